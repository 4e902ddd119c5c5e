"""``lafs eval``: model files (training checkpoints, TorchScript) and precomputed embeddings give
the same numbers; the cache is keyed by model and set; errors name what is missing."""

import json

import cv2
import numpy as np
import pytest
import torch

from lafs.cli import main
from lafs.config import load_config
from lafs.data.pairs import write_bin
from lafs.data.synthetic import SyntheticFaces, synthetic_pairs
from lafs.embedder import load_embedder
from lafs.train.loop import checkpoints_in
from lafs.train.run import train

BASE = ["model.name=part_fvit", "model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0",
        "model.drop_path=0.0", "data.source=synthetic", "data.num_identities=8", "data.images_per_identity=4",
        "data.val_pairs=0", "data.workers=0", "augment.preset=none", "train.batch_size=16", "train.steps=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    train(load_config(None, BASE + [f"out_dir={root / 'run'}"]), progress=False)
    ckpt = checkpoints_in(root / "run" / "checkpoints")[-1]
    faces = SyntheticFaces(40, seed=3)
    images, issame, _ = synthetic_pairs(faces, 40, seed=3, identities=range(20, 40))
    encoded = [cv2.imencode(".png", im[:, :, ::-1])[1].tobytes() for im in images]  # RGB arrays -> RGB on decode
    bin_path = write_bin(root / "toy.bin", encoded, issame)
    return root, ckpt, bin_path


def run_eval(args, capsys):
    code = main(["eval", *args])
    return code, capsys.readouterr()


def test_checkpoint_eval_writes_report_and_cache_is_reused(setup, tmp_path, capsys):
    root, ckpt, bin_path = setup
    cache = tmp_path / "cache"
    code, out = run_eval([str(ckpt), "--sets", str(bin_path), "--out", str(tmp_path / "a"), "--cache", str(cache)],
                         capsys)
    assert code == 0, out.err
    assert "toy" in out.out and "part_fvit-micro" in out.out
    first = json.loads((tmp_path / "a" / "eval.json").read_text())
    r = first["results"][0]
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["auc"] <= 1.0 and r["pairs"] == 40 and not r["cached"]
    assert (tmp_path / "a" / "roc.png").stat().st_size > 1000
    assert len(list(cache.glob("toy-*.npz"))) == 1
    code, _ = run_eval([str(ckpt), "--sets", str(bin_path), "--out", str(tmp_path / "b"), "--cache", str(cache)],
                       capsys)
    second = json.loads((tmp_path / "b" / "eval.json").read_text())["results"][0]
    assert code == 0 and second["cached"] and second["accuracy"] == r["accuracy"]
    # another test option is another cache entry
    run_eval([str(ckpt), "--sets", str(bin_path), "--no-flip", "--cache", str(cache)], capsys)
    assert len(list(cache.glob("toy-*.npz"))) == 2


def test_embeddings_file_scores_like_the_model(setup, tmp_path, capsys):
    root, ckpt, bin_path = setup
    run_eval([str(ckpt), "--sets", str(bin_path), "--out", str(tmp_path / "m"), "--no-cache"], capsys)
    model = json.loads((tmp_path / "m" / "eval.json").read_text())["results"][0]
    # the same embeddings computed by hand (flip sum), saved, and scored through --embeddings
    from lafs.eval.verification import embed_images, load_bin

    emb = embed_images(load_embedder(ckpt), load_bin(bin_path)[0]).numpy()
    np.save(tmp_path / "emb.npy", emb)
    code, out = run_eval(["--embeddings", str(tmp_path / "emb.npy"), "--pairs", str(bin_path),
                          "--out", str(tmp_path / "e")], capsys)
    assert code == 0, out.err
    given = json.loads((tmp_path / "e" / "eval.json").read_text())["results"][0]
    assert given["accuracy"] == model["accuracy"] and given["auc"] == pytest.approx(model["auc"], abs=1e-12)


def test_torchscript_file_embeds_like_the_checkpoint(setup, tmp_path):
    root, ckpt, bin_path = setup
    emb = load_embedder(ckpt)
    x = torch.rand(2, 3, 56, 56) * 2 - 1

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)["embedding"]

    from lafs.models import build_backbone

    backbone = build_backbone("part_fvit", "micro", dropout=0.0, emb_dropout=0.0, drop_path=0.0)
    state = torch.load(ckpt, weights_only=False)["model"]
    backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
    scripted = torch.jit.trace(Wrapped(backbone.eval()), x)
    scripted.save(str(tmp_path / "m.ts"))
    ts = load_embedder(tmp_path / "m.ts")
    with torch.no_grad():
        torch.testing.assert_close(ts(x), emb(x), atol=1e-5, rtol=1e-5)
    assert emb.file_hash != ts.file_hash


def test_eval_errors(setup, tmp_path, capsys):
    root, ckpt, bin_path = setup
    code, out = run_eval(["--embeddings", str(tmp_path / "x.npy")], capsys)
    assert code == 2 and "--pairs" in out.err
    np.save(tmp_path / "short.npy", np.zeros((10, 4), np.float32))
    code, out = run_eval(["--embeddings", str(tmp_path / "short.npy"), "--pairs", str(bin_path)], capsys)
    assert code == 2 and "10 embeddings for 40 pairs" in out.err
    code, out = run_eval([str(tmp_path / "missing.pt"), "--sets", str(bin_path)], capsys)
    assert code == 2 and "missing.pt" in out.err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    code, out = run_eval([str(tmp_path / "junk.pt"), "--sets", str(bin_path)], capsys)
    assert code == 2 and "junk.pt" in out.err


@pytest.mark.slow
@pytest.mark.shared_data
def test_lfw_bin_end_to_end(setup, tmp_path, capsys, shared_data):
    root, ckpt, _ = setup
    lfw = shared_data / "lfw" / "lfw.bin"
    code, out = run_eval([str(ckpt), "--sets", f"{lfw},{shared_data / 'lfw' / 'lfw_unaligned.bin'}", "--out",
                          str(tmp_path), "--no-cache"], capsys)
    assert code == 0, out.err
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["pairs"] for r in results] == [6000, 6000]
    assert all(0.4 < r["accuracy"] < 1.0 for r in results)
