"""Optimizer, parameter groups and per-iteration schedules of the supervised recipe (the official LAFS code's
``train_largescale.py``).

Parameter groups follow the reference ``param_groups_lrd``: weight decay on every parameter with >= 2
dimensions (so position embeddings, the CLS token and the margin-head centres decay too), none on 1-D
parameters (norm weights, biases), and a separate decay for the landmark CNN's >= 2-D parameters (stage-1
code: 0.05 while the transformer gets 0.1). The reference also sets up a layer-wise LR decay that it never
applies; we do not build it.

The learning rate is a pure function of the optimizer step (``lr_at``), so resuming needs only the step:
linear warm-up from 0 (the reference ``GradualWarmupScheduler``, multiplier 1), then cosine annealing to
``min_lr`` over the remaining steps (``CosineAnnealingLR``), or constant.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..ssl.dino import cosine_at


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
    landmark_weight_decay: float | None = None, landmark_prefix: str = "landmark_cnn.",
) -> list[dict]:
    """Groups ``decay`` / ``no_decay`` / ``landmark`` (empty groups dropped); frozen parameters left out."""
    lm_wd = weight_decay if landmark_weight_decay is None else landmark_weight_decay
    groups = {
        "decay": {"name": "decay", "params": [], "weight_decay": weight_decay},
        "landmark": {"name": "landmark", "params": [], "weight_decay": lm_wd},
        "no_decay": {"name": "no_decay", "params": [], "weight_decay": 0.0},
    }
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim <= 1:
            groups["no_decay"]["params"].append(p)
        elif landmark_prefix in name:
            groups["landmark"]["params"].append(p)
        else:
            groups["decay"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


FUSED_DEVICES = ("cpu", "cuda")  # where torch.optim.AdamW(fused=True) has a kernel


def build_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW or SGD over ``groups``. ``fused`` (AdamW): one kernel per step over every parameter instead of the
    foreach implementation's dozen passes; ``None`` = fused when every parameter lives on a device that has it."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {tuple(OPTIMIZERS)}")
    return OPTIMIZERS[name](groups, lr, momentum, betas, fused)


def _adamw(groups: list[dict], lr: float, momentum: float, betas, fused: bool | None) -> torch.optim.Optimizer:
    if fused is None:
        fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=bool(fused) or None)


def _sgd(groups: list[dict], lr: float, momentum: float, betas, fused: bool | None) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


# ``optim.name``: the optimizers build_optimizer makes (the config's choices are these names)
OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd}
# ``optim.schedule``: what lr_at does after the warm-up
LR_SCHEDULES = ("cosine", "constant")
# ``optim.clip_mode``: one norm over all gradients (torch's clip_grad_norm_), or DINO's clip_gradients (each tensor)
CLIP_MODES = ("global", "per_param")


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0,
          schedule: str = "cosine") -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine or constant.

    The cosine spans the run's remaining ``total_steps - warmup_steps`` steps, so it is run-relative already (the
    loop passes a budgeted run's final count once timed). ``warmup_steps`` comes from
    ``lafs.train.schedules.resolve_schedule``: ``optim.warmup_fraction`` of the run, or ``warmup_epochs`` /
    ``warmup_steps`` (DINO, Caron et al. 2021: 10 epochs; the LAFS fine-tunes: 5)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; use one of {LR_SCHEDULES}")
    return cosine_at(step - warmup_steps, total_steps - warmup_steps, base_lr, min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def step_schedule(epoch: int, values: list[float], epochs: list[int]) -> float:
    """A per-epoch step schedule: ``values[i]`` from epoch ``epochs[i]`` (0-indexed) on.

    The finetuning ``beta_schedule`` (the official code's; the paper's Eq. 7 gives no beta) is 1000/100/1/0.11/0 from
    epochs 0/8/14/21/28. Any unit works if ``epoch`` and ``epochs`` share it: with ``finetune.beta_fractions`` the task
    passes the optimizer step and the fractions resolved to steps (``lafs.train.schedules``).
    """
    if len(values) != len(epochs) or not values:
        raise ValueError(f"schedule values {list(values)} and epochs {list(epochs)} must be non-empty and of equal length")
    if list(epochs) != sorted(epochs) or epochs[0] != 0:
        raise ValueError(f"schedule epochs {list(epochs)} must start at 0 and increase")
    value = values[0]
    for v, e in zip(values, epochs):
        if epoch >= e:
            value = v
    return float(value)
