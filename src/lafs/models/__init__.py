"""Backbones: every model maps images in [-1, 1] to ``{"embedding": B x D}`` (+ ``"landmarks"`` B x R x 2)."""

from .complexity import Complexity, complexity, count_macs, count_params
from .fvit import FViT
from .iresnet import IResNet
from .landmark_cnn import LandmarkCNN
from .part_fvit import PartFViT, sample_patches
from .registry import BACKBONES, build_backbone, get_backbone
from .vit import ViTEncoder

__all__ = [
    "BACKBONES",
    "Complexity",
    "FViT",
    "IResNet",
    "LandmarkCNN",
    "PartFViT",
    "ViTEncoder",
    "build_backbone",
    "complexity",
    "count_macs",
    "count_params",
    "get_backbone",
    "sample_patches",
]
