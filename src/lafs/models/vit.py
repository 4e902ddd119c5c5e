"""Pre-norm vision transformer encoder shared by fViT, Part fViT and (later) KP-RPE models.

Tokens -> Linear embedding -> [CLS] + learned absolute position embedding -> pre-norm blocks
(attention, feed-forward, each with DropPath) -> pooled token -> embedding head.
This is the encoder of Part fViT (Sun & Tzimiropoulos, BMVC 2022, §3) as released with LAFS
(lafs_spec §1.4). The released code's quirks are options whose preset values are the code's:

- ``attn_scale="dim"``: logits are scaled by ``dim ** -0.5`` instead of ``dim_head ** -0.5``;
- ``dim_head=64`` independent of ``heads`` (11 heads give an inner width of 704 != dim);
- ``embedding_size=None``: the face embedding is ``LayerNorm(CLS)`` of size ``dim``;
- ``drop_path_schedule="constant"``: the same DropPath rate in every block;
- ``token_init="normal"``: CLS token and position embedding drawn from N(0, 1) (vit-pytorch); DINO's ViT
  uses ``"trunc_normal"`` (std 0.02), which lets the image content, not the constant embeddings, dominate
  the CLS output of a freshly initialised shallow model: self-distillation needs that diversity between
  images to start from (with N(0, 1) a 2-layer micro model's outputs for different faces have cosine ~0.995).

Attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`, which accepts an
optional additive per-head bias (B x H x N x N or broadcastable, added to the scaled logits before
the softmax, kprpe_spec §2.7). iRPE / KP-RPE supply that bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_SCALES = ("dim", "head_dim")
DROP_PATH_SCHEDULES = ("constant", "linear")
POOLS = ("cls", "mean")
TOKEN_INITS = ("normal", "trunc_normal")


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
    ) -> None:
        super().__init__()
        if attn_scale not in ATTN_SCALES:
            raise ValueError(f"attn_scale must be one of {ATTN_SCALES}, got {attn_scale!r}")
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        # The reference scales by the model width, not the head width (lafs_spec §1.4).
        self.scale = (dim if attn_scale == "dim" else dim_head) ** -0.5
        self.attn_dropout = attn_dropout
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.out_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
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
    """Position-wise MLP: Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
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
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, dropout, attn_dropout, attn_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_bias))
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
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if token_init not in TOKEN_INITS:
            raise ValueError(f"token_init must be one of {TOKEN_INITS}, got {token_init!r}")
        self.num_tokens = num_tokens
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.pool = pool
        self.to_embedding = nn.Linear(token_dim, dim)
        # std-1 normal init, as the reference (vit-pytorch style) does.
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_tokens + 1, dim))
        if token_init == "trunc_normal":
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.emb_drop = nn.Dropout(emb_dropout)
        rates = drop_path_rates(drop_path, depth, drop_path_schedule)
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, mlp_dim or 4 * dim, dropout, attn_dropout, r, attn_scale)
            for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        if embedding_size is None:
            self.proj: nn.Module = nn.Identity()
            self.embedding_size = dim
        else:
            self.proj = nn.Sequential(
                nn.Linear(dim, embedding_size, bias=False), nn.BatchNorm1d(embedding_size)
            )
            self.embedding_size = embedding_size

    def forward(
        self, tokens: Tensor, attn_bias: Tensor | Sequence[Tensor | None] | None = None,
        positions: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``attn_bias``: one tensor for every layer, or one (or None) per layer.

        ``positions`` (B x n, in 0..num_tokens-1): the position embedding of each token (LAFS views without
        landmark shuffle keep their landmark's); default: token j takes position j, as the reference does.
        """
        b, n, _ = tokens.shape
        if n > self.num_tokens and positions is None:
            raise ValueError(f"got {n} tokens but the position embedding holds {self.num_tokens}")
        x = self.to_embedding(tokens)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        if positions is None:
            pos = self.pos_embedding[:, : n + 1]
        else:
            if positions.shape != (b, n) or int(positions.min()) < 0 or int(positions.max()) >= self.num_tokens:
                raise ValueError(f"positions must be {b} x {n} indices in 0..{self.num_tokens - 1}")
            pos = torch.cat([self.pos_embedding[:, :1].expand(b, -1, -1), self.pos_embedding[0, 1:][positions]], 1)
        x = self.emb_drop(x + pos.to(x.dtype))
        if attn_bias is None or isinstance(attn_bias, Tensor):
            biases: Sequence[Tensor | None] = [attn_bias] * self.depth
        else:
            biases = attn_bias
            if len(biases) != self.depth:
                raise ValueError(f"got {len(biases)} per-layer attention biases for depth {self.depth}")
        for block, bias in zip(self.blocks, biases):
            x = block(x, bias)
        pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return {"embedding": self.proj(self.norm(pooled)), "tokens": x}
