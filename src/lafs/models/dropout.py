"""Dropout (Srivastava et al., JMLR 2014, §2: each unit kept with probability q = 1 - p, kept units scaled by 1 / q)
with a random mask that is cheap on the CPU.

PyTorch's CPU ``bernoulli_`` draws one 32-bit random number per element; on the ViT's feed-forward activations that
costs more than the layer's matrix products at CPU face sizes (measured: 7-9 ms for a 64 x 49 x 384 mask against
1 ms here; ``benchmarks/bench_models.py`` prints the figure). Here one 64-bit draw of PyTorch's generator gives
four 16-bit lanes, each compared with a threshold: a unit is kept with probability ``round(q * 65536) / 65536``,
i.e. ``p`` rounded to 1/65536 (|error| <= 7.7e-6), independently per element. The mask comes from the global torch
generator, so a seeded run and an exact resume see the same masks.

On other devices (CUDA's fused dropout is already cheap) and inside ``torch.compile`` (inductor fuses its own mask
into the graph) :func:`dropout` is ``F.dropout``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LANES = 1 << 16  # 16-bit lanes: the keep probability's resolution


def keep_mask(shape: tuple[int, ...] | torch.Size, keep: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask of ``shape``, each element True independently with probability ``round(keep * 65536) / 65536``."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep probability must be in [0, 1], got {keep}")
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)  # the full 64-bit range: four uniform 16-bit lanes
    lanes = words.view(torch.int16)[:n].view(shape)
    # P(lane < t) = (t + 32768) / 65536 for a lane uniform on [-32768, 32767]; keep = 1 needs t = 32768, past int16
    threshold = round(keep * LANES) - LANES // 2
    if threshold >= LANES // 2:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return lanes < threshold


_FAST = [True]


@contextlib.contextmanager
def stock_dropout() -> Iterator[None]:
    """Within this context :func:`dropout` is plain ``F.dropout`` everywhere (benchmarks compare the two)."""
    _FAST.append(False)
    try:
        yield
    finally:
        _FAST.pop()


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with :func:`keep_mask` on the CPU."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    # compiled, inductor generates its own fused mask (and random_ would break the graph)
    if x.device.type != "cpu" or p == 1.0 or not _FAST[-1] or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    keep = 1.0 - p
    scale = keep_mask(x.shape, keep, x.device).to(x.dtype).mul_(1.0 / keep)
    return x * scale


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout`` (not in place) that uses :func:`dropout`."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
