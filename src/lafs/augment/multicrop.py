"""Multi-crop views for self-supervised pretraining (LAFS's and DINO's official code), batched.

Two view generators share one set of building blocks:

- :class:`LAFSViews` (the official LAFS code's ``DataAugmentation_LAFS``): every view is a
  ``RandomResizedCrop(112, scale=(0.4, 1.0))`` plus a horizontal flip, emitted twice: clean, and photometrically
  augmented with the same geometry. View 0 uses :data:`DINO_GLOBAL_1`, view 1 :data:`DINO_GLOBAL_2` and the others
  :data:`DINO_LOCAL`.
- :class:`MultiCropViews` (``DataAugmentationDINO``, present in the official LAFS code but not wired up): two 112
  global crops at scale (0.4, 1.0) and ``num_local`` 48 local crops at scale (0.05, 0.4), each flipped and augmented
  once.

The photometric pipeline (:class:`Photometric`) is DINO's: ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8 (its four ops
in a random order per image), RandomGrayscale(0.2), GaussianBlur with sigma ~ U(0.1, 2) and a preset probability,
and Solarization (threshold 128) with a preset probability.

The crop boxes (``RandomResizedCrop``) and the colour jitter are :mod:`lafs.augment.ops`', shared with the supervised
pipeline: every draw is per image but each op runs once on the batch (or on the group of images that drew it), on
the images' device, with torch's global RNG for that device, so a resumed run repeats the draws exactly. Input and
output are floats in [-1, 1]; the ops work in [0, 1], where the reference's uint8 value v is v / 255. The
normalisation is always the project's (0.5, 0.5), also for the DINO views (the reference's DINO class uses ImageNet
mean/std).

Known differences from the reference: no rounding to uint8 between ops; crops are resampled bicubically without
antialiasing (PIL antialiases when a DINO local crop is shrunk to 48 px); the blur is a true Gaussian with a
13-tap kernel (3 sigma at sigma 2) and reflect borders, where PIL's GaussianBlur approximates it with box blurs;
random draws differ from PIL/torchvision, and the distributions match.
"""

from __future__ import annotations

import math

import kornia.filters as KF
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import color_jitter, sample_boxes, uniform

__all__ = [
    "DINO_GLOBAL_1", "DINO_GLOBAL_2", "DINO_LOCAL", "LAFSViews", "MultiCropViews", "Photometric", "crop_resize",
    "dino_photometrics",
    "random_resized_crop",
]  # fmt: skip

_SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize inverts every value >= 128
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, torchvision rgb_to_grayscale


def crop_resize(images: Tensor, boxes: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Resample box i = (left, top, width, height) of image i to size x size in one batched ``grid_sample``.

    Pixel p spans [p, p + 1] (PIL's convention), so output pixel centre j reads the input at
    left + (j + 0.5) * width / size. Border padding; bicubic overshoot is left to the caller to clamp.
    """
    _, _, h, w = images.shape
    t = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size  # size
    b = boxes.to(images.dtype)
    xs = (b[:, 0:1] + t * b[:, 2:3]) * (2 / w) - 1  # n x size, normalised (align_corners=False)
    ys = (b[:, 1:2] + t * b[:, 3:4]) * (2 / h) - 1
    n = len(images)
    grid = torch.stack([xs.view(n, 1, size).expand(n, size, size), ys.view(n, size, 1).expand(n, size, size)], -1)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def random_resized_crop(
    images: Tensor,
    size: int,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    return_boxes: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """torchvision ``RandomResizedCrop(size, scale, ratio, bicubic)`` per image on a B x 3 x H x W batch in [-1, 1].

    Returns B x 3 x size x size in [-1, 1], and with ``return_boxes`` also the B x 4 boxes of :func:`sample_boxes`.
    """
    _, _, h, w = images.shape
    boxes = sample_boxes(len(images), h, w, scale, ratio, images.device)
    out = crop_resize(images, boxes, size).clamp(-1, 1)
    return (out, boxes) if return_boxes else out


def _random_flip(images: Tensor, p: float = 0.5) -> Tensor:
    flipped = torch.rand(len(images), device=images.device) < p
    return torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)


class Photometric(nn.Module):
    """DINO's photometric pipeline on a B x 3 x H x W batch in [-1, 1], each stage drawn per image:

    ColorJitter(brightness, contrast, saturation, hue) = ``jitter`` with probability ``jitter_prob`` (torchvision:
    factors ~ U(max(0, 1 - s), 1 + s), hue shift ~ U(-s, s), the ops in a random order per image, an op of strength
    0 skipped); grayscale (ITU-R 601 luma on all 3 channels) with ``grayscale_prob``; Gaussian blur with sigma
    ~ U(``blur_sigma``) with ``blur_prob``; solarization (values >= 128/255 inverted) with ``solarize_prob``.
    A stage of probability 0 draws nothing; with all four off the input tensor is returned as is.
    """

    def __init__(
        self,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 1.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(f"jitter must be 4 non-negative strengths with hue <= 0.5, got {jitter}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be 0 < low <= high, got {blur_sigma}")
        self.jitter = tuple(float(s) for s in jitter)
        self.jitter_prob = jitter_prob
        self.grayscale_prob = grayscale_prob
        self.blur_prob = blur_prob
        self.blur_sigma = tuple(float(s) for s in blur_sigma)
        self.solarize_prob = solarize_prob
        self.blur_kernel = 2 * math.ceil(3 * self.blur_sigma[1]) + 1

    def extra_repr(self) -> str:
        keys = ("jitter", "jitter_prob", "grayscale_prob", "blur_prob", "blur_sigma", "solarize_prob")
        return ", ".join(f"{k}={getattr(self, k)}" for k in keys)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        jitter_on = self.jitter_prob > 0 and max(self.jitter) > 0
        if not (jitter_on or self.grayscale_prob > 0 or self.blur_prob > 0 or self.solarize_prob > 0):
            return x
        y = ((x.float() + 1) / 2).clamp(0, 1)
        b, dev = len(y), y.device
        if jitter_on:
            idx = (torch.rand(b, device=dev) < self.jitter_prob).nonzero().squeeze(1)
            if len(idx):
                y[idx] = color_jitter(y[idx], self.jitter)
        if self.grayscale_prob > 0:
            gray = torch.rand(b, device=dev) < self.grayscale_prob
            luma = (y * y.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(y)
            y = torch.where(gray.view(-1, 1, 1, 1), luma, y)
        if self.blur_prob > 0:
            blur = torch.rand(b, device=dev) < self.blur_prob
            sigma = uniform(*self.blur_sigma, (b,), dev)
            idx = blur.nonzero().squeeze(1)
            if len(idx):
                s = sigma[idx].view(-1, 1).expand(-1, 2)
                y[idx] = KF.gaussian_blur2d(y[idx], self.blur_kernel, s, border_type="reflect").clamp(0, 1)
        if self.solarize_prob > 0:
            sol = (torch.rand(b, device=dev) < self.solarize_prob).view(-1, 1, 1, 1)
            y = torch.where(sol & (y >= _SOLARIZE_THRESHOLD), 1 - y, y)
        return (y * 2 - 1).to(x.dtype)

# DINO's three photometric presets: global view 1, global view 2, local views (LAFS uses them unchanged).
DINO_GLOBAL_1 = Photometric(blur_prob=1.0, solarize_prob=0.0)
DINO_GLOBAL_2 = Photometric(blur_prob=0.1, solarize_prob=0.2)
DINO_LOCAL = Photometric(blur_prob=0.5, solarize_prob=0.0)


def dino_photometrics(blur_sigma: tuple[float, float] = (0.1, 2.0),
                      jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
                      grayscale_prob: float = 0.2) -> dict[str, Photometric]:
    """DINO's three presets (``global_1``, ``global_2``, ``local``: keyword arguments of the view classes) with the
    blur's sigma range ``blur_sigma`` in pixels of the views, the colour-jitter strengths ``jitter`` (brightness,
    contrast, saturation, hue) and the grayscale probability. DINO's blur (0.1, 2) is in pixels of a 224 px crop and
    the LAFS code keeps it at 112 px; :class:`~lafs.train.pretrain.PretrainTask` scales it to the model input."""
    sigma = tuple(float(s) for s in blur_sigma)
    common = {"blur_sigma": sigma, "jitter": tuple(jitter), "grayscale_prob": grayscale_prob}
    return {"global_1": Photometric(blur_prob=1.0, solarize_prob=0.0, **common),
            "global_2": Photometric(blur_prob=0.1, solarize_prob=0.2, **common),
            "local": Photometric(blur_prob=0.5, solarize_prob=0.0, **common)}


class MultiCropViews:
    """DINO's ``DataAugmentationDINO`` on a B x 3 x H x W batch in [-1, 1].

    Returns ``[g1, g2, l1, ..., l_num_local]``: B x 3 x global_size^2 crops at ``global_scale`` (g1 with
    :data:`DINO_GLOBAL_1`, g2 with :data:`DINO_GLOBAL_2`) and B x 3 x local_size^2 crops at ``local_scale``
    (:data:`DINO_LOCAL`), each flipped with p = 0.5 when ``flip``.
    """

    def __init__(
        self,
        global_size: int = 112,
        local_size: int = 48,
        num_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        flip: bool = True,
        global_1: Photometric = DINO_GLOBAL_1,
        global_2: Photometric = DINO_GLOBAL_2,
        local: Photometric = DINO_LOCAL,
    ) -> None:
        self.global_size, self.local_size, self.num_local = global_size, local_size, num_local
        self.global_scale, self.local_scale, self.flip = tuple(global_scale), tuple(local_scale), flip
        self.global_1, self.global_2, self.local = global_1, global_2, local

    def __repr__(self) -> str:
        return (f"MultiCropViews(global_size={self.global_size}, local_size={self.local_size}, "
                f"num_local={self.num_local}, global_scale={self.global_scale}, local_scale={self.local_scale}, "
                f"flip={self.flip})")  # fmt: skip

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        b = len(images)
        g = random_resized_crop(images.repeat(2, 1, 1, 1), self.global_size, self.global_scale)
        if self.flip:
            g = _random_flip(g)
        views = [self.global_1(g[:b]), self.global_2(g[b:])]
        if self.num_local > 0:
            loc = random_resized_crop(images.repeat(self.num_local, 1, 1, 1), self.local_size, self.local_scale)
            if self.flip:
                loc = _random_flip(loc)
            views += list(self.local(loc).split(b))
        return views


class LAFSViews:
    """The official LAFS code's ``DataAugmentation_LAFS`` on a B x 3 x H x W batch in [-1, 1].

    ``num_views`` crops per image, all ``RandomResizedCrop(size, scale, bicubic)`` then a flip with p = 0.5 when
    ``flip``. Views 0 and 1 are the global (teacher) views, the rest student views. Returns ``(clean, augmented)``,
    two lists of ``num_views`` B x 3 x size x size tensors; ``augmented[i]`` is ``clean[i]`` after
    :data:`DINO_GLOBAL_1` (i = 0), :data:`DINO_GLOBAL_2` (i = 1) or :data:`DINO_LOCAL`: same geometry, only colour.
    The reference's 20-tensor sample is ``[clean[0], augmented[0], clean[1], augmented[1], ...]``.
    """

    def __init__(
        self,
        size: int = 112,
        num_views: int = 10,
        scale: tuple[float, float] = (0.4, 1.0),
        flip: bool = True,
        global_1: Photometric = DINO_GLOBAL_1,
        global_2: Photometric = DINO_GLOBAL_2,
        local: Photometric = DINO_LOCAL,
    ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.size, self.num_views, self.scale, self.flip = size, num_views, tuple(scale), flip
        self.global_1, self.global_2, self.local = global_1, global_2, local

    def __repr__(self) -> str:
        return f"LAFSViews(size={self.size}, num_views={self.num_views}, scale={self.scale}, flip={self.flip})"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        b, v = len(images), self.num_views
        crops = random_resized_crop(images.repeat(v, 1, 1, 1), self.size, self.scale)  # view-major: V*B
        if self.flip:
            crops = _random_flip(crops)
        clean = list(crops.split(b))
        aug = [self.global_1(clean[0])]
        if v > 1:
            aug.append(self.global_2(clean[1]))
        if v > 2:
            aug += list(self.local(crops[2 * b :]).split(b))
        return clean, aug
