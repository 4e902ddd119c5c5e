"""The CPU fast paths of training: the cheap dropout mask, bf16 attention, fused AdamW, channels_last, bf16 autocast
and torch.compile, each checked against the plain fp32 computation."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lafs.checkpoint import checkpoints_in
from lafs.config import load_config
from lafs.models import build_backbone
from lafs.models.dropout import Dropout, dropout, keep_mask, stock_dropout
from lafs.models.vit import Attention
from lafs.train.optim import build_optimizer
from lafs.train.run import train

# part_fvit micro with its preset dropout (0.1) and DropPath on: the masks are part of what must agree
CURVE = ["model.name=part_fvit", "model.size=micro", "data.source=synthetic", "data.num_identities=16",
         "data.images_per_identity=8", "data.val_pairs=0", "data.workers=0", "augment.preset=flip",
         "train.batch_size=32", "train.log_every=1", "optim.lr=1e-3", "optim.warmup_steps=5", "train.steps=50"]
# bf16 against fp32 over the 50 steps, measured here: max 1.6 %, mean 0.3 % relative per-step difference
CURVE_MAX_REL, CURVE_MEAN_REL = 0.04, 0.01
# compiled, inductor draws the dropout masks from its own generator, so the masks differ from eager fp32's and the
# curves differ by that noise too (measured: max 4.2 %, mean 1.4 %)
COMPILED_MAX_REL, COMPILED_MEAN_REL = 0.08, 0.03


# ----------------------------------------------------------------------------- dropout
def test_keep_mask_rate_independence_and_edges():
    torch.manual_seed(0)
    m = keep_mask((1000, 1000), 0.9)
    assert m.dtype == torch.bool and m.shape == (1000, 1000)
    # 1e6 Bernoulli(0.9): std 3e-4; the 16-bit threshold rounds 0.9 to 58982 / 65536 = 0.899994
    assert abs(m.float().mean().item() - 58982 / 65536) < 2e-3
    # neighbouring lanes of one 64-bit draw are independent: P(both kept) = 0.81
    pairs = m.view(-1, 4)
    assert abs((pairs[:, 0] & pairs[:, 1]).float().mean().item() - 0.9**2) < 3e-3
    assert abs((pairs[:, 2] & pairs[:, 3]).float().mean().item() - 0.9**2) < 3e-3
    assert keep_mask((5, 7), 1.0).all() and not keep_mask((5, 7), 0.0).any()
    assert keep_mask((3,), 1 - 1e-7).all()  # rounds to 1: never a wrapped int16 threshold
    with pytest.raises(ValueError, match=r"keep probability must be in \[0, 1\], got 1.5"):
        keep_mask((2,), 1.5)


def test_dropout_scales_kept_units_and_its_gradient_is_the_mask():
    x = torch.randn(64, 49, 96, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.25)
    kept = y != 0
    assert 0.72 < kept.float().mean().item() < 0.78
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    # same seed, same mask; eval mode and p = 0 are the identity
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.25), y)
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0) is x
    layer = Dropout(0.25).eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(-0.1)


def test_stock_dropout_context_is_torchs_dropout():
    x = torch.randn(8, 50)
    torch.manual_seed(3)
    with stock_dropout():
        got = dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(got, F.dropout(x, 0.3, True))
    torch.manual_seed(3)
    assert not torch.equal(dropout(x, 0.3), got)  # outside the context: the cheap mask


# ----------------------------------------------------------------------------- attention, optimizer, layout
def test_bf16_cpu_attention_matches_fp32_sdpa():
    torch.manual_seed(0)
    attn = Attention(96, heads=3, dim_head=32, attn_scale="head_dim").eval()
    x = torch.randn(4, 50, 96)
    bias = torch.randn(4, 3, 50, 50) * 0.5
    with torch.no_grad():
        ref = attn(x, bias)  # fp32: scaled_dot_product_attention
        with torch.autocast("cpu", torch.bfloat16):
            got = attn(x, bias)  # bf16 on the CPU: the explicit path
    assert got.dtype == torch.bfloat16
    err = (got.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err


def test_fused_adamw_matches_foreach():
    torch.manual_seed(0)
    a = build_backbone("fvit", "micro")
    b = build_backbone("fvit", "micro")
    b.load_state_dict(a.state_dict())
    init = build_backbone("fvit", "micro")
    init.load_state_dict(a.state_dict())
    groups = lambda m: [{"params": [p for p in m.parameters()], "weight_decay": 0.05}]  # noqa: E731
    fused = build_optimizer(groups(a), "adamw", 1e-3)
    plain = build_optimizer(groups(b), "adamw", 1e-3, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x = torch.rand(4, 3, 56, 56) * 2 - 1
    for _ in range(3):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            m.eval()(x)["embedding"].square().mean().backward()
            opt.step()
    # 3 steps of lr 1e-3 move a weight up to 3e-3; where a gradient is ~1e-12 Adam's eps makes the update
    # sensitive to rounding (measured: <= 2.5e-5), so the two agree to 2 % of the largest possible move
    moved = 0.0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=6e-5, msg=name)
        moved = max(moved, (p - dict(init.named_parameters())[name]).abs().max().item())
    assert moved > 1e-3  # the optimizers did move the weights


def test_channels_last_cnn_gives_the_same_landmarks():
    torch.manual_seed(0)
    model = build_backbone("part_fvit", "micro").eval()
    x = torch.rand(4, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x)
    conv = model.landmark_cnn.trunk.features[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got["landmarks"], ref["landmarks"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got["embedding"], ref["embedding"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- training curves
@pytest.fixture(scope="module")
def fp32_curve(tmp_path_factory):
    cfg = load_config(None, CURVE + [f"out_dir={tmp_path_factory.mktemp('fp32')}", "train.amp=none"])
    return np.array(train(cfg, progress=False).losses)


def assert_follows(curve: np.ndarray, ref: np.ndarray, max_rel: float = CURVE_MAX_REL,
                   mean_rel: float = CURVE_MEAN_REL) -> None:
    assert len(curve) == len(ref) == 50
    rel = np.abs(curve - ref) / np.abs(ref)
    assert rel.max() < max_rel and rel.mean() < mean_rel, (rel.max(), rel.mean())
    # and it learns as much: the drop over the run is within 10 % of fp32's
    drop, ref_drop = curve[:5].mean() - curve[-5:].mean(), ref[:5].mean() - ref[-5:].mean()
    assert ref_drop > 3.0 and abs(drop - ref_drop) < 0.1 * ref_drop, (drop, ref_drop)


def test_bf16_training_follows_the_fp32_loss_curve(tmp_path, fp32_curve):
    cfg = load_config(None, CURVE + [f"out_dir={tmp_path}", "train.amp=bf16"])
    assert_follows(np.array(train(cfg, progress=False).losses), fp32_curve)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_bf16_run_follows_fp32_and_resumes_exactly(tmp_path, fp32_curve):
    out = tmp_path / "compiled"
    over = CURVE + [f"out_dir={out}", "train.amp=bf16", "train.compile=true", "train.ckpt_every=25",
                    "train.keep_last=10"]
    first = train(load_config(None, over), progress=False)
    assert first.first_steps_s is not None and first.first_steps_s > 0  # compilation, timed apart
    ckpts = checkpoints_in(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step_0000025.pt", "step_0000050.pt"]
    ckpts[-1].unlink()
    resumed = train(load_config(None, over), resume="auto", progress=False)
    assert resumed.resumed_from.endswith("step_0000025.pt") and resumed.step == 50
    assert resumed.losses == first.losses[25:]  # bit for bit: RNG, data position and compiled kernels
    assert_follows(np.array(first.losses), fp32_curve, COMPILED_MAX_REL, COMPILED_MEAN_REL)


@pytest.mark.parametrize("flags,expected", [({"avx512_bf16", "amx_tile", "amx_bf16"}, "bf16"),
                                            ({"avx512_bf16", "avx512f"}, "bf16"), ({"avx512f", "avx2"}, "none"),
                                            (set(), "none")])
def test_amp_auto_picks_bf16_only_on_a_cpu_with_bf16_units(monkeypatch, flags, expected):
    from lafs.models import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.resolve_amp("auto", "cpu") == expected
    # an explicit choice is never overridden by the hardware
    assert precision.resolve_amp("bf16", "cpu") == "bf16" and precision.resolve_amp("none", "cpu") == "none"
    with pytest.raises(ValueError, match="amp must be one of none, auto, bf16, fp16, got 'bf32'"):
        precision.resolve_amp("bf32", "cpu")


@pytest.mark.parametrize(
    "flags, forced, iresnet, landmark",
    [({"amx_bf16"}, None, True, False), ({"avx512_bf16"}, None, False, False), (set(), "1", True, True),
     ({"amx_bf16"}, "0", False, False)],
)
def test_cnn_bf16_rule_is_per_cnn_as_measured(monkeypatch, flags, forced, iresnet, landmark):
    from lafs.models import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    if forced is None:
        monkeypatch.delenv("LAFS_CNN_AUTOCAST", raising=False)
    else:
        monkeypatch.setenv("LAFS_CNN_AUTOCAST", forced)
    assert precision.convs_follow_autocast("cpu") is iresnet
    assert precision.convs_follow_autocast("cpu", amx_pays=False) is landmark
    assert precision.convs_follow_autocast("cuda", amx_pays=False) is (forced != "0")


def test_landmark_cnn_runs_fp32_under_cpu_autocast():
    from lafs.models.landmark_cnn import LandmarkCNN

    seen = []
    cnn = LandmarkCNN(num_landmarks=4, img_size=32, width_mult=0.5)
    conv = next(m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cnn(torch.rand(2, 3, 32, 32))
    assert seen == [torch.float32] and out.shape == (2, 4, 2)


def test_amp_auto_run_reports_the_precision_it_used(tmp_path, monkeypatch):
    from lafs.models import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    cfg = load_config(None, CURVE + [f"out_dir={tmp_path}", "train.amp=auto", "train.steps=2", "train.log_every=1"])
    train(cfg, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["compiled"] is False


def test_compile_without_a_cpp_compiler_is_a_clear_error_before_any_step(tmp_path, monkeypatch):
    from lafs.train import loop

    monkeypatch.setattr(loop.shutil, "which", lambda name: None)
    cfg = load_config(None, CURVE + [f"out_dir={tmp_path}", "train.compile=true"])
    with pytest.raises(ValueError, match="train.compile=true on CPU needs a C\\+\\+ compiler .*train.compile=false"):
        train(cfg, progress=False)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
