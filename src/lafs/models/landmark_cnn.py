"""Landmark CNN of Part fViT (Sun & Tzimiropoulos, BMVC 2022, §3.1; its official code's ``mobilenet_v3_my.py``).

A truncated MobileNetV3-Large trunk (Howard et al. 2019, Table 1: stem + 15 bottlenecks, no 960-channel
1x1 conv, no classifier) -> global average pool -> Dropout(0.5) -> Linear(C_last, 2R). The 2R outputs of
each sample are min-max rescaled *jointly* (x and y together) to ``[0, img_size - 1]`` pixels, so every
sample has one coordinate at exactly 0 and one at exactly ``img_size - 1``; gradients flow through the
min and the max. No landmark supervision: the CNN learns through the patch sampler.

``rescale="per_axis"`` (not the reference's) rescales x and y each over its own min and max, so the landmarks span
the face's full width and height. The joint rescale only pins the extremes of all 2R numbers: a CNN trained by the
identity loss alone can put every x in a narrow band while the y values take the full range (seen in the demo's
stage 1, landmarks collapsed onto a vertical strip down the nose); per axis, that band is stretched over the face.
``output_init="grid"`` (not the reference's, which keeps PyTorch's default Linear init and so starts every face at
one random spread) zeroes the output layer's weights and sets its bias to a square grid over the crop, so the CNN
starts as fViT's patch grid and learns per-face offsets from it.
Output ``B x R x 2`` in (x, y) pixel coordinates (pixel centres at integers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import Dropout
from .precision import cnn_precision

# (kernel, expansion, out, squeeze-excite, activation, stride): MobileNetV3-Large, Table 1.
MOBILENET_V3_LARGE = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without going below 90 % (MobileNet convention)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _act(kind: str) -> nn.Module:
    return nn.ReLU(inplace=True) if kind == "RE" else nn.Hardswish(inplace=True)


class SqueezeExcite(nn.Module):
    """avgpool -> FC(C, C/4, no bias) -> ReLU -> FC(C/4, C, no bias) -> h-sigmoid, as in the reference."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Hardsigmoid(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk (stride) -> [SE] -> act -> 1x1 linear project."""

    def __init__(self, inp: int, exp: int, out: int, kernel: int, se: bool, act: str, stride: int) -> None:
        super().__init__()
        self.use_res = stride == 1 and inp == out
        self.block = nn.Sequential(
            nn.Conv2d(inp, exp, 1, bias=False),
            nn.BatchNorm2d(exp),
            _act(act),
            nn.Conv2d(exp, exp, kernel, stride, kernel // 2, groups=exp, bias=False),
            nn.BatchNorm2d(exp),
            SqueezeExcite(exp) if se else nn.Identity(),
            _act(act),
            nn.Conv2d(exp, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV3Trunk(nn.Module):
    """MobileNetV3-Large feature trunk, truncated after the last bottleneck (160 channels at width 1)."""

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        stem = make_divisible(16 * width_mult)
        layers: list[nn.Module] = [
            nn.Conv2d(3, stem, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.Hardswish(inplace=True),
        ]
        inp = stem
        for k, exp, out, se, act, stride in MOBILENET_V3_LARGE:
            exp_c, out_c = make_divisible(exp * width_mult), make_divisible(out * width_mult)
            layers.append(Bottleneck(inp, exp_c, out_c, k, se, act, stride))
            inp = out_c
        self.features = nn.Sequential(*layers)
        self.out_channels = inp
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


RESCALES = ("joint", "per_axis")
OUTPUT_INITS = ("reference", "grid")


def minmax_rescale(raw: Tensor, size: int, mode: str = "joint") -> Tensor:
    """Per-sample min-max rescale of B x 2R raw outputs, laid out (x0, y0, x1, y1, ...), to ``[0, size - 1]``
    (differentiable): over all 2R values together (``joint``, the reference code) or over the R x values and the R
    y values separately (``per_axis``). Returns B x 2R in the same layout."""
    # per axis, the extremes are taken over the R landmarks of each coordinate: B x R x 2, reduced over dim 1
    x = raw.view(raw.shape[0], -1, 2) if mode == "per_axis" else raw
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return ((x - lo) / (hi - lo).clamp_min(1e-12) * (size - 1)).view_as(raw)


class LandmarkCNN(nn.Module):
    """Predicts ``num_landmarks`` (x, y) pixel positions per face. ``forward(x in [-1, 1]) -> B x R x 2``."""

    def __init__(
        self, num_landmarks: int = 196, img_size: int = 112, width_mult: float = 1.0, dropout: float = 0.5,
        rescale: str = "joint", output_init: str = "reference",
    ) -> None:
        super().__init__()
        if rescale not in RESCALES:
            raise ValueError(f"landmark rescale must be one of {RESCALES}, got {rescale!r}")
        if output_init not in OUTPUT_INITS:
            raise ValueError(f"landmark output_init must be one of {OUTPUT_INITS}, got {output_init!r}")
        self.rescale = rescale
        self.num_landmarks = num_landmarks
        self.img_size = img_size
        self.trunk = MobileNetV3Trunk(width_mult)
        self.dropout = Dropout(dropout)
        # Outside the trunk's init on purpose: the reference keeps PyTorch's default Linear init here.
        self.output_layer = nn.Linear(self.trunk.out_channels, 2 * num_landmarks)
        if output_init == "grid":
            self._grid_init()

    def _grid_init(self) -> None:
        """Zero weights and a bias laid out as a square grid in [-1, 1] (x0, y0, x1, y1, ...), row-major like the
        fViT patch grid; a landmark count that is not a square fills the first R points of the next larger grid."""
        from .fvit import grid_landmarks

        side = int(math.ceil(math.sqrt(self.num_landmarks)))
        # the patch grid of a side x side image of 1-px patches (cell centres 0..side-1), mapped to [-1, 1]
        grid = grid_landmarks(side, 1)[: self.num_landmarks] * (2.0 / max(side - 1, 1)) - 1.0
        with torch.no_grad():
            self.output_layer.weight.zero_()
            self.output_layer.bias.copy_(grid.flatten())

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            raise ValueError(
                f"LandmarkCNN expects {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}"
            )
        # fp32 convs under CPU autocast, AMX or not: measured slower in bf16 here (models/precision.py)
        with cnn_precision(x, amx_pays=False):
            feats = F.adaptive_avg_pool2d(self.trunk(x.float()), 1).flatten(1)
        raw = self.output_layer(self.dropout(feats))
        return minmax_rescale(raw, self.img_size, self.rescale).view(-1, self.num_landmarks, 2)
