"""fViT: the grid-token face ViT baseline (Part fViT paper, BMVC 2022, §4; its official ``vit_face_nolandmark.py``).

Non-overlapping ``patch_size`` x ``patch_size`` patches on a regular grid (8 x 8 on 112 x 112 gives
14 x 14 = 196 tokens), each flattened in (row, column, channel) order, as the reference's
``rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``. Tokens are row-major over the grid.

Self-supervised views (DINO local crops, LAFS landmark views) reach the same model in two ways:

- a smaller image (a 48 px DINO local crop: a 6 x 6 grid) takes, for each of its cells, the position
  embedding of the nearest cell of the full grid (:func:`grid_positions`, nearest-neighbour resampling of
  the embedding grid; DINO resamples bicubically, and the reference's ``pos_embedding[:, :n + 1]`` would
  give a small crop the embeddings of the top rows);
- ``landmarks`` (B x k x 2 pixels) sample the tokens at arbitrary points, as Part fViT does: the grid
  centres ``8g + 3.5`` read exactly the grid patches (:func:`grid_landmarks`), so LAFS on fViT perturbs,
  subsets and shuffles grid points (the grid variant of the reference code).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .part_fvit import sample_patches
from .vit import ViTEncoder


def grid_tokens(images: Tensor, patch_size: int) -> Tensor:
    """B x C x H x W -> B x (H/p * W/p) x (p * p * C), feature order (p1, p2, c)."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


def grid_landmarks(img_size: int, patch_size: int, device=None) -> Tensor:
    """The (x, y) pixel centres of the grid patches, row-major: (img_size / patch_size)^2 x 2."""
    g = img_size // patch_size
    c = torch.arange(g, device=device, dtype=torch.float32) * patch_size + (patch_size - 1) / 2
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=-1)


def grid_positions(rows: int, cols: int, grid: int, device=None) -> Tensor:
    """Position index (0..grid^2-1) of the nearest full-grid cell for each cell of a rows x cols grid."""
    def nearest(n: int) -> Tensor:
        if n == 1:
            return torch.tensor([(grid - 1) // 2], device=device)
        return torch.round(torch.arange(n, device=device) * ((grid - 1) / (n - 1))).long()

    return (nearest(rows)[:, None] * grid + nearest(cols)[None, :]).reshape(-1)


class FViT(nn.Module):
    """Grid-patch face ViT. ``forward(images in [-1, 1]) -> {"embedding": B x D}``.

    ``landmarks`` (B x k x 2) replace the grid by patches sampled at those points; ``positions`` (B x k)
    choose their position embeddings (default: token j takes position j, or the nearest-cell positions of
    a smaller grid).
    """

    def __init__(self, img_size: int = 112, patch_size: int = 8, in_chans: int = 3, **encoder_kwargs) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_tokens = (img_size // patch_size) ** 2
        self.encoder = ViTEncoder(
            token_dim=patch_size * patch_size * in_chans, num_tokens=self.num_tokens, img_size=img_size,
            patch_size=patch_size, **encoder_kwargs
        )
        self.embedding_size = self.encoder.embedding_size

    @property
    def uses_keypoints(self) -> bool:
        """KP-RPE models take ``keypoints`` (B x 5 x 2 pixels of the input) in ``forward``."""
        return self.encoder.uses_keypoints

    def forward(self, images: Tensor, attn_bias: Tensor | None = None, landmarks: Tensor | None = None,
                positions: Tensor | None = None, keypoints: Tensor | None = None) -> dict[str, Tensor]:
        token_xy = None
        if landmarks is not None:
            tokens = sample_patches(images, landmarks, self.patch_size)
            token_xy = landmarks
        else:
            tokens = grid_tokens(images, self.patch_size)
            h, w = images.shape[-2:]
            if h != self.img_size or w != self.img_size:
                token_xy = grid_landmarks(h, self.patch_size, images.device) if h == w else None
                if positions is None:
                    grid = self.img_size // self.patch_size
                    pos = grid_positions(h // self.patch_size, w // self.patch_size, grid, images.device)
                    positions = pos.expand(len(images), -1)
        out = self.encoder(tokens, attn_bias, positions, token_xy=token_xy, keypoints=keypoints)
        return {"embedding": out["embedding"]}
