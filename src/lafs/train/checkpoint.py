"""Checkpoints that never lose data: written to a temporary name and renamed into place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically: a crash mid-write leaves the previous file intact."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))
