"""Relative position encodings for face ViTs: iRPE (Wu et al., ICCV 2021) and KP-RPE (Kim et al., CVPR 2024).

- :func:`piecewise_index` is iRPE's Eq. 18 (``kprpe_spec`` §1.2): exact near zero, logarithmic up to β, clipped,
  with α:β:γ = 1:2:8 times ``ratio`` (1.9: α 1.9, β 3.8, γ 15.2; |Δ| = 0..13 -> 0,1,2,2,3,...,3).
- :func:`product_buckets` is iRPE's product method (§1.3): bucket = (g(Δrow) + β)·S + g(Δcol) + β, S = 2·int(β) + 1,
  K = S² = 49 buckets on any grid. Grid buckets are input-independent and cached per (grid, ratio, device);
  :func:`position_buckets` gives the same buckets for tokens at arbitrary positions (Part fViT's landmark tokens).
- :class:`IRPE`: one layer's iRPE, bias mode (a scalar per bucket) or contextual mode on q, k and/or v (a vector
  per bucket), heads shared or not, zero-initialised (§1.1; the KP-RPE paper's "ViT + iRPE" baseline is contextual
  product on q, k, v with shared heads, §1.6). The k and q terms become an additive logit bias; the v term adds
  ``Σ_j attn_ij r_v[b(i,j)]``, computed by first summing the attention per bucket (B x H x N x K), so no
  H x N x N x d tensor is ever built.
- :class:`KPRPE`: the keypoint-dependent table f(P) (§2), computed once per forward for every layer. Variants
  (§2.3): ``absolute`` (f from the flattened keypoints, one row for all queries, heads and layers), ``relative``
  (f from each query's offsets to the keypoints, shared by heads and layers) and ``multihead`` (relative, unique
  per layer and head: the paper's best and the released model). W_L is a zero-initialised Linear with bias (the
  code's), so a KP-RPE model starts as the same ViT without it. The offsets are computed without gradient: the
  keypoints are never trained through (§2.2).
- :func:`gather_bias` turns a per-query table (B x H x N x K) into the B x H x N x N additive bias
  ``bias[b,h,i,j] = table[b,h,i,bucket(i,j)]`` with one index_select, the largest tensor it builds.

The bias is added to the already scaled logits before the softmax, as the code does (§2.1), through the additive
``attn_mask`` of ``scaled_dot_product_attention`` (``models/vit.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

IRPE_MODES = ("bias", "ctx")
KPRPE_VARIANTS = ("absolute", "relative", "multihead")
DEFAULT_RATIO = 1.9

_BUCKET_CACHE: dict[tuple, Tensor] = {}


def _beta(ratio: float) -> int:
    return int(2 * ratio)


def num_buckets(ratio: float = DEFAULT_RATIO) -> int:
    """K = (2·int(β) + 1)², 49 for ratio 1.9, independent of the grid size."""
    return (2 * _beta(ratio) + 1) ** 2


def piecewise_index(x: Tensor, ratio: float = DEFAULT_RATIO) -> Tensor:
    """iRPE Eq. 18 with α, β, γ = ratio·(1, 2, 8); long output in [-int(β), int(β)] (the cast truncates, §1.2)."""
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    x = x.float()
    mag = x.abs()
    far = alpha + torch.log(mag.clamp_min(alpha) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    far = torch.round(far).clamp(max=beta)
    out = torch.where(mag <= alpha, torch.round(x), torch.sign(x) * far)
    return out.long()


def position_buckets(positions: Tensor, ratio: float = DEFAULT_RATIO) -> Tensor:
    """Product buckets of tokens at ``positions`` (..., N, 2) in grid units, (row, col) -> (..., N, N) long.

    ``diff[i, j] = position_i - position_j`` (query minus key), each coordinate through :func:`piecewise_index`.
    """
    b = _beta(ratio)
    d = positions[..., :, None, :] - positions[..., None, :, :]
    g = piecewise_index(d, ratio) + b
    return g[..., 0] * (2 * b + 1) + g[..., 1]


def product_buckets(height: int, width: int, ratio: float = DEFAULT_RATIO, device=None) -> Tensor:
    """(H·W) x (H·W) bucket ids of a row-major token grid; cached, so every layer and step reuses one tensor."""
    key = (int(height), int(width), float(ratio), str(torch.device(device or "cpu")))
    if key not in _BUCKET_CACHE:
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).float()
        _BUCKET_CACHE[key] = position_buckets(pos, ratio).to(device)
    return _BUCKET_CACHE[key]


def gather_bias(table: Tensor, buckets: Tensor) -> Tensor:
    """``bias[b,h,i,j] = table[b,h,i,buckets[i,j]]`` for a (B, H, N, K) table and (N, N) or (B, N, N) buckets.

    One index_select on the flattened (i, k) axis (or a gather for per-image buckets): the output, B x H x N x N,
    is the largest tensor built; its backward scatters into B x H x N x K.
    """
    bsz, heads, n, k = table.shape
    if buckets.ndim == 2:
        flat = (torch.arange(n, device=buckets.device)[:, None] * k + buckets).reshape(-1)
        return table.reshape(bsz, heads, n * k).index_select(2, flat).view(bsz, heads, n, n)
    if buckets.shape != (bsz, n, n):
        raise ValueError(f"buckets {tuple(buckets.shape)} do not match a table of {bsz} images x {n} tokens")
    return table.gather(3, buckets[:, None].expand(bsz, heads, n, n))


class IRPE(nn.Module):
    """One attention layer's iRPE (Wu et al. 2021): ``mode`` "bias" or "ctx", ``on`` any of "q", "k", "v" (ctx)."""

    def __init__(self, heads: int, head_dim: int, mode: str = "ctx", on: str = "qkv", shared_head: bool = True,
                 ratio: float = DEFAULT_RATIO, extra_buckets: int = 0) -> None:
        super().__init__()
        if mode not in IRPE_MODES:
            raise ValueError(f"iRPE mode must be one of {IRPE_MODES}, got {mode!r}")
        if not on or set(on) - set("qkv") or (mode == "bias" and on != "k"):
            raise ValueError(f"iRPE 'on' must be a non-empty subset of 'qkv' (bias mode: 'k'), got {on!r}")
        self.mode, self.on, self.ratio = mode, on, ratio
        h = 1 if shared_head else heads
        k = num_buckets(ratio) + extra_buckets  # extra: one bucket for every pair with a CLS token (iRPE skip)
        self.num_buckets = k
        if mode == "bias":
            self.table = nn.Parameter(torch.zeros(h, k))
        else:
            for c in on:
                shape = (h, k, head_dim) if c == "v" else (h, head_dim, k)
                self.register_parameter(f"table_{c}", nn.Parameter(torch.zeros(shape)))

    @property
    def has_value_term(self) -> bool:
        return self.mode == "ctx" and "v" in self.on

    def logit_bias(self, q: Tensor, k: Tensor, scale: float, buckets: Tensor) -> Tensor:
        """The additive logit term (B x H x N x N, or 1 x H x N x N in bias mode) of the q / k tables."""
        if self.mode == "bias":
            n = buckets.shape[-1]
            return self.table[:, buckets.reshape(-1)].view(1, -1, n, n)
        bias = None
        if "k" in self.on:  # q_i . r_k[b(i, j)]
            bias = gather_bias((q * scale) @ self.table_k, buckets)
        if "q" in self.on:  # k_j . r_q[b(j, i)]
            t = gather_bias((k * scale) @ self.table_q, buckets).transpose(2, 3)
            bias = t if bias is None else bias + t
        return bias

    def value_term(self, attn: Tensor, buckets: Tensor) -> Tensor:
        """``Σ_j attn[b,h,i,j] r_v[b(i,j)]``: attention summed per bucket (B x H x N x K), then one matmul."""
        bsz, heads, n, _ = attn.shape
        idx = buckets.expand(bsz, heads, n, n) if buckets.ndim == 2 else buckets[:, None].expand(bsz, heads, n, n)
        per_bucket = attn.new_zeros(bsz, heads, n, self.num_buckets).scatter_add_(3, idx, attn)
        return per_bucket @ self.table_v


class KPRPE(nn.Module):
    """KP-RPE f(P) (Kim et al. 2024, Eqs. 5-11): ``forward(keypoints, token_positions)`` -> one table per layer.

    ``keypoints``: B x L x 2 in [0, 1] of the image (not clipped); ``token_positions``: N x 2 or B x N x 2 in [0, 1]
    (grid patch centres ``(k + 0.5) / s``, or landmark tokens), both (x, y). Returns ``depth`` tables of shape
    (B, H', N, K): H' = heads for ``multihead``, 1 otherwise (broadcast over heads).
    """

    def __init__(self, variant: str, depth: int, heads: int, num_keypoints: int = 5,
                 ratio: float = DEFAULT_RATIO) -> None:
        super().__init__()
        if variant not in KPRPE_VARIANTS:
            raise ValueError(f"KP-RPE variant must be one of {KPRPE_VARIANTS}, got {variant!r}")
        self.variant, self.depth, self.heads, self.num_keypoints = variant, depth, heads, num_keypoints
        self.k = num_buckets(ratio)
        out = self.k * heads * depth if variant == "multihead" else self.k
        self.linear = nn.Linear(2 * num_keypoints, out)  # W_L, with the code's bias
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, keypoints: Tensor, token_positions: Tensor) -> list[Tensor]:
        bsz = keypoints.shape[0]
        if keypoints.ndim != 3 or keypoints.shape[1:] != (self.num_keypoints, 2):
            raise ValueError(f"keypoints of shape {tuple(keypoints.shape)}: expected (B, {self.num_keypoints}, 2)")
        n = token_positions.shape[-2]
        with torch.no_grad():  # the keypoints are inputs, never trained through (kprpe_spec §2.2)
            p = keypoints.detach().to(self.linear.weight.dtype)
            if self.variant == "absolute":
                d = p.reshape(bsz, 1, -1)
            else:
                m = token_positions.to(p.dtype)
                m = m.expand(bsz, n, 2) if m.ndim == 2 else m
                d = (m[:, :, None, :] - p[:, None, :, :]).reshape(bsz, n, -1)  # grid minus keypoint
        f = self.linear(d)
        if self.variant == "absolute":  # one row for every query (the released code's shape bug avoided, §2.3)
            return [f.view(bsz, 1, 1, self.k).expand(bsz, 1, n, self.k)] * self.depth
        if self.variant == "relative":
            return [f.view(bsz, 1, n, self.k)] * self.depth
        f = f.view(bsz, n, self.depth * self.heads, self.k).transpose(1, 2)
        return list(f.chunk(self.depth, dim=1))

    def extra_repr(self) -> str:
        return f"variant={self.variant}, depth={self.depth}, heads={self.heads}, buckets={self.k}"
