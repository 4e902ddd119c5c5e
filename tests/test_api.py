"""The Python API (``lafs.load`` / ``embed`` / ``verify`` / ``evaluate``) gives the commands' numbers; presets are found
by name from any folder; the package ships ``py.typed`` and its presets."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import lafs
from lafs.cli import main
from lafs.config import ConfigError, load_config
from lafs.data.pairs import write_bin
from lafs.data.synthetic import SyntheticFaces, synthetic_pairs
from lafs.presets import folder, names

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import train_tiny

    root = tmp_path_factory.mktemp("api")
    ckpt = train_tiny(root / "run", "model.name=fvit", "data.val_pairs=40", "data.val_identities=8")
    faces = SyntheticFaces(30, seed=4)
    crops = np.stack([faces.render(ident, idx)[0] for ident in (20, 21) for idx in (0, 1)])  # N x 112 x 112 x 3 RGB
    paths = []
    for i, crop in enumerate(crops):
        paths.append(root / f"face{i}.png")
        cv2.imwrite(str(paths[-1]), crop[:, :, ::-1])
    return ckpt, crops, paths


def test_embed_paths_array_and_tensor_agree(tiny):
    ckpt, crops, paths = tiny
    model = lafs.load(ckpt)
    from_paths = lafs.embed(model, paths)
    from_strings = lafs.embed(str(ckpt), [str(p) for p in paths])  # a model path is loaded on the fly
    from_array = lafs.embed(model, crops)
    from_tensor = lafs.embed(model, torch.from_numpy(crops).permute(0, 3, 1, 2))
    one = lafs.embed(model, crops[2])
    assert from_paths.ndim == 2 and len(from_paths) == 4 and from_paths.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1.0, atol=1e-5)
    for other in (from_strings, from_array, from_tensor):
        np.testing.assert_allclose(other, from_paths, atol=1e-5)
    np.testing.assert_allclose(one, from_paths[2:3], atol=1e-5)
    # the flip test changes the numbers, so the option reaches the model
    assert not np.allclose(lafs.embed(model, crops, flip=False), from_paths, atol=1e-4)


def test_keypoint_model_embeds_arrays_like_files(tiny, tmp_path):
    """A KP-RPE model needs keypoints: an aligned crop given as an array gets the template, as its file does."""
    from conftest import train_tiny

    _, crops, paths = tiny
    model = lafs.load(train_tiny(tmp_path / "kp", "model.name=vit_kprpe"))
    assert model.uses_keypoints
    np.testing.assert_allclose(lafs.embed(model, crops), lafs.embed(model, paths), atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        lafs.embed(model, crops[:, :100])


def test_embed_matches_lafs_embed_command(tiny, tmp_path, capsys):
    ckpt, _, paths = tiny
    out = tmp_path / "emb.npy"
    assert main(["embed", str(ckpt), *map(str, paths), "-o", str(out)]) == 0
    np.testing.assert_allclose(lafs.embed(lafs.load(ckpt), paths), np.load(out), atol=1e-6)


def test_embed_refuses_what_it_cannot_read(tiny):
    ckpt, crops, paths = tiny
    model = lafs.load(ckpt)
    with pytest.raises(TypeError, match="uint8"):
        lafs.embed(model, crops.astype(np.float32))
    with pytest.raises(ValueError, match=r"N x H x W x 3.*\(4, 3, 112, 112\)"):
        lafs.embed(model, crops.transpose(0, 3, 1, 2).copy())
    with pytest.raises(TypeError, match="only file paths or only"):
        lafs.embed(model, [paths[0], crops[0]])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        lafs.embed(model, ["nope.png"])
    with pytest.raises(TypeError, match="Embedder"):
        lafs.embed(42, paths)


def test_verify_self_is_same_and_threshold_comes_from_the_model(tiny):
    ckpt, crops, paths = tiny
    model = lafs.load(ckpt)
    assert model.threshold is not None  # the tiny run validated, so the model carries its threshold
    r = lafs.verify(model, paths[0], paths[0])
    assert r["score"] == pytest.approx(1.0, abs=1e-5) and r["same"] is True
    assert r["threshold"] == model.threshold and "validation" in r["threshold_source"]
    # arrays too, and the same score as the files; a given threshold wins
    mixed = lafs.verify(model, crops[0], paths[2], threshold=1.5)
    assert mixed["same"] is False and mixed["threshold"] == 1.5 and mixed["threshold_source"] == "given"
    assert mixed["score"] == pytest.approx(lafs.verify(model, paths[0], paths[2])["score"], abs=1e-5)
    with pytest.raises(ValueError, match="two images"):
        lafs.verify(model, crops[:2], crops[2])


def test_evaluate_matches_lafs_eval(tiny, tmp_path, capsys):
    ckpt, _, _ = tiny
    faces = SyntheticFaces(40, seed=3)
    images, issame, _ = synthetic_pairs(faces, 40, seed=3, identities=range(20, 40))
    bin_path = write_bin(tmp_path / "toy.bin", [cv2.imencode(".png", im[:, :, ::-1])[1].tobytes() for im in images],
                         issame)
    r = lafs.evaluate(lafs.load(ckpt), bin_path)
    assert main(["eval", str(ckpt), "--sets", str(bin_path), "--out", str(tmp_path / "ev"), "--no-cache"]) == 0
    cli = json.loads((tmp_path / "ev" / "eval.json").read_text())["results"][0]
    assert r["name"] == "toy" and r["pairs"] == 40 and not r["cached"]
    for key in ("accuracy", "accuracy_std", "auc", "threshold"):
        assert r[key] == pytest.approx(cli[key], abs=1e-9), key
    assert not any(k.startswith("_") for k in r)
    exact = lafs.evaluate(str(ckpt), bin_path, thresholds="exact", flip=False)
    assert 0.0 <= exact["accuracy"] <= 1.0
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        lafs.evaluate(ckpt, tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="thresholds"):
        lafs.evaluate(ckpt, bin_path, thresholds="fine")


def test_import_lafs_stays_light():
    code = "import sys, lafs; assert lafs.__version__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------- presets
def test_preset_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the packaged presets answer
    packaged = load_config(folder("configs") / "micro" / "supervised_synthetic.yaml")
    assert load_config("micro/supervised_synthetic") == packaged
    assert load_config("configs/micro/supervised_synthetic.yaml") == packaged  # the repository-era spelling
    assert load_config("paper/part_fvit_b_webface4m_aug").model.size == "base"
    # a file on disk wins over the preset of the same name
    local = tmp_path / "micro" / "supervised_synthetic.yaml"
    local.parent.mkdir()
    local.write_text("train:\n  steps: 7\n")
    assert load_config("micro/supervised_synthetic.yaml").train.steps == 7
    assert load_config("micro/supervised_synthetic").train.steps == packaged.train.steps != 7


def test_unknown_preset_names_the_close_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no config named .micro/supervised_synth.: file not found.*close presets: "
                       "micro/supervised_synthetic"):
        load_config("micro/supervised_synth")
    with pytest.raises(ConfigError, match="close presets:.*micro/supervised_synthetic"):
        load_config("supervised_synthetc")  # the folder left out, a typo in the name
    assert main(["train", "micro/supervised_syntetic"]) == 2
    assert "micro/supervised_synthetic" in capsys.readouterr().err
    assert main(["experiment", "fewshott", "--list"]) == 2
    assert "close presets: fewshot" in capsys.readouterr().err


def test_packaged_grids_and_listing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "fewshot", "--list"]) == 0  # the packaged grid, run from a folder without experiments/
    assert "todo" in capsys.readouterr().out
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "micro/supervised_synthetic" in out and "paper/part_fvit_b_webface4m_aug" in out and "fewshot" in out


def test_package_data_ships_presets_and_py_typed():
    """pyproject's package-data globs cover every preset file (a preset they miss would vanish from the wheel),
    and the py.typed marker is there."""
    assert (Path(lafs.__file__).parent / "py.typed").is_file()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["lafs"]
    root = folder("configs").parent
    covered = {p for pattern in data["lafs.presets"] for p in root.glob(pattern)}
    shipped = {p for p in root.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts}
    assert shipped and shipped <= covered, sorted(str(p.relative_to(root)) for p in shipped - covered)
    assert {"micro/supervised_synthetic", "paper/part_fvit_b_webface4m_aug"} <= set(names("configs"))
