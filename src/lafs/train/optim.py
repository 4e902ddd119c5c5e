"""Optimizer, parameter groups and per-iteration schedules of the supervised recipe (the official LAFS code's
``train_largescale.py``).

Parameter groups follow the reference ``param_groups_lrd``: weight decay on every parameter with >= 2
dimensions (so position embeddings, the CLS token and the margin-head centres decay too), none on 1-D
parameters (norm weights, biases), and a separate decay for the landmark CNN's >= 2-D parameters (stage-1
code: 0.05 while the transformer gets 0.1). The reference also sets up a layer-wise LR decay (0.58) that it never
applies: by default neither do we, and ``optim.layer_decay`` applies one (:func:`layer_ids`), the fine-tuning rule
of BEiT (Bao et al., ICLR 2022, fine-tuning on downstream tasks) that keeps a pretrained ViT's lower blocks near
their pretrained weights.

The learning rate is a pure function of the optimizer step (``lr_at``), so resuming needs only the step:
linear warm-up from 0 (the reference ``GradualWarmupScheduler``, multiplier 1), then cosine annealing to
``min_lr`` over the remaining steps (``CosineAnnealingLR``), or constant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from ..ssl.dino import cosine_at


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDINGS = ("cls_token", "pos_embedding", "to_embedding.")  # the ViT's token embeddings (lafs.models.vit)


def layer_ids(names: list[str], landmark_prefix: str = "landmark_cnn.") -> tuple[dict[str, int], int]:
    """Each parameter's layer for layer-wise LR decay, and the top layer ``L + 1`` of a ViT of ``L`` blocks: the
    LAFS code's ``param_groups_lrd`` numbering (embeddings and the landmark CNN 0, block ``k`` ``k + 1``, the rest
    ``L + 1``). The rest is what follows the blocks (final norm, projection, margin-head centres) and any parameter
    shared by every block (KP-RPE's keypoint map). A model without ``blocks.<k>.`` parameters is an error."""
    blocks = {n: int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    if not blocks:
        raise ValueError("optim.layer_decay: the model has no transformer blocks ('blocks.<k>.' parameters); "
                         "layer-wise LR decay applies to the ViTs (vit, fvit, part_fvit and their RPE variants)")
    top = max(blocks.values()) + 2
    ids = {}
    for n in names:
        if n in blocks:
            ids[n] = blocks[n] + 1
        elif landmark_prefix in n or any(e in n for e in _EMBEDDINGS):
            ids[n] = 0
        else:
            ids[n] = top
    return ids, top


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
    landmark_weight_decay: float | None = None, landmark_prefix: str = "landmark_cnn.",
    layer_decay: float | None = None,
) -> list[dict]:
    """Groups ``decay`` / ``no_decay`` / ``landmark`` (empty groups dropped); frozen parameters left out.

    ``layer_decay`` (in (0, 1]) splits each group by layer (:func:`layer_ids`), group ``<kind>_layer<i>`` with
    ``lr_scale = layer_decay ** (top - i)``, which :func:`set_lr` applies: the heads train at the run's lr, block
    ``k`` of ``L`` at ``layer_decay ** (L - k)`` of it, the embeddings and landmark CNN at ``layer_decay ** (L + 1)``."""
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optim.layer_decay must be in (0, 1], got {layer_decay}")
    lm_wd = weight_decay if landmark_weight_decay is None else landmark_weight_decay
    kinds = {"decay": weight_decay, "landmark": lm_wd, "no_decay": 0.0}
    seen: set[int] = set()
    chosen: list[tuple[str, str, nn.Parameter]] = []
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        kind = "no_decay" if p.ndim <= 1 else "landmark" if landmark_prefix in name else "decay"
        chosen.append((kind, name, p))
    if layer_decay is None:
        groups = {k: {"name": k, "params": [], "weight_decay": wd} for k, wd in kinds.items()}
        for kind, _, p in chosen:
            groups[kind]["params"].append(p)
        return [g for g in groups.values() if g["params"]]
    ids, top = layer_ids([n for _, n, _ in chosen], landmark_prefix)
    groups = {}
    for kind in kinds:  # the same order as without decay: decay, landmark, no_decay; layers from the bottom up
        for i in sorted({ids[n] for k, n, _ in chosen if k == kind}):
            groups[(kind, i)] = {"name": f"{kind}_layer{i}", "params": [], "weight_decay": kinds[kind],
                                 "lr_scale": layer_decay ** (top - i)}
    for kind, name, p in chosen:
        groups[(kind, ids[name])]["params"].append(p)
    return list(groups.values())


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
