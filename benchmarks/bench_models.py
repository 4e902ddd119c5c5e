"""CPU throughput benchmark of the backbones, against a matmul peak measured in the same run.

What it measures (everything printed is measured by this run; nothing is hard-coded):

1. **Matmul peak**: best GFLOP/s of a large fp32 ``torch.mm`` (2048 x 2048 @ 2048 x 2048 by default,
   ``2 n^3`` FLOPs per product), a few warm-up and timed repeats. It is measured again after the model
   runs; the better of the two is the reference peak (the two are printed, so drift or noise shows).
2. **Train-step throughput** of each backbone (default: fViT-Tiny, Part fViT-Tiny, Part fViT-micro,
   IResNet-50) at ``--batch`` images, CPU, fp32, train mode: forward + backward + ``AdamW`` step with
   ``loss = out["embedding"].square().mean()``. One or more warm-up steps, then ``--steps`` timed steps
   (``time.perf_counter``); images/s uses the median step time (the best step is shown too).
   FLOP convention: ``achieved GFLOP/s = 3 x 2 x total_macs x images/s / 1e9``, i.e. a train step counts
   3 forward passes (forward + backward for activations + backward for weights), 1 MAC = 2 FLOPs, and
   ``total_macs`` is :func:`lafs.models.complexity.complexity` of one image: conv + linear MACs **plus**
   the attention matmuls (Q K^T, A V). Normalisation, activations, ``grid_sample``, the optimizer
   and depthwise-conv inefficiency are not counted, so they show up as a lower fraction of peak.
   Goal: >= 50 % of the matmul peak for the ViTs (reported, not asserted).
3. **Batched patch sampling**: :func:`lafs.models.part_fvit.sample_patches` (one batched ``grid_sample``)
   vs :func:`~lafs.models.part_fvit.sample_patches_loop` (one ``grid_sample`` per landmark) on 32 x 3 x
   112 x 112 images with 32 x 196 random landmarks in [0, 111]: forward only (``no_grad``) and forward +
   backward (landmarks ``requires_grad``, as in Part fViT where the landmark CNN learns through the
   sampler). Median (and best) times over interleaved repeats, the loop / batched ratio (goal >= 10x)
   and the max abs difference of the outputs and of the landmark gradients.

``--profile N`` adds one untimed, profiled train step per model (``torch.profiler``) and prints its top N
ops by self CPU time: where a model falls short of the peak.

The thread count is PyTorch's default (not changed here); it and the torch version are printed.

Run (from the repository root)::

    python benchmarks/bench_models.py                 # full run (batch 32, 3 timed steps, ~2 min on 2 cores)
    python benchmarks/bench_models.py --quick         # smoke test (batch 8, 1 timed step)
    python benchmarks/bench_models.py --models fvit:tiny,part_fvit:micro --json out.json

Wall-clock timings on a shared or virtualised CPU are noisy; compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import gc
import json
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

from lafs.models.complexity import complexity
from lafs.models.part_fvit import sample_patches, sample_patches_loop
from lafs.models.registry import build_backbone, get_backbone

DEFAULT_MODELS = "fvit:tiny,part_fvit:tiny,part_fvit:micro,iresnet:r50"
PRETTY_NAMES = {
    ("fvit", "tiny"): "fViT-Tiny",
    ("part_fvit", "tiny"): "Part fViT-Tiny",
    ("part_fvit", "micro"): "Part fViT-micro",
    ("iresnet", "r50"): "IResNet-50",
}
VIT_BACKBONES = ("fvit", "part_fvit")
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
    n: int
    repeats: int
    times_s: list[float]
    best_gflops: float
    median_gflops: float


def bench_matmul(n: int, warmup: int, repeats: int) -> MatmulResult:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return MatmulResult(
        n=n,
        repeats=repeats,
        times_s=times,
        best_gflops=flops / min(times) / 1e9,
        median_gflops=flops / statistics.median(times) / 1e9,
    )


# ----------------------------------------------------------------------------------------------- models


@dataclass
class ModelResult:
    spec: str
    label: str
    img_size: int
    batch: int
    warmup: int
    steps: int
    params: int
    macs: int
    attn_macs: int
    total_macs: int
    step_times_s: list[float]
    fwd_times_s: list[float]
    bwd_times_s: list[float]
    opt_times_s: list[float]
    losses: list[float]
    profile_top: list[dict] | None = None
    median_step_s: float = 0.0
    best_step_s: float = 0.0
    images_per_s: float = 0.0
    best_images_per_s: float = 0.0
    achieved_gflops: float = 0.0
    best_achieved_gflops: float = 0.0
    fraction_of_peak: float | None = None
    best_fraction_of_peak: float | None = None
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


def profile_step(step: Callable[[], None], rows: int) -> list[dict]:
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
    log("    profiled step (top ops by self CPU time):\n" + "\n".join("      " + line for line in table.splitlines()))
    return top


def bench_model(name: str, size: str, batch: int, warmup: int, steps: int, profile_rows: int = 0) -> ModelResult:
    torch.manual_seed(0)
    img_size = int(get_backbone(name).sizes[size]["img_size"])
    model = build_backbone(name, size)
    cx = complexity(model, img_size)  # one image, one forward; restores the train/eval mode
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, img_size, img_size, generator=g) * 2 - 1  # the models take [-1, 1]

    def train_step() -> tuple[float, float, float, float, float]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(images)["embedding"].square().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return t0, t1, t2, t3, float(loss.detach())

    fwd, bwd, optt, total, losses = [], [], [], [], []
    for i in range(warmup + steps):
        t0, t1, t2, t3, value = train_step()
        if not torch.isfinite(torch.tensor(value)):
            raise RuntimeError(f"{name}:{size}: non-finite loss {value} at step {i}")
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            optt.append(t3 - t2)
            total.append(t3 - t0)
            losses.append(value)
        log(f"    {'warm-up' if i < warmup else 'step':7s} {i + 1}/{warmup + steps}: {t3 - t0:7.2f} s "
            f"(fwd {t1 - t0:.2f}, bwd {t2 - t1:.2f}, opt {t3 - t2:.2f})")

    top = profile_step(train_step, profile_rows) if profile_rows > 0 else None

    res = ModelResult(
        spec=f"{name}:{size}",
        label=PRETTY_NAMES.get((name, size), f"{name}:{size}"),
        img_size=img_size,
        batch=batch,
        warmup=warmup,
        steps=steps,
        params=cx.params,
        macs=cx.macs,
        attn_macs=cx.attn_macs,
        total_macs=cx.total_macs,
        step_times_s=total,
        fwd_times_s=fwd,
        bwd_times_s=bwd,
        opt_times_s=optt,
        losses=losses,
        profile_top=top,
    )
    res.median_step_s = statistics.median(total)
    res.best_step_s = min(total)
    res.images_per_s = batch / res.median_step_s
    res.best_images_per_s = batch / res.best_step_s
    res.achieved_gflops = TRAIN_FLOPS_PER_MAC * cx.total_macs * res.images_per_s / 1e9
    res.best_achieved_gflops = TRAIN_FLOPS_PER_MAC * cx.total_macs * res.best_images_per_s / 1e9
    if name in VIT_BACKBONES:
        res.goal_fraction = VIT_GOAL_FRACTION
    del model, opt, images
    gc.collect()
    return res


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="train-step batch size (default 32; --quick: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps per model (default 3; --quick: 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up train steps per model (default 1)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated name:size list (default {DEFAULT_MODELS})")
    p.add_argument("--matmul-n", type=int, default=2048, help="matmul size n for the peak (default 2048)")
    p.add_argument("--sample-repeats", type=int, default=None,
                   help="timed repeats of patch sampling (default 15; --quick: 5)")
    p.add_argument("--skip-sampling", action="store_true", help="skip the patch-sampling benchmark")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one extra train step per model and print its top N ops (default off)")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 8, 1 timed step, fewer repeats")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)

    batch = args.batch if args.batch is not None else (8 if args.quick else 32)
    steps = args.steps if args.steps is not None else (1 if args.quick else 3)
    sample_repeats = args.sample_repeats if args.sample_repeats is not None else (5 if args.quick else 15)
    mm_repeats = 3 if args.quick else 5
    if batch < 1 or steps < 1 or args.warmup < 0 or sample_repeats < 1:
        p.error("--batch, --steps and --sample-repeats must be >= 1, --warmup >= 0")
    models = parse_models(args.models)

    t_start = time.perf_counter()
    log("=" * 100)
    log("lafs backbone benchmark (CPU, fp32)")
    log(f"torch {torch.__version__}; torch.get_num_threads() = {torch.get_num_threads()} (default, unchanged); "
        f"os.cpu_count() = {os.cpu_count()}; python {platform.python_version()}; {platform.machine()}")
    log(f"batch {batch}, warm-up steps {args.warmup}, timed steps {steps}; models: "
        + ", ".join(f"{n}:{s}" for n, s in models))
    log(f"convention: {CONVENTION}")
    log("=" * 100)

    # 1. matmul peak (before)
    log(f"\n[1] matmul peak: torch.mm fp32 {args.matmul_n} x {args.matmul_n} @ {args.matmul_n} x {args.matmul_n}")
    mm_before = bench_matmul(args.matmul_n, warmup=2, repeats=mm_repeats)
    log(f"    before models: best {mm_before.best_gflops:.1f} GFLOP/s, median {mm_before.median_gflops:.1f} GFLOP/s")

    # 2. models
    log(f"\n[2] train steps (forward + backward + AdamW), batch {batch}")
    results: list[ModelResult] = []
    for name, size in models:
        log(f"  {PRETTY_NAMES.get((name, size), name + ':' + size)} ({name}:{size})")
        t0 = time.perf_counter()
        results.append(bench_model(name, size, batch, args.warmup, steps, args.profile))
        log(f"    ({time.perf_counter() - t0:.1f} s incl. build and MAC count)")

    mm_after = bench_matmul(args.matmul_n, warmup=1, repeats=mm_repeats)
    log(f"\n    matmul re-check after models: best {mm_after.best_gflops:.1f} GFLOP/s, "
        f"median {mm_after.median_gflops:.1f} GFLOP/s")
    peak = max(mm_before.best_gflops, mm_after.best_gflops)
    for r in results:
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
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    log(f"matmul peak (reference): {peak:.1f} GFLOP/s  (best of {mm_repeats} torch.mm n={args.matmul_n}; "
        f"before models best/median {mm_before.best_gflops:.1f}/{mm_before.median_gflops:.1f}, "
        f"after {mm_after.best_gflops:.1f}/{mm_after.median_gflops:.1f})")
    log(f"convention: {CONVENTION}\n")

    headers = ["model", "params M", "GMAC/img", "attn GMAC", "img px", "batch", "step s (med)", "step s (best)",
               "img/s", "GFLOP/s", "% peak", "% peak (best)", "goal"]
    rows = []
    for r in results:
        if r.goal_fraction is None:
            goal = "-"
        else:
            goal = f">={r.goal_fraction:.0%}: " + ("MET" if r.meets_goal else "NOT met")
        rows.append([
            r.label, f"{r.params / 1e6:.2f}", f"{r.total_macs / 1e9:.3f}", f"{r.attn_macs / 1e9:.3f}",
            str(r.img_size), str(r.batch), f"{r.median_step_s:.3f}", f"{r.best_step_s:.3f}",
            f"{r.images_per_s:.2f}", f"{r.achieved_gflops:.1f}", f"{100 * r.fraction_of_peak:.1f}%",
            f"{100 * r.best_fraction_of_peak:.1f}%", goal,
        ])
    log(format_table(headers, rows, right=set(range(1, 12))))

    log("\nstep-time breakdown (median of timed steps, seconds)")
    headers = ["model", "forward", "backward", "AdamW", "total", "timed steps", "loss (last)"]
    rows = [[r.label, f"{statistics.median(r.fwd_times_s):.3f}", f"{statistics.median(r.bwd_times_s):.3f}",
             f"{statistics.median(r.opt_times_s):.3f}", f"{r.median_step_s:.3f}", str(r.steps), f"{r.losses[-1]:.4g}"]
            for r in results]
    log(format_table(headers, rows))

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
                "torch_version": torch.__version__,
                "num_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "batch": batch,
                "warmup": args.warmup,
                "steps": steps,
                "quick": args.quick,
                "convention": CONVENTION,
                "wall_time_s": wall,
            },
            "matmul": {"peak_gflops": peak, "before": asdict(mm_before), "after": asdict(mm_after)},
            "models": [asdict(r) for r in results],
            "sampling": asdict(sampling) if sampling is not None else None,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
