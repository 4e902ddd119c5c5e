"""Usage: part_fvit_step_split.py [SIZE] [BATCH] [ROUNDS] [LAYOUT]

Where a Part fViT train step's time goes, and what that allows bf16 to buy (Amdahl's law). Times, interleaved over
ROUNDS rounds (medians): forward + backward of the whole model (landmark CNN, patch sampling, ViT) in fp32 and under
bf16 autocast (the project's rules: the landmark CNN stays in fp32 on a CPU, ``lafs.models.precision``), and of the
landmark CNN alone in fp32. With the CNN's share f of the fp32 step fixed, no speed-up of the rest can make the step
faster than 1 / f; the printed bound says whether a 3x target is reachable at all by speeding up the transformer.
LAYOUT ``channels_last`` (default, as the trainer's ``train.channels_last: true`` converts the model) or ``nchw``."""
import statistics
import sys
import time

import torch

from lafs.models.precision import cpu_flags
from lafs.models.registry import build_backbone

size = sys.argv[1] if len(sys.argv) > 1 else "micro"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
layout = sys.argv[4] if len(sys.argv) > 4 else "channels_last"
if layout not in ("channels_last", "nchw"):
    raise SystemExit(f"LAYOUT must be channels_last or nchw, got {layout!r}")
torch.manual_seed(0)
model = build_backbone("part_fvit", size).train()
if layout == "channels_last":  # the conv weights only, as the trainer does; their outputs follow them
    model.to(memory_format=torch.channels_last)
img = model.img_size
x = torch.rand(batch, 3, img, img) * 2 - 1


def whole(amp: bool) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):  # the landmark CNN opts out (cnn_precision)
        out = model(x)
    (out["embedding"].float().square().mean() + out["landmarks"].float().mean()).backward()


def cnn() -> None:
    model.zero_grad(set_to_none=True)
    model.landmark_cnn(x).square().mean().backward()


jobs = {"whole step, fp32": lambda: whole(False), "whole step, bf16": lambda: whole(True),
        "landmark CNN alone, fp32": cnn}
times = {k: [] for k in jobs}
for job in jobs.values():  # warm-up
    job(), job()
for _ in range(rounds):
    for k, job in jobs.items():
        t = time.perf_counter()
        job()
        times[k].append(time.perf_counter() - t)
med = {k: statistics.median(v) for k, v in times.items()}
flags = sorted(cpu_flags() & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
print(f"Part fViT-{size}, batch {batch}, {img} px, {layout}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
      f"CPU flags {flags}; medians of {rounds} interleaved rounds (forward + backward, no optimizer)")
for k, v in med.items():
    print(f"  {k}: {v * 1000:.1f} ms ({batch / v:.0f} images/s)")
share = med["landmark CNN alone, fp32"] / med["whole step, fp32"]
print(f"  landmark CNN share of the fp32 step: {share:.1%}; bf16 speed-up measured {med['whole step, fp32'] / med['whole step, bf16']:.2f}x;"
      f" bound with the CNN unchanged and the rest free: {1 / share:.2f}x")
