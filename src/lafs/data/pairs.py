"""insightface ``.bin`` verification files: read (as encoded bytes or decoded images), write, build from an LFW
``pairs.txt``, a CSV of pairs or a dataset; and the keypoints that travel beside a set.

A ``.bin`` is ``pickle((list of encoded images, list of issame bools))``; images 2k and 2k+1 form pair k (insightface
``eval/verification.py``, ``load_bin``). Image entries may be ``bytes`` or numpy uint8 buffers (older files); both are
accepted and returned as ``bytes``. Reading admits nothing else (a restricted unpickler,
:func:`lafs.io_safe.load_bin_pickle`: a file naming any other Python global is refused unopened). Writing is atomic.
Keypoint-aware models (KP-RPE) and geometry changes read a set's five points from its ``<stem>_kps.npy`` sidecar
(:func:`sidecar_keypoints`).
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write
from ..io_safe import UnsafeFileError, load_bin_pickle
from .datasets import decode_image, load_keypoints


def _as_bytes(item, path, i: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    if isinstance(item, memoryview):
        return item.tobytes()
    raise ValueError(f"{path}: image {i} is {type(item).__name__}, expected bytes or a uint8 numpy buffer")


def read_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """(encoded images, issame bool array of length len(images) / 2)."""
    path = Path(path)
    try:
        # never pickle.load: a .bin from elsewhere could name any callable; this unpickler admits only bytes,
        # lists, tuples, bools and uint8/bool numpy arrays (lafs.io_safe)
        obj = load_bin_pickle(path)
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"{path}: not a .bin verification file ({err})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    raw_images, issame = obj
    images = [_as_bytes(item, path, i) for i, item in enumerate(raw_images)]
    issame = _issame_values(issame, path)
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    return images, issame


def _issame_values(issame, path: Path) -> np.ndarray:
    """The issame list as bools: only True/False (Python or numpy) or the integers 0/1 are read, so a string
    such as "no" (truthy in Python) or a 2 is refused with the file and pair named, never read as "same"."""
    if isinstance(issame, np.ndarray):
        if issame.dtype == bool:
            return issame.reshape(-1).copy()
        values = list(issame.reshape(-1))
    else:
        values = list(issame)
    out = np.empty(len(values), dtype=bool)
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)):
            out[i] = bool(v)
        elif isinstance(v, (int, np.integer)) and int(v) in (0, 1):
            out[i] = bool(v)
        else:
            raise ValueError(f"{path}: pair {i}: issame value {v!r} is not True/False (or 0/1)")
    return out


def load_bin(path: str | Path, color: str = "rgb", image_size: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """A ``.bin`` pair file -> (uint8 N x 3 x H x W RGB images, issame bool array of N / 2 pairs).

    Pair k is images 2k and 2k+1. All images must have one size: ``image_size`` (square) if given, else the size of
    image 0. ``color`` is the channel order the file stores (``decode_image``).
    """
    path = Path(path)
    encoded, issame = read_bin(path)
    if not encoded:
        raise ValueError(f"{path}: no images")
    out = None
    for i, data in enumerate(encoded):
        img = decode_image(data, color, source=f"{path}: image {i}")
        if out is None:
            h, w = (image_size, image_size) if image_size is not None else img.shape[:2]
            out = np.empty((len(encoded), 3, h, w), np.uint8)
        if img.shape[:2] != out.shape[2:]:
            raise ValueError(f"{path}: image {i} is {img.shape[1]}x{img.shape[0]}, expected {w}x{h} (W x H)")
        out[i] = img.transpose(2, 0, 1)
    return torch.from_numpy(out), issame


def write_bin(path: str | Path, images: list[bytes], issame) -> Path:
    """Write a ``.bin`` atomically (temporary file + rename)."""
    path = Path(path)
    issame = [bool(s) for s in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    payload = ([bytes(b) for b in images], issame)
    return atomic_write(path, lambda fh: pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL))


def parse_lfw_pairs(pairs_txt: str | Path) -> list[tuple[str, int, str, int, bool]]:
    """LFW ``pairs.txt``: ``name n1 n2`` (same person) or ``name1 n1 name2 n2``; an optional header line."""
    pairs = []
    lines = Path(pairs_txt).read_text().splitlines()
    for lineno, line in enumerate(lines, 1):
        f = line.split()
        if not f:
            continue
        if lineno == 1 and all(x.isdigit() for x in f):
            continue  # "folds pairs_per_fold" header
        if len(f) == 3:
            pairs.append((f[0], int(f[1]), f[0], int(f[2]), True))
        elif len(f) == 4:
            pairs.append((f[0], int(f[1]), f[2], int(f[3]), False))
        else:
            raise ValueError(f"{pairs_txt}:{lineno}: expected 3 or 4 fields, got {line!r}")
    return pairs


def lfw_pair_images(pairs_txt: str | Path, image_root: str | Path, ext: str = "jpg") -> tuple[list[Path], list[bool]]:
    """The image files (two per pair, in order) and issame of an LFW ``pairs.txt`` over ``root/name/name_0001.jpg``."""
    root = Path(image_root)
    paths, issame = [], []
    for name1, n1, name2, n2, same in parse_lfw_pairs(pairs_txt):
        for name, n in ((name1, n1), (name2, n2)):
            p = root / name / f"{name}_{n:04d}.{ext}"
            if not p.is_file():
                raise FileNotFoundError(f"{pairs_txt}: image {p} not found")
            paths.append(p)
        issame.append(same)
    return paths, issame


def csv_pair_images(csv_path: str | Path, image_root: str | Path) -> tuple[list[Path], list[bool]]:
    """The image files (two per pair, in order) and issame of a CSV with columns ``path1,path2,issame`` (paths
    relative to ``image_root``)."""
    root = Path(image_root)
    paths, issame = [], []
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path1", "path2", "issame"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        for row_no, row in enumerate(reader, 2):
            for key in ("path1", "path2"):
                p = root / row[key]
                if not p.is_file():
                    raise FileNotFoundError(f"{csv_path}:{row_no}: image {p} not found")
                paths.append(p)
            value = row["issame"].strip().lower()
            if value not in ("1", "0", "true", "false"):
                raise ValueError(f"{csv_path}:{row_no}: issame must be 0/1/true/false, got {row['issame']!r}")
            issame.append(value in ("1", "true"))
    return paths, issame


def bin_from_lfw_pairs(pairs_txt: str | Path, image_root: str | Path, out: str | Path, ext: str = "jpg") -> Path:
    """Build a ``.bin`` from LFW ``pairs.txt`` and ``root/name/name_0001.jpg`` images (bytes kept as stored)."""
    paths, issame = lfw_pair_images(pairs_txt, image_root, ext)
    return write_bin(out, [p.read_bytes() for p in paths], issame)


def bin_from_csv(csv_path: str | Path, image_root: str | Path, out: str | Path) -> Path:
    """Build a ``.bin`` from a CSV with columns ``path1,path2,issame`` (paths relative to ``image_root``)."""
    paths, issame = csv_pair_images(csv_path, image_root)
    return write_bin(out, [p.read_bytes() for p in paths], issame)


def build_bin(pairs: str | Path, image_root: str | Path, out: str | Path, *, keypoints: str | Path | None = None,
              detect: bool = False, upsample: int | None = None) -> tuple[Path, Path | None]:
    """``lafs data bin``: a ``.bin`` from LFW ``pairs.txt`` (or a ``.csv`` of ``path1,path2,issame``), and with
    ``keypoints`` (rows in the folder order of ``image_root``) or ``detect`` its ``<stem>_kps.npy`` sidecar.
    Returns (the .bin, the sidecar or None)."""
    find = csv_pair_images if str(pairs).endswith(".csv") else lfw_pair_images
    paths, issame = find(pairs, image_root)
    sidecar = None
    if keypoints is not None or detect:
        from .tools import bin_keypoints

        # the points first: a missing row or an undetected face stops before anything is written
        sidecar = bin_keypoints(out, paths, image_root, keypoints=keypoints, detect=detect, upsample=upsample)
    return write_bin(out, [p.read_bytes() for p in paths], issame), sidecar


def pairs_from_labels(labels, identities, num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num_pairs`` verification pairs among ``identities``: (P, 2) dataset positions and issame, alternating
    genuine / impostor so that every one of the 10 unshuffled folds is balanced. Genuine pairs are two distinct
    images of one identity (identities with >= 2 images), impostors one image of each of two identities."""
    labels = np.asarray(labels).reshape(-1)
    ids = np.unique(np.asarray(identities))
    members = {int(i): np.flatnonzero(labels == i) for i in ids}
    if any(m.size == 0 for m in members.values()):
        raise ValueError(f"identities without images: {[i for i, m in members.items() if m.size == 0][:5]}")
    multi = [i for i, m in members.items() if m.size >= 2]
    if not multi or len(ids) < 2:
        raise ValueError(f"pairs need >= 2 identities and one with >= 2 images; got {len(ids)} identities, "
                         f"{len(multi)} with >= 2 images")
    rng = np.random.default_rng(seed)
    pairs, issame = np.empty((num_pairs, 2), np.int64), np.arange(num_pairs) % 2 == 0
    for k in range(num_pairs):
        if issame[k]:
            pairs[k] = rng.choice(members[multi[rng.integers(len(multi))]], 2, replace=False)
        else:
            a, b = rng.choice(ids, 2, replace=False)
            pairs[k] = rng.choice(members[int(a)]), rng.choice(members[int(b)])
    return pairs, issame


def bin_from_dataset(dataset, pairs: np.ndarray, issame, out: str | Path) -> Path:
    """Pairs of a record dataset (its encoded bytes, not re-encoded) -> ``.bin``, plus ``<stem>_kps.npy`` when the
    dataset has keypoints (what keypoint-aware models read beside a set)."""
    order = np.asarray(pairs).reshape(-1)
    out = write_bin(out, [dataset.raw(int(i)) for i in order], issame)
    kps = getattr(dataset, "keypoints", None)
    if kps is not None:
        rows = np.asarray(kps)[order].astype(np.float32)
        atomic_write(out.with_name(out.stem + "_kps.npy"), lambda fh: np.save(fh, rows))
    return out


def sidecar_keypoints(bin_path: str | Path) -> Path:
    """The keypoints file that goes with a set: ``<stem>_kps.npy`` beside it (``../shared/data`` naming)."""
    p = Path(bin_path)
    return p.with_name(p.stem + "_kps.npy")


def load_set_keypoints(bin_path: str | Path, keypoints_path: str | Path | None, count: int) -> np.ndarray:
    """The (count, 5, 2) keypoints of a set's images: ``keypoints_path``, else the set's sidecar."""
    path = Path(keypoints_path) if keypoints_path else sidecar_keypoints(bin_path)
    if not path.is_file():
        raise FileNotFoundError(f"{bin_path}: no keypoints ({path} not found; pass --keypoints KPS.npy, "
                                f"(images, 5, 2) pixels, one row per image of the .bin)")
    kps = load_keypoints(path, count)  # checks one row per image of the set
    if kps.shape[1] != 5:
        raise ValueError(f"{path}: {kps.shape[1]} keypoints per image, expected the 5 ArcFace points for {bin_path}")
    return kps
