"""Classification heads on embeddings: margin softmax (CosFace, ArcFace, AdaFace)."""

from .base import ClassifierState
from .margin import HEADS, AdaFace, ArcFace, CosFace, MarginHead, build_head

__all__ = ["HEADS", "AdaFace", "ArcFace", "ClassifierState", "CosFace", "MarginHead", "build_head"]
