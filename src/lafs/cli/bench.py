"""``lafs bench``: measured cost tables. ``kprpe``: the KP-RPE paper's Table 3 on this machine.

ViT vs ViT + iRPE vs ViT + KP-RPE of one size, built from the same seed: parameters, GFLOPs (2 x conv + linear
MACs, the paper's DeepSpeed convention; the attention and iRPE table products listed apart), evaluation throughput
(forward, no grad) and training throughput (forward + backward + AdamW step, a plain squared-embedding loss so the
classifier does not dilute the difference). Timings are interleaved: each round times one step of every model in
turn (the order reversed every other round), so all three see the same machine load. Throughputs are from the
median step over rounds; the overheads relative to the plain ViT are the median over rounds of each round's ratio
(arm / ViT), in wall time and in this process's CPU time (which a machine shared with other jobs disturbs less:
``--threads 1`` makes it the work done).
"""

from __future__ import annotations

import statistics
import time

import torch

from ..geometry import template
from ..models import build_backbone, complexity

KPRPE_ARMS = (("ViT", "vit"), ("ViT + iRPE", "vit_irpe"), ("ViT + KP-RPE", "vit_kprpe"))


def _inputs(model, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    s = model.img_size
    x = torch.rand(batch, 3, s, s, generator=gen) * 2 - 1
    extra = {}
    if getattr(model, "uses_keypoints", False):
        kp = torch.from_numpy(template(112) * (s / 112))[None].expand(batch, 5, 2)
        extra["keypoints"] = kp + torch.randn(batch, 5, 2, generator=gen)
    return x, extra


def bench_kprpe(size: str = "small", batch: int = 8, rounds: int = 5, warmup: int = 1, threads: int = 0,
                device: str = "cpu", log=print, amp: str = "none", compile: bool = False) -> dict:
    """Measure the three arms; returns ``{"arms": [...], "settings": {...}}`` (times in seconds per step).

    ``amp="bf16"`` times every arm's forward (and the train step's forward and backward) under bf16 autocast, the
    weights and AdamW in fp32, as ``train.amp=bf16``: then the ViT's attention and KP-RPE's bias both take the
    explicit bf16 path (``models/vit.py``).

    ``compile=True`` times every arm through ``torch.compile`` (inductor), as ``train.compile=true``: the warm-up
    rounds compile (give at least one), and the KP-RPE bias is then left to inductor to fuse into the softmax."""
    if amp not in ("none", "bf16"):
        raise ValueError(f"amp must be none or bf16, got {amp!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    models, rows = [], []
    for label, name in KPRPE_ARMS:
        torch.manual_seed(0)
        model = build_backbone(name, size)
        c = complexity(model, model.img_size)
        model.to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        x, extra = _inputs(model, batch, gen)
        x, extra = x.to(dev), {k: v.to(dev) for k, v in extra.items()}
        models.append((torch.compile(model) if compile else model, opt, x, extra))
        rows.append({"arm": label, "name": name, "params": c.params, "gflops": 2 * c.macs / 1e9,
                     "attn_gflops": 2 * c.attn_macs / 1e9, "eval_s": [], "train_s": [], "eval_cpu_s": [],
                     "train_cpu_s": []})

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def clocks() -> tuple[float, float]:
        sync()
        return time.perf_counter(), time.process_time()

    for r in range(warmup + rounds):
        order = list(zip(models, rows))
        for (model, opt, x, extra), row in (order if r % 2 == 0 else order[::-1]):
            model.eval()
            w0, c0 = clocks()
            with torch.no_grad(), autocast():
                model(x, **extra)
            w1, c1 = clocks()
            model.train()
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = model(x, **extra)["embedding"].float().square().mean()
            loss.backward()
            opt.step()
            w2, c2 = clocks()
            if r >= warmup:
                for key, value in (("eval_s", w1 - w0), ("train_s", w2 - w1), ("eval_cpu_s", c1 - c0),
                                   ("train_cpu_s", c2 - c1)):
                    row.setdefault(key, []).append(value)
        if log:
            log(f"round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}: " + ", ".join(
                f"{row['arm']} {row['train_s'][-1] if r >= warmup else float('nan'):.2f} s/train step"
                for row in rows))
    base = rows[0]

    def overhead(row: dict, key: str) -> float:  # median over rounds of the round's ratio to the ViT
        return 100 * (statistics.median(t / b for t, b in zip(row[key], base[key])) - 1)

    for row in rows:
        row["eval_step_s"] = statistics.median(row["eval_s"])
        row["train_step_s"] = statistics.median(row["train_s"])
        row["eval_img_s"] = batch / row["eval_step_s"]
        row["train_img_s"] = batch / row["train_step_s"]
        row["train_overhead_pct"] = overhead(row, "train_s")
        row["eval_overhead_pct"] = overhead(row, "eval_s")
        row["train_cpu_overhead_pct"] = overhead(row, "train_cpu_s")
        row["eval_cpu_overhead_pct"] = overhead(row, "eval_cpu_s")
    settings = {"size": size, "batch": batch, "rounds": rounds, "warmup": warmup, "device": str(dev), "amp": amp,
                "compile": compile, "threads": torch.get_num_threads(), "torch": torch.__version__}
    return {"arms": rows, "settings": settings}


def format_kprpe(result: dict) -> str:
    s = result["settings"]
    title = (f"KP-RPE cost table, {s['size']} models, batch {s['batch']}, {s['device']} ({s['threads']} threads), "
             f"precision {'bf16 autocast' if s.get('amp') == 'bf16' else 'fp32'}"
             f"{', compiled' if s.get('compile') else ''}, "
             f"{s['rounds']} interleaved rounds; vs ViT: median of the rounds' ratios, wall time (CPU time)")
    lines = [title,
             "| model | params | GFLOPs | + attention GFLOPs | eval img/s | train img/s | eval step vs ViT | train step vs ViT |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["arms"]:
        lines.append(f"| {r['arm']} | {r['params'] / 1e6:.2f}M | {r['gflops']:.2f} | {r['attn_gflops']:.2f} | "
                     f"{r['eval_img_s']:.1f} | {r['train_img_s']:.2f} | "
                     f"{r['eval_overhead_pct']:+.1f} % ({r['eval_cpu_overhead_pct']:+.1f} %) | "
                     f"{r['train_overhead_pct']:+.1f} % ({r['train_cpu_overhead_pct']:+.1f} %) |")
    return "\n".join(lines)
