"""lafs: landmark-based face recognition research toolkit (LAFS, Part fViT, DINO, margin losses, KP-RPE)."""

__version__ = "0.1.0"
