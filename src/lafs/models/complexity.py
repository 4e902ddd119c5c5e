"""Parameter and multiply-accumulate (MAC) counts, measured by running the model once.

Convention of the papers' tables (ptflops-style; it reproduces the LAFS paper's §4.2 counts): MACs of convolutions
and linear layers only; normalisation, activations, pooling and ``grid_sample`` are not counted. The attention matmuls
(Q K^T and A V, and iRPE's contextual table products) are counted separately, because ptflops misses them:
Part fViT-Tiny is 2.48 GMACs without them, as the paper reports. The KP-RPE paper's "GFLOPs" (DeepSpeed's
profiler, its Table 3) are 2 x the conv + linear MACs: ViT-S 2 x 8.71 = 17.42.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .vit import Attention


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int  # conv + linear (paper convention)
    attn_macs: int  # attention matmuls, not in ``macs``

    @property
    def total_macs(self) -> int:
        return self.macs + self.attn_macs


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> tuple[int, int]:
    """(conv+linear MACs, attention-matmul MACs) of one forward pass on one image."""
    counts = {"macs": 0, "attn": 0}

    def conv_hook(m: nn.Conv2d, inp, out) -> None:
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        counts["macs"] += out.numel() * k

    def linear_hook(m: nn.Linear, inp, out) -> None:
        counts["macs"] += out.numel() * m.in_features

    def attn_hook(m: Attention, inp, out) -> None:
        b, n, _ = inp[0].shape
        counts["attn"] += 2 * b * m.heads * n * n * m.dim_head
        if m.rpe is not None and m.rpe.mode == "ctx":  # iRPE tables: q W_k, k W_q (N x d x K), attn-per-bucket W_v
            counts["attn"] += len(m.rpe.on) * b * m.heads * n * m.dim_head * m.rpe.num_buckets

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_hook(attn_hook))
    was_training = model.training
    model.eval()
    extra = {}
    if getattr(model, "uses_keypoints", False):  # KP-RPE: any keypoints (f(P) is one Linear either way)
        from ..geometry import template

        extra["keypoints"] = torch.from_numpy(template(112) * (img_size / 112))[None]
    try:
        model(torch.zeros(1, in_chans, img_size, img_size), **extra)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts["macs"], counts["attn"]


def complexity(model: nn.Module, img_size: int) -> Complexity:
    macs, attn = count_macs(model, img_size)
    return Complexity(params=count_params(model), macs=macs, attn_macs=attn)
