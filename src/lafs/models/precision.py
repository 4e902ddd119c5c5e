"""Where bf16 autocast pays on this machine: matrix products everywhere, convolutions only where the hardware has
bf16 convolution units.

On a CPU with AVX-512 BF16 but without AMX tiles, oneDNN's bf16 convolutions (the landmark CNN's depthwise and 1 x 1
layers, IResNet's 3 x 3) run slower than its fp32 ones, forward and backward (``benchmarks/bench_models.py``
shows the CNN settings side by side), while bf16 matrix products run about 4x faster than fp32. So under CPU
autocast IResNet runs in fp32 unless the CPU has ``amx_bf16``; on CUDA the CNNs follow autocast. The landmark CNN
(depthwise 3 x 3 and thin 1 x 1 layers on 64 px inputs) stays in fp32 under CPU autocast even with AMX: there its
bf16 convolutions made Part fViT-mini's whole train step slower (batch 128: 1.54 s with the CNN in bf16, 0.96 s with
it in fp32 and the transformer in bf16; ``benchmarks/bench_models.py`` on a 2-core Xeon with AMX), while IResNet-mini's
3 x 3 convolutions gain from bf16 there. ``LAFS_CNN_AUTOCAST`` (``1`` / ``0``, read at import) overrides both rules,
e.g. to measure them.

``train.amp: auto`` (:func:`resolve_amp`) turns bf16 on where it is measured to pay: on CUDA with bf16 support
and on a CPU with bf16 matrix units, AMX or AVX-512 BF16 (IResNet-mini's train step 1.8x fp32 in bf16 with AMX, 2.8x
with ``train.compile``; without AMX, where the convolutions above stay in fp32, ``benchmarks/bench_models.py`` at batch
64 on a 2-core AMD EPYC measured ViT-mini 2.26x, fViT-micro 1.70x, Part fViT-micro 1.19x and IResNet-mini 1.04x);
elsewhere it trains in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

# The autocast precisions ``train.amp`` and ``lafs eval --amp`` accept besides "none" (fp32), and their dtypes.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# ``auto`` resolves to one of them or to "none" on the run's device (resolve_amp)
AMP_CHOICES = ("none", "auto", *AMP_DTYPES)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where the file does not exist)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags") and ":" in line), "")
    return frozenset(flags.split())


def convs_follow_autocast(device_type: str, amx_pays: bool = True) -> bool:
    """Whether a CNN's convolutions on ``device_type`` should run in autocast's bf16 (see the module docstring);
    ``amx_pays=False`` for a CNN whose bf16 convolutions were measured slower even on a CPU with AMX."""
    forced = os.environ.get("LAFS_CNN_AUTOCAST")
    if forced in ("0", "1"):
        return forced == "1"
    return device_type != "cpu" or (amx_pays and "amx_bf16" in cpu_flags())


def resolve_amp(amp: str, device_type: str) -> str:
    """The precision a run uses: ``amp`` itself, or for ``auto`` bf16 where its kernels pay (see the module
    docstring) and "none" (fp32) elsewhere."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp != "auto":
        return amp
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "none"
    return "bf16" if device_type == "cpu" and cpu_flags() & {"amx_bf16", "avx512_bf16"} else "none"


# decided once per process, so that torch.compile sees a constant (reading /proc in a traced forward breaks its graph)
CPU_CONVS_FOLLOW_AUTOCAST = {True: convs_follow_autocast("cpu"), False: convs_follow_autocast("cpu", amx_pays=False)}


def cnn_precision(x: torch.Tensor, amx_pays: bool = True) -> contextlib.AbstractContextManager:
    """Context for a CNN's forward on ``x``: autocast off (and fp32 inputs expected) where bf16 convs do not pay;
    ``amx_pays`` as in :func:`convs_follow_autocast`."""
    if x.device.type == "cpu" and not CPU_CONVS_FOLLOW_AUTOCAST[amx_pays] and torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()
