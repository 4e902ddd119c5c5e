"""What the step guard (finite weights only, ``lafs.train.guard``; ``train.step_guard``) costs per training step.

    python benchmarks/bench_step_guard.py [--models fvit:micro,iresnet:micro] [--optimizers adamw,sgd]
                                          [--batch 32] [--steps 10] [--rounds 5] [--threads 0] [--json OUT]

For each model and optimizer, the training step of ``lafs.train.loop`` (zero_grad, forward, backward, optimizer step)
is timed with and without the guard's work around it (``snapshot`` before the forward, the fused ``nonfinite``
check after the step), the two interleaved round by round on the same model, batch and thread count, so drift in
the machine's load hits both alike. Printed side by side: the median ms per step of each, the difference, and the
guard's two parts timed alone; with the CPU model, its vector flags and the torch thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lafs.config import load_config
from lafs.models.precision import cpu_flags as cpu_flag_set
from lafs.train.distributed import DistEnv
from lafs.train.guard import StepGuard
from lafs.train.loop import collate
from lafs.train.optim import build_optimizer, param_groups
from lafs.train.run import build_task, build_train_set


def cpu_line() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name") and ":" in ln),
                 platform.processor() or platform.machine())
    flags = cpu_flag_set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return f"{model}; flags: " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)


def setup(spec: str, optimizer: str, batch: int):
    name, size = spec.split(":")
    cfg = load_config(None, [f"model.name={name}", f"model.size={size}", "data.source=synthetic",
                             "data.num_identities=16", f"data.images_per_identity={max(2, batch // 16 + 1)}",
                             "data.workers=0", "data.val_pairs=0", "augment.preset=none", f"optim.name={optimizer}",
                             f"train.batch_size={batch}"])
    torch.manual_seed(0)
    data = build_train_set(cfg)
    task = build_task(cfg, data.num_identities, DistEnv(), log=lambda *_: None).train()
    if cfg.train.channels_last:
        task.to(memory_format=torch.channels_last)
    o = cfg.optim
    opt = build_optimizer(param_groups(list(task.named_parameters()), o.weight_decay, o.landmark_weight_decay),
                          o.name, o.lr, o.momentum, tuple(o.betas), o.fused)
    b = collate([data[i] for i in range(batch)])
    return task, opt, b["image"], b["label"]


def timed_steps(task, opt, x, y, guard: StepGuard | None, steps: int) -> float:
    """Seconds per step of ``steps`` training steps, with the guard's work when ``guard`` is given."""
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if guard is not None:
            guard.snapshot()
        task(x, y)["loss"].backward()
        opt.step()
        if guard is not None and guard.nonfinite():
            guard.restore()
    return (time.perf_counter() - t0) / steps


def part_ms(fn, reps: int = 20) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def measure(spec: str, optimizer: str, batch: int, steps: int, rounds: int) -> dict:
    task, opt, x, y = setup(spec, optimizer, batch)
    guard = StepGuard(task, opt)
    timed_steps(task, opt, x, y, guard, 2)  # warm-up: optimizer state and the guard's copies exist from here
    timed_steps(task, opt, x, y, None, 1)
    on, off = [], []
    for r in range(rounds):  # interleaved, the order alternating, so load drift hits both alike
        for which in ((True, False) if r % 2 == 0 else (False, True)):
            (on if which else off).append(timed_steps(task, opt, x, y, guard if which else None, steps))
    params = sum(p.numel() for p in task.parameters())
    state = sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    on_ms, off_ms = statistics.median(on) * 1e3, statistics.median(off) * 1e3
    return {"model": spec, "optimizer": optimizer, "batch": batch, "params": params, "optimizer_state": state,
            "step_ms_guard": on_ms, "step_ms_no_guard": off_ms, "cost_ms": on_ms - off_ms,
            "cost_percent": 100 * (on_ms - off_ms) / off_ms,
            "snapshot_ms": part_ms(guard.snapshot), "check_ms": part_ms(guard.nonfinite),
            "rounds_guard_ms": [v * 1e3 for v in on], "rounds_no_guard_ms": [v * 1e3 for v in off]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fvit:micro,iresnet:micro", help="comma-separated name:size")
    p.add_argument("--optimizers", default="adamw,sgd", help="comma-separated optim.name values")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per setting (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_line()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"median of {args.rounds} rounds of {args.steps} steps, guard on/off interleaved")
    rows = [measure(m, o, args.batch, args.steps, args.rounds)
            for m in args.models.split(",") for o in args.optimizers.split(",")]
    head = (f"{'model':<14} {'optim':<6} {'params':>9} {'guard ms/step':>14} {'no guard':>9} {'cost':>16} "
            f"{'snapshot ms':>12} {'check ms':>9}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['model']:<14} {r['optimizer']:<6} {r['params']:>9,} {r['step_ms_guard']:>14.2f} "
              f"{r['step_ms_no_guard']:>9.2f} {r['cost_ms']:>+7.2f} ms {r['cost_percent']:>+5.1f}% "
              f"{r['snapshot_ms']:>12.3f} {r['check_ms']:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_line(), "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
