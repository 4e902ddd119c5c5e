"""Where the image files of ``lafs data pack / detect / align / bin`` come from: three layouts, one order.

- ``root/identity/image.jpg``: identities are the sorted sub-folder names, images sorted within each (the layout of
  :class:`~lafs.data.datasets.ImageFolderDataset`);
- a flat folder ``root/image.jpg``: every image file, sorted by name, without labels (detect, align, bin);
- a list file (``--list``), CSV or plain text, one image per line: ``path`` or ``path,label``, the path relative to
  the root (a first line ``path,label`` or ``path`` is a header). Labels are identity names: identities are
  numbered 0..K-1 in sorted order (numerically when every name is an integer).

Rows of keypoint arrays (``--keypoints``, what ``detect`` writes) follow :attr:`ImageList.paths`, the order above:
list order for a list file.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import IMAGE_EXTENSIONS


@dataclass
class ImageList:
    root: Path
    paths: list[Path]
    labels: np.ndarray | None  # identity 0..K-1 of each path, None without labels (a flat folder, a list of paths)
    identities: list[str]
    source: str  # where the list came from, for messages

    def __len__(self) -> int:
        return len(self.paths)

    def require_labels(self, command: str) -> np.ndarray:
        if self.labels is None:
            raise ValueError(f"{self.source}: {command} needs an identity per image: use root/identity/image.jpg "
                             "folders or --list with lines 'path,label'")
        return self.labels


def _identity_order(names: list[str]) -> list[str]:
    unique = set(names)
    if all(n.lstrip("-").isdigit() for n in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def read_list(root: str | Path, list_file: str | Path) -> ImageList:
    """A list file of ``path[,label]`` lines, paths relative to ``root``; a missing file or a line with another number
    of fields is an error naming the list file and line."""
    root, list_file = Path(root), Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"--list: {list_file} not found")
    paths, names = [], []
    with open(list_file, newline="") as fh:
        rows = list(csv.reader(fh))
    widths = set()
    for lineno, row in enumerate(rows, 1):
        row = [f.strip() for f in row]
        if not row or not any(row) or row[0].startswith("#"):
            continue
        if lineno == 1 and row[0].lower() == "path":
            continue
        if len(row) not in (1, 2) or not row[0]:
            raise ValueError(f"{list_file}:{lineno}: expected 'path' or 'path,label', got {','.join(row)!r}")
        widths.add(len(row))
        if len(widths) > 1:
            raise ValueError(f"{list_file}:{lineno}: every line needs a label once one line has one")
        path = root / row[0]
        if not path.is_file():
            raise FileNotFoundError(f"{list_file}:{lineno}: image {path} not found")
        paths.append(path)
        if len(row) == 2:
            names.append(row[1])
    if not paths:
        raise ValueError(f"{list_file}: no images listed")
    if names:
        identities = _identity_order(names)
        number = {n: i for i, n in enumerate(identities)}
        labels = np.array([number[n] for n in names], np.int64)
        return ImageList(root, paths, labels, identities, str(list_file))
    return ImageList(root, paths, None, [], str(list_file))


def image_list(root: str | Path, list_file: str | Path | None = None) -> ImageList:
    """The images of ``root``: from ``list_file`` when given, else identity sub-folders, else a flat folder."""
    root = Path(root)
    if list_file is not None:
        return read_list(root, list_file)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    identities = sorted(p.name for p in root.iterdir() if p.is_dir())
    if identities:
        paths, labels = [], []
        for label, name in enumerate(identities):
            files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            paths += files
            labels += [label] * len(files)
        return ImageList(root, paths, np.asarray(labels, np.int64), identities, str(root))
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{root}: no images (expected root/identity/image.jpg, root/image.jpg, or --list)")
    return ImageList(root, files, None, [], str(root))
