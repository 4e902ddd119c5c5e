"""Supervised-finetuning augmentations of LAFS (the official code's ``train_largescale.py``), batched on the device.

"w/ Aug" (the reference code's default; presets ``webface4m`` and ``ms1mv3``), in this order:

- horizontal flip, p = 0.5;
- RandAugment as in timm ``rand-m{M}-mstd0.5-inc1`` (the reference's ``util/rand_aa_face.py`` fork): 2 ops per
  image drawn with replacement from :data:`RANDAUGMENT_OPS` (timm's "increasing" set minus Solarize, SolarizeAdd
  and Cutout), each applied with p = 0.5 at a magnitude ~ N(M, 0.5) clipped to [0, 10]; M = 1 for WebFace4M and
  M = 2 for MS1MV3;
- RandomResizedCrop back to the input size, scale (0.9, 1.0), ratio 3/4 to 4/3;
- ColorJitter(0.1, 0.1, 0.1, 0.1), its four ops in a random order per image;
- RandomErasing p = 0.5, area scale (0.02, 0.1), ratio 0.3 to 3.3, value 0;
- batch Mixup (:class:`Mixup`), alpha 0.2, p = 0.1 for WebFace4M and 0.2 for MS1MV3 (:data:`MIXUP_PRESETS`).

"w/o Aug" (preset ``flip``): horizontal flip only, no Mixup. Preset ``none`` is the identity.

The reference runs these per image in the data loader (PIL, then uint8 tensors). Here every random draw is still
per image, but each op runs once on the whole batch (or once on the group of images that drew it), on the batch's
device. All draws come from torch's global RNG for that device, so the trainer's RNG save/restore makes a resumed
run repeat them exactly. Input and output are floats in the project's [-1, 1] convention; the ops work in [0, 1],
where the reference's uint8 values v are v / 255. So erasing value 0 is black (-1 on output), and the geometric
fill, grey 128, is 0.5 (0 on output).

Known differences from the reference: no rounding to uint8 between ops; geometric ops always resample
bilinearly (timm picks bilinear or bicubic at random); random draws differ from PIL/torchvision, and the
distributions match.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import kornia.enhance as KE
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..geometry import flip_keypoints
from .ops import brightness, color_jitter, groups, sample_boxes, uniform

RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Color", "Contrast", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
# Argument of each geometric op at magnitude 10 (timm: level / _LEVEL_DENOM * max, _LEVEL_DENOM = 10).
_GEOMETRIC_MAX = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45}
_ENHANCE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Color": KE.adjust_saturation_with_gray_subtraction,  # PIL ImageEnhance.Color: blend with the grey image
    "Contrast": KE.adjust_contrast_with_mean_subtraction,  # PIL: blend with the mean grey level
    "Brightness": brightness,  # PIL: blend with black
    "Sharpness": KE.sharpness,  # PIL: blend with the 3x3 smoothed image, border kept
}
# timm's mixup_my settings per dataset preset: (alpha, probability). Beta(alpha, alpha) weights, batch mode.
MIXUP_PRESETS = {"none": (0.2, 0.0), "flip": (0.2, 0.0), "shift": (0.2, 0.0), "webface4m": (0.2, 0.1),
                 "ms1mv3": (0.2, 0.2), "misalign": (0.2, 0.0)}

_W_AUG = dict(randaugment_ops=2, resized_crop_scale=(0.9, 1.0), color_jitter=0.1, erasing_prob=0.5)
PRESETS: dict[str, dict] = {
    "none": dict(flip=False),
    "flip": {},
    # flip + whole-pixel shifts up to 1/16 of the side (4 px at 64), edges replicated: the small-data CPU recipes
    # (configs/cpu), where 56k faces are seen a dozen times and a fixed crop is memorised
    "shift": dict(shift=1 / 16),
    "webface4m": dict(_W_AUG, randaugment_magnitude=1.0),
    "ms1mv3": dict(_W_AUG, randaugment_magnitude=2.0),
    # KP-RPE training (the official code's CVLface gridsample_v1): deliberately misaligned faces whose keypoints follow
    "misalign": dict(affine_scale=(0.8, 1.2), affine_rotate=20.0, affine_rotate_prob=0.2, affine_translate=0.1),
}


def _warp(images: Tensor, theta: Tensor, padding_mode: str) -> Tensor:
    """Bilinear resampling: output pixel centre (x, y) reads the input at theta @ (x, y, 1).

    theta is N x 2 x 3 in pixel units with pixel p spanning [p, p + 1], PIL's convention for affine transforms.
    """
    _, _, h, w = images.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=images.device, dtype=images.dtype) + 0.5,
        torch.arange(w, device=images.device, dtype=images.dtype) + 0.5,
        indexing="ij",
    )
    src = torch.einsum("nij,hwj->nhwi", theta.to(images.dtype), torch.stack([xs, ys, torch.ones_like(xs)], -1))
    grid = src * src.new_tensor([2 / w, 2 / h]) - 1  # align_corners=False puts pixel p's centre at p + 0.5
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _geometric_theta(name: str, level: Tensor, h: int, w: int) -> Tensor:
    """PIL's output-to-input affine for one geometric op at a signed per-image level."""
    one, zero = torch.ones_like(level), torch.zeros_like(level)
    if name == "Rotate":  # PIL: counter-clockwise by `level` degrees about the image centre
        cos, sin, cx, cy = torch.cos(torch.deg2rad(level)), torch.sin(torch.deg2rad(level)), w / 2, h / 2
        rows = (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    else:  # timm shears about the top-left corner, and translates by a fraction of the image size
        rows = {
            "ShearX": (one, level, zero, zero, one, zero),
            "ShearY": (one, zero, zero, level, one, zero),
            "TranslateXRel": (one, zero, level * w, zero, one, zero),
            "TranslateYRel": (one, zero, zero, zero, one, level * h),
        }[name]
    return torch.stack(rows, -1).view(-1, 2, 3)


def move_points(points: Tensor, theta: Tensor) -> Tensor:
    """Keypoints (N x K x 2, pixel centres at integers) through a warp whose ``theta`` maps output to input (the
    :func:`_warp` convention, pixel p spanning [p, p + 1]): p_out = theta^-1 (p_in + 0.5) - 0.5."""
    a, t = theta[:, :, :2].to(points.dtype), theta[:, :, 2].to(points.dtype)
    return torch.linalg.solve(a, ((points + 0.5) - t[:, None, :]).transpose(1, 2)).transpose(1, 2) - 0.5


def _op_theta(name: str, magnitude: Tensor, sign: Tensor, h: int, w: int) -> Tensor:
    return _geometric_theta(name, sign * (magnitude / 10) * _GEOMETRIC_MAX[name], h, w)


def rand_augment_op(images: Tensor, name: str, magnitude: Tensor, sign: Tensor) -> Tensor:
    """Apply one RandAugment op of :data:`RANDAUGMENT_OPS` to every image, timm "increasing" level semantics.

    images: N x 3 x H x W in [0, 1]. magnitude: N, in [0, 10]. sign: N of +-1, the random direction timm gives the
    geometric and enhance ops (unused by the others). Returns N x 3 x H x W in [0, 1].
    """
    frac = magnitude.to(images.dtype) / 10
    if name == "AutoContrast":  # per channel, min -> 0 and max -> 1; PIL leaves a flat channel alone
        lo, hi = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
        return torch.where(hi > lo, (images - lo) / (hi - lo).clamp_min(1e-12), images)
    if name == "Equalize":
        return KE.equalize(images)
    if name == "Invert":
        return 1 - images
    if name == "Posterize":  # keep 4 down to 0 high bits as the magnitude grows
        return KE.posterize(images, 4 - (frac * 4).long())
    if name in _ENHANCE:  # factor 1 is "no change"; it moves towards 0.1 or 1.9
        return _ENHANCE[name](images, (1 + sign * 0.9 * frac).clamp_min(0.1)).clamp_(0, 1)
    if name in _GEOMETRIC_MAX:
        theta = _op_theta(name, magnitude.to(images.dtype), sign, *images.shape[-2:])
        return _warp(images - 0.5, theta, "zeros").add_(0.5).clamp_(0, 1)  # zero padding fills with grey 128
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {RANDAUGMENT_OPS}")


class SupervisedAugment(nn.Module):
    """The "w/ Aug" / "w/o Aug" pipeline of the module docstring on a B x 3 x H x W batch in [-1, 1].

    Every stage can be switched off: ``flip=False``, ``randaugment_ops=0``, ``resized_crop_scale=None``,
    ``color_jitter=0`` and ``erasing_prob=0``. With all off, the input tensor is returned as is.
    """

    def __init__(
        self,
        flip: bool = True,
        randaugment_ops: int = 0,
        randaugment_magnitude: float = 1.0,
        randaugment_magnitude_std: float = 0.5,
        randaugment_prob: float = 0.5,
        resized_crop_scale: tuple[float, float] | None = None,
        color_jitter: float = 0.0,
        erasing_prob: float = 0.0,
        erasing_scale: tuple[float, float] = (0.02, 0.1),
        affine_scale: tuple[float, float] | None = None,
        affine_rotate: float = 0.0,
        affine_rotate_prob: float = 0.0,
        affine_translate: float = 0.0,
        shift: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift < 0.5:
            raise ValueError(f"shift must be in [0, 0.5) of the side, got {shift}")
        self.shift = shift
        if not 0 <= color_jitter <= 0.5:  # torchvision's hue bound; beyond it the hue shift wraps around
            raise ValueError(f"color_jitter must be in [0, 0.5], got {color_jitter}")
        self.flip = flip
        self.randaugment_ops = randaugment_ops
        self.randaugment_magnitude = randaugment_magnitude
        self.randaugment_magnitude_std = randaugment_magnitude_std
        self.randaugment_prob = randaugment_prob
        self.resized_crop_scale = tuple(resized_crop_scale) if resized_crop_scale is not None else None
        self.color_jitter = color_jitter
        self.erasing_prob = erasing_prob
        self.erasing_scale = tuple(erasing_scale)
        self.affine_scale = tuple(affine_scale) if affine_scale is not None else None
        self.affine_rotate, self.affine_rotate_prob = affine_rotate, affine_rotate_prob
        self.affine_translate = affine_translate

    @classmethod
    def preset(cls, name: str) -> SupervisedAugment:
        """``none`` (identity), ``flip`` ("w/o Aug"), ``webface4m`` ("w/ Aug", RandAugment M=1), ``ms1mv3`` (M=2)."""
        if name not in PRESETS:
            raise ValueError(f"unknown augmentation preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def extra_repr(self) -> str:
        keys = ("flip", "randaugment_ops", "randaugment_magnitude", "randaugment_magnitude_std", "randaugment_prob",
                "resized_crop_scale", "color_jitter", "erasing_prob", "erasing_scale", "affine_scale",
                "affine_rotate", "affine_rotate_prob", "affine_translate", "shift")  # fmt: skip
        return ", ".join(f"{k}={getattr(self, k)}" for k in keys)

    @torch.no_grad()
    def forward(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Augmented images; with ``keypoints`` (B x 5 x 2 pixels), ``(images, keypoints)`` with the keypoints moved
        by every geometric step (flip with left/right labels swapped, RandAugment's rotate / shear / translate, the
        resized crop), as the official KP-RPE training pipeline does."""
        kp = None if keypoints is None else keypoints.float().clone()
        if self.flip:  # in the input space, so that a flip-only pipeline is an exact mirror
            flipped = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
            if kp is not None:
                kp = torch.where(flipped.view(-1, 1, 1), flip_keypoints(kp, images.shape[-1]), kp)
        if self.shift > 0:
            images, kp = self._shift(images, kp)
        ra = self.randaugment_ops > 0 and self.randaugment_prob > 0
        if not (ra or self.resized_crop_scale or self.color_jitter > 0 or self.erasing_prob > 0 or self.affine_scale):
            return images if kp is None else (images, kp)
        x = images.float().add(1).div_(2).clamp_(0, 1)  # kornia's equalize rejects values outside [0, 1]
        if self.affine_scale:
            x = self._affine(x, kp)
        if ra:
            x = self._rand_augment(x, kp)
        if self.resized_crop_scale:
            x = self._resized_crop(x, kp)
        if self.color_jitter > 0:
            x = color_jitter(x, (self.color_jitter,) * 4)
        if self.erasing_prob > 0:
            x = self._erase(x)
        x = x.mul_(2).sub_(1).to(images.dtype)  # x is this call's own tensor
        return x if kp is None else (x, kp)

    def _shift(self, x: Tensor, kp: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Each image moved by whole pixels, dx, dy uniform in [-s, s] with s = round(shift x side), the edge pixels
        replicated into the gap: no resampling blur, so the pixels are the stored ones."""
        b, c, h, w = x.shape
        s = round(self.shift * min(h, w))
        if s == 0:
            return x, kp
        dev = x.device
        d = torch.randint(0, 2 * s + 1, (2, b), device=dev)  # offsets into the padded image: s = no shift
        padded = F.pad(x.float(), (s, s, s, s), mode="replicate").to(x.dtype)
        rows = (d[1, :, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (d[0, :, None] + torch.arange(w, device=dev))[:, None, None, :]
        out = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                     rows, cols]
        if kp is not None:  # content at padded (r, c) lands at (r - d): points move by s - d
            kp = kp + (s - d).T[:, None, :].to(kp.dtype)
        return out, kp

    def _rand_augment(self, x: Tensor, kp: Tensor | None = None) -> Tensor:
        b, dev = len(x), x.device
        for _ in range(self.randaugment_ops):
            op = torch.randint(len(RANDAUGMENT_OPS), (b,), device=dev)
            applied = torch.rand(b, device=dev) < self.randaugment_prob
            magnitude = self.randaugment_magnitude + self.randaugment_magnitude_std * torch.randn(b, device=dev)
            magnitude = magnitude.clamp(0, 10)
            sign = torch.randint(0, 2, (b,), device=dev) * 2.0 - 1
            for k, idx in groups(torch.where(applied, op, -1), len(RANDAUGMENT_OPS)):
                name = RANDAUGMENT_OPS[k]
                x[idx] = rand_augment_op(x.index_select(0, idx), name, magnitude[idx], sign[idx])
                if kp is not None and name in _GEOMETRIC_MAX:
                    kp[idx] = move_points(kp[idx], _op_theta(name, magnitude[idx], sign[idx], *x.shape[-2:]))
        return x

    def _resized_crop(self, x: Tensor, kp: Tensor | None = None) -> Tensor:
        """torchvision RandomResizedCrop (:func:`lafs.augment.ops.sample_boxes`, ratio 3/4 to 4/3); the box is
        resized back to H x W bilinearly, through the same warp as the other geometric steps (keypoints follow)."""
        (b, _, h, w), dev = x.shape, x.device
        left, top, cw, ch = sample_boxes(b, h, w, self.resized_crop_scale, (3 / 4, 4 / 3), dev).unbind(1)
        zero = torch.zeros_like(cw)
        theta = torch.stack([cw / w, zero, left, zero, ch / h, top], -1).view(-1, 2, 3)
        if kp is not None:
            kp.copy_(move_points(kp, theta))
        return _warp(x, theta, "border").clamp_(0, 1)

    def _affine(self, x: Tensor, kp: Tensor | None = None) -> Tensor:
        """A random similarity about the image centre: scale ~ U(affine_scale), rotation ~ U(+-affine_rotate) degrees
        with probability affine_rotate_prob, shift ~ U(+-affine_translate) of the size per axis; black border."""
        (b, _, h, w), dev = x.shape, x.device
        scale = uniform(*self.affine_scale, (b,), dev)
        angle = uniform(-self.affine_rotate, self.affine_rotate, (b,), dev)
        angle = torch.where(torch.rand(b, device=dev) < self.affine_rotate_prob, angle, torch.zeros_like(angle))
        tx = uniform(-self.affine_translate, self.affine_translate, (b,), dev) * w
        ty = uniform(-self.affine_translate, self.affine_translate, (b,), dev) * h
        # output -> input: undo the shift, then the rotation and scale about the centre
        cos, sin = torch.cos(torch.deg2rad(angle)) / scale, torch.sin(torch.deg2rad(angle)) / scale
        cx, cy = w / 2, h / 2
        theta = torch.stack([cos, -sin, cx - cos * (cx + tx) + sin * (cy + ty),
                             sin, cos, cy - sin * (cx + tx) - cos * (cy + ty)], -1).view(-1, 2, 3)
        if kp is not None:
            kp.copy_(move_points(kp, theta))
        return _warp(x, theta, "zeros")

    def _erase(self, x: Tensor) -> Tensor:
        """torchvision RandomErasing(value=0): 10 tries at a box of area fraction ~ U(scale) and log-uniform aspect
        ratio in (0.3, 3.3) that fits strictly inside the image; an image where no try fits is left alone."""
        (b, _, h, w), dev = x.shape, x.device
        erased = torch.rand(b, device=dev) < self.erasing_prob
        area = h * w * uniform(*self.erasing_scale, (b, 10), dev)
        ratio = torch.exp(uniform(math.log(0.3), math.log(3.3), (b, 10), dev))
        eh, ew = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
        fits = (eh < h) & (ew < w)
        first = fits.int().argmax(1, keepdim=True)
        eh, ew = eh.gather(1, first), ew.gather(1, first)  # b x 1
        top = torch.floor(torch.rand(b, 1, device=dev) * (h - eh + 1))
        left = torch.floor(torch.rand(b, 1, device=dev) * (w - ew + 1))
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        box = (rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
        box = box & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1))
        box = box & (erased & fits.any(1)).view(b, 1, 1)
        return x.masked_fill_(box.unsqueeze(1), 0.0)


class Mixup:
    """timm Mixup in "batch" mode, no CutMix, no label smoothing (the official LAFS code's ``util/mixup_my.py``).

    With probability ``prob`` the whole batch is mixed with its reverse at one lam ~ Beta(alpha, alpha); the loss
    is then ``lam * loss(labels_a) + (1 - lam) * loss(labels_b)``. Random draws come from torch's global RNG on the
    images' device, and none at all when ``prob`` is 0.
    """

    def __init__(self, alpha: float = 0.2, prob: float = 0.1) -> None:
        self.alpha, self.prob = alpha, prob

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.alpha}, prob={self.prob})"

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        if self.prob <= 0:
            return images, labels, labels, 1.0
        dev = images.device
        alpha = torch.tensor(self.alpha, device=dev)
        u, lam = torch.cat([torch.rand(1, device=dev), torch.distributions.Beta(alpha, alpha).sample((1,))]).tolist()
        if u >= self.prob:
            return images, labels, labels, 1.0
        return lam * images + (1 - lam) * images.flip(0), labels, labels.flip(0), lam
