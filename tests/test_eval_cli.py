"""``lafs eval``: model files (training checkpoints, TorchScript) and precomputed embeddings give
the same numbers; the cache is keyed by model and set; errors name what is missing."""

import json

import cv2
import numpy as np
import pytest
import torch

from lafs.cli import main
from lafs.data.pairs import write_bin
from lafs.data.synthetic import SyntheticFaces, synthetic_pairs
from lafs.embedder import load_embedder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import train_tiny

    root = tmp_path_factory.mktemp("eval")
    ckpt = train_tiny(root / "run", "model.name=part_fvit", "data.val_pairs=0")
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


def test_bf16_eval_embeds_like_fp32_and_caches_apart(setup, tmp_path, capsys, monkeypatch):
    root, ckpt, bin_path = setup
    fp32, bf16 = load_embedder(ckpt), load_embedder(ckpt, amp="bf16")
    assert bf16.precision == "bf16" and "[bf16]" in bf16.description
    x = torch.rand(6, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    assert b.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert cos.min().item() > 0.99, cos  # bf16 rounding, not another model
    cache = tmp_path / "cache"
    for amp in ("none", "bf16"):
        code, out = run_eval([str(ckpt), "--sets", str(bin_path), "--amp", amp, "--cache", str(cache),
                              "--out", str(tmp_path / amp)], capsys)
        assert code == 0, out.err
    assert len(list(cache.glob("toy-*.npz"))) == 2  # the two precisions never share cached embeddings
    meta = json.loads((tmp_path / "bf16" / "eval.json").read_text())["meta"]
    assert meta["precision"] == "bf16"
    with pytest.raises(ValueError, match="amp must be one of none, auto, bf16, fp16, got 'int8'"):
        load_embedder(ckpt, amp="int8")
    # "auto" follows the hardware, as train.amp=auto does
    from lafs.models import precision

    for flags, expected in (({"avx512_bf16"}, "bf16"), ({"avx2"}, "fp32")):
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert load_embedder(ckpt, amp="auto").precision == expected


def test_embeddings_file_scores_like_the_model(setup, tmp_path, capsys):
    root, ckpt, bin_path = setup
    run_eval([str(ckpt), "--sets", str(bin_path), "--out", str(tmp_path / "m"), "--no-cache"], capsys)
    model = json.loads((tmp_path / "m" / "eval.json").read_text())["results"][0]
    # the same embeddings computed by hand (flip sum), saved, and scored through --embeddings
    from lafs.data.pairs import load_bin
    from lafs.eval.embedding import embed_images

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


def _pool_model(path):
    """A TorchScript embedder (8 x 8 average colours): fast, deterministic, any input size."""
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten())), str(path))
    return path


def test_ijb_from_the_cli_matches_the_library_and_caches(tmp_path, capsys):
    from test_ijb import write_ijb

    from lafs.eval.ijb import evaluate_ijb

    root = tmp_path / "IJBC"  # the folder name gives the protocol name
    write_ijb(root)
    model = _pool_model(tmp_path / "pool.pt")
    cache = tmp_path / "cache"
    for out in ("a", "b"):
        code, res = run_eval([str(model), "--ijb", str(root), "--out", str(tmp_path / out), "--cache", str(cache),
                              "--ijb-mode", "N0D1F1"], capsys)
        assert code == 0, res.err
        assert "IJBC N0D1F1" in res.out and "1:N G1" in res.out
    assert len(list(cache.glob("ijbc-*.npy"))) == 1
    a, b = (json.loads((tmp_path / o / "eval.json").read_text())["results"][0] for o in ("a", "b"))
    ref = evaluate_ijb(load_embedder(model), root, "ijbc", use_norm_score=False)
    assert a == b
    assert a["tar_at_far"] == pytest.approx(ref["tar_at_far"]) and a["auc"] == pytest.approx(ref["auc"])
    assert a["identification"]["G1"]["rank"] == pytest.approx(
        {str(k): v for k, v in ref["identification"]["G1"]["rank"].items()})
    code, res = run_eval([str(model), "--ijb", str(root), "--ijb-mode", "N1F1"], capsys)
    assert code == 2 and "N1D1F1" in res.err


def test_identification_folder_from_the_cli(tmp_path, capsys):
    from lafs.eval.embedding import embed_images
    from lafs.eval.identification import rank_k

    faces = SyntheticFaces(6, seed=5)
    layout = {"gallery": [(i, 0) for i in range(6)], "probe": [(i, j) for i in range(5) for j in (1, 2)]}
    images = {}
    for sub, items in layout.items():
        for i, j in items:
            img = faces.render(i, j)[0]
            d = tmp_path / "tiny" / sub / f"id{i}"
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{j}.png"), img[:, :, ::-1])
            images.setdefault(sub, []).append((f"id{i}", img))
    (tmp_path / "tiny" / "distractors").mkdir()
    for j in range(4):
        cv2.imwrite(str(tmp_path / "tiny" / "distractors" / f"d{j}.png"), faces.render(5, 10 + j)[0][:, :, ::-1])
    model = _pool_model(tmp_path / "pool.pt")
    code, res = run_eval([str(model), "--identification", str(tmp_path / "tiny"), "--out", str(tmp_path / "o")],
                         capsys)
    assert code == 0, res.err
    r = json.loads((tmp_path / "o" / "eval.json").read_text())["results"][0]
    assert (r["probes"], r["gallery"], r["distractors"]) == (10, 6, 4)
    emb = load_embedder(model)

    def embed(sub):
        x = torch.from_numpy(np.stack([im for _, im in images[sub]])).permute(0, 3, 1, 2).contiguous()
        return embed_images(emb, x), [name for name, _ in images[sub]]

    (p, pid), (g, gid) = embed("probe"), embed("gallery")
    d = embed_images(emb, torch.from_numpy(np.stack([faces.render(5, 10 + j)[0] for j in range(4)]))
                     .permute(0, 3, 1, 2).contiguous())
    assert r["rank"] == pytest.approx({str(k): v for k, v in rank_k(p, pid, g, gid, (1, 5, 20), d).items()})
    assert f"rank-1 {100 * r['rank']['1']:.2f} %" in res.out
