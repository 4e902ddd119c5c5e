"""``lafs.export``: trained checkpoints -> ONNX; onnxruntime matches torch at another batch size than the one
exported (dynamic axis), Part fViT's landmark CNN + patch sampling and KP-RPE's keypoints input included; the
ONNX file opens with ``load_embedder`` and embeds like the checkpoint; errors name the file."""

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason='needs the onnx extra: pip install "lafs-face[onnx]"')
ort = pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install "lafs-face[onnx]"')

import onnx  # noqa: E402

from lafs import export as export_mod  # noqa: E402
from lafs.embedder import load_backbone, load_embedder  # noqa: E402
from lafs.export import export_onnx, random_inputs  # noqa: E402
from lafs.io import file_hash  # noqa: E402

MODELS = {  # part_fvit validates, so its checkpoint stores a verification threshold
    "part_fvit": ["model.name=part_fvit", "data.val_pairs=40", "data.val_identities=8"],
    "vit_kprpe": ["model.name=vit_kprpe", "data.val_pairs=0"],
}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (checkpoint, onnx file, export result): 2 training steps each, then export with the check."""
    from conftest import train_tiny

    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, overrides in MODELS.items():
        ckpt = train_tiny(root / name, *overrides)
        if name == "vit_kprpe":
            # W_L starts at zero and barely moves in 2 steps: give it weights, so the keypoints change the output
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            g = torch.Generator().manual_seed(1)
            for key, value in state["model"].items():
                if "kprpe" in key:
                    state["model"][key] = torch.randn(value.shape, generator=g) * 0.5
            ckpt = root / name / "kprpe_random_wl.pt"
            torch.save(state, ckpt)
        path = root / f"{name}.onnx"
        out[name] = (ckpt, path, export_onnx(ckpt, path, batch=4))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_export_reports_parity_and_writes_metadata(exported, name):
    ckpt, path, r = exported[name]
    assert path.is_file() and r["bytes"] == path.stat().st_size > 100_000
    assert r["opset"] == 17 and r["check_batch"] == 4 and r["model"] == f"{name}-micro" and r["img_size"] == 56
    assert r["max_abs_diff"] < 1e-4 and r["min_cosine"] > 0.9999 and r["max_abs_diff"] <= r["tolerance"]
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    uses_keypoints = name == "vit_kprpe"
    assert meta["lafs_model"] == f"{name}-micro" and meta["img_size"] == "56"
    assert meta["uses_keypoints"] == str(uses_keypoints).lower()
    assert meta["lafs_checkpoint_sha256"] == file_hash(ckpt) == r["checkpoint_sha256"]
    assert [i.name for i in model.graph.input] == (["images", "keypoints"] if uses_keypoints else ["images"])
    assert [o.name for o in model.graph.output] == ["embedding"]
    ops = {n.op_type for n in model.graph.node}
    if name == "part_fvit":  # the landmark CNN's convolutions and the patch sampler are in the graph
        assert {"GridSample", "Conv"} <= ops


@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_matches_torch_at_another_batch_size(exported, name):
    ckpt, path, _ = exported[name]
    backbone, _ = load_backbone(ckpt)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    uses_keypoints = name == "vit_kprpe"
    inputs = random_inputs(56, 7, uses_keypoints, seed=5)  # 7: neither the traced (2) nor the checked (4) size
    with torch.no_grad():
        ref = backbone(inputs[0], **({"keypoints": inputs[1]} if uses_keypoints else {}))["embedding"].numpy()
    feed = {"images": inputs[0].numpy()}
    if uses_keypoints:
        feed["keypoints"] = inputs[1].numpy()
    got = session.run(None, feed)[0]
    assert got.shape == ref.shape == (7, backbone.embedding_size)
    assert np.abs(got - ref).max() < 1e-4 and cosine_rows(got, ref).min() > 0.9999
    if uses_keypoints:  # the keypoints are a live input of the graph, not constants of the trace
        feed["keypoints"] = (inputs[1] + 3.0).numpy()
        assert np.abs(session.run(None, feed)[0] - got).max() > 1e-3


@pytest.mark.parametrize("name", list(MODELS))
def test_load_embedder_on_the_onnx_file_embeds_like_the_checkpoint(exported, name):
    ckpt, path, _ = exported[name]
    from_onnx, from_ckpt = load_embedder(path), load_embedder(ckpt)
    uses_keypoints = name == "vit_kprpe"
    assert from_onnx.uses_keypoints == from_ckpt.uses_keypoints == uses_keypoints
    assert from_onnx.img_size == from_ckpt.img_size == 56 and f"{name}-micro" in from_onnx.description
    assert from_onnx.threshold == from_ckpt.threshold and from_onnx.threshold_source == from_ckpt.threshold_source
    assert (from_onnx.threshold is not None) == (name == "part_fvit")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1  # not the model size: both resize the same way
    kw = {"keypoints": torch.rand(3, 5, 2, generator=g) * 40 + 12} if uses_keypoints else {}
    with torch.no_grad():
        a, b = from_onnx(x, **kw).numpy(), from_ckpt(x, **kw).numpy()
    assert np.abs(a - b).max() < 1e-4 and cosine_rows(a, b).min() > 0.9999


def test_export_errors_name_the_file(exported, tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="notes.pt: not a lafs checkpoint"):
        export_onnx(junk, tmp_path / "out.onnx")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt: not a lafs checkpoint \(no 'model' entry\)"):
        export_onnx(tmp_path / "other.pt", tmp_path / "out.onnx")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        export_onnx(tmp_path / "missing.pt", tmp_path / "out.onnx")
    ckpt = exported["part_fvit"][0]
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        export_onnx(ckpt, tmp_path / "out.bin")
    assert not list(tmp_path.glob("out*"))


def test_failed_parity_check_names_the_numbers_and_writes_nothing(exported, tmp_path, monkeypatch):
    ckpt = exported["part_fvit"][0]
    monkeypatch.setattr(export_mod, "RELATIVE_TOLERANCE", 0.0)  # any float difference fails
    monkeypatch.setattr(export_mod, "MIN_COSINE", 2.0)  # and any cosine: the check fails whatever the numbers
    with pytest.raises(ValueError, match=r"max \|torch - onnxruntime\| = .* \(tolerance 0\).*min cosine") as err:
        export_onnx(ckpt, tmp_path / "m.onnx", batch=3)
    assert "m.onnx not written" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    r = export_onnx(ckpt, tmp_path / "m.onnx", check=False)
    assert r["max_abs_diff"] is None and (tmp_path / "m.onnx").stat().st_size == r["bytes"]
    assert list(tmp_path.iterdir()) == [tmp_path / "m.onnx"]  # no temporary file left beside it


def test_missing_onnxruntime_names_the_extra(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ImportError, match=r'pip install "lafs-face\[onnx\]"'):
        export_onnx(exported["part_fvit"][0], tmp_path / "m.onnx")
