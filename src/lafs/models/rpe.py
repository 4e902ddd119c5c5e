"""Relative position encodings for face ViTs: iRPE (Wu et al., ICCV 2021) and KP-RPE (Kim et al., CVPR 2024).

- :func:`piecewise_index` is iRPE's Eq. 18: exact near zero, logarithmic up to β, clipped, with α:β:γ = 1:2:8 times
  ``ratio`` (1.9: α 1.9, β 3.8, γ 15.2; |Δ| = 0..13 -> 0,1,2,2,3,...,3).
- :func:`product_buckets` is iRPE's product method (the one that keeps direction): bucket = (g(Δrow) + β)·S +
  g(Δcol) + β, S = 2·int(β) + 1, K = S² = 49 buckets on any grid. Grid buckets are input-independent and cached per
  (grid, ratio, device); :func:`position_buckets` gives the same buckets for tokens at arbitrary positions (Part
  fViT's landmark tokens).
- :class:`IRPE`: one layer's iRPE, bias mode (a scalar per bucket) or contextual mode on q, k and/or v (a vector
  per bucket), heads shared or not, zero-initialised as in the official iRPE code (the KP-RPE paper's "ViT + iRPE"
  baseline is contextual product on q, k, v with shared heads: the official KP-RPE code's ``v1_base_irpe.yaml``).
  The k and q terms become an additive logit bias; the v term adds ``Σ_j attn_ij r_v[b(i,j)]``, computed by first
  summing the attention per bucket (B x H x N x K), so no H x N x N x d tensor is ever built.
- :class:`KPRPE`: the keypoint-dependent table f(P) (KP-RPE, Eqs. 5-11), computed once per forward (each layer's
  table from its own slice of W_L). Variants (the paper's Table 2; the official code's ``ctx_type``): ``absolute``
  (f from the flattened keypoints, one row for all queries, heads and layers), ``relative`` (f from each query's
  offsets to the keypoints, shared by heads and layers) and ``multihead`` (relative, unique per layer and head: the
  paper's best and the released model). W_L is a zero-initialised Linear with bias (the official code's), so a
  KP-RPE model starts as the same ViT without it. The offsets are computed without gradient, as in the official
  code: the keypoints are never trained through.
- :func:`gather_bias` turns a per-query table (B x H x N x K) into the B x H x N x N additive bias
  ``bias[b,h,i,j] = table[b,h,i,bucket(i,j)]`` with one gather, the largest tensor it builds.

The bias is added to the already scaled logits before the softmax, as the official code does (the paper's equation
puts it inside the 1/sqrt(d_k); with W_L learned from zero the two differ by a rescaling of W_L). A layer gets it as a
:class:`TableBias` (table and buckets). Training on the CPU in float32 runs :func:`table_bias_attention`: explicit
attention with the bias gathered into the logits and a written-out backward, because a float mask that needs a
gradient sends ``scaled_dot_product_attention`` to its unfused math path there (measured by ``lafs bench kprpe``).
Otherwise (evaluation, other devices, autocast, attention dropout) the bias is gathered and goes through the additive
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
    """iRPE Eq. 18 with α, β, γ = ratio·(1, 2, 8); long output in [-int(β), int(β)] (the cast truncates, as in the
    official code)."""
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

    One ``gather`` along the bucket axis, reading the table in place (any strides): the output, B x H x N x N, is
    the largest tensor built; its backward is one ``scatter_add`` into B x H x N x K.
    """
    bsz, heads, n, _ = table.shape
    if buckets.ndim == 3 and buckets.shape != (bsz, n, n):
        raise ValueError(f"buckets {tuple(buckets.shape)} do not match a table of {bsz} images x {n} tokens")
    return table.gather(3, _bucket_index(buckets).expand(bsz, heads, n, n))


def _bucket_index(buckets: Tensor) -> Tensor:
    """(N, N) or (B, N, N) bucket ids as a (1 or B, 1, N, N) index, to be expanded over images and heads."""
    return buckets[None, None] if buckets.ndim == 2 else buckets[:, None]


class TableBias:
    """A layer's additive logit bias kept as its table and bucket ids, ``bias = gather_bias(table, buckets)``.

    :class:`~lafs.models.vit.Attention` adds it inside :func:`table_bias_attention` when it can (the bias is then
    never built on its own) and otherwise through :meth:`materialize` and ``scaled_dot_product_attention``; the
    gathered bias is kept, so layers that share one table (the ``absolute`` and ``relative`` variants) gather once.
    """

    __slots__ = ("_bias", "buckets", "table")

    def __init__(self, table: Tensor, buckets: Tensor) -> None:
        self.table = table  # (B, H or 1, N, K)
        self.buckets = buckets  # (N, N) or (B, N, N)
        self._bias: Tensor | None = None

    def materialize(self) -> Tensor:
        if self._bias is None:
            self._bias = gather_bias(self.table, self.buckets)
        return self._bias


FUSED_TABLE_ATTENTION = True  # switch for tests and benchmarks: False always takes the materialised-bias path


def can_fuse_table_attention(x: Tensor, bias: TableBias, dropout_p: float) -> bool:
    """Whether :func:`table_bias_attention` applies: float32 on the CPU, no attention dropout, no autocast, not
    compiled (inductor fuses the gather itself), not while tracing or exporting (an autograd Function has no ONNX
    symbolic), and a table that needs a gradient (without one, ``scaled_dot_product_attention``'s fused CPU kernel
    takes the materialised bias as is).

    Elsewhere the materialised bias goes through ``scaled_dot_product_attention``: on CUDA its memory-efficient
    kernel returns the bias gradient itself.
    """
    return (FUSED_TABLE_ATTENTION and x.device.type == "cpu" and x.dtype == torch.float32
            and bias.table.dtype == torch.float32 and dropout_p == 0.0 and bias.table.requires_grad
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export())


class _TableBiasAttention(torch.autograd.Function):
    """softmax(q k^T · scale + gather(table, buckets)) v from the packed B x N x 3 x H x d projections, ``chunk``
    images at a time, with a hand-written backward (see :func:`table_bias_attention`)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, table: Tensor, buckets: Tensor, scale: float, chunk: int) -> Tensor:
        b, n, _, h, d = qkv.shape
        index = _bucket_index(buckets)
        tables = table.expand(b, h, n, table.shape[-1])
        attn = qkv.new_empty(b, h, n, n)
        out = qkv.new_empty(b, n, h, d)
        for i in range(0, b, chunk):
            c = min(chunk, b - i)
            q, k, v = qkv[i:i + c].permute(2, 0, 3, 1, 4).reshape(3, c * h, n, d)  # one copy into per-head order
            a = attn[i:i + c]
            torch.gather(tables[i:i + c], 3, _chunk_index(index, i, c, h, n), out=a)  # the bias
            a = a.view(c * h, n, n).baddbmm_(q, k.transpose(1, 2), alpha=scale)  # + q k^T · scale
            torch.softmax(a, dim=-1, out=a)  # row by row, in place
            out[i:i + c] = torch.bmm(a, v).view(c, h, n, d).transpose(1, 2)
        ctx.save_for_backward(qkv, attn, table, index)
        ctx.scale, ctx.chunk = scale, chunk
        return out.view(b, n, h * d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qkv, attn, table, index = ctx.saved_tensors
        b, n, _, h, d = qkv.shape
        grads = grad_out.view(b, n, h, d)
        dqkv = qkv.new_empty(qkv.shape)  # the gradient in the layout of the projection's output
        need_table, th = ctx.needs_input_grad[1], table.shape[1]
        dtable = torch.zeros_like(table) if need_table else None  # the table's own layout where it is dense
        for i in range(0, b, ctx.chunk):
            c = min(ctx.chunk, b - i)
            q, k, v = qkv[i:i + c].permute(2, 0, 3, 1, 4).reshape(3, c * h, n, d)
            g = grads[i:i + c].transpose(1, 2).reshape(c * h, n, d)
            a = attn[i:i + c].view(c * h, n, n)
            dq, dk, dv = dout = q.new_empty(3, c * h, n, d)
            torch.bmm(a.transpose(1, 2), g, out=dv)
            dlogits = torch.bmm(g, v.transpose(1, 2))  # d attn, then through the softmax, in place:
            torch.ops.aten._softmax_backward_data.out(dlogits, a, -1, a.dtype, grad_input=dlogits)
            torch.baddbmm(dq, dlogits, k, beta=0, alpha=ctx.scale, out=dq)
            torch.baddbmm(dk, dlogits.transpose(1, 2), q, beta=0, alpha=ctx.scale, out=dk)
            dqkv[i:i + c] = dout.view(3, c, h, n, d).permute(1, 3, 0, 2, 4)
            if need_table:  # the gather's backward: each logit's gradient summed into its bucket
                dl = dlogits.view(c, h, n, n)
                dl = dl if th == h else dl.sum(1, keepdim=True)
                dtable[i:i + c].scatter_add_(3, _chunk_index(index, i, c, th, n), dl)
        return dqkv, dtable, None, None, None


def _chunk_index(index: Tensor, i: int, c: int, heads: int, n: int) -> Tensor:
    return (index if index.shape[0] == 1 else index[i:i + c]).expand(c, heads, n, n)


def table_bias_attention(qkv: Tensor, bias: TableBias, scale: float, chunk: int | None = None) -> Tensor:
    """Multi-head attention with a table bias, from the packed projections ``qkv`` (B, N, 3, H, d; q, k, v) to the
    heads' outputs (B, N, H·d): ``scaled_dot_product_attention(q, k, v, attn_mask=bias.materialize(), scale=scale)``
    computed as explicit attention, the bias gathered straight into the logits buffer, and a backward written out in
    which the bias gradient is the logits' gradient summed into the table's buckets (one scatter_add).

    Why: on the CPU, a float mask that needs a gradient sends ``scaled_dot_product_attention`` to its unfused math
    path, and the gathered bias is then built, read and differentiated on its own. Here the probabilities are kept
    for the backward (one product fewer than the fused kernel, which recomputes them; B x H x N x N floats more
    memory per layer, as the math path keeps too).

    ``chunk``: images per step (default: 1 with one intra-op thread, so that each image's N x N logits stay in
    cache through the gather, the products, the softmax and the scatter; all at once with several threads, where
    every op is a parallel region and many small ones cost more than they save on a shared machine).
    """
    b = qkv.shape[0]
    if chunk is None:
        chunk = 1 if torch.get_num_threads() == 1 else b
    return _TableBiasAttention.apply(qkv, bias.table, bias.buckets, scale, max(1, min(chunk, b)))


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


class _LayerwiseLinear(nn.Linear):
    """W_L (with the code's bias), output features ordered (layer, head, bucket). ``forward(x)`` is the Linear;
    ``forward(x, layer=l)`` gives layer l's outputs alone, one product per head: H x (rows of x) x K. Called as a
    module either way, so hooks (``models.complexity``) see every product."""

    def __init__(self, in_features: int, out_features: int, heads: int, buckets: int) -> None:
        super().__init__(in_features, out_features)
        self.heads, self.buckets = heads, buckets

    def forward(self, x: Tensor, layer: int | None = None) -> Tensor:
        if layer is None:
            return super().forward(x)
        h, k = self.heads, self.buckets
        rows = slice(layer * h * k, (layer + 1) * h * k)
        w = self.weight[rows].view(h, k, -1).transpose(1, 2)  # (H, in, K)
        return torch.baddbmm(self.bias[rows].view(h, 1, k), x.reshape(1, -1, x.shape[-1]).expand(h, -1, -1), w)


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
        self.linear = _LayerwiseLinear(2 * num_keypoints, out, heads if variant == "multihead" else 1, self.k)  # W_L
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, keypoints: Tensor, token_positions: Tensor) -> list[Tensor]:
        d = self.offsets(keypoints, token_positions)
        if self.variant != "multihead":  # one table for every layer
            return [self.table(d, 0, token_positions.shape[-2])] * self.depth
        return [self.table(d, layer) for layer in range(self.depth)]

    def offsets(self, keypoints: Tensor, token_positions: Tensor) -> Tensor:
        """The input of W_L, without gradient: B x N x 2L offsets grid minus keypoint (B x 1 x 2L keypoints for
        ``absolute``)."""
        bsz = keypoints.shape[0]
        if keypoints.ndim != 3 or keypoints.shape[1:] != (self.num_keypoints, 2):
            raise ValueError(f"keypoints of shape {tuple(keypoints.shape)}: expected (B, {self.num_keypoints}, 2)")
        n = token_positions.shape[-2]
        with torch.no_grad():  # the keypoints are inputs, never trained through
            p = keypoints.detach().to(self.linear.weight.dtype)
            if self.variant == "absolute":
                return p.reshape(bsz, 1, -1)
            m = token_positions.to(p.dtype)
            m = m.expand(bsz, n, 2) if m.ndim == 2 else m
            return (m[:, :, None, :] - p[:, None, :, :]).reshape(bsz, n, -1)  # grid minus keypoint

    def table(self, offsets: Tensor, layer: int, n: int | None = None) -> Tensor:
        """Layer ``layer``'s (B, H', N, K) table from :meth:`offsets` (``n``: the token count, for ``absolute``).

        ``multihead``: output features ``[(l·H)·K, (l+1)·H·K)`` of W_L (layer-major, then head, then bucket, as the
        official code's ``rel_keypoint_splithead_unshared``), computed for this layer alone as one product per head,
        H x (B·N) x K, seen as (B, H, N, K): each (image, head) table is one contiguous block, which the gather reads
        at the speed of a contiguous table, and the gradient goes straight to this layer's slice of W_L (no
        (B, N, L·H·K) gradient assembled).
        """
        bsz = offsets.shape[0]
        if self.variant == "absolute":  # one row for every query (the released code's shape bug avoided)
            return self.linear(offsets).view(bsz, 1, 1, self.k).expand(bsz, 1, n, self.k)
        if self.variant == "relative":
            return self.linear(offsets).view(bsz, 1, offsets.shape[1], self.k)
        n = offsets.shape[1]
        return self.linear(offsets, layer=layer).view(self.heads, bsz, n, self.k).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, depth={self.depth}, heads={self.heads}, buckets={self.k}"
