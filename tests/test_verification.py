"""ROC AUC against hand-counted values; the 10-fold .bin protocol against hand counts, a loop reference and real LFW."""

import time
import warnings

import cv2
import numpy as np
import pytest
import torch

from lafs.data.pairs import load_bin, write_bin
from lafs.eval.embedding import embed_images, evaluate_bin, evaluate_pairs
from lafs.eval.metrics import CoarseThresholdGridWarning, fold_ids, roc_auc, ten_fold_accuracy


def test_roc_auc_by_hand():
    # genuine 0.9, 0.4; impostor 0.5, 0.1: 3 of 4 genuine-impostor orderings are right.
    assert roc_auc([0.9, 0.5, 0.4, 0.1], [True, False, True, False]) == 0.75
    # one tie between a genuine and an impostor score counts half: (1 + 0.5) / 2.
    assert roc_auc([0.7, 0.3, 0.3], [True, True, False]) == 0.75
    assert roc_auc([1.0, 0.0], [True, False]) == 1.0 and roc_auc([0.0, 1.0], [True, False]) == 0.0


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    same = rng.random(300) < 0.4
    diff = scores[same][:, None] - scores[~same][None, :]
    assert roc_auc(scores, same) == pytest.approx((diff > 0).mean() + 0.5 * (diff == 0).mean(), abs=1e-15)
    scores[:7] = -np.inf  # NaN-embedding pairs reach it as -inf: ordinary (tied) lowest values
    with np.errstate(invalid="ignore"):  # -inf - -inf
        diff = scores[same][:, None] - scores[~same][None, :]
    ties = scores[same][:, None] == scores[~same][None, :]
    assert roc_auc(scores, same) == pytest.approx((diff > 0).mean() + 0.5 * ties.mean(), abs=1e-15)
    with pytest.raises(ValueError, match="genuine and impostor"):
        roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="1 scores are NaN"):
        roc_auc([0.1, np.nan], [True, False])


# --- 10-fold protocol -------------------------------------------------------------------------------------------------

def _pairs_at(dists):
    """Unit-vector pairs whose squared distance is exactly ``dists`` (up to rounding): cos = 1 - d / 2."""
    c = 1.0 - np.asarray(dists, np.float64) / 2.0
    e1 = np.tile([1.0, 0.0], (len(c), 1))
    return e1, np.stack([c, np.sqrt(1.0 - c**2)], axis=1)


def test_ten_fold_by_hand():
    # 2 folds of 5 pairs. Fold 0: genuine 0.2 0.4 1.0, impostor 2.0 3.0; fold 1: genuine 0.3 1.2 2.2, impostor 1.0 3.5.
    # Test fold 0: on fold 1, t=0.5/1.5/2.5 get 3/3/4 right -> 2.5 -> fold 0 gets 4/5 (impostor 2.0 accepted).
    # Test fold 1: on fold 0, t=0.5/1.5/2.5 get 4/5/4 right -> 1.5 -> fold 1 gets 3/5 (2.2 rejected, 1.0 accepted).
    e1, e2 = _pairs_at([0.2, 0.4, 1.0, 2.0, 3.0, 0.3, 1.2, 2.2, 1.0, 3.5])
    same = [True, True, True, False, False] * 2
    r = ten_fold_accuracy(e1, e2, same, nfolds=2, thresholds=[2.5, 0.5, 1.5])  # sorted internally
    assert r["fold_thresholds"] == [2.5, 1.5]
    assert r["fold_accuracies"] == pytest.approx([0.8, 0.6])
    assert r["accuracy"] == pytest.approx(0.7) and r["accuracy_std"] == pytest.approx(0.1)
    assert r["threshold"] == pytest.approx(2.0)
    # Without 2.5, test fold 0 sees a tie (3/5 at 0.5 and 1.5): the smallest threshold wins -> fold 0 gets 4/5.
    r = ten_fold_accuracy(e1, e2, same, nfolds=2, thresholds=[0.5, 1.5])
    assert r["fold_thresholds"] == [0.5, 1.5] and r["fold_accuracies"] == pytest.approx([0.8, 0.6])
    # Genuine-impostor orderings (6 x 4): 2.2 > 2.0, 2.2 > 1.0, 1.2 > 1.0 wrong and the 1.0 / 1.0 tie counts half.
    assert r["auc"] == pytest.approx(1 - 3.5 / 24)


def test_ten_fold_perfect_separation_and_contiguous_folds():
    rng = np.random.default_rng(1)
    e1 = rng.normal(size=(200, 16))
    same = np.arange(200) % 2 == 0
    noise = 0.01 * rng.normal(size=e1.shape)
    e2 = np.where(same[:, None], e1 + noise, -e1 + noise)  # genuine distance ~0, impostor ~4
    r = ten_fold_accuracy(e1 * 3.0, e2, same)  # scale does not matter: embeddings are normalised
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0 and r["auc"] == 1.0
    assert r["val_at_far"] == 1.0 and r["far"] == 0.0 and len(r["fold_accuracies"]) == 10
    # 20 pairs, 10 folds of 2: only pair 6 is wrong (a far genuine pair), so only fold 3 = pairs 6, 7 drops to 1/2.
    dists = np.where(np.arange(20) % 2 == 0, 0.2, 3.0)
    dists[6] = 3.5
    r = ten_fold_accuracy(*_pairs_at(dists), np.arange(20) % 2 == 0)
    assert r["fold_accuracies"] == pytest.approx([1.0] * 3 + [0.5] + [1.0] * 6)
    assert r["accuracy"] == pytest.approx(0.95)
    # nfolds=1 (insightface LFold): the threshold is chosen and tested on all pairs.
    assert ten_fold_accuracy(*_pairs_at(dists), np.arange(20) % 2 == 0, nfolds=1)["fold_accuracies"] == [0.95]
    # sklearn KFold(shuffle=False) sizes: the first n % k folds are one longer.
    assert np.bincount(fold_ids(23, 10)).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert (np.diff(fold_ids(23, 10)) >= 0).all()
    with pytest.raises(ValueError, match="nfolds"):
        fold_ids(5, 10)


def test_coarse_reference_grid_is_flagged():
    # Every distance lies between the grid points 0.01 and 0.02: the reference grid accepts all pairs or none (50 %)
    # although genuine (0.0103) and impostor (0.0107) pairs separate perfectly; the exact grid finds that.
    same = np.arange(40) % 2 == 0
    pairs = _pairs_at(np.where(same, 0.0103, 0.0107))
    with pytest.warns(CoarseThresholdGridWarning, match=r"right on 50\.00% of the pairs, the exact one on 100\.00%"):
        r = ten_fold_accuracy(*pairs, same)
    assert r["accuracy"] == 0.5 and r["auc"] == 1.0 and r["coarse_grid"] is True
    exact = ten_fold_accuracy(*pairs, same, thresholds="exact")
    assert exact["accuracy"] == 1.0 and exact["coarse_grid"] is False
    # spread-out distances: the grid's best is the exact best, nothing to flag
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoarseThresholdGridWarning)
        spread = ten_fold_accuracy(*_pairs_at(np.where(same, 0.4, 1.6)), same)
    assert spread["accuracy"] == 1.0 and spread["coarse_grid"] is False


def _reference(e1, e2, same, nfolds, thresholds, val_thresholds, far_target=1e-3):
    """insightface calculate_roc / calculate_val with explicit loops (largest threshold with train FAR <= target)."""
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum(np.square(e1 - e2), 1)
    accs, best, vals, fars = [], [], [], []
    for test in np.array_split(np.arange(len(same)), nfolds):
        train = np.setdiff1d(np.arange(len(same)), test)

        def acc(t, idx):
            return np.mean(np.less(dist[idx], t) == same[idx])

        acc_train = [acc(t, train) for t in thresholds]
        b = thresholds[int(np.argmax(acc_train))]
        best.append(b)
        accs.append(acc(b, test))
        far_train = [np.mean(dist[train][~same[train]] < t) for t in val_thresholds]
        t = max(v for v, f in zip(val_thresholds, far_train) if f <= far_target)
        vals.append(np.mean(dist[test][same[test]] < t))
        fars.append(np.mean(dist[test][~same[test]] < t))
    return np.mean(accs), np.std(accs), np.mean(best), accs, np.mean(vals), np.mean(fars)


@pytest.mark.parametrize("n, nfolds", [(600, 10), (437, 7)])
def test_ten_fold_matches_loop_reference(n, nfolds):
    rng = np.random.default_rng(n)
    e1 = rng.normal(size=(n, 32)).astype(np.float32)
    same = rng.random(n) < 0.5
    e2 = np.where(same[:, None], e1 + 1.3 * rng.normal(size=e1.shape), rng.normal(size=e1.shape)).astype(np.float32)
    thresholds, val_thresholds = np.arange(0, 4, 0.01), np.arange(0, 4, 0.004)
    r = ten_fold_accuracy(e1, e2, same, nfolds=nfolds, val_thresholds=val_thresholds)
    acc, std, thr, accs, val, far = _reference(e1, e2, same, nfolds, thresholds, val_thresholds)
    assert 0.6 < r["accuracy"] < 0.99  # overlapping classes: the threshold choice matters
    assert r["fold_accuracies"] == pytest.approx(accs) and r["accuracy"] == pytest.approx(acc)
    assert r["accuracy_std"] == pytest.approx(std) and r["threshold"] == pytest.approx(thr)
    assert r["val_at_far"] == pytest.approx(val) and r["far"] == pytest.approx(far)
    assert 0.0 < r["val_at_far"] < 1.0 and 0.0 <= r["far"] < 0.02  # test FAR near the 1e-3 target
    cos = np.sum(e1 * e2, 1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(e2, axis=1)
    assert r["auc"] == pytest.approx(roc_auc(cos, same))  # -dist = 2 cos - 2 ranks pairs like cos


# --- embedding --------------------------------------------------------------------------------------------------------


def _linear(h=4, w=5, d=3, seed=0):
    weight = torch.randn(d, 3 * h * w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    seen = []

    def fn(x):
        seen.append((len(x), float(x.min()), float(x.max())))
        return (x.double().flatten(1) @ weight.T).float()

    return fn, weight, seen


def test_embed_images_scales_every_batch_and_adds_flip():
    images = torch.randint(0, 256, (10, 3, 4, 5), dtype=torch.uint8)
    images[0] = 0
    images[9] = 255  # last image, in the last (partial) batch
    fn, weight, seen = _linear()
    x = images.double() / 127.5 - 1.0
    plain = x.flatten(1) @ weight.T
    flipped = x.flip(3).flatten(1) @ weight.T  # weight is not mirror-symmetric, so this differs from `plain`
    out = embed_images(fn, images, batch_size=4, flip=False)
    assert out.dtype == torch.float32 and out.shape == (10, 3) and not out.requires_grad
    assert torch.allclose(out.double(), plain, atol=1e-5)
    assert [s[0] for s in seen] == [4, 4, 2]
    assert seen[0][1] == -1.0 and seen[-1][2] == 1.0  # every batch, the partial one included, is in [-1, 1]
    # an image's embedding does not depend on whether it falls in a full or a partial batch
    assert torch.equal(embed_images(fn, images, batch_size=10, flip=False)[8:], out[8:])
    with_flip = embed_images(fn, images, batch_size=3)
    assert torch.allclose(with_flip.double(), plain + flipped, atol=1e-5)
    assert not torch.allclose(plain, flipped, atol=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        embed_images(fn, images.float())


@pytest.mark.parametrize("training", [True, False])
def test_embed_images_leaves_model_mode_alone(training):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8), torch.nn.Dropout(0.5))
    model.train(training)
    out = embed_images(model, torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8), batch_size=2)
    assert model.training is training and all(m.training is training for m in model.modules())
    assert out.shape == (5, 8) and not out.requires_grad


# --- .bin files -------------------------------------------------------------------------------------------------------


def _png(rgb):
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))  # lossless; cv2 encodes BGR arrays
    assert ok
    return buf.tobytes()


def test_load_bin_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    path = write_bin(tmp_path / "toy.bin", [_png(im) for im in rgb], [True, False, True])
    images, issame = load_bin(path)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 12, 10)
    assert np.array_equal(images.numpy(), rgb.transpose(0, 3, 1, 2)) and issame.tolist() == [True, False, True]
    assert np.array_equal(load_bin(path, color="bgr")[0].numpy(), rgb[..., ::-1].transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"toy\.bin: image 0 is 10x12, expected 16x16"):
        load_bin(path, image_size=16)

    encoded = [_png(im) for im in rgb]
    encoded[3] = b"\xff\xd8 not a jpeg"
    bad = write_bin(tmp_path / "corrupt.bin", encoded, [True] * 3)
    with pytest.raises(ValueError, match=r"corrupt\.bin: image 3: cannot decode"):
        load_bin(bad)
    encoded[3] = _png(rgb[3][:8])
    bad = write_bin(tmp_path / "sizes.bin", encoded, [True] * 3)
    with pytest.raises(ValueError, match=r"sizes\.bin: image 3 is 10x8, expected 10x12"):
        load_bin(bad)


def test_evaluate_bin_end_to_end(tmp_path):
    # genuine pairs are the same image, impostor pairs two random ones: raw pixels separate them perfectly.
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    issame = np.arange(20) % 2 == 0
    rgb[1::2][issame] = rgb[0::2][issame]
    path = write_bin(tmp_path / "pairs.bin", [_png(im) for im in rgb], issame)
    r = evaluate_bin(lambda x: x.flatten(1), path, batch_size=7)
    assert r["name"] == "pairs" and r["pairs"] == 20
    assert r["accuracy"] == 1.0 and r["auc"] == 1.0 and len(r["fold_accuracies"]) == 10
    images, _ = load_bin(path)
    assert evaluate_pairs(lambda x: x.flatten(1), images, issame, nfolds=5)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="40 images for 19 pairs"):
        evaluate_pairs(lambda x: x.flatten(1), images, issame[:19])


# --- real data --------------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_lfw_bin_raw_pixel_baseline(shared_data):
    path = shared_data / "lfw" / "lfw.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found: the real LFW pairs are needed for this test")
    start = time.perf_counter()
    images, issame = load_bin(path)
    loaded = time.perf_counter() - start
    assert images.shape == (12000, 3, 112, 112) and images.dtype == torch.uint8
    assert issame.shape == (6000,) and issame.sum() == 3000
    # Every third pair (2,000, each fold still mixed) and pixels at stride 4, to keep the test to a few seconds.
    keep = np.arange(0, 6000, 3)
    subset = images[np.stack([2 * keep, 2 * keep + 1], 1).ravel()]
    r = evaluate_pairs(lambda x: x[:, :, ::4, ::4].flatten(1), subset, issame[keep])
    print(f"\nlfw.bin: loaded in {loaded:.1f}s; raw pixels, {len(keep)} pairs: accuracy {r['accuracy']:.4f} "
          f"± {r['accuracy_std']:.4f}, AUC {r['auc']:.4f}, VAL@FAR=1e-3 {r['val_at_far']:.4f}")
    assert 0.55 < r["accuracy"] < 0.85


# --- extra metrics, threshold grids, flip modes -----------------------------------------------------------------------

from lafs.eval.metrics import pair_distances, reference_thresholds, verification_metrics  # noqa: E402


def _overlapping(n, seed, dim=32, noise=1.3, rounding=None):
    rng = np.random.default_rng(seed)
    e1 = rng.normal(size=(n, dim))
    same = rng.random(n) < 0.5
    e2 = np.where(same[:, None], e1 + noise * rng.normal(size=e1.shape), rng.normal(size=e1.shape))
    dist = pair_distances(e1, e2)
    if rounding is not None:  # many exact ties, genuine and impostor alike
        dist = np.round(dist, rounding)
    return e1, e2, same, dist


def _loop_metrics(dist, same, grid, far_targets):
    """Plain loops: accuracy at every threshold of ``grid``; ROC at every distinct distance (plus accept-all)."""
    gen, imp = dist[same], dist[~same]
    accs = [np.mean((dist < t) == same) for t in grid]
    best = int(np.argmax(accs))
    points = []  # (FAR, FRR), threshold ascending
    for t in list(np.unique(dist)) + [np.inf]:
        points.append((np.mean(imp < t), np.mean(gen >= t)))
    eer = None
    for (f0, r0), (f1, r1) in zip(points[:-1], points[1:]):
        if f0 - r0 < 0 <= f1 - r1:  # the polyline crosses FAR = FRR on this segment
            a = (r0 - f0) / ((f1 - f0) - (r1 - r0))
            eer = f0 + a * (f1 - f0)
            break
    tar = {}
    for target in far_targets:
        best_tar = 0.0
        for t in list(np.unique(dist)) + [np.inf]:
            if np.sum(imp < t) / len(imp) <= target:
                best_tar = max(best_tar, np.mean(gen < t))
        tar[target] = best_tar
    return grid[best], accs[best], eer, tar


def _exact_candidates(dist):
    u = np.unique(dist)
    return np.concatenate([[u[0]], (u[:-1] + u[1:]) / 2, [np.nextafter(u[-1], np.inf)]])


@pytest.mark.parametrize("seed, rounding", [(0, None), (1, 2), (2, 1)])
def test_verification_metrics_match_loops(seed, rounding):
    _, _, same, dist = _overlapping(700, seed, rounding=rounding)
    targets = (1e-3, 1e-2, 0.05, 0.5)
    for grid_name, grid in (("exact", _exact_candidates(dist)), ("reference", reference_thresholds())):
        m = verification_metrics(dist, same, thresholds=grid_name, far_targets=targets)
        thr, acc, eer, tar = _loop_metrics(dist, same, grid, targets)
        assert m["best_threshold"] == pytest.approx(thr, abs=1e-12)
        assert abs(m["best_accuracy"] - acc) <= 1e-12
        assert abs(m["eer"] - eer) <= 1e-12
        for t in targets:
            assert abs(m["tar_at_far"][t] - tar[t]) <= 1e-12
            assert m["tar_far"][t] <= t
            assert m["tar_far"][t] == np.mean(dist[~same] < m["tar_threshold"][t])
    assert 0.6 < m["best_accuracy"] < 0.99 and 0.01 < m["eer"] < 0.4
    assert m["auc"] == roc_auc(-dist, same)
    # an explicit grid = the same loop over that grid
    grid = np.linspace(0.5, 3.5, 37)
    m = verification_metrics(dist, same, thresholds=grid[::-1])
    thr, acc, _, _ = _loop_metrics(dist, same, grid, ())
    assert m["best_threshold"] == thr and abs(m["best_accuracy"] - acc) <= 1e-12


def test_verification_metrics_similarity_mirrors_distance():
    _, _, same, dist = _overlapping(500, 3, rounding=2)
    sim = 1.0 - dist / 2.0  # exactly representable flip of the order, ties kept
    md = verification_metrics(dist, same)
    ms = verification_metrics(sim, same, kind="similarity")
    for key in ("best_accuracy", "eer", "auc"):
        assert ms[key] == pytest.approx(md[key], abs=1e-12)
    assert ms["tar_at_far"] == md["tar_at_far"] and ms["tar_far"] == md["tar_far"]
    # similarity thresholds: accept sim > t, and t reproduces the reported accuracy and FAR
    assert np.mean((sim > ms["best_threshold"]) == same) == ms["best_accuracy"]
    for t, thr in ms["tar_threshold"].items():
        assert np.mean(sim[~same] > thr) == ms["tar_far"][t] and np.mean(sim[same] > thr) == ms["tar_at_far"][t]


def test_verification_metrics_by_hand():
    # genuine 0.1 0.2 0.6, impostor 0.5 0.9 1.0 1.2 (distances)
    dist = np.array([0.1, 0.2, 0.6, 0.5, 0.9, 1.0, 1.2])
    same = np.array([True, True, True, False, False, False, False])
    m = verification_metrics(dist, same, far_targets=(0.0, 0.25, 0.3, 1.0))
    # best: accept 0.1, 0.2 (and reject the rest) or accept all of 0.1..0.6: 6/7 both; the smaller threshold wins
    assert m["best_accuracy"] == 6 / 7 and m["best_threshold"] == pytest.approx(0.35)
    # FAR 0: t = 0.5 (the smallest impostor), TAR 2/3; FAR 0.25 / 0.3 allow one impostor: t = 0.9, TAR 1
    assert m["tar_at_far"] == {0.0: 2 / 3, 0.25: 1.0, 0.3: 1.0, 1.0: 1.0}
    assert m["tar_threshold"][0.0] == 0.5 and m["tar_threshold"][0.25] == 0.9 and m["tar_threshold"][1.0] == np.inf
    assert m["tar_far"] == {0.0: 0.0, 0.25: 0.25, 0.3: 0.25, 1.0: 1.0}
    # ROC points (FAR, FRR): ... (0, 1/3) at t=0.5, (1/4, 1/3) at t=0.6, (1/4, 0) at t=0.9: FAR = FRR at 1/4.
    assert m["eer"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="genuine and impostor"):
        verification_metrics([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        verification_metrics([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="kind"):
        verification_metrics(dist, same, kind="cosine")
    with pytest.raises(ValueError, match="squared-distance grid"):
        verification_metrics(dist, same, kind="similarity", thresholds="reference")
    with pytest.raises(ValueError, match="'reference', 'exact'"):
        verification_metrics(dist, same, thresholds="fine")
    with pytest.raises(ValueError, match=r"FAR targets must be in \[0, 1\]"):
        verification_metrics(dist, same, far_targets=(2.0,))
    with pytest.raises(ValueError, match="7 scores for 6 labels"):
        verification_metrics(dist, same[:6])


def _reference_exact(dist, same, nfolds):
    """Per fold, a loop over every midpoint of the training distances (insightface calculate_roc with a fine grid)."""
    return _reference_loop(dist, same, nfolds, _exact_candidates)


@pytest.mark.parametrize("n, nfolds, rounding", [(600, 10, None), (437, 7, 2), (300, 1, None)])
def test_ten_fold_exact_grid_matches_loop_and_beats_reference(n, nfolds, rounding):
    e1, e2, same, dist = _overlapping(n, n, rounding=rounding)
    if rounding is not None:  # feed the rounded distances back as exact unit-vector pairs
        e1, e2 = _pairs_at(dist)
        dist = pair_distances(e1, e2)
    exact = ten_fold_accuracy(e1, e2, same, nfolds=nfolds, thresholds="exact")
    ref = ten_fold_accuracy(e1, e2, same, nfolds=nfolds)
    accs, thrs, train_accs = _reference_exact(dist, same, nfolds)
    assert exact["thresholds"] == "exact" and ref["thresholds"] == "reference"
    assert np.allclose(exact["fold_accuracies"], accs, rtol=0, atol=1e-12)
    assert np.allclose(exact["fold_thresholds"], thrs, rtol=0, atol=1e-12)
    assert np.allclose(exact["fold_train_accuracies"], train_accs, rtol=0, atol=1e-12)
    # the exact grid is the optimum of the training accuracy: never below the reference grid's
    assert all(a >= b for a, b in zip(exact["fold_train_accuracies"], ref["fold_train_accuracies"]))
    assert exact["best_accuracy"] >= ref["best_accuracy"]
    if nfolds == 1:
        assert exact["accuracy"] >= ref["accuracy"]
    # the reference grid's train accuracy and all-pairs best also match a loop
    ref_accs, ref_thrs, ref_train = _reference_with_train(dist, same, nfolds)
    assert np.allclose(ref["fold_accuracies"], ref_accs, rtol=0, atol=1e-12) and ref["fold_thresholds"] == ref_thrs
    assert np.allclose(ref["fold_train_accuracies"], ref_train, rtol=0, atol=1e-12)
    # threshold-free metrics do not depend on the grid
    for key in ("eer", "tar_at_far", "auc", "val_at_far"):
        assert exact[key] == ref[key]


def _reference_with_train(dist, same, nfolds):
    """The reference grid, per fold, with the training accuracy of the chosen threshold."""
    grid = reference_thresholds()
    return _reference_loop(dist, same, nfolds, lambda _: grid)


def _reference_loop(dist, same, nfolds, grid_of):
    """Per fold: every threshold of ``grid_of(training distances)``, best training accuracy, test accuracy."""
    accs, best, train_accs = [], [], []
    for test in np.array_split(np.arange(len(same)), nfolds):
        train = np.setdiff1d(np.arange(len(same)), test) if nfolds > 1 else test
        grid = grid_of(dist[train])
        acc_train = [np.mean((dist[train] < t) == same[train]) for t in grid]
        b = int(np.argmax(acc_train))
        best.append(grid[b])
        train_accs.append(acc_train[b])
        accs.append(np.mean((dist[test] < grid[b]) == same[test]))
    return accs, best, train_accs


def test_ten_fold_metrics_keys_and_errors():
    e1, e2, same, dist = _overlapping(200, 5)
    r = ten_fold_accuracy(e1, e2, same, far_targets=(1e-2,))
    m = verification_metrics(dist, same, thresholds="reference", far_targets=(1e-2,))
    for key in ("best_threshold", "best_accuracy", "eer", "tar_at_far", "tar_far", "tar_threshold", "auc"):
        assert r[key] == m[key]
    assert list(r["tar_at_far"]) == [1e-2]
    with pytest.raises(ValueError, match="'reference', 'exact', None or an array"):
        ten_fold_accuracy(e1, e2, same, thresholds="fine")
    with pytest.raises(ValueError, match="empty threshold grid"):
        ten_fold_accuracy(e1, e2, same, thresholds=[])
    # NaN embeddings are rejected pairs (as insightface's dist < t), not a crash mid-training
    bad = e2.copy()
    bad[0] = np.nan
    r = ten_fold_accuracy(e1, bad, same)
    assert np.isfinite(r["accuracy"]) and np.isfinite(ten_fold_accuracy(e1, bad, same, thresholds="exact")["accuracy"])


def test_embed_images_concat_flip_mode(tmp_path):
    images = torch.randint(0, 256, (7, 3, 4, 5), dtype=torch.uint8)
    fn, weight, _ = _linear()
    x = images.double() / 127.5 - 1.0
    plain = x.flatten(1) @ weight.T
    flipped = x.flip(3).flatten(1) @ weight.T
    out = embed_images(fn, images, batch_size=3, flip_mode="concat")
    assert out.shape == (7, 6) and torch.allclose(out.double(), torch.cat([plain, flipped], 1), atol=1e-5)
    assert torch.equal(embed_images(fn, images, batch_size=3, flip_mode="sum"), embed_images(fn, images, batch_size=3))
    with pytest.raises(ValueError, match="flip_mode must be 'sum' or 'concat'"):
        embed_images(fn, images, flip_mode="mean")
    with pytest.raises(ValueError, match="needs flip=True"):
        embed_images(fn, images, flip=False, flip_mode="concat")
    # the wrappers pass flip_mode and thresholds through
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    issame = np.arange(20) % 2 == 0
    rgb[1::2][issame] = rgb[0::2][issame]
    path = write_bin(tmp_path / "pairs.bin", [_png(im) for im in rgb], issame)
    r = evaluate_bin(lambda x: x.flatten(1)[:, :50], path, flip_mode="concat", thresholds="exact")
    assert r["accuracy"] == 1.0 and r["thresholds"] == "exact"
    images, _ = load_bin(path)
    emb = embed_images(lambda x: x.flatten(1)[:, :50], images, flip_mode="concat").numpy()
    direct = ten_fold_accuracy(emb[0::2], emb[1::2], issame, thresholds="exact")
    assert r["fold_thresholds"] == direct["fold_thresholds"]
