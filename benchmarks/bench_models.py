"""CPU throughput benchmark of the backbones, against a matmul peak measured in the same run.

What it measures (everything printed is measured by this run; nothing is hard-coded):

1. **Matmul peaks**: best GFLOP/s of a large fp32 and a large bf16 ``torch.mm`` (2048 x 2048 @ 2048 x 2048 by default,
   ``2 n^3`` FLOPs per product), a few warm-up and timed repeats. It is measured again after the model
   runs; the better of the two is the reference peak (the two are printed, so drift or noise shows).
2. **Train-step throughput** of each backbone (default: Part fViT-micro, fViT-micro, fViT-Tiny, Part fViT-Tiny,
   IResNet-micro) at ``--batch`` images (default 64), CPU, train mode: forward + backward + ``AdamW`` step with
   ``loss = out["embedding"].square().mean()``, in each **setting** (``--settings``):
   ``fp32-stock`` (the kernels before the lean path: ``nn.Dropout``'s bernoulli mask, NCHW convs, foreach AdamW),
   ``fp32`` (eager, the library's lean kernels: cheap dropout masks, channels_last CNNs, fused AdamW),
   ``bf16`` (bf16 autocast, fp32 master weights and optimizer), ``fp32+compile`` and ``bf16+compile``
   (``torch.compile``, inductor). Every setting builds the same model from the same seed. The warm-up steps
   (compilation included) are timed apart; then each round times one step of every setting in turn, so all settings
   see the same machine load, and images/s uses the median over rounds. The speed-up column divides fp32's median
   step time by the setting's. FLOP convention: ``achieved GFLOP/s = 3 x 2 x total_macs x images/s / 1e9``, i.e.
   a train step counts 3 forward passes (forward + backward for activations + backward for weights), 1 MAC = 2
   FLOPs, and ``total_macs`` is :func:`lafs.models.complexity.complexity` of one image: conv + linear MACs **plus**
   the attention matmuls (Q K^T, A V). Normalisation, activations, ``grid_sample``, the optimizer and depthwise-conv
   inefficiency are not counted, so they show up as a lower fraction of peak. The fraction is taken against the
   matmul peak of the setting's dtype (fp32 or bf16), both measured in this run. Goal: >= 50 % of that peak for the
   ViTs (reported, not asserted).
3. **Batched patch sampling**: :func:`lafs.models.part_fvit.sample_patches` (one batched ``grid_sample``)
   vs :func:`~lafs.models.part_fvit.sample_patches_loop` (one ``grid_sample`` per landmark) on 32 x 3 x
   112 x 112 images with 32 x 196 random landmarks in [0, 111]: forward only (``no_grad``) and forward +
   backward (landmarks ``requires_grad``, as in Part fViT where the landmark CNN learns through the
   sampler). Median (and best) times over interleaved repeats, the loop / batched ratio (goal >= 10x)
   and the max abs difference of the outputs and of the landmark gradients.

``--official DIR`` adds the official Part fViT-Tiny (``ViT_face_landmark_patch8`` with the Tiny arguments, imported
from ``DIR/vit_pytorch_my/``; **this executes the Python code in DIR**, and only when the option is given; no
official code is part of lafs): its fp32 eager train step (train mode, stock AdamW, same seed, same images and loss)
is timed interleaved, round by round, with lafs's part_fvit:tiny in every ``--settings`` setting, and the table gives
official / lafs speed-ups (goal: >= 2x). Those lafs steps are timed there, whatever ``--models`` says.

``--profile N`` adds one untimed, profiled train step per model (``torch.profiler``) and prints its top N
ops by self CPU time: where a model falls short of the peak.

The thread count is PyTorch's default (not changed here); it, the torch version and the CPU flags that decide bf16
speed (``avx512_bf16``, ``amx_bf16``) are printed: machines of one kind differ.

Run (from the repository root)::

    python benchmarks/bench_models.py                 # full run (batch 64, 5 interleaved rounds)
    python benchmarks/bench_models.py --quick         # smoke test (batch 8, 1 timed step)
    python benchmarks/bench_models.py --models fvit:tiny,part_fvit:micro --json out.json

Wall-clock timings on a shared or virtualised CPU are noisy; compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from lafs.models.complexity import complexity
from lafs.models.dropout import stock_dropout
from lafs.models.precision import cpu_flags as cpu_flag_set
from lafs.models.part_fvit import sample_patches, sample_patches_loop
from lafs.models.registry import build_backbone, get_backbone

DEFAULT_MODELS = "part_fvit:micro,fvit:micro,fvit:tiny,part_fvit:tiny,iresnet:micro"
PRETTY_NAMES = {
    ("fvit", "tiny"): "fViT-Tiny",
    ("part_fvit", "tiny"): "Part fViT-Tiny",
    ("part_fvit", "micro"): "Part fViT-micro",
    ("iresnet", "r50"): "IResNet-50",
}
VIT_BACKBONES = ("fvit", "part_fvit", "vit", "vit_irpe", "vit_kprpe")
VIT_GOAL_FRACTION = 0.5
SAMPLING_GOAL_RATIO = 10.0
TRAIN_FLOPS_PER_MAC = 3 * 2  # train step ~ 3 forward passes; 1 MAC = 2 FLOPs
CONVENTION = (
    "achieved GFLOP/s = 3 (fwd + 2x bwd) x 2 (FLOP/MAC) x total_macs/img (conv + linear + attention matmuls) "
    "x img/s / 1e9; img/s from the median step; % peak = achieved / matmul peak"
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- matmul


@dataclass
class MatmulResult:
    dtype: str
    n: int
    repeats: int
    times_s: list[float]
    best_gflops: float
    median_gflops: float


def bench_matmul(n: int, warmup: int, repeats: int, dtype: torch.dtype = torch.float32) -> MatmulResult:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return MatmulResult(
        dtype=str(dtype).replace("torch.", ""),
        n=n,
        repeats=repeats,
        times_s=times,
        best_gflops=flops / min(times) / 1e9,
        median_gflops=flops / statistics.median(times) / 1e9,
    )


# ----------------------------------------------------------------------------------------------- models


SETTINGS = {
    # name: (autocast dtype or None, torch.compile, lean kernels)
    "fp32-stock": (None, False, False),
    "fp32": (None, False, True),
    "bf16": (torch.bfloat16, False, True),
    "fp32+compile": (None, True, True),
    "bf16+compile": (torch.bfloat16, True, True),
}
DEFAULT_SETTINGS = "fp32-stock,fp32,bf16,bf16+compile"


@dataclass
class ModelResult:
    spec: str
    label: str
    setting: str
    img_size: int
    batch: int
    warmup: int
    steps: int
    params: int
    macs: int
    attn_macs: int
    total_macs: int
    step_times_s: list[float]
    losses: list[float]
    warmup_s: float = 0.0  # the untimed first steps (torch.compile's compilation included)
    profile_top: list[dict] | None = None
    median_step_s: float = 0.0
    best_step_s: float = 0.0
    images_per_s: float = 0.0
    best_images_per_s: float = 0.0
    achieved_gflops: float = 0.0
    best_achieved_gflops: float = 0.0
    peak_dtype: str = "fp32"
    fraction_of_peak: float | None = None
    best_fraction_of_peak: float | None = None
    speedup_vs_fp32: float | None = None
    goal_fraction: float | None = None
    meets_goal: bool | None = None


def parse_models(spec: str) -> list[tuple[str, str]]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise SystemExit(f"--models entries are name:size (e.g. fvit:tiny), got {item!r}")
        name, size = (s.strip() for s in item.split(":", 1))
        try:
            entry = get_backbone(name)
        except KeyError as e:
            raise SystemExit(str(e.args[0])) from None
        if size not in entry.sizes:
            raise SystemExit(f"unknown size {size!r} for {name!r}; sizes: {', '.join(entry.sizes)}")
        out.append((name, size))
    if not out:
        raise SystemExit("--models is empty")
    return out


def parse_settings(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in SETTINGS]
    if bad or not names:
        raise SystemExit(f"--settings: unknown {bad or spec!r}; choose from {', '.join(SETTINGS)}")
    return names


def profile_step(step: Callable[[], None], rows: int, title: str = "") -> list[dict]:
    """Run ``step`` once under torch.profiler; print and return its top ``rows`` ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = [
        {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
         "self_cpu_pct": 100.0 * e.self_cpu_time_total / total}
        for e in events[:rows]
    ]
    table = format_table(
        ["op", "calls", "self CPU ms", "% of step"],
        [[t["op"][:60], str(t["calls"]), f"{t['self_cpu_ms']:.1f}", f"{t['self_cpu_pct']:.1f}%"] for t in top],
    )
    log(f"    profiled step {title} (top ops by self CPU time):\n" + "\n".join("      " + line for line in table.splitlines()))
    return top


def make_train_step(name: str, size: str, setting: str, images: torch.Tensor) -> tuple[Callable[[], float], nn.Module]:
    """One model (same seed for every setting) and its train step: forward + backward + AdamW."""
    dtype, compiled, lean = SETTINGS[setting]
    torch.manual_seed(0)
    model = build_backbone(name, size).train()
    if lean:  # the library's training defaults: NHWC convs, fused AdamW, the cheap dropout mask
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True if lean else None)
    forward = torch.compile(model) if compiled else model

    def step() -> float:
        with contextlib.nullcontext() if lean else stock_dropout():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
                loss = forward(images)["embedding"].float().square().mean()
            loss.backward()
            opt.step()
        return float(loss.detach())

    return step, model


def time_interleaved(runs: dict[str, Callable[[], float]], warmup: int, steps: int, what: str
                     ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, list[float]]]:
    """Warm every step up (timed apart: compilation happens there), then ``steps`` rounds that time one step of each
    in turn, so all see the same machine load. Returns (warm-up seconds, step times, losses) per key."""
    warm: dict[str, float] = {}
    for key, step in runs.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warm[key] = time.perf_counter() - t0
        log(f"    {key:13s} warm-up {warmup} step(s): {warm[key]:.1f} s")
    times: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(steps):
        for key, step in runs.items():
            t0 = time.perf_counter()
            value = step()
            times[key].append(time.perf_counter() - t0)
            if not math.isfinite(value):
                raise RuntimeError(f"{what}, {key}: non-finite loss {value} at timed step {i}")
            losses[key].append(value)
        log(f"    round {i + 1}/{steps}: " + ", ".join(f"{k} {times[k][-1]:.3f} s" for k in runs))
    return warm, times, losses


def bench_model(name: str, size: str, settings: list[str], batch: int, warmup: int, steps: int,
                profile_rows: int = 0) -> list[ModelResult]:
    """Every setting of one model, timed interleaved: each round times one step of every setting in turn, so all
    settings see the same machine load; the medians over rounds are compared."""
    img_size = int(get_backbone(name).sizes[size]["img_size"])
    torch.manual_seed(0)
    cx = complexity(build_backbone(name, size), img_size)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, img_size, img_size, generator=g) * 2 - 1  # the models take [-1, 1]
    runs = {setting: make_train_step(name, size, setting, images)[0] for setting in settings}
    warm, times, losses = time_interleaved(runs, warmup, steps, f"{name}:{size}")
    results = []
    for setting in settings:
        top = profile_step(runs[setting], profile_rows, f"[{setting}]") if profile_rows > 0 else None
        ts = times[setting]
        r = ModelResult(
            spec=f"{name}:{size}", label=PRETTY_NAMES.get((name, size), f"{name}:{size}"), setting=setting,
            img_size=img_size, batch=batch, warmup=warmup, steps=steps, params=cx.params, macs=cx.macs,
            attn_macs=cx.attn_macs, total_macs=cx.total_macs, step_times_s=ts, losses=losses[setting],
            warmup_s=warm[setting], profile_top=top, peak_dtype="bf16" if SETTINGS[setting][0] else "fp32",
        )
        r.median_step_s, r.best_step_s = statistics.median(ts), min(ts)
        r.images_per_s, r.best_images_per_s = batch / r.median_step_s, batch / r.best_step_s
        r.achieved_gflops = TRAIN_FLOPS_PER_MAC * cx.total_macs * r.images_per_s / 1e9
        r.best_achieved_gflops = TRAIN_FLOPS_PER_MAC * cx.total_macs * r.best_images_per_s / 1e9
        if name in VIT_BACKBONES:
            r.goal_fraction = VIT_GOAL_FRACTION
        results.append(r)
    if "fp32" in times:
        base = statistics.median(times["fp32"])
        for r in results:
            r.speedup_vs_fp32 = base / r.median_step_s
    del runs
    gc.collect()
    return results


# ------------------------------------------------------------------------------------- official code


# The official Part fViT-Tiny: ``ViT_face_landmark_patch8`` (Part_fViT repo, vit_pytorch_my/vit_face_withlandmark.py)
# with the Tiny configuration (512/3/11/2560, the LAFS paper's §4.2 ablation model) and the released dropout values;
# loss_type "None" = no classifier, so it has exactly the parameters of lafs's part_fvit:tiny (15.28 M).
OFFICIAL_MODULE = "vit_pytorch_my.vit_face_withlandmark"
OFFICIAL_CLASS = "ViT_face_landmark_patch8"
OFFICIAL_TINY_KWARGS = {"loss_type": "None", "GPU_ID": None, "num_class": None, "image_size": 112, "patch_size": 8,
                        "dim": 512, "depth": 3, "heads": 11, "mlp_dim": 2560, "dropout": 0.1, "emb_dropout": 0.1,
                        "with_land": True}
OFFICIAL_GOAL_SPEEDUP = 2.0


@dataclass
class OfficialSettingResult:
    setting: str
    step_times_s: list[float]
    losses: list[float]
    warmup_s: float
    median_step_s: float
    best_step_s: float
    speedup_median: float  # official median step / lafs median step (same rounds)
    speedup_best: float
    meets_goal: bool


@dataclass
class OfficialComparison:
    official_dir: str
    official_model: str
    official_kwargs: dict
    official_params: int
    lafs_params: int
    batch: int
    warmup: int
    steps: int
    official_step_times_s: list[float]
    official_losses: list[float]
    official_warmup_s: float
    official_median_step_s: float
    official_best_step_s: float
    lafs: list[OfficialSettingResult]
    goal_speedup: float = OFFICIAL_GOAL_SPEEDUP


def load_official_class(official_dir: Path):
    """Import ``ViT_face_landmark_patch8`` from ``official_dir`` (the folder that holds ``vit_pytorch_my/``).

    This EXECUTES the Python files found there (and whatever they import); it is only called when the user passes
    ``--official DIR``. Nothing of the official code is part of this repository.
    """
    import importlib

    official_dir = Path(official_dir).resolve()
    if not (official_dir / "vit_pytorch_my" / "vit_face_withlandmark.py").is_file():
        raise SystemExit(f"--official: {official_dir} has no vit_pytorch_my/vit_face_withlandmark.py")
    sys.path.insert(0, str(official_dir))
    try:
        module = importlib.import_module(OFFICIAL_MODULE)
    except ImportError as e:
        raise SystemExit(f"--official: importing {OFFICIAL_MODULE} from {official_dir} failed: {e}") from None
    finally:
        sys.path.remove(str(official_dir))
    return getattr(module, OFFICIAL_CLASS)


def bench_official(official_dir: Path, settings: list[str], batch: int, warmup: int,
                   steps: int) -> OfficialComparison:
    """The official Part fViT-Tiny's fp32 eager train step vs lafs part_fvit:tiny in every setting, interleaved.

    Official step, as released: train mode, stock PyTorch (NCHW, ``nn.Dropout``, timm DropPath, one ``grid_sample``
    per landmark), ``AdamW`` with PyTorch's default implementation; its forward takes [0, 255] pixels and rescales
    them to [-1, 1] itself, so it gets ``(images + 1) * 127.5`` of the same images. Same seed (0) for the
    construction, the same loss (``embedding.square().mean()``), lr and weight decay as :func:`make_train_step`.
    Each round times one official step, then one step of every lafs setting, so all see the same machine load.
    """
    import warnings

    cls = load_official_class(official_dir)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1  # the same images as bench_model's
    pixels = (images + 1) * 127.5
    torch.manual_seed(0)
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # its constructor prints "no loss for vit_face"
        official = cls(**OFFICIAL_TINY_KWARGS).train()
    official_opt = torch.optim.AdamW(official.parameters(), lr=1e-4, weight_decay=0.05)

    def official_step() -> float:
        official_opt.zero_grad(set_to_none=True)
        loss = official(pixels).float().square().mean()
        loss.backward()
        official_opt.step()
        return float(loss.detach())

    runs: dict[str, Callable[[], float]] = {"official": official_step}
    lafs_params = 0
    for setting in settings:
        runs[setting], model = make_train_step("part_fvit", "tiny", setting, images)
        lafs_params = sum(p.numel() for p in model.parameters())
    official_params = sum(p.numel() for p in official.parameters())
    log(f"    official {OFFICIAL_CLASS} (Tiny) from {official_dir}: {official_params / 1e6:.3f} M params; "
        f"lafs part_fvit:tiny: {lafs_params / 1e6:.3f} M")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid")  # the official sampler's, every call
        warm, times, losses = time_interleaved(runs, warmup, steps, "official comparison")
    off_med, off_best = statistics.median(times["official"]), min(times["official"])
    lafs = []
    for setting in settings:
        med, best = statistics.median(times[setting]), min(times[setting])
        lafs.append(OfficialSettingResult(
            setting=setting, step_times_s=times[setting], losses=losses[setting], warmup_s=warm[setting],
            median_step_s=med, best_step_s=best, speedup_median=off_med / med, speedup_best=off_best / best,
            meets_goal=off_med / med >= OFFICIAL_GOAL_SPEEDUP,
        ))
    del runs
    gc.collect()
    return OfficialComparison(
        official_dir=str(Path(official_dir).resolve()), official_model=f"{OFFICIAL_MODULE}.{OFFICIAL_CLASS}",
        official_kwargs=dict(OFFICIAL_TINY_KWARGS), official_params=official_params, lafs_params=lafs_params,
        batch=batch, warmup=warmup, steps=steps, official_step_times_s=times["official"],
        official_losses=losses["official"], official_warmup_s=warm["official"], official_median_step_s=off_med,
        official_best_step_s=off_best, lafs=lafs,
    )


def format_official(c: OfficialComparison) -> str:
    headers = ["lafs setting", "official fp32 step s (med)", "lafs step s (med)", "lafs / official speed-up",
               "best: official s", "lafs s", "speed-up", f"goal >={c.goal_speedup:.0f}x (median)"]
    rows = [
        [r.setting, f"{c.official_median_step_s:.3f}", f"{r.median_step_s:.3f}", f"{r.speedup_median:.2f}x",
         f"{c.official_best_step_s:.3f}", f"{r.best_step_s:.3f}", f"{r.speedup_best:.2f}x",
         "MET" if r.meets_goal else "NOT met"]
        for r in c.lafs
    ]
    return (f"official Part fViT-Tiny ({c.official_model}, fp32 eager, train mode, stock AdamW; "
            f"{c.official_params / 1e6:.3f} M params) vs lafs part_fvit:tiny ({c.lafs_params / 1e6:.3f} M), "
            f"batch {c.batch}, medians and bests of {c.steps} interleaved rounds:\n" + format_table(headers, rows))


# --------------------------------------------------------------------------------------------- sampling


@dataclass
class SamplingResult:
    batch: int
    num_landmarks: int
    img_size: int
    patch_size: int
    repeats: int
    # median (primary) and best times, seconds; ratio = loop / batched
    fwd_batched_s: float
    fwd_loop_s: float
    fwd_ratio: float
    fwdbwd_batched_s: float
    fwdbwd_loop_s: float
    fwdbwd_ratio: float
    fwd_batched_best_s: float
    fwd_loop_best_s: float
    fwd_ratio_best: float
    fwdbwd_batched_best_s: float
    fwdbwd_loop_best_s: float
    fwdbwd_ratio_best: float
    max_abs_diff_out: float
    max_abs_diff_grad: float
    goal_ratio: float = SAMPLING_GOAL_RATIO
    meets_goal_fwd: bool = False
    meets_goal_fwdbwd: bool = False


def bench_sampling(batch: int, num_landmarks: int, img_size: int, patch_size: int, repeats: int) -> SamplingResult:
    g = torch.Generator().manual_seed(2)
    images = torch.rand(batch, 3, img_size, img_size, generator=g) * 2 - 1
    landmarks = torch.rand(batch, num_landmarks, 2, generator=g) * (img_size - 1)
    weight = torch.randn(batch, num_landmarks, patch_size * patch_size * 3, generator=g)

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(images, landmarks, patch_size)
        return run

    def fwdbwd(fn):
        def run():
            lm = landmarks.detach().requires_grad_(True)
            (fn(images, lm, patch_size) * weight).sum().backward()
            return lm.grad
        return run

    # Agreement (outputs and landmark gradients); also the warm-up.
    out_b, out_l = fwd(sample_patches)(), fwd(sample_patches_loop)()
    grad_b, grad_l = fwdbwd(sample_patches)(), fwdbwd(sample_patches_loop)()
    diff_out = float((out_b - out_l).abs().max())
    diff_grad = float((grad_b - grad_l).abs().max())

    cases = {
        "fwd_batched": fwd(sample_patches),
        "fwd_loop": fwd(sample_patches_loop),
        "fwdbwd_batched": fwdbwd(sample_patches),
        "fwdbwd_loop": fwdbwd(sample_patches_loop),
    }
    for fn in cases.values():
        fn()
    # Interleaved, so that a slow spell of a shared CPU hits both variants alike.
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return SamplingResult(
        batch=batch,
        num_landmarks=num_landmarks,
        img_size=img_size,
        patch_size=patch_size,
        repeats=repeats,
        fwd_batched_s=med["fwd_batched"],
        fwd_loop_s=med["fwd_loop"],
        fwd_ratio=med["fwd_loop"] / med["fwd_batched"],
        fwdbwd_batched_s=med["fwdbwd_batched"],
        fwdbwd_loop_s=med["fwdbwd_loop"],
        fwdbwd_ratio=med["fwdbwd_loop"] / med["fwdbwd_batched"],
        fwd_batched_best_s=best["fwd_batched"],
        fwd_loop_best_s=best["fwd_loop"],
        fwd_ratio_best=best["fwd_loop"] / best["fwd_batched"],
        fwdbwd_batched_best_s=best["fwdbwd_batched"],
        fwdbwd_loop_best_s=best["fwdbwd_loop"],
        fwdbwd_ratio_best=best["fwdbwd_loop"] / best["fwdbwd_batched"],
        max_abs_diff_out=diff_out,
        max_abs_diff_grad=diff_grad,
        meets_goal_fwd=med["fwd_loop"] / med["fwd_batched"] >= SAMPLING_GOAL_RATIO,
        meets_goal_fwdbwd=med["fwdbwd_loop"] / med["fwdbwd_batched"] >= SAMPLING_GOAL_RATIO,
    )


# ---------------------------------------------------------------------------------------------- output


def format_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(headers).rstrip(), "  ".join("-" * w for w in widths)]
    lines += [fmt(r).rstrip() for r in rows]
    return "\n".join(lines)


def cpu_flags() -> str:
    """The CPU model and the flags that decide bf16 speed (AMX tiles, AVX-512 BF16), from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name") and ":" in line),
                 platform.processor() or platform.machine())
    flags = cpu_flag_set()  # the same reading that decides where bf16 convolutions run
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    return f"{model}; flags: " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="train-step batch size (default 64; --quick: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds per model (default 5; --quick: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per setting (default 3; --quick: 1)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated name:size list (default {DEFAULT_MODELS})")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help=f"comma-separated, from {', '.join(SETTINGS)} (default {DEFAULT_SETTINGS}); "
                        "fp32-stock = the kernels before the lean path (nn.Dropout's bernoulli, NCHW, foreach AdamW)")
    p.add_argument("--matmul-n", type=int, default=2048, help="matmul size n for the peaks (default 2048)")
    p.add_argument("--sample-repeats", type=int, default=None,
                   help="timed repeats of patch sampling (default 15; --quick: 5)")
    p.add_argument("--skip-sampling", action="store_true", help="skip the patch-sampling benchmark")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one extra train step per model and setting; print its top N ops")
    p.add_argument("--official", type=Path, default=None, metavar="DIR",
                   help="folder holding the official vit_pytorch_my/ (Part fViT code): time its Tiny fp32 step\n"
                        "interleaved with lafs part_fvit:tiny in every setting. EXECUTES the code in DIR.")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 8, 1 timed round, fewer repeats")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)

    batch = args.batch if args.batch is not None else (8 if args.quick else 64)
    steps = args.steps if args.steps is not None else (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    sample_repeats = args.sample_repeats if args.sample_repeats is not None else (5 if args.quick else 15)
    mm_repeats = 3 if args.quick else 5
    if batch < 1 or steps < 1 or warmup < 1 or sample_repeats < 1:
        p.error("--batch, --steps, --warmup and --sample-repeats must be >= 1")
    models = parse_models(args.models)
    settings = parse_settings(args.settings)
    if args.official is not None and not (args.official / "vit_pytorch_my" / "vit_face_withlandmark.py").is_file():
        p.error(f"--official: {args.official} has no vit_pytorch_my/vit_face_withlandmark.py")

    t_start = time.perf_counter()
    log("=" * 100)
    log("lafs backbone benchmark (CPU train steps; settings timed interleaved, side by side)")
    log(f"cpu: {cpu_flags()}")
    log(f"torch {torch.__version__} (capability {torch.backends.cpu.get_cpu_capability()}); "
        f"torch.get_num_threads() = {torch.get_num_threads()} (default, unchanged); os.cpu_count() = {os.cpu_count()}; "
        f"python {platform.python_version()}; {platform.machine()}")
    log(f"batch {batch}, warm-up steps {warmup}, timed rounds {steps}; settings: {', '.join(settings)}; models: "
        + ", ".join(f"{n}:{s}" for n, s in models))
    log(f"convention: {CONVENTION}")
    log("=" * 100)

    # 1. matmul peaks (before)
    log(f"\n[1] matmul peaks: torch.mm {args.matmul_n} x {args.matmul_n} @ {args.matmul_n} x {args.matmul_n}")
    mm = {"fp32": [bench_matmul(args.matmul_n, 2, mm_repeats, torch.float32)],
          "bf16": [bench_matmul(args.matmul_n, 2, mm_repeats, torch.bfloat16)]}
    for k, (r,) in mm.items():
        log(f"    {k} before models: best {r.best_gflops:.1f} GFLOP/s, median {r.median_gflops:.1f} GFLOP/s")

    # 2. models
    log(f"\n[2] train steps (forward + backward + AdamW), batch {batch}")
    results: list[ModelResult] = []
    for name, size in models:
        log(f"  {PRETTY_NAMES.get((name, size), name + ':' + size)} ({name}:{size})")
        t0 = time.perf_counter()
        results += bench_model(name, size, settings, batch, warmup, steps, args.profile)
        log(f"    ({time.perf_counter() - t0:.1f} s incl. build, compilation and MAC count)")
    official = None
    if args.official is not None:
        log(f"\n[2b] official Part fViT-Tiny (from {args.official}) vs lafs part_fvit:tiny, interleaved, batch {batch}")
        t0 = time.perf_counter()
        official = bench_official(args.official, settings, batch, warmup, steps)
        log(f"    ({time.perf_counter() - t0:.1f} s)")

    for k, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        mm[k].append(bench_matmul(args.matmul_n, 1, mm_repeats, dtype))
        log(f"    {k} matmul re-check after models: best {mm[k][1].best_gflops:.1f} GFLOP/s, "
            f"median {mm[k][1].median_gflops:.1f} GFLOP/s")
    peaks = {k: max(r.best_gflops for r in v) for k, v in mm.items()}
    for r in results:
        peak = peaks[r.peak_dtype]
        r.fraction_of_peak = r.achieved_gflops / peak
        r.best_fraction_of_peak = r.best_achieved_gflops / peak
        if r.goal_fraction is not None:
            r.meets_goal = r.fraction_of_peak >= r.goal_fraction

    # 3. sampling
    sampling = None
    if not args.skip_sampling:
        log(f"\n[3] patch sampling: batched vs per-landmark loop ({sample_repeats} interleaved timed repeats)")
        sampling = bench_sampling(batch=32, num_landmarks=196, img_size=112, patch_size=8, repeats=sample_repeats)

    # ---- report
    log("\n" + "=" * 100)
    log("RESULTS")
    log("=" * 100)
    log(f"cpu: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for k in ("fp32", "bf16"):
        b, a = mm[k]
        log(f"{k} matmul peak (reference): {peaks[k]:.1f} GFLOP/s  (best of {mm_repeats} torch.mm n={args.matmul_n}; "
            f"before models best/median {b.best_gflops:.1f}/{b.median_gflops:.1f}, "
            f"after {a.best_gflops:.1f}/{a.median_gflops:.1f})")
    log(f"convention: {CONVENTION}; % peak is against the matmul peak of the setting's dtype\n")

    headers = ["model", "setting", "GMAC/img", "batch", "step s (med)", "step s (best)", "img/s", "GFLOP/s",
               "% peak", "peak", "x fp32", "warm-up s", "goal >=50% peak"]
    rows = []
    for r in results:
        goal = "-" if r.goal_fraction is None else ("MET" if r.meets_goal else "NOT met")
        rows.append([
            r.label, r.setting, f"{r.total_macs / 1e9:.3f}", str(r.batch), f"{r.median_step_s:.3f}",
            f"{r.best_step_s:.3f}", f"{r.images_per_s:.1f}", f"{r.achieved_gflops:.1f}",
            f"{100 * r.fraction_of_peak:.1f}%", r.peak_dtype,
            "-" if r.speedup_vs_fp32 is None else f"{r.speedup_vs_fp32:.2f}x", f"{r.warmup_s:.1f}", goal,
        ])
    log(format_table(headers, rows, right=set(range(2, 12))))
    best = {}
    for r in results:
        if r.spec not in best or r.images_per_s > best[r.spec].images_per_s:
            best[r.spec] = r
    log("\nbest setting per model (speed-up over fp32 eager with the lean kernels"
        + (", and over fp32-stock" if "fp32-stock" in settings else "") + ", medians of the same interleaved rounds):")
    for spec, r in best.items():
        stock = next((x for x in results if x.spec == spec and x.setting == "fp32-stock"), None)
        extra = f", {stock.median_step_s / r.median_step_s:.2f}x fp32-stock" if stock else ""
        fp32 = "-" if r.speedup_vs_fp32 is None else f"{r.speedup_vs_fp32:.2f}x"
        log(f"  {r.label}: {r.setting}, {r.images_per_s:.1f} img/s, {fp32} fp32{extra}")

    if official is not None:
        log("\n" + format_official(official))

    if sampling is not None:
        s = sampling
        log(f"\npatch sampling: images {s.batch} x 3 x {s.img_size} x {s.img_size}, landmarks {s.batch} x "
            f"{s.num_landmarks} x 2, patch {s.patch_size} (median and best of {s.repeats}, interleaved)")
        headers = ["pass", "batched ms", "loop ms", "loop / batched", "best: batched ms", "loop ms",
                   "loop / batched", f"goal >={s.goal_ratio:.0f}x (median)"]
        rows = [
            ["forward (no_grad)", f"{1e3 * s.fwd_batched_s:.2f}", f"{1e3 * s.fwd_loop_s:.2f}", f"{s.fwd_ratio:.1f}x",
             f"{1e3 * s.fwd_batched_best_s:.2f}", f"{1e3 * s.fwd_loop_best_s:.2f}", f"{s.fwd_ratio_best:.1f}x",
             "MET" if s.meets_goal_fwd else "NOT met"],
            ["forward + backward", f"{1e3 * s.fwdbwd_batched_s:.2f}", f"{1e3 * s.fwdbwd_loop_s:.2f}",
             f"{s.fwdbwd_ratio:.1f}x", f"{1e3 * s.fwdbwd_batched_best_s:.2f}", f"{1e3 * s.fwdbwd_loop_best_s:.2f}",
             f"{s.fwdbwd_ratio_best:.1f}x", "MET" if s.meets_goal_fwdbwd else "NOT met"],
        ]
        log(format_table(headers, rows))
        log(f"agreement: max |batched - loop| output {s.max_abs_diff_out:.3g}, landmark gradient "
            f"{s.max_abs_diff_grad:.3g}")

    wall = time.perf_counter() - t_start
    log(f"\ntotal wall time {wall:.1f} s")

    if args.json is not None:
        payload = {
            "meta": {
                "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "argv": sys.argv[1:] if argv is None else list(argv),
                "cpu": cpu_flags(),
                "torch_version": torch.__version__,
                "num_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "batch": batch,
                "warmup": warmup,
                "steps": steps,
                "settings": settings,
                "quick": args.quick,
                "convention": CONVENTION,
                "wall_time_s": wall,
            },
            "matmul": {"peak_gflops": peaks, "runs": {k: [asdict(r) for r in v] for k, v in mm.items()}},
            "models": [asdict(r) for r in results],
            "sampling": asdict(sampling) if sampling is not None else None,
            "official": asdict(official) if official is not None else None,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
