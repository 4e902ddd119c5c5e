"""Where bf16 autocast pays on this machine: matrix products everywhere, convolutions only where the hardware has
bf16 convolution units.

On a CPU with AVX-512 BF16 but without AMX tiles, oneDNN's bf16 convolutions (the landmark CNN's depthwise and 1 x 1
layers, IResNet's 3 x 3) run slower than its fp32 ones, forward and backward (``benchmarks/bench_models.py``
shows the CNN settings side by side), while bf16 matrix products run about 4x faster than fp32. So under CPU
autocast the CNNs run in fp32 unless the CPU has ``amx_bf16``; on CUDA they follow autocast. ``LAFS_CNN_AUTOCAST``
(``1`` / ``0``, read at import) overrides the rule, e.g. to measure both.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

# The autocast precisions ``train.amp`` and ``lafs eval --amp`` accept besides "none" (fp32), and their dtypes.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where the file does not exist)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags") and ":" in line), "")
    return frozenset(flags.split())


def convs_follow_autocast(device_type: str) -> bool:
    """Whether convolutions on ``device_type`` should run in autocast's bf16 (see the module docstring)."""
    forced = os.environ.get("LAFS_CNN_AUTOCAST")
    if forced in ("0", "1"):
        return forced == "1"
    return device_type != "cpu" or "amx_bf16" in cpu_flags()


# decided once per process, so that torch.compile sees a constant (reading /proc in a traced forward breaks its graph)
CPU_CONVS_FOLLOW_AUTOCAST = convs_follow_autocast("cpu")


def cnn_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context for a CNN's forward on ``x``: autocast off (and fp32 inputs expected) where bf16 convs do not pay."""
    if x.device.type == "cpu" and not CPU_CONVS_FOLLOW_AUTOCAST and torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()
