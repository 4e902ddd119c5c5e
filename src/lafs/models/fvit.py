"""fViT: the grid-token face ViT baseline (Part fViT paper, BMVC 2022, §4; lafs_spec §2).

Non-overlapping ``patch_size`` x ``patch_size`` patches on a regular grid (8 x 8 on 112 x 112 gives
14 x 14 = 196 tokens), each flattened in (row, column, channel) order, as the reference's
``rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``. Tokens are row-major over the grid.
"""

from __future__ import annotations

from torch import Tensor, nn

from .vit import ViTEncoder


def grid_tokens(images: Tensor, patch_size: int) -> Tensor:
    """B x C x H x W -> B x (H/p * W/p) x (p * p * C), feature order (p1, p2, c)."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


class FViT(nn.Module):
    """Grid-patch face ViT. ``forward(images in [-1, 1]) -> {"embedding": B x D}``."""

    def __init__(self, img_size: int = 112, patch_size: int = 8, in_chans: int = 3, **encoder_kwargs) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_tokens = (img_size // patch_size) ** 2
        self.encoder = ViTEncoder(
            token_dim=patch_size * patch_size * in_chans, num_tokens=self.num_tokens, **encoder_kwargs
        )
        self.embedding_size = self.encoder.embedding_size

    def forward(self, images: Tensor, attn_bias: Tensor | None = None) -> dict[str, Tensor]:
        out = self.encoder(grid_tokens(images, self.patch_size), attn_bias)
        return {"embedding": out["embedding"]}
