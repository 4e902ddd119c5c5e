"""Position-aware starts for a ViT trained from scratch on little data: 2-D sin-cos positions and mimetic attention.

A freshly initialised CLS-pooled ViT is a bag of patches: its attention is near uniform and its position embeddings
(trunc-normal, std 0.02) add a near-constant to the mean of the value vectors, so shuffling a face's patches barely
moves its embedding (``docs/analysis/patch_shuffle.py``), and the first gradients cannot reward a feature that
depends on where the eyes are. Two published initialisations give the model spatial structure at step 0:

- :func:`sincos_2d` -- the fixed 2-D sin-cos position embedding of MoCo v3 (Chen, Xie & He, ICCV 2021, §4 "Position
  embedding"), used here as the *start* of the learned embedding (``token_init: sincos``): nearby grid cells get
  similar vectors, so a query that matches its own position also matches its neighbours'.
- :func:`mimetic_init_` -- mimetic initialisation (Trockman & Kolter, "Mimetic Initialization of Self-Attention
  Layers", ICML 2023): each head's W_q^T W_k is the rank-``dim_head`` part of alpha_1 Z_1 + beta_1 I and W_o W_v that
  of alpha_2 Z_2 - beta_2 I (Z ~ N(0, I/d)), the structure the paper reads off trained ViTs. With sin-cos positions
  the identity part makes every token attend to itself and its neighbours: the first layers start as local,
  convolution-like mixing, and a patch shuffle changes the embedding (``attn_init: mimetic``).

Both are options of :class:`~lafs.models.vit.ViTEncoder`; the presets keep the papers' and their code's starts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The paper's values for ViTs (its Section on the method): alpha_1 = beta_1 = 0.7, alpha_2 = beta_2 = 0.4.
MIMETIC_QK = (0.7, 0.7)
MIMETIC_VO = (0.4, 0.4)


def sincos_2d(side: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """(side * side) x dim sin-cos embedding of a row-major square grid: [sin x, cos x, sin y, cos y] over
    ``dim / 4`` frequencies from 1 to 1 / temperature (MoCo v3's ``build_2d_sincos_position_embedding``)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    c = torch.arange(side, dtype=torch.float64)
    y, x = torch.meshgrid(c, c, indexing="ij")
    ox, oy = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1).float()


def _low_rank_factors(dim: int, rank: int, alpha: float, beta: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """L (dim x rank), R (rank x dim) with L @ R the best rank-``rank`` approximation of alpha Z + beta I."""
    target = alpha * torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    target += beta * torch.eye(dim, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


@torch.no_grad()
def mimetic_init_(
    blocks: nn.ModuleList, qk: tuple[float, float] = MIMETIC_QK, vo: tuple[float, float] = MIMETIC_VO,
    generator: torch.Generator | None = None,
) -> None:
    """Set every block's ``attn.to_qkv`` (no bias: zeroed if present) and ``attn.to_out`` weights so that per head
    W_q^T W_k ~ alpha_1 Z + beta_1 I and W_o W_v ~ alpha_2 Z - beta_2 I (Trockman & Kolter, ICML 2023).

    With more heads than the width holds (heads * dim_head > dim, Part fViT-Tiny's 11 x 64 > 512), the value-output
    factors are scaled by dim / (heads * dim_head), so that their sum over heads stays near -beta_2 I."""
    generator = generator if generator is not None else torch.default_generator
    for block in blocks:
        attn = block.attn
        heads, dh = attn.heads, attn.dim_head
        dim, inner = attn.to_out.out_features, heads * dh
        if dh > dim:
            raise ValueError(f"mimetic init needs dim_head <= dim, got {dh} > {dim}")
        shrink = min(1.0, dim / inner)
        w, w_out = attn.to_qkv.weight, attn.to_out.weight
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            left, right = _low_rank_factors(dim, dh, *qk, generator)
            w[rows] = left.T  # q_h = L^T x, k_h = R x: q_h . k_h = x^T (L R) x
            w[inner + h * dh: inner + (h + 1) * dh] = right
            left, right = _low_rank_factors(dim, dh, vo[0] * shrink, -vo[1] * shrink, generator)
            w[2 * inner + h * dh: 2 * inner + (h + 1) * dh] = right  # v_h = R x, out += L v_h
            w_out[:, rows] = left
        if attn.to_qkv.bias is not None:
            attn.to_qkv.bias.zero_()
