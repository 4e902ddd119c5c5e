"""The smallest end-to-end step: train a backbone + margin head on toy identities, verify held-out pairs.

Until the data layer (synthetic faces) and the full demo land, identities are a Gaussian-process-like toy:
each identity is a smooth random image (a random 8 x 8 field, bilinearly upsampled, tanh-squashed); its
images add a random shift of a few pixels, a brightness change and pixel noise. The run trains the
configured backbone (Part fViT-micro by default) with the configured margin head, then scores
verification pairs of identities never seen in training: accuracy at the threshold chosen on pairs of
training identities, and ROC AUC. Everything printed is measured in this run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import Config, save_config, to_yaml
from .eval.verification import roc_auc
from .heads import build_head
from .io import atomic_write_bytes
from .models import build_backbone, count_params
from .train.checkpoint import atomic_save


def toy_identities(num: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` smooth identity templates in [-1, 1], shape num x 3 x size x size."""
    field = torch.randn(num, 3, 8, 8, generator=generator)
    return torch.tanh(1.5 * F.interpolate(field, size=(size, size), mode="bilinear", align_corners=False))


def toy_images(templates: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images of identities ``labels``: shifted (+-3 px), brightness-jittered, noisy copies of their template."""
    x = templates[labels]
    n, _, h, w = x.shape
    shifts = torch.randint(-3, 4, (n, 2), generator=generator)
    # A cyclic shift (torch.roll) of every image at once: output pixel i reads input pixel (i - shift) mod size.
    rows = (torch.arange(h) - shifts[:, :1]) % h
    cols = (torch.arange(w) - shifts[:, 1:]) % w
    x = x[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    x = x + 0.2 * torch.randn(len(labels), 1, 1, 1, generator=generator)
    x = x + 0.25 * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


def pair_scores(model, templates: torch.Tensor, num_pairs: int, generator: torch.Generator):
    """Cosine scores of ``num_pairs`` pairs (half same identity, half different) and their labels."""
    n = templates.shape[0]
    a = torch.randint(0, n, (num_pairs,), generator=generator)
    other = (a + torch.randint(1, n, (num_pairs,), generator=generator)) % n
    same = torch.arange(num_pairs) % 2 == 0
    b = torch.where(same, a, other)
    with torch.no_grad():
        ea = model(toy_images(templates, a, generator))["embedding"]
        eb = model(toy_images(templates, b, generator))["embedding"]
    return F.cosine_similarity(ea, eb).float(), same


def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> float:
    candidates = torch.cat([scores.sort().values, scores.max()[None] + 1e-6])
    acc = torch.stack([((scores >= t) == same).float().mean() for t in candidates])
    return float(candidates[acc.argmax()])


def run_demo(cfg: Config, progress: bool = True) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)

    model = build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides())
    img_size = model.img_size
    head = build_head(
        cfg.head.name, model.embedding_size, cfg.data.num_identities,
        scale=cfg.head.scale, margin=cfg.head.margin, h=cfg.head.h, t_alpha=cfg.head.t_alpha,
    )
    train_ids = toy_identities(cfg.data.num_identities, img_size, gen)
    heldout_ids = toy_identities(max(8, cfg.data.num_identities // 2), img_size, gen)
    params = list(model.parameters()) + list(head.parameters())
    if cfg.optim.name == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay)

    model.eval()
    scores0, same0 = pair_scores(model, heldout_ids, cfg.data.val_pairs, torch.Generator().manual_seed(1))
    auc_before = roc_auc(scores0.numpy(), same0.numpy())

    metrics_path = out / "metrics.jsonl"
    model.train()
    head.train()
    losses = []
    t0 = time.perf_counter()
    with open(metrics_path, "w") as log:
        bar = tqdm(range(cfg.train.steps), desc="train", unit="step", disable=not progress)
        for step in bar:
            labels = torch.randint(0, cfg.data.num_identities, (cfg.train.batch_size,), generator=gen)
            images = toy_images(train_ids, labels, gen)
            loss = head(model(images)["embedding"], labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            elapsed = time.perf_counter() - t0
            ips = (step + 1) * cfg.train.batch_size / elapsed
            log.write(json.dumps({"step": step, "loss": losses[-1], "images_per_s": ips}) + "\n")
            bar.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{ips:.0f}")
    train_time = time.perf_counter() - t0

    model.eval()
    thr_scores, thr_same = pair_scores(model, train_ids, cfg.data.val_pairs, torch.Generator().manual_seed(2))
    threshold = best_threshold(thr_scores, thr_same)
    scores, same = pair_scores(model, heldout_ids, cfg.data.val_pairs, torch.Generator().manual_seed(1))
    summary = {
        "model": f"{cfg.model.name}-{cfg.model.size}",
        "params": count_params(model),
        "head": cfg.head.name,
        "steps": cfg.train.steps,
        "loss_first": losses[0] if losses else float("nan"),
        "loss_last": losses[-1] if losses else float("nan"),
        "train_seconds": train_time,
        "heldout_auc_before": auc_before,
        "heldout_auc": roc_auc(scores.numpy(), same.numpy()),
        "heldout_accuracy": float(((scores >= threshold) == same).float().mean()),
        "threshold": threshold,
    }
    atomic_save({"model": model.state_dict(), "head": head.state_dict(), "config": to_yaml(cfg), "summary": summary},
                out / "checkpoint.pt")
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def format_summary(s: dict) -> str:
    rows = [
        ("model", f"{s['model']} ({s['params'] / 1e6:.2f} M params), head {s['head']}"),
        ("training", f"{s['steps']} steps in {s['train_seconds']:.1f} s, loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}"),
        ("held-out AUC", f"{s['heldout_auc_before']:.3f} before -> {s['heldout_auc']:.3f} after training"),
        ("held-out accuracy", f"{s['heldout_accuracy']:.3f} at threshold {s['threshold']:.3f} (chosen on training identities)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
