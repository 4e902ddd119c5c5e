"""lafs: landmark-based face recognition research toolkit (LAFS, Part fViT, DINO, margin losses, KP-RPE).

The Python API (``lafs.api``): ``lafs.load``, ``lafs.embed``, ``lafs.verify``, ``lafs.evaluate``. They are imported
on first use, so ``import lafs`` (and ``lafs --help``) stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "embed", "evaluate", "load", "verify"]

if TYPE_CHECKING:  # type checkers and IDEs see the functions; at run time __getattr__ imports them lazily
    from .api import embed, evaluate, load, verify


def __getattr__(name: str) -> Any:
    if name in ("load", "embed", "verify", "evaluate"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lafs' has no attribute {name!r}")
