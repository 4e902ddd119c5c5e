"""Part fViT: ViT on patches sampled at learned landmarks (Sun & Tzimiropoulos, BMVC 2022, §3).

The landmark CNN predicts R landmarks; a ``patch_size`` x ``patch_size`` patch is sampled around each by
bilinear interpolation (differentiable in the image and in the landmarks), flattened to a token, and the
R tokens go through the ViT encoder in landmark order.

Sampling convention (``patch_layout``):

- Coordinates are pixels with pixel centres at integers (the keypoint convention of the data layer):
  pixel (i, j) is at x = j, y = i; the image spans [-0.5, W - 0.5].
- All R patches of the batch are sampled by **one** ``grid_sample`` call (bilinear, ``align_corners=False``,
  ``padding_mode="zeros"``: samples outside the image read 0, mid-grey in [-1, 1] space).
- ``"centred"`` (default): sample k in 0..p-1 of a patch lies at offset ``k - (p - 1) / 2`` from the
  landmark, so the window is centred on it; patch rows run along y, columns along x. A landmark at
  ``(8g + 3.5, 8h + 3.5)`` reads exactly the grid patch (g, h) that fViT uses.
- ``"reference"``: the released code's ``extract_patches_pytorch_gridsample``: offsets ``k - p/2 - 1/2``
  (-4.5..+2.5 for p = 8, so the window is centred 1 px up-left of the landmark and every sample falls
  half-way between pixels) and **transposed** patches (rows run along x). Use it with weights trained
  by the reference code.

Token features are ordered (row, column, channel), as the reference's ``(p1 p2 c)`` rearrange.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .landmark_cnn import LandmarkCNN
from .vit import ViTEncoder

PATCH_LAYOUTS = ("centred", "reference")


def _patch_offsets(patch_size: int, layout: str, device, dtype) -> Tensor:
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"patch_layout must be one of {PATCH_LAYOUTS}, got {layout!r}")
    k = torch.arange(patch_size, device=device, dtype=dtype)
    if layout == "centred":
        return k - (patch_size - 1) / 2
    # Reference: grid = (l + k - p/2) / (W/2) - 1 with align_corners=False, which samples pixel-centre
    # coordinate l + k - p/2 - 1/2.
    return k - patch_size / 2 - 0.5


def _offset_grid(patch_size: int, layout: str, device, dtype) -> tuple[Tensor, Tensor]:
    """(dx, dy), each p x p: offset of output element [row, col] of a patch from its landmark."""
    d = _patch_offsets(patch_size, layout, device, dtype)
    rows, cols = torch.meshgrid(d, d, indexing="ij")
    # "reference" transposes the patch: its row index runs along x.
    return (rows, cols) if layout == "reference" else (cols, rows)


def sampling_grid(landmarks: Tensor, height: int, width: int, patch_size: int, layout: str, dtype) -> Tensor:
    """B x R x 2 pixel landmarks -> B x R x p x p x 2 ``grid_sample`` coordinates (``align_corners=False``).

    Pixel-centre coordinate u maps to (2u + 1) / size - 1. The landmarks are normalised once and the p x p
    offsets, already normalised, are added by one broadcast.
    """
    dx, dy = _offset_grid(patch_size, layout, landmarks.device, dtype)
    scale = torch.tensor([2.0 / width, 2.0 / height], device=landmarks.device, dtype=dtype)
    centre = landmarks.to(dtype) * scale + (scale / 2 - 1)
    return centre[:, :, None, None, :] + torch.stack((dx, dy), dim=-1) * scale


def sample_patches(images: Tensor, landmarks: Tensor, patch_size: int = 8, layout: str = "centred") -> Tensor:
    """Sample one patch per landmark with a single batched ``grid_sample``.

    images: B x C x H x W; landmarks: B x R x 2 (x, y) pixels. Returns B x R x (p * p * C).
    """
    b, c, h, w = images.shape
    r = landmarks.shape[1]
    p = patch_size
    grid = sampling_grid(landmarks, h, w, p, layout, images.dtype)
    out = F.grid_sample(
        images, grid.view(b, r * p, p, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    )  # B x C x (R p) x p
    return out.view(b, c, r, p, p).permute(0, 2, 3, 4, 1).reshape(b, r, p * p * c)


def sample_patches_loop(images: Tensor, landmarks: Tensor, patch_size: int = 8, layout: str = "centred") -> Tensor:
    """One ``grid_sample`` call per landmark, as the reference code does it. For tests and benchmarks only."""
    b, c, h, w = images.shape
    p = patch_size
    tokens = []
    for i in range(landmarks.shape[1]):
        grid = sampling_grid(landmarks[:, i : i + 1], h, w, p, layout, images.dtype)[:, 0]
        patch = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        tokens.append(patch.permute(0, 2, 3, 1).reshape(b, p * p * c))
    return torch.stack(tokens, dim=1)


KEYPOINT_SOURCES = ("data", "landmarks")


class PartFViT(nn.Module):
    """Landmark CNN + patch sampling + ViT encoder.

    ``forward(images in [-1, 1], landmarks=None) -> {"embedding": B x D, "landmarks": B x R x 2}``.
    Passing ``landmarks`` (any count R' <= R) skips the CNN: LAFS predicts them on a clean view and
    samples patches from an augmented one, possibly a subset. Self-supervised trunks set
    ``landmark_cnn = None`` (the frozen CNN lives outside the student and the teacher).
    """

    def __init__(
        self,
        img_size: int = 112,
        patch_size: int = 8,
        num_landmarks: int = 196,
        in_chans: int = 3,
        patch_layout: str = "centred",
        landmark_width_mult: float = 1.0,
        landmark_dropout: float = 0.5,
        landmark_rescale: str = "joint",
        landmark_output_init: str = "reference",
        keypoint_source: str = "data",
        **encoder_kwargs,
    ) -> None:
        super().__init__()
        if patch_layout not in PATCH_LAYOUTS:
            raise ValueError(f"patch_layout must be one of {PATCH_LAYOUTS}, got {patch_layout!r}")
        if keypoint_source not in KEYPOINT_SOURCES:
            raise ValueError(f"keypoint_source must be one of {KEYPOINT_SOURCES}, got {keypoint_source!r}")
        # KP-RPE on landmark tokens: the keypoints P are either the data's 5 points or the model's own landmarks
        self.keypoint_source = keypoint_source
        if keypoint_source == "landmarks" and encoder_kwargs.get("rpe") == "kprpe":
            encoder_kwargs["num_keypoints"] = num_landmarks
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_landmarks = num_landmarks
        self.num_tokens = num_landmarks
        self.patch_layout = patch_layout
        self.landmark_cnn = LandmarkCNN(num_landmarks, img_size, landmark_width_mult, landmark_dropout,
                                        landmark_rescale, landmark_output_init)
        self.encoder = ViTEncoder(
            token_dim=patch_size * patch_size * in_chans, num_tokens=num_landmarks, img_size=img_size,
            patch_size=patch_size, **encoder_kwargs
        )
        self.embedding_size = self.encoder.embedding_size

    @property
    def uses_keypoints(self) -> bool:
        """With KP-RPE the token positions are the landmarks; ``keypoint_source="data"`` needs ``keypoints`` (B x 5
        x 2 pixels) in ``forward``, ``"landmarks"`` takes the landmark CNN's own (detached) predictions as P."""
        return self.encoder.uses_keypoints and self.keypoint_source == "data"

    def forward(
        self, images: Tensor, landmarks: Tensor | None = None, attn_bias: Tensor | None = None,
        positions: Tensor | None = None, keypoints: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if landmarks is None:
            if self.landmark_cnn is None:
                raise ValueError("this Part fViT has no landmark CNN (an SSL trunk): pass landmarks")
            landmarks = self.landmark_cnn(images)
        tokens = sample_patches(images, landmarks, self.patch_size, self.patch_layout)
        if self.encoder.uses_keypoints and self.keypoint_source == "landmarks":
            keypoints = landmarks.detach()
        # relative encodings see the tokens where they were sampled; detached: the RPE does not move landmarks
        out = self.encoder(tokens, attn_bias, positions, token_xy=landmarks.detach(), keypoints=keypoints)
        return {"embedding": out["embedding"], "landmarks": landmarks}
