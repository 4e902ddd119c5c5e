"""Files from elsewhere are data, never code (lafs.io_safe): crafted checkpoints, ``.bin`` sets and arrays that
would run code when unpickled are refused by every command that opens them, with the file named, and the code never
runs; lafs's own checkpoints (training, pretraining, older ones) still load and resume; the safetensors folder of
``lafs export --safetensors`` embeds exactly like its checkpoint and starts a finetuning."""

import io
import pathlib
import pickle

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_RUN, train_tiny

from lafs.checkpoint import checkpoints_in, rng_state, set_rng_state
from lafs.cli import main
from lafs.config import load_config
from lafs.data.pairs import read_bin, write_bin
from lafs.data.synthetic import SyntheticFaces, synthetic_pairs
from lafs.embedder import load_backbone, load_embedder
from lafs.io_safe import UnsafeFileError, load_array, load_checkpoint
from lafs.train.logging import read_metrics
from lafs.train.pretrained import load_pretrained
from lafs.train.run import train


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny validated checkpoint, a small .bin, a face image, and crafted files that each touch a marker."""
    root = tmp_path_factory.mktemp("safety")
    ckpt = train_tiny(root / "run", "data.val_pairs=40", "data.val_identities=4")
    faces = SyntheticFaces(40, seed=3)
    images, issame, _ = synthetic_pairs(faces, 20, seed=3, identities=range(20, 40))
    encoded = [cv2.imencode(".png", im[:, :, ::-1])[1].tobytes() for im in images]
    good_bin = write_bin(root / "toy.bin", encoded, issame)
    face = root / "face.png"
    cv2.imwrite(str(face), images[0][:, :, ::-1])

    marker = root / "MARKER"
    state = load_checkpoint(ckpt)
    state["extra"] = Payload(marker)  # a real checkpoint with one poisoned entry
    evil_pt = root / "evil.pt"
    torch.save(state, evil_pt)
    evil_bin = root / "evil.bin"
    evil_bin.write_bytes(pickle.dumps((encoded[:2], [Payload(marker)]), protocol=pickle.HIGHEST_PROTOCOL))
    evil_npy = root / "evil.npy"
    np.save(evil_npy, np.array([Payload(marker)] * 40, dtype=object), allow_pickle=True)
    # the crafted files are live: opened the unsafe way, each one runs its code
    for open_unsafely in (lambda: torch.load(evil_pt, weights_only=False), lambda: pickle.loads(evil_bin.read_bytes()),
                          lambda: np.load(evil_npy, allow_pickle=True)):
        open_unsafely()
        assert marker.exists()
        marker.unlink()
    return {"root": root, "ckpt": ckpt, "bin": good_bin, "face": face, "marker": marker, "evil_pt": evil_pt,
            "evil_bin": evil_bin, "evil_npy": evil_npy}


def refused(args, capsys, name: str) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert name in err and "refused" in err, err
    return err


# ---------------------------------------------------------------------------------------- crafted files refused


def test_crafted_checkpoint_is_refused_by_every_command(setup, tmp_path, capsys):
    s, evil = setup, str(setup["evil_pt"])
    err = refused(["eval", evil, "--sets", str(s["bin"]), "--no-cache"], capsys, "evil.pt")
    assert "pathlib" in err and "objects other than weights" in err  # what it asked for, and why refused
    refused(["embed", evil, str(s["face"]), "-o", str(tmp_path / "e.npy")], capsys, "evil.pt")
    refused(["verify", evil, str(s["face"]), str(s["face"])], capsys, "evil.pt")
    refused(["export", evil, "--safetensors", str(tmp_path / "st")], capsys, "evil.pt")
    refused(["finetune", *TINY_RUN, "--init", evil, "--out", str(tmp_path / "ft")], capsys, "evil.pt")
    refused(["train", *TINY_RUN, "--resume", evil, "--out", str(tmp_path / "tr")], capsys, "evil.pt")
    with pytest.raises(UnsafeFileError, match="evil.pt"):
        load_backbone(evil)
    assert not s["marker"].exists()


def test_crafted_bin_is_refused_naming_the_global(setup, tmp_path, capsys):
    s = setup
    err = refused(["eval", str(s["ckpt"]), "--sets", str(s["evil_bin"]), "--no-cache"], capsys, "evil.bin")
    assert "pathlib" in err
    # an object array of payloads (insightface files hold uint8 / bool arrays only)
    obj = tmp_path / "objects.bin"
    obj.write_bytes(pickle.dumps(([np.array([Payload(s["marker"])], dtype=object)] * 2, [True])))
    with pytest.raises(UnsafeFileError, match="objects.bin"):
        read_bin(obj)
    assert not s["marker"].exists()


def test_crafted_arrays_and_embedding_cache_are_refused(setup, tmp_path, capsys):
    s = setup
    refused(["eval", "--embeddings", str(s["evil_npy"]), "--pairs", str(s["bin"])], capsys, "evil.npy")
    # a poisoned cache entry in place of the real one
    cache = tmp_path / "cache"
    assert main(["eval", str(s["ckpt"]), "--sets", str(s["bin"]), "--cache", str(cache)]) == 0
    (entry,) = cache.glob("toy-*.npz")
    buf = io.BytesIO()
    np.savez(buf, embeddings=np.array([Payload(s["marker"])], dtype=object), issame=np.zeros(1, bool))
    entry.write_bytes(buf.getvalue())
    capsys.readouterr()
    refused(["eval", str(s["ckpt"]), "--sets", str(s["bin"]), "--cache", str(cache)], capsys, entry.name)
    with pytest.raises(UnsafeFileError, match="evil.npy"):
        load_array(s["evil_npy"])
    assert not s["marker"].exists()


def test_not_a_checkpoint_is_named_and_kept_apart_from_refusals(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="notes.pt: not a lafs checkpoint") as info:
        load_checkpoint(junk)
    assert not isinstance(info.value, UnsafeFileError)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------- lafs's own files load


def test_new_checkpoints_need_no_allow_list_and_older_ones_still_load(setup, tmp_path):
    state = torch.load(setup["ckpt"], map_location="cpu", weights_only=True)  # stock torch, no allow-list
    assert isinstance(state["rng"][0]["numpy"], dict)
    # a checkpoint written before the RNG state was stored as plain values: numpy's tuple with its ndarray
    state["rng"][0]["numpy"] = np.random.get_state()
    old = tmp_path / "old.pt"
    torch.save(state, old)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(old, weights_only=True)
    assert isinstance(load_checkpoint(old)["rng"][0]["numpy"], tuple)
    assert load_embedder(old).threshold == load_embedder(setup["ckpt"]).threshold


@pytest.mark.parametrize("legacy", [False, True])
def test_rng_state_round_trips(legacy):
    np.random.seed(5)
    state = rng_state()
    if legacy:
        state["numpy"] = np.random.get_state()
    expected = np.random.rand(4), torch.rand(3)
    set_rng_state(state)
    np.testing.assert_array_equal(np.random.rand(4), expected[0])
    torch.testing.assert_close(torch.rand(3), expected[1], rtol=0, atol=0)


def _losses(out: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}


@pytest.mark.parametrize("legacy", [False, True])
def test_training_checkpoint_resumes_exactly(tmp_path, legacy):
    """Resume from the step-1 checkpoint of a 3-step run (as written now, or with an older numpy RNG tuple)."""
    cfg = load_config(None, [*TINY_RUN, "train.steps=3", "train.ckpt_every=1", "train.keep_last=10", "train.log_every=1",
                             f"out_dir={tmp_path / 'a'}"])
    torch.manual_seed(0)
    train(cfg, progress=False)
    first = checkpoints_in(tmp_path / "a" / "checkpoints")[0]
    if legacy:
        state = load_checkpoint(first)
        for rank_state in state["rng"]:
            n = rank_state["numpy"]
            rank_state["numpy"] = (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                                   n["gauss"])
        first = tmp_path / "legacy.pt"
        torch.save(state, first)
    again = load_config(None, [*TINY_RUN, "train.steps=3", "train.log_every=1", f"out_dir={tmp_path / 'b'}"])
    torch.manual_seed(123)
    result = train(again, resume=str(first), progress=False)
    assert result.step == 3
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert a[2] == pytest.approx(b[2], rel=1e-6) and a[3] == pytest.approx(b[3], rel=1e-6)


def test_pretraining_checkpoint_loads_and_resumes(tmp_path):
    pre = ["model.name=fvit", "model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0", "model.drop_path=0.0",
           "data.source=synthetic", "data.num_identities=8", "data.images_per_identity=4", "data.val_pairs=0",
           "data.workers=0", "train.batch_size=16", "train.steps=2", "train.ckpt_every=1", "train.keep_last=10",
           "ssl.method=dino", "ssl.freeze_last_layer=0", "ssl.out_dim=64", "ssl.hidden_dim=32", "ssl.bottleneck_dim=16", "ssl.num_local=2"]
    torch.manual_seed(0)
    train(load_config(None, [*pre, f"out_dir={tmp_path / 'a'}"]), progress=False)
    ckpts = checkpoints_in(tmp_path / "a" / "checkpoints")
    state = torch.load(ckpts[-1], weights_only=True)
    assert {"teacher", "student", "model"} <= set(state)
    assert "teacher" in load_embedder(ckpts[-1]).description
    result = train(load_config(None, [*pre, f"out_dir={tmp_path / 'b'}"]), resume=str(ckpts[0]), progress=False)
    assert str(result.resumed_from).endswith(ckpts[0].name) and result.step == 2


def test_bin_round_trips_with_older_encodings(tmp_path):
    images, issame = [b"\xff\xd8jpeg-a", b"\xff\xd8jpeg-b", b"c", b"d"], [True, False]
    got, same = read_bin(write_bin(tmp_path / "w.bin", images, issame))
    assert got == images and same.tolist() == issame
    # older files: uint8 numpy buffers and numpy bools; protocol 2 (bytes through _codecs.encode)
    as_arrays = ([np.frombuffer(b, np.uint8) for b in images], [np.bool_(True), np.bool_(False)])
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"old{protocol}.bin"
        path.write_bytes(pickle.dumps(as_arrays, protocol=protocol))
        got, same = read_bin(path)
        assert got == images and same.tolist() == issame
        path.write_bytes(pickle.dumps((images, issame), protocol=protocol))
        assert read_bin(path)[0] == images


@pytest.mark.shared_data
def test_real_bin_files_load(shared_data):
    for path in (shared_data / "lfw" / "lfw.bin", shared_data / "celeba64" / "celeba64_val.bin"):
        if not path.is_file():
            pytest.skip(f"{path} not found")
        images, issame = read_bin(path)
        assert len(images) == 2 * len(issame) > 0 and images[0][:2] in (b"\xff\xd8", b"\x89P")


# ---------------------------------------------------------------------------------------- safetensors


def test_safetensors_folder_embeds_like_the_checkpoint_and_starts_a_finetuning(setup, tmp_path, capsys):
    s = setup
    out = tmp_path / "shared-model"
    assert main(["export", str(s["ckpt"]), "--safetensors", str(out)]) == 0, capsys.readouterr().err
    assert "model.safetensors" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "MODEL_CARD.md"}
    assert "## Export" in (out / "MODEL_CARD.md").read_text()  # the run's card, with what was exported
    # safetensors: an 8-byte header length, a JSON header, raw tensor bytes (no pickle)
    assert (out / "model.safetensors").read_bytes()[8:9] == b"{"

    ref = load_embedder(s["ckpt"])
    x = torch.rand(5, 3, 56, 56) * 2 - 1
    for path in (out, out / "model.safetensors"):
        emb = load_embedder(path)
        assert emb.threshold == ref.threshold and emb.threshold_source == ref.threshold_source
        assert emb.geometry == ref.geometry and "model.safetensors" in emb.description
        with torch.no_grad():
            torch.testing.assert_close(emb(x), ref(x), atol=1e-6, rtol=0)
    assert main(["eval", str(out), "--sets", str(s["bin"]), "--no-cache"]) == 0, capsys.readouterr().err
    assert "toy" in capsys.readouterr().out

    # finetune --init reads the folder (build_task: load_pretrained(backbone, finetune.init))
    from lafs.models import build_backbone

    cfg = load_config(text=(out / "config.yaml").read_text())
    torch.manual_seed(1)
    fresh = build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides())
    report = load_pretrained(fresh, out)
    assert report.source == "safetensors" and report.loaded and not report.missing and not report.unexpected
    trained, _ = load_backbone(s["ckpt"])
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, atol=0, rtol=0, msg=key)
    assert main(["export", str(s["ckpt"])]) == 2  # neither --onnx nor --safetensors
