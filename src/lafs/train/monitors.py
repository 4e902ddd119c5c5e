"""Learning monitors: is the network moving at all?

A self-supervised run can end with an EMA teacher that still weighs its random initialisation heavily (momentum
0.996 -> 1 over a few hundred steps moves it by a fraction of a percent), and a finetune can barely leave its
starting point. The validation accuracy says *that* a model is poor; the drift says whether it ever trained:

    drift = ||theta - theta_0|| / ||theta_0||

over the floating-point parameters of a module (its trunk: student, teacher or backbone), theta_0 taken when the
task is built — for a resumed run that is the same seeded initialisation (or the same pretrained weights), so the
drift of a resumed run continues where it stopped. The teacher entropy of DINO / LAFS (``ssl.dino``) and the
teacher's verification accuracy on the validation pairs are logged by the loop next to it.
"""

from __future__ import annotations

import torch
from torch import nn


class DriftMonitor:
    """``monitor() -> {"<name>_drift": float}`` for each named module, relative to its parameters at construction.

    The snapshot is a CPU float32 copy (one extra copy of the monitored weights)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.start = {name: [p.detach().float().cpu().clone() for p in self._params(m)] for name, m in modules.items()}

    @staticmethod
    def _params(module: nn.Module) -> list[torch.Tensor]:
        return [p for p in module.parameters() if p.is_floating_point()]

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        out = {}
        for name, module in self.modules.items():
            num = den = 0.0
            for p, p0 in zip(self._params(module), self.start[name]):
                num += float((p.detach().float().cpu() - p0).square().sum())
                den += float(p0.square().sum())
            out[f"{name}_drift"] = (num / den) ** 0.5 if den > 0 else float("nan")
        return out
