"""Batched augmentation throughput on this machine: supervised presets and the SSL view generators.

    python benchmarks/bench_augment.py [--batch 64] [--reps 3]

Prints images/s per pipeline (median of ``--reps`` timed calls after one warm-up), measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lafs.augment.multicrop import LAFSViews, MultiCropViews
from lafs.augment.supervised import SupervisedAugment


def timed(fn, x, reps: int) -> float:
    fn(x[:2])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 112, 112) * 2 - 1
    pipelines = {
        "supervised flip (w/o Aug)": SupervisedAugment.preset("flip"),
        "supervised webface4m (w/ Aug)": SupervisedAugment.preset("webface4m"),
        "DINO multi-crop (2 x 112 + 8 x 48)": MultiCropViews(),
        "LAFS views (10 x 112, clean + augmented)": LAFSViews(),
    }
    print(f"batch {args.batch} x 3 x 112 x 112, {torch.get_num_threads()} threads, median of {args.reps}")
    for name, fn in pipelines.items():
        dt = timed(fn, x, args.reps)
        print(f"  {name:<44} {args.batch / dt:>9.0f} source images/s  ({dt * 1e3:.0f} ms/batch)")


if __name__ == "__main__":
    main()
