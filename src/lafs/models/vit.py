"""Pre-norm vision transformer encoder shared by fViT, Part fViT and (later) KP-RPE models.

Tokens -> Linear embedding -> [CLS] + learned absolute position embedding -> pre-norm blocks
(attention, feed-forward, each with DropPath) -> pooled token -> embedding head.
This is the encoder of Part fViT (Sun & Tzimiropoulos, BMVC 2022, §3) as the official code releases it
(``ViT_face_landmark_patch8``). The released code's quirks are options whose preset values are the code's:

- ``attn_scale="dim"``: logits are scaled by ``dim ** -0.5`` instead of ``dim_head ** -0.5``;
- ``dim_head=64`` independent of ``heads`` (11 heads give an inner width of 704 != dim);
- ``embedding_size=None``: the face embedding is ``LayerNorm(CLS)`` of size ``dim``;
- ``drop_path_schedule="constant"``: the same DropPath rate in every block;
- ``token_init="normal"``: CLS token and position embedding drawn from N(0, 1) (vit-pytorch); DINO's ViT
  uses ``"trunc_normal"`` (std 0.02), which lets the image content, not the constant embeddings, dominate
  the CLS output of a freshly initialised shallow model: self-distillation needs that diversity between
  images to start from (with N(0, 1) a 2-layer micro model's outputs for different faces have cosine ~0.995).
  ``"sincos"`` starts the learned position embedding at MoCo v3's 2-D sin-cos grid (CLS: zero, the CLS token
  trunc-normal), and ``attn_init="mimetic"`` starts attention as Trockman & Kolter's mimetic init
  (``models/mimetic.py``): both give the model spatial structure at step 0, which the defaults lack.

Attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`, which accepts an
optional additive per-head bias (B x H x N x N or broadcastable, added to the scaled logits before
the softmax, where the official KP-RPE code adds its bias). iRPE / KP-RPE supply that bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import Dropout, dropout as apply_dropout
from .mimetic import mimetic_init_, sincos_2d
from .rpe import (
    IRPE,
    KPRPE,
    TableBias,
    can_fuse_table_attention,
    num_buckets,
    position_buckets,
    product_buckets,
    table_bias_attention,
)

ATTN_SCALES = ("dim", "head_dim")
DROP_PATH_SCHEDULES = ("constant", "linear")
POOLS = ("cls", "mean", "flatten")
TOKEN_INITS = ("normal", "trunc_normal", "sincos")
ATTN_INITS = ("default", "mimetic")
MLP_ACTS = ("gelu", "relu6")
WEIGHT_INITS = ("torch", "trunc_normal")
RPES = ("none", "irpe", "kprpe")


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the residual branch per sample."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention with an optional additive logit bias (Vaswani et al. 2017, Eq. 1)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        attn_scale: str = "dim",
        qkv_bias: bool = False,
        irpe: dict | None = None,
    ) -> None:
        super().__init__()
        if attn_scale not in ATTN_SCALES:
            raise ValueError(f"attn_scale must be one of {ATTN_SCALES}, got {attn_scale!r}")
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        # The official code scales by the model width, not the head width.
        self.scale = (dim if attn_scale == "dim" else dim_head) ** -0.5
        self.attn_dropout = attn_dropout
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.out_drop = Dropout(dropout)
        self.rpe = IRPE(heads, dim_head, **irpe) if irpe else None

    def forward(self, x: Tensor, attn_bias: Tensor | TableBias | None = None, buckets: Tensor | None = None) -> Tensor:
        """``attn_bias``: an additive logit bias, or a :class:`~lafs.models.rpe.TableBias` (KP-RPE's table and buckets).
        ``buckets``: the iRPE bucket id of every (query, key) token pair (N x N or B x N x N), when iRPE is on."""
        b, n, _ = x.shape
        table_bias = isinstance(attn_bias, TableBias)
        if table_bias:  # KP-RPE: a table and its buckets, gathered here (models/rpe.py)
            if self.rpe is None and can_fuse_table_attention(x, attn_bias, self.attn_dropout if self.training else 0.0):
                qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head)
                return self.out_drop(self.to_out(table_bias_attention(qkv, attn_bias, self.scale)))
            attn_bias = attn_bias.materialize()
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.rpe is not None:
            if buckets is None:
                raise ValueError("iRPE attention needs the token buckets")
            rpe_bias = self.rpe.logit_bias(q, k, self.scale, buckets)
            attn_bias = rpe_bias if attn_bias is None else attn_bias + rpe_bias
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        value_term = self.rpe is not None and self.rpe.has_value_term
        compiled_table = table_bias and q.device.type == "cpu" and torch.compiler.is_compiling()
        if value_term or compiled_table or (q.dtype == torch.bfloat16 and q.device.type == "cpu"):
            # Explicit attention, for two reasons: iRPE's value term needs the attention probabilities (its
            # contextual v term), and in bf16 on the CPU the fused kernel's backward is several times slower than
            # these batched bf16 matrix products at face-token counts (N <= 197; benchmarks/bench_models.py measures
            # both). Compiled on the CPU, a KP-RPE table takes this path too: inductor then fuses its gather into the
            # softmax, where an attn_mask would be built in full for the fused kernel (``lafs bench kprpe --compile``).
            logits = (q @ k.transpose(-2, -1)) * self.scale
            attn = (logits if attn_bias is None else logits + attn_bias).softmax(dim=-1)
            attn = apply_dropout(attn, self.attn_dropout, self.training)
            out = attn @ v
            if value_term:
                out = out + self.rpe.value_term(attn, buckets)
            out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
            return self.out_drop(self.to_out(out))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_bias,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.out_drop(self.to_out(out))


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU (ReLU6 in insightface's face ViT) -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, act: str = "gelu") -> None:
        super().__init__()
        if act not in MLP_ACTS:
            raise ValueError(f"mlp_act must be one of {MLP_ACTS}, got {act!r}")
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU() if act == "gelu" else nn.ReLU6(),
            Dropout(dropout),
            nn.Linear(hidden, dim),
            Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(FFN(LN(x)))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float,
        attn_dropout: float,
        drop_path: float,
        attn_scale: str,
        mlp_act: str = "gelu",
        irpe: dict | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, dropout, attn_dropout, attn_scale, irpe=irpe)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_dim, dropout, mlp_act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, buckets: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_bias, buckets))
        return x + self.drop_path(self.ff(self.norm2(x)))


def drop_path_rates(rate: float, depth: int, schedule: str) -> list[float]:
    """Per-block DropPath rates: constant (reference code) or a linear ramp 0 -> rate (DeiT)."""
    if schedule not in DROP_PATH_SCHEDULES:
        raise ValueError(f"drop_path_schedule must be one of {DROP_PATH_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or depth == 1:
        return [rate] * depth
    return [rate * i / (depth - 1) for i in range(depth)]


class ViTEncoder(nn.Module):
    """Token sequence (B x N x token_dim) -> face embedding.

    ``num_tokens`` is the maximum sequence length; a shorter sequence (for example the 36-landmark
    student views of LAFS) uses the first ``N + 1`` position embeddings, as the reference does.

    ``pool="flatten"`` is insightface's face ViT, used by the KP-RPE paper (its official code's ``vit_kprpe``): no
    CLS token, and the head is LayerNorm -> flatten all N tokens -> Linear(N·dim, E, no bias) -> BN -> Linear(E, E,
    no bias) -> BN (E = ``embedding_size``, default 512).

    Relative position encodings (``rpe``, ``models/rpe.py``): ``"irpe"`` puts an :class:`~lafs.models.rpe.IRPE` in
    every attention layer (``rpe_mode``, ``rpe_on``, ``rpe_shared_head``, ``rpe_ratio``); ``"kprpe"`` adds the
    keypoint table f(P) of :class:`~lafs.models.rpe.KPRPE` (``kprpe_variant``, ``num_keypoints``), gathered into each
    layer's bias. Both need the token geometry: ``img_size`` / ``patch_size`` (set by the backbone) and, per forward,
    ``token_xy`` (the tokens' pixel centres, default a full row-major grid) and, for KP-RPE, ``keypoints`` in pixels.
    With a CLS token, its pairs get an extra iRPE bucket (iRPE's ``skip``) and a zero KP-RPE bias (the KP-RPE paper's
    ViT has no CLS token; that case is unspecified there).
    """

    def __init__(
        self,
        token_dim: int,
        num_tokens: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        mlp_dim: int | None = None,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path: float = 0.1,
        drop_path_schedule: str = "constant",
        attn_scale: str = "dim",
        pool: str = "cls",
        embedding_size: int | None = None,
        token_init: str = "normal",
        attn_init: str = "default",
        mlp_act: str = "gelu",
        weight_init: str = "torch",
        rpe: str = "none",
        rpe_mode: str = "ctx",
        rpe_on: str = "qkv",
        rpe_shared_head: bool = True,
        rpe_ratio: float = 1.9,
        kprpe_variant: str = "multihead",
        num_keypoints: int = 5,
        img_size: int | None = None,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if token_init not in TOKEN_INITS:
            raise ValueError(f"token_init must be one of {TOKEN_INITS}, got {token_init!r}")
        if attn_init not in ATTN_INITS:
            raise ValueError(f"attn_init must be one of {ATTN_INITS}, got {attn_init!r}")
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
        if rpe not in RPES:
            raise ValueError(f"rpe must be one of {RPES}, got {rpe!r}")
        if rpe != "none" and not (img_size and patch_size):
            raise ValueError("relative position encodings need the token geometry (img_size, patch_size)")
        self.num_tokens = num_tokens
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.pool = pool
        self.has_cls = pool != "flatten"
        self.rpe, self.rpe_ratio = rpe, rpe_ratio
        self.img_size, self.patch_size = img_size, patch_size
        self.to_embedding = nn.Linear(token_dim, dim)
        # std-1 normal init, as the reference (vit-pytorch style) does.
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim)) if self.has_cls else None
        self.pos_embedding = nn.Parameter(torch.randn(1, num_tokens + int(self.has_cls), dim))
        if token_init in ("trunc_normal", "sincos"):
            if self.has_cls:
                nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        if token_init == "sincos":
            side = math.isqrt(num_tokens)
            if side * side != num_tokens:
                raise ValueError(f"token_init='sincos' needs a square token grid, got {num_tokens} tokens")
            with torch.no_grad():
                self.pos_embedding[0, int(self.has_cls):] = sincos_2d(side, dim)
                self.pos_embedding[0, : int(self.has_cls)] = 0.0
        self.emb_drop = Dropout(emb_dropout)
        rates = drop_path_rates(drop_path, depth, drop_path_schedule)
        irpe = None
        if rpe == "irpe":
            irpe = dict(mode=rpe_mode, on=rpe_on, shared_head=rpe_shared_head, ratio=rpe_ratio,
                        extra_buckets=int(self.has_cls))
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, mlp_dim or 4 * dim, dropout, attn_dropout, r, attn_scale, mlp_act, irpe)
            for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        if pool == "flatten":
            emb = embedding_size or 512
            self.proj: nn.Module = nn.Sequential(
                nn.Linear(num_tokens * dim, emb, bias=False), nn.BatchNorm1d(emb, eps=2e-5),
                nn.Linear(emb, emb, bias=False), nn.BatchNorm1d(emb, eps=2e-5),
            )
            self.embedding_size = emb
        elif embedding_size is None:
            self.proj = nn.Identity()
            self.embedding_size = dim
        else:
            self.proj = nn.Sequential(
                nn.Linear(dim, embedding_size, bias=False), nn.BatchNorm1d(embedding_size)
            )
            self.embedding_size = embedding_size
        if weight_init == "trunc_normal":  # insightface / timm ViT: Linear N(0, 0.02) truncated, zero bias
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        if attn_init == "mimetic":  # after weight_init, which would overwrite it
            mimetic_init_(self.blocks)
        # created after the init above, so W_L stays zero and the model starts as the plain ViT (the official code's)
        self.kprpe = KPRPE(kprpe_variant, depth, heads, num_keypoints, rpe_ratio) if rpe == "kprpe" else None

    @property
    def uses_keypoints(self) -> bool:
        return self.kprpe is not None

    def _buckets(self, n: int, token_xy: Tensor | None, device) -> Tensor:
        """iRPE product bucket of every token pair (with the CLS token's extra bucket when there is one)."""
        if token_xy is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{n} tokens are not a square grid: pass token_xy (their pixel centres)")
            buckets = product_buckets(side, side, self.rpe_ratio, device)
        else:
            buckets = position_buckets(token_xy.flip(-1).float() / self.patch_size, self.rpe_ratio)  # (row, col)
        if self.has_cls:
            buckets = F.pad(buckets, (1, 0, 1, 0), value=num_buckets(self.rpe_ratio))
        return buckets

    def _token_positions(self, n: int, token_xy: Tensor | None, device) -> Tensor:
        """Token centres in [0, 1] of the image, (x, y): grid cells ``(k + 0.5) / s`` (the official code's)."""
        if token_xy is not None:
            return (token_xy.float() + 0.5) / self.img_size
        side = math.isqrt(n)
        c = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        return torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=-1)

    def forward(
        self, tokens: Tensor, attn_bias: Tensor | Sequence[Tensor | None] | None = None,
        positions: Tensor | None = None, token_xy: Tensor | None = None, keypoints: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``attn_bias``: one tensor for every layer, or one (or None) per layer.

        ``positions`` (B x n, in 0..num_tokens-1): the position embedding of each token (LAFS views without
        landmark shuffle keep their landmark's); default: token j takes position j, as the reference does.
        ``token_xy`` (n x 2 or B x n x 2 pixels) and ``keypoints`` (B x L x 2 pixels): relative position encodings.
        """
        b, n, _ = tokens.shape
        if n > self.num_tokens and positions is None:
            raise ValueError(f"got {n} tokens but the position embedding holds {self.num_tokens}")
        if self.pool == "flatten" and n != self.num_tokens:
            raise ValueError(f"the flatten head takes exactly {self.num_tokens} tokens, got {n}")
        x = self.to_embedding(tokens)
        c = int(self.has_cls)
        if self.has_cls:
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        if positions is None:
            pos = self.pos_embedding[:, : n + c]
        else:
            if positions.shape != (b, n) or int(positions.min()) < 0 or int(positions.max()) >= self.num_tokens:
                raise ValueError(f"positions must be {b} x {n} indices in 0..{self.num_tokens - 1}")
            pos = self.pos_embedding[0, c:][positions]
            if self.has_cls:
                pos = torch.cat([self.pos_embedding[:, :1].expand(b, -1, -1), pos], 1)
        x = self.emb_drop(x + pos.to(x.dtype))
        if attn_bias is None or isinstance(attn_bias, Tensor):
            biases: Sequence[Tensor | None] = [attn_bias] * self.depth
        else:
            biases = attn_bias
            if len(biases) != self.depth:
                raise ValueError(f"got {len(biases)} per-layer attention biases for depth {self.depth}")
        buckets = self._buckets(n, token_xy, x.device) if self.rpe != "none" else None
        tables = None
        if self.kprpe is not None:
            if keypoints is None:
                raise ValueError("a KP-RPE model needs keypoints (B x 5 x 2 pixels of the input image)")
            kp = (keypoints.float() + 0.5) / self.img_size
            tables = self.kprpe(kp, self._token_positions(n, token_xy, x.device))
        grid_buckets = buckets[..., c:, c:] if buckets is not None else None
        last_table, last_bias = None, None
        for layer, (block, bias) in enumerate(zip(self.blocks, biases)):
            if tables is not None:
                if tables[layer] is not last_table:  # absolute / relative: one table for every layer
                    last_table = tables[layer]
                    last_bias = TableBias(last_table, grid_buckets)  # gathered in the attention (models/rpe.py)
                    if self.has_cls:  # the CLS token's pairs get a zero bias
                        last_bias = F.pad(last_bias.materialize(), (1, 0, 1, 0))
                if bias is None:
                    bias = last_bias
                else:
                    bias = bias + (last_bias.materialize() if isinstance(last_bias, TableBias) else last_bias)
            x = block(x, bias, buckets)
        if self.pool == "flatten":
            return {"embedding": self.proj(self.norm(x).flatten(1)), "tokens": x}
        pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return {"embedding": self.proj(self.norm(pooled)), "tokens": x}
