"""Finite weights only: every optimizer step is checked, and a step that made a weight non-finite is undone.

Before a step's forward (BatchNorm statistics move there) :meth:`StepGuard.snapshot` copies the weights, the buffers
and the optimizer state into spare tensors on their device (no host sync, no allocation after the first
steps). After the optimizer step :meth:`StepGuard.nonfinite` checks them all with one fused max-abs norm
(``torch._foreach_norm``, one host sync); when a value is NaN or infinite, :meth:`StepGuard.restore` puts the copies
back, so the step leaves no trace and a non-finite weight can never reach a checkpoint. The cost is one copy of the
weights and optimizer state in memory and a memory-speed copy per step.
"""

from __future__ import annotations

import torch
from torch import nn


class StepGuard:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        params = [p for g in optimizer.param_groups for p in g["params"]]
        seen = {id(p) for p in params}
        buffers = [b for b in module.buffers() if id(b) not in seen]
        self.saved = [t for t in params + buffers if t.numel()]  # counters too (BatchNorm's num_batches_tracked)
        self.tensors = [t for t in self.saved if t.is_floating_point()]  # what can be non-finite
        self.copies: list[torch.Tensor] | None = None
        self.state: dict = {}  # param -> {key: copy of its optimizer state value}

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the weights, buffers and optimizer state as they are before this step."""
        live = [t.detach() for t in self.saved]
        if self.copies is None:
            self.copies = [t.clone() for t in live]
        else:
            torch._foreach_copy_(self.copies, live)
        src, dst, state = [], [], {}
        for p, entries in self.optimizer.state.items():
            old = self.state.get(p, {})
            kept = {}
            for k, v in entries.items():
                if torch.is_tensor(v):
                    copy = old.get(k)
                    if not (torch.is_tensor(copy) and copy.shape == v.shape and copy.dtype == v.dtype
                            and copy.device == v.device):
                        copy = torch.empty_like(v)  # the first step that has this state: allocated once
                    src.append(v)
                    dst.append(copy)
                    kept[k] = copy
                else:
                    kept[k] = v
            state[p] = kept
        if src:
            torch._foreach_copy_(dst, src)
        self.state = state

    @torch.no_grad()
    def nonfinite(self) -> bool:
        """Whether any weight or floating buffer holds a NaN or an infinity (one fused check, one host sync)."""
        if not self.tensors:
            return False
        # the max-abs norm: NaN and inf propagate, and unlike a sum of squares it cannot overflow on finite weights
        norms = torch._foreach_norm(self.tensors, float("inf"))
        return not bool(torch.isfinite(torch.stack([n.float() for n in norms]).max()))

    @torch.no_grad()
    def restore(self) -> None:
        """Put back what :meth:`snapshot` copied: this step never happened."""
        if self.copies is not None:
            torch._foreach_copy_([t.detach() for t in self.saved], self.copies)
        for p in [p for p in self.optimizer.state if p not in self.state]:
            del self.optimizer.state[p]  # state the step created (its first): gone, as before it
        for p, kept in self.state.items():
            entries = self.optimizer.state[p]
            for k, v in kept.items():
                if torch.is_tensor(v) and torch.is_tensor(entries.get(k)) and entries[k].shape == v.shape:
                    entries[k].copy_(v)  # in place: fused and foreach optimizers keep their tensors
                else:
                    entries[k] = v.clone() if torch.is_tensor(v) else v


def too_many_skipped(what: str, consecutive: int, skipped: list[int], step: int, max_nonfinite: int,
                     max_fraction: float) -> str | None:
    """Why the run stops after skipping step ``step`` (``what``: ``loss`` or ``update``), None while it goes on:
    ``max_nonfinite`` skipped steps in a row, or in all more than ``max_fraction`` of the steps so far (and more
    than ``max_nonfinite``, so a short run is not stopped by its first skips)."""
    if consecutive >= max_nonfinite:
        kinds = "losses" if what == "loss" else "updates"
        return f"{consecutive} consecutive non-finite {kinds} (steps {skipped[-consecutive:]})"
    if len(skipped) > max(max_nonfinite, max_fraction * step):
        return (f"{len(skipped)} of {step} steps skipped for non-finite losses or updates, more than "
                f"train.max_skipped_fraction={max_fraction:g} of them (latest: steps {skipped[-10:]})")
    return None
