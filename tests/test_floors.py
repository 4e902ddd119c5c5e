"""Floors (lafs.eval.floors, ``lafs eval --floors``): hand-computed raw-pixel accuracies, PCA whitening of data with a
known covariance, errors that name the problem, and the eval.json floors block of a tiny checkpoint."""

import json

import cv2
import numpy as np
import pytest
import torch
from test_eval_cli import _pool_model, run_eval, setup  # noqa: F401  (setup: the tiny checkpoint and toy.bin)

from lafs.config import load_config
from lafs.data.pairs import load_bin
from lafs.data.recordio import write_face_records
from lafs.data.synthetic import SyntheticFaces
from lafs.eval import report
from lafs.eval.embedding import evaluate_pairs
from lafs.eval.floors import (
    PCAWhitening,
    floor_accuracies,
    floors_for_sets,
    raw_pixel_embeddings,
    subsample_indices,
)


def symmetric_images(n: int, seed: int = 0, size: int = 2) -> torch.Tensor:
    """n uint8 3 x size x size images equal to their horizontal flip (the flip test then only doubles them)."""
    rng = np.random.default_rng(seed)
    half = rng.integers(0, 256, (n, 3, size, (size + 1) // 2), dtype=np.uint8)
    return torch.from_numpy(np.concatenate([half, half[..., : size // 2][..., ::-1]], axis=3).copy())


def interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pair k = images 2k, 2k+1."""
    return torch.stack([first, second], dim=1).flatten(0, 1)


# ---- (a) raw pixels, by hand ----

def test_raw_pixel_embeddings_are_the_model_input_range():
    img = torch.tensor([[[0, 255], [255, 0]]] * 3, dtype=torch.uint8)[None]  # 1 x 3 x 2 x 2
    e = raw_pixel_embeddings(img)
    assert e.dtype == np.float64 and e.shape == (1, 12)
    np.testing.assert_array_equal(e[0, :4], [-1.0, 1.0, 1.0, -1.0])
    # area downsampling to 1 x 1: the mean of the four pixels, per channel
    np.testing.assert_allclose(raw_pixel_embeddings(img, size=1), [[0.0, 0.0, 0.0]], atol=1e-15)


@pytest.mark.parametrize("flip", [False, True])
def test_raw_pixel_floor_hand_computed(flip):
    a = symmetric_images(10, seed=1)
    # perfect separation: genuine pairs are (A, A), cosine 1, distance 0; impostors (A, 255 - A), whose model-range
    # vector is -A's: cosine -1, distance 4. Every fold's threshold (the first grid point 0.01) is then right.
    issame = np.arange(10) % 2 == 0
    second = torch.where(torch.from_numpy(issame)[:, None, None, None], a, 255 - a)
    r = floor_accuracies(interleave(a, second), issame, flip=flip)["raw_pixels"]
    assert r["accuracy"] == 1.0 and r["std"] == 0.0 and r["auc"] == 1.0 and "cosines" not in r
    # scores=True: the per-pair cosines the floor was scored on (for ROC pictures)
    cos = floor_accuracies(interleave(a, second), issame, flip=flip, scores=True)["raw_pixels"]["cosines"]
    np.testing.assert_allclose(cos, np.where(issame, 1.0, -1.0), atol=1e-6)
    # no separation at all: every pair is (A, A), half labelled different. Leave-one-out (10 folds of 1 pair) learns
    # the majority of the 9 other pairs, which is always the opposite label: 0 %. One fold on all pairs: 50 %.
    same = interleave(a, a)
    assert floor_accuracies(same, issame, flip=flip)["raw_pixels"]["accuracy"] == 0.0
    assert floor_accuracies(same, issame, flip=flip, nfolds=1)["raw_pixels"]["accuracy"] == 0.5
    # partial: distances 0 (genuine), 4 (genuine), 4, 4 (impostors): the best threshold in (0, 4] gets 3 of 4
    b = a[:4]
    second = torch.stack([b[0], 255 - b[1], 255 - b[2], 255 - b[3]])
    r = floor_accuracies(interleave(b, second), [True, True, False, False], flip=flip, nfolds=1)["raw_pixels"]
    assert r["accuracy"] == 0.75 and r["auc"] == pytest.approx(0.75)  # ties count half: (1 + 0.5) / 2


# ---- (b) PCA whitening on a known covariance ----

def known_covariance_images(n: int, size: int, seed: int = 0):
    """uint8 images = 128 + 25 g u + 3 noise (pixels), u a random unit direction: the top principal direction."""
    rng = np.random.default_rng(seed)
    d = 3 * size * size
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    x = 128 + 25 * rng.normal(size=(n, 1)) * u + 3 * rng.normal(size=(n, d))
    return torch.from_numpy(np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(n, 3, size, size)), u


@pytest.mark.parametrize("size,components", [(2, 4), (8, 5)])  # (8, 5): q = 15 of 192 dims, the randomized path
def test_pca_whitening_known_covariance(size, components):
    images, u = known_covariance_images(3000, size)
    pca = PCAWhitening().fit(images, components=components, size=size)
    assert pca.n_images == 3000 and pca.components == components and pca.directions.shape == (3 * size**2, components)
    y = pca.transform(images)
    assert y.dtype == np.float64 and y.shape == (3000, components)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)  # the mean is removed
    np.testing.assert_allclose(np.cov(y.T), np.eye(components), atol=1e-3)  # whitened: identity covariance
    expected_mean = images.double().flatten(1).mean(0) / 127.5 - 1
    np.testing.assert_allclose(pca.mean.numpy(), expected_mean.numpy(), atol=1e-5)
    assert abs(float(pca.directions[:, 0].double() @ torch.from_numpy(u))) > 0.999  # the known top direction
    sv = pca.singular_values.numpy()
    assert np.all(np.diff(sv) <= 0) and sv[0] > 5 * sv[1]  # descending, the dominant one far ahead
    # any input size: a 2x nearest-neighbour upsampling is area-downsampled back to the very same pixels
    big = images[:50].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    np.testing.assert_allclose(pca.transform(big), y[:50], atol=1e-5)


def test_pca_fit_subsamples_with_its_seed():
    images, _ = known_covariance_images(400, 2, seed=1)
    idx = subsample_indices(400, 100, seed=7)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    a = PCAWhitening().fit(images, components=3, size=2, max_images=100, seed=7)
    b = PCAWhitening().fit(images[torch.from_numpy(idx)], components=3, size=2, seed=7)
    assert a.n_images == 100
    torch.testing.assert_close(a.mean, b.mean)
    np.testing.assert_allclose(a.transform(images), b.transform(images), atol=1e-9)


# ---- (c) errors name the problem ----

def test_errors_name_the_problem(tmp_path):
    good = symmetric_images(8, size=4)
    with pytest.raises(ValueError, match="uint8 N x 3 x H x W"):
        raw_pixel_embeddings(good.float())
    with pytest.raises(ValueError, match="PCA fit images must be a uint8 N x 3 x H x W tensor, got torch.uint8 "
                                         r"\(8, 4, 4\)"):
        PCAWhitening().fit(good[:, 0])
    with pytest.raises(ValueError, match="256 components needs more than 256 fit images, got 8"):
        PCAWhitening().fit(good)
    with pytest.raises(ValueError, match="13 components exceed the 12 dimensions of 3 x 2 x 2"):
        PCAWhitening().fit(symmetric_images(20), components=13, size=2)
    with pytest.raises(ValueError, match="all identical"):
        PCAWhitening().fit(good[:1].repeat(8, 1, 1, 1), components=2, size=2)
    with pytest.raises(ValueError, match="before fit"):
        PCAWhitening().transform(good)
    with pytest.raises(ValueError, match="7 images for 3 pairs"):
        floor_accuracies(good[:7], [True, False, True])
    with pytest.raises(ValueError, match="set 'lfw': 8 images for 3 pairs"):
        floors_for_sets({"lfw": (good, [True, False, True])})
    with pytest.raises(ValueError, match="set 'x': expected"):
        floors_for_sets({"x": good})
    np.save(tmp_path / "hwc.npy", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"hwc\.npy: PCA fit images must be uint8 N x 3 x H x W"):
        report.load_fit_images([tmp_path / "hwc.npy"])
    (tmp_path / "fit.txt").write_text("x")
    with pytest.raises(ValueError, match=r"fit\.txt: PCA fit images must be a \.rec"):
        report.load_fit_images([tmp_path / "fit.txt"])
    with pytest.raises(FileNotFoundError, match="missing.rec not found"):
        report.load_fit_images([tmp_path / "missing.rec"])


# ---- (d) an untrained "network" that returns the raw pixels is the raw-pixel floor ----

@pytest.mark.parametrize("flip_mode", ["sum", "concat"])
def test_identity_untrained_network_equals_raw_pixels(flip_mode):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (20, 3, 6, 6), dtype=np.uint8)
    # second images: the first plus noise (genuine) or another image (impostor), so accuracies are neither 0 nor 1
    issame = rng.random(20) < 0.5
    noise = rng.normal(0, 60, base.shape)
    other = np.roll(base, 1, axis=0)
    second = np.where(issame[:, None, None, None], np.clip(base + noise, 0, 255), other).astype(np.uint8)
    images = interleave(torch.from_numpy(base), torch.from_numpy(second))
    fit = torch.from_numpy(rng.integers(0, 256, (60, 3, 6, 6), dtype=np.uint8))
    r = floor_accuracies(images, issame, fit, lambda x: x.flatten(1), size=6, components=10, flip_mode=flip_mode)
    assert set(r) == {"raw_pixels", "pca_whitened", "untrained", "settings"}
    assert r["untrained"]["accuracy"] == r["raw_pixels"]["accuracy"]
    assert r["untrained"]["fold_accuracies"] == r["raw_pixels"]["fold_accuracies"]
    assert r["untrained"]["auc"] == pytest.approx(r["raw_pixels"]["auc"], abs=1e-12)
    assert 0.0 < r["raw_pixels"]["accuracy"] < 1.0
    assert r["settings"] == {"raw_size": 6, "size": 6, "components": 10, "fit_images": 60, "flip": True,
                             "flip_mode": flip_mode, "nfolds": 10, "thresholds": None}
    # the PCA floor is the same as raw pixels mapped by the fitted PCA, through the untrained path
    pca = PCAWhitening().fit(fit, components=10, size=6)
    via_fn = evaluate_pairs(lambda x: torch.from_numpy(pca.transform(((x + 1) * 127.5).round().to(torch.uint8))),
                            images, issame, flip_mode=flip_mode)
    assert via_fn["accuracy"] == r["pca_whitened"]["accuracy"]
    # floors_for_sets: one PCA for every set, the same numbers per set
    both = floors_for_sets({"a": (images, issame), "b": (images[:20], issame[:10], None)}, fit,
                           lambda x: x.flatten(1), size=6, components=10, flip_mode=flip_mode)
    assert both["a"]["pca_whitened"]["accuracy"] == r["pca_whitened"]["accuracy"]
    assert both["b"]["settings"]["fit_images"] == 60 and set(both["b"]) == set(r)


# ---- fit images from files ----

def test_fit_images_from_a_rec_npy_and_bin(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)  # H x W x 3 RGB
    rec = tmp_path / "train.rec"
    write_face_records(rec, ((i // 2, cv2.imencode(".png", im[:, :, ::-1])[1].tobytes()) for i, im in enumerate(imgs)))
    chw = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    expected = torch.nn.functional.avg_pool2d(chw.float(), 2).round().to(torch.uint8)  # area 8 -> 4 px
    got, desc = report.load_fit_images([rec], size=4)
    torch.testing.assert_close(got, expected)
    assert "6 of 6 images" in desc and "train.rec" in desc
    np.save(tmp_path / "fit.npy", chw.numpy())
    got, _ = report.load_fit_images([tmp_path / "fit.npy", rec], size=4, max_images=5, seed=1)
    torch.testing.assert_close(got, torch.cat([expected, expected])[torch.from_numpy(subsample_indices(12, 5, 1))])


def test_floor_context_fits_on_the_runs_training_records(tmp_path, monkeypatch):
    imgs = np.random.default_rng(1).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    rec = tmp_path / "train.rec"
    write_face_records(rec, ((i // 4, cv2.imencode(".png", im)[1].tobytes()) for i, im in enumerate(imgs)))
    cfg = load_config(None, ["data.source=records", f"data.train=[{rec}]", "model.size=micro", "train.seed=3"])
    monkeypatch.setattr(report, "checkpoint_config", lambda path: (cfg, ""))
    ctx = report.floor_context("run.pt", "abc", size=8, components=4)
    assert ctx["notes"] == [] and ctx["pca"].n_images == 20 and "the run's data.train" in ctx["fit"]
    assert "untrained (torch.manual_seed(3))" in ctx["untrained"].description
    # the same seed builds the same network: the untrained floor is reproducible
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    again = report.untrained_embedder(cfg, "abc")
    with torch.no_grad():
        torch.testing.assert_close(ctx["untrained"](x), again(x))
    cfg.data.train = [str(tmp_path / "elsewhere.rec")]
    ctx = report.floor_context("run.pt", "abc", size=8, components=4)
    assert ctx["pca"] is None and "elsewhere.rec is not on this machine" in ctx["notes"][0]


def test_floors_see_the_sets_in_the_models_geometry(setup, tmp_path):  # noqa: F811
    _, _, bin_path = setup  # 112 px ArcFace crops
    ctx = {"pca": None, "fit": None, "untrained": None, "notes": [], "geometry": "celeba64",
           "settings": {"size": 32, "components": 256, "max_images": 20000}}
    floors = report.floors_report(ctx, [bin_path])
    # a model trained on celeba64 crops sees each set warped to that geometry at 64 px; so do its floors
    assert floors["settings"]["raw_size"] == 64 and floors["settings"]["geometry"] == "celeba64"
    images, _ = report.set_in_geometry(load_bin(bin_path)[0], None, bin_path, "celeba64", log=lambda note: None)
    direct = floor_accuracies(images, load_bin(bin_path)[1])["raw_pixels"]
    assert floors["sets"]["toy"]["raw_pixels"]["accuracy"] == direct["accuracy"]


# ---- (e) lafs eval --floors ----

def test_eval_floors_block(setup, tmp_path, capsys):  # noqa: F811
    _, ckpt, bin_path = setup
    faces = SyntheticFaces(40, seed=3)
    fit, _ = faces.batch(list(range(20)) * 3, [5] * 20 + [6] * 20 + [7] * 20)  # training identities, unlabelled
    np.save(tmp_path / "fit.npy", np.ascontiguousarray(fit.transpose(0, 3, 1, 2)))
    cache = tmp_path / "cache"
    args = [str(ckpt), "--sets", str(bin_path), "--floors", "--floor-fit", str(tmp_path / "fit.npy"),
            "--floor-components", "16", "--cache", str(cache)]
    code, out = run_eval(args + ["--out", str(tmp_path / "a")], capsys)
    assert code == 0, out.err
    for label in ("floor: raw pixels", "floor: PCA-whitened", "floor: untrained net"):
        assert label in out.out
    doc = json.loads((tmp_path / "a" / "eval.json").read_text())
    floors = doc["floors"]["sets"]["toy"]
    assert set(floors) == {"raw_pixels", "pca_whitened", "untrained"}
    for r in floors.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["std"] <= 1.0 and 0.0 <= r["auc"] <= 1.0
    s = doc["floors"]["settings"]
    assert (s["components"], s["size"], s["fit_images"], s["raw_size"]) == (16, 32, 60, 112)
    assert "fit.npy" in doc["floors"]["fit"] and "seed(0)" in doc["floors"]["untrained"]
    # the same numbers as the library on the same images: raw pixels, and the seeded untrained twin
    images, issame = load_bin(bin_path)
    assert floors["raw_pixels"]["accuracy"] == floor_accuracies(images, issame)["raw_pixels"]["accuracy"]
    cfg, _ = report.checkpoint_config(ckpt)
    twin = evaluate_pairs(report.untrained_embedder(cfg), images, issame)
    assert floors["untrained"]["accuracy"] == twin["accuracy"]
    assert floors["untrained"]["auc"] == pytest.approx(twin["auc"], abs=1e-6)
    assert len(list(cache.glob("toy-*.npz"))) == 2  # the model's and the untrained network's embeddings

    # without --floor-fit: the synthetic run has no training files, so no PCA floor, and the output says why
    code, out = run_eval([str(ckpt), "--sets", str(bin_path), "--floors", "--cache", str(cache), "--out",
                          str(tmp_path / "b")], capsys)
    assert code == 0, out.err
    assert "no PCA-whitened floor" in out.out and "data.source=synthetic" in out.out
    doc = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert set(doc["floors"]["sets"]["toy"]) == {"raw_pixels", "untrained"}
    assert doc["floors"]["sets"]["toy"]["untrained"] == floors["untrained"]  # cached embeddings, same numbers
    # without --floors nothing changes: no floors block, no floor rows
    code, out = run_eval([str(ckpt), "--sets", str(bin_path), "--cache", str(cache), "--out", str(tmp_path / "c")],
                         capsys)
    assert code == 0 and "floor: " not in out.out and "floors (" not in out.out
    assert "floors" not in json.loads((tmp_path / "c" / "eval.json").read_text())


def test_eval_floors_errors_and_embeddings(setup, tmp_path, capsys):  # noqa: F811
    _, ckpt, bin_path = setup
    model = _pool_model(tmp_path / "pool.pt")
    code, out = run_eval([str(model), "--identification", str(tmp_path / "none"), "--floors"], capsys)
    assert code == 2 and "--floors scores .bin pair sets" in out.err
    code, out = run_eval([str(ckpt), "--sets", str(bin_path), "--floors", "--floor-fit", str(bin_path), "--no-cache"],
                         capsys)
    assert code == 2 and f"--floor-fit {bin_path}" in out.err and "256 components needs more than 256" in out.err
    # precomputed embeddings: no model, so no untrained floor (said), but pixels and PCA floors
    emb = np.random.default_rng(0).normal(size=(80, 8)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    code, out = run_eval(["--embeddings", str(tmp_path / "emb.npy"), "--pairs", str(bin_path), "--floors",
                          "--floor-fit", str(bin_path), "--floor-components", "8", "--out", str(tmp_path / "e")],
                         capsys)
    assert code == 0, out.err
    assert "no untrained-network floor: no model file" in out.out
    doc = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert set(doc["floors"]["sets"]["toy"]) == {"raw_pixels", "pca_whitened"}
    # a TorchScript model has no run config: no untrained floor, said so
    code, out = run_eval([str(model), "--sets", str(bin_path), "--floors", "--no-cache"], capsys)
    assert code == 0, out.err
    assert "no untrained-network floor: pool.pt is not a lafs checkpoint" in out.out
