"""Build any backbone by name and size; the size presets of the papers.

Presets (the values of the papers' official code, Part fViT and fViT alike):

- ``part_fvit``: Part fViT. ``tiny`` = 512/3/11/2560 (15.28 M params, 2.48 GMACs with the landmark CNN,
  paper §4.2), ``base`` = 768/12/11/2048 (66.96 M). ``small`` = 512/6/8/2048 is our choice (the papers
  have none). ``micro`` = 56 x 56 input, 49 landmarks, a half-width landmark CNN and a 96-d, 2-layer
  encoder: it trains on a laptop CPU in minutes, for tests and the demo. ``mini`` = 64 x 64 input, 64
  landmarks, a half-width landmark CNN and a 192-d, 6-layer encoder (ViT-Ti's width, half its depth): the
  token model of the CPU recipes on CelebA-64.
- ``fvit``: the grid-patch baseline with the same encoder sizes (fViT-B = 64.08 M).
- ``iresnet``: IResNet-18/50/100 (insightface layout, 512-d), plus a ``micro`` for CPU tests and a ``mini``
  (IResNet-18 at half width, 64 px, 256-d) for the CPU recipes on real faces.

Every config option that a backbone does not take is an error naming it, so a typo never goes unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .fvit import FViT
from .iresnet import IResNet
from .part_fvit import PartFViT

VIT_OPTIONS = (
    "img_size",
    "patch_size",
    "dim",
    "depth",
    "heads",
    "dim_head",
    "mlp_dim",
    "dropout",
    "emb_dropout",
    "attn_dropout",
    "drop_path",
    "drop_path_schedule",
    "attn_scale",
    "pool",
    "embedding_size",
    "token_init",
    "attn_init",
    "mlp_act",
    "weight_init",
    "rpe",
    "rpe_mode",
    "rpe_on",
    "rpe_shared_head",
    "rpe_ratio",
    "kprpe_variant",
    "num_keypoints",
)
PART_FVIT_OPTIONS = VIT_OPTIONS + ("num_landmarks", "patch_layout", "landmark_width_mult", "landmark_dropout",
                                   "landmark_rescale", "landmark_output_init",
                                   "keypoint_source")
IRESNET_OPTIONS = ("img_size", "depth", "width", "embedding_size", "dropout")

# The released code's values: dim_head 64, dim**-0.5 attention scale, DropPath 0.1 in every block.
_VIT_COMMON = dict(
    img_size=112,
    patch_size=8,
    dim_head=64,
    dropout=0.1,
    emb_dropout=0.1,
    drop_path=0.1,
    drop_path_schedule="constant",
    attn_scale="dim",
    pool="cls",
)
VIT_SIZES: dict[str, dict[str, Any]] = {
    "micro": {**_VIT_COMMON, "img_size": 56, "dim": 96, "depth": 2, "heads": 3, "dim_head": 32, "mlp_dim": 384},
    # the CPU recipes' token model (configs/cpu): 64 px CelebA crops, 8 x 8 patches (64 tokens), ViT-Ti's width
    # (192) at half its depth; no dropout and trunc-normal tokens, which a small model trained briefly needs
    "mini": {**_VIT_COMMON, "img_size": 64, "dim": 192, "depth": 6, "heads": 3, "dim_head": 64, "mlp_dim": 768,
             "dropout": 0.0, "emb_dropout": 0.0, "drop_path": 0.05, "token_init": "trunc_normal",
             "embedding_size": 256},
    "tiny": {**_VIT_COMMON, "dim": 512, "depth": 3, "heads": 11, "mlp_dim": 2560},
    "small": {**_VIT_COMMON, "dim": 512, "depth": 6, "heads": 8, "mlp_dim": 2048},
    "base": {**_VIT_COMMON, "dim": 768, "depth": 12, "heads": 11, "mlp_dim": 2048},
}
PART_FVIT_SIZES = {
    name: {**cfg, "num_landmarks": (cfg["img_size"] // cfg["patch_size"]) ** 2, "landmark_width_mult": 1.0}
    for name, cfg in VIT_SIZES.items()
}
PART_FVIT_SIZES["micro"]["landmark_width_mult"] = 0.5
PART_FVIT_SIZES["mini"]["landmark_width_mult"] = 0.5
# The KP-RPE paper's face ViT (insightface's, as its official code builds it): patch 8, 196 tokens, dim 512, no
# CLS token, a flattened-token head to 512, ReLU6 MLP, head-dim scaling, trunc-normal init, DropPath 0.1 (linear).
_FACE_VIT = dict(img_size=112, patch_size=8, dim=512, dim_head=64, dropout=0.0, emb_dropout=0.0, drop_path=0.1,
                 drop_path_schedule="linear", attn_scale="head_dim", pool="flatten", embedding_size=512,
                 token_init="trunc_normal", weight_init="trunc_normal", mlp_act="relu6")
FACE_VIT_SIZES: dict[str, dict[str, Any]] = {
    "micro": {**_FACE_VIT, "img_size": 56, "dim": 96, "depth": 2, "heads": 3, "dim_head": 32, "mlp_dim": 384,
              "embedding_size": 128},
    # the CPU recipes' size (configs/cpu/kprpe_celeba64): fViT-mini's 64 px, 64 tokens, width 192 and depth 6
    "mini": {**_FACE_VIT, "img_size": 64, "dim": 192, "depth": 6, "heads": 3, "dim_head": 64, "mlp_dim": 768,
             "drop_path": 0.05, "embedding_size": 256},
    "small": {**_FACE_VIT, "depth": 12, "heads": 8, "mlp_dim": 2560},
    "base": {**_FACE_VIT, "depth": 24, "heads": 16, "dim_head": 32, "mlp_dim": 1536},
}
# "ViT + iRPE" (contextual product on q, k, v, heads shared: the official code's v1_base_irpe.yaml) and "ViT +
# KP-RPE" (multi-head relative f(P), the paper's Table 2 best): the same ViT, one option apart.
IRPE_DEFAULTS = dict(rpe="irpe", rpe_mode="ctx", rpe_on="qkv", rpe_shared_head=True, rpe_ratio=1.9)
KPRPE_DEFAULTS = dict(rpe="kprpe", kprpe_variant="multihead", num_keypoints=5, rpe_ratio=1.9)
IRESNET_SIZES: dict[str, dict[str, Any]] = {
    "micro": dict(depth=18, width=16, img_size=56, embedding_size=128),
    # the CPU recipes' model (configs/cpu): IResNet-18 at half width on 64 px crops, 3.8 M parameters, about
    # 120 training images/s on 2 cores (fp32, batch 128)
    "mini": dict(depth=18, width=32, img_size=64, embedding_size=256),
    "r18": dict(depth=18, img_size=112),
    "r50": dict(depth=50, img_size=112),
    "r100": dict(depth=100, img_size=112),
}


# architecture sizes: a 0, negative or fractional value would build a broken model (or none) without a word
POSITIVE_INTS = frozenset({"depth", "width", "dim", "heads", "dim_head", "mlp_dim", "img_size", "patch_size",
                           "embedding_size", "num_landmarks", "num_keypoints"})


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    description: str
    builder: Callable[..., nn.Module]
    sizes: dict[str, dict[str, Any]]
    options: tuple[str, ...]
    has_landmarks: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    def kwargs(self, size: str, **overrides: Any) -> dict[str, Any]:
        if size not in self.sizes:
            raise KeyError(f"unknown size {size!r} for backbone {self.name!r}; sizes: {', '.join(self.sizes)}")
        bad = sorted(k for k in overrides if k not in self.options)
        if bad:
            raise KeyError(
                f"backbone {self.name!r} does not take option(s) {', '.join(bad)}; "
                f"it takes: {', '.join(self.options)}"
            )
        merged = {**self.defaults, **self.sizes[size], **overrides}
        for key in sorted(POSITIVE_INTS & merged.keys()):
            value = merged[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KeyError(f"backbone {self.name!r}: model.{key} must be a whole number >= 1, got {value!r}")
        return merged

    def build(self, size: str, **overrides: Any) -> nn.Module:
        return self.builder(**self.kwargs(size, **overrides))


BACKBONES: dict[str, BackboneEntry] = {}


def register_backbone(entry: BackboneEntry) -> BackboneEntry:
    if entry.name in BACKBONES:
        raise ValueError(f"backbone {entry.name!r} is already registered")
    BACKBONES[entry.name] = entry
    return entry


def get_backbone(name: str) -> BackboneEntry:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(BACKBONES)}") from None


def build_backbone(name: str, size: str, **overrides: Any) -> nn.Module:
    """Build ``name`` at preset ``size``; ``overrides`` replace preset values (None means keep)."""
    return get_backbone(name).build(size, **{k: v for k, v in overrides.items() if v is not None})


register_backbone(
    BackboneEntry("part_fvit", "Part fViT: landmark CNN + patches at landmarks + ViT", PartFViT, PART_FVIT_SIZES,
                  PART_FVIT_OPTIONS, has_landmarks=True)
)
register_backbone(BackboneEntry("fvit", "fViT: ViT on an 8x8 patch grid", FViT, VIT_SIZES, VIT_OPTIONS))
register_backbone(BackboneEntry("vit", "face ViT of the KP-RPE paper (flattened-token head)", FViT, FACE_VIT_SIZES,
                                VIT_OPTIONS))
register_backbone(BackboneEntry("vit_irpe", "face ViT + iRPE (contextual product, q/k/v)", FViT, FACE_VIT_SIZES,
                                VIT_OPTIONS, defaults=IRPE_DEFAULTS))
register_backbone(BackboneEntry("vit_kprpe", "face ViT + KP-RPE (multi-head relative f(P)); forward takes keypoints",
                                FViT, FACE_VIT_SIZES, VIT_OPTIONS, defaults=KPRPE_DEFAULTS))
register_backbone(BackboneEntry("iresnet", "IResNet (insightface layout)", IResNet, IRESNET_SIZES, IRESNET_OPTIONS))
