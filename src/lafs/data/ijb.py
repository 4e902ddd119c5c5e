"""IJB-B / IJB-C protocol files and loose crops (insightface's IJB release): read, check, align.

Layout: ``root/loose_crop/<image>`` and, in ``root/meta/`` (or ``root`` itself), ``<name>_face_tid_mid.txt`` (image,
template id, media id), ``<name>_name_5pts_score.txt`` (image, 5 (x, y) landmarks, detector score),
``<name>_template_pair_label.txt`` (template 1, template 2, label) and, for 1:N, the official protocol's
``<name>_1N_gallery_G1.csv`` / ``_G2.csv`` / ``_1N_probe_mixed.csv`` (IJB-B ships ``_S1`` / ``_S2``; both are
accepted). ``name`` is ``ijbb`` or ``ijbc``. The two text files are line-aligned: image features are indexed by the
5pts file, templates by the tid_mid file, exactly as the reference scripts do.

Each loose crop is aligned with its 5 points to the 112x112 ArcFace template (``lafs.data.align``). The metrics on
these arrays are :mod:`lafs.eval.ijb`'s.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .align import align_face
from .datasets import decode_image

__all__ = ["NAMES", "IJBMeta", "TemplateSet", "iter_aligned_batches", "load_aligned_image", "load_ijb_meta",
           "template_rows"]

NAMES = ("ijbb", "ijbc")


# --- meta files -------------------------------------------------------------------------------------------------------


@dataclass
class TemplateSet:
    """One 1:N CSV reduced to its templates: sorted unique TEMPLATE_IDs, each one's SUBJECT_ID and first line."""

    path: Path
    templates: np.ndarray  # (K,) int64, ascending (np.unique order, the reference's gallery order)
    subjects: np.ndarray  # (K,) int64
    lines: np.ndarray  # (K,) int64, line of each template's first row (for error messages)
    images: int  # image rows in the file


@dataclass
class IJBMeta:
    """The IJB-B/C protocol files as arrays (``load_ijb_meta``). Image arrays follow the 5pts file's order."""

    name: str
    meta_dir: Path
    image_dir: Path
    image_names: np.ndarray  # (N,) str
    landmarks: np.ndarray  # (N, 5, 2) float32, (x, y) in loose-crop pixels
    detector_scores: np.ndarray  # (N,) float32
    templates: np.ndarray  # (N,) int64, from tid_mid
    medias: np.ndarray  # (N,) int64, from tid_mid
    pairs: np.ndarray  # (P, 2) int64 template ids
    labels: np.ndarray  # (P,) int8, 1 = same subject
    galleries: dict[str, TemplateSet] | None = None  # {"G1": ..., "G2": ...} ("S1"/"S2" for IJB-B files)
    probes: TemplateSet | None = None  # probe_mixed

    def __len__(self) -> int:
        return len(self.image_names)


def _err(path, line, msg) -> ValueError:
    return ValueError(f"{path}, line {line}: {msg}")


def _rows(path: Path, nfields: int, layout: str):
    """(line number, fields, line) of each non-empty line, which must have ``nfields`` fields."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != nfields:
                raise _err(path, lineno, f"expected {nfields} fields ({layout}), got {len(parts)}: {line.strip()!r}")
            yield lineno, parts, line


def _read_tid_mid(path: Path):
    names, tids, mids, lines = [], [], [], []
    for lineno, parts, line in _rows(path, 3, "image template_id media_id"):
        try:
            tids.append(int(parts[1]))
            mids.append(int(parts[2]))
        except ValueError:
            raise _err(path, lineno, f"template and media ids must be integers: {line.strip()!r}") from None
        names.append(parts[0])
        lines.append(lineno)
    if not names:
        raise ValueError(f"{path}: no images listed")
    return names, np.array(tids, np.int64), np.array(mids, np.int64), np.array(lines, np.int64)


def _read_5pts(path: Path):
    names, values, lines = [], [], []
    for lineno, parts, line in _rows(path, 12, "image, 10 landmark coordinates, detector score"):
        try:
            row = [float(x) for x in parts[1:]]
        except ValueError:
            raise _err(path, lineno, f"landmarks and score must be numbers: {line.strip()!r}") from None
        if not all(math.isfinite(x) for x in row):
            raise _err(path, lineno, f"NaN or infinite value: {line.strip()!r}")
        names.append(parts[0])
        values.append(row)
        lines.append(lineno)
    if not names:
        raise ValueError(f"{path}: no images listed")
    values = np.array(values, np.float32)
    return names, values[:, :10].reshape(-1, 5, 2), values[:, 10].copy(), np.array(lines, np.int64)


def _data_lines(path: Path) -> np.ndarray:
    """Line number of each non-blank line (only computed to name the line of an error found after fast parsing)."""
    with open(path, encoding="utf-8") as f:
        return np.array([i for i, line in enumerate(f, 1) if line.strip()], np.int64)


def _read_pairs(path: Path):
    """``t1 t2 label`` lines -> (P, 3) int64. Fast C parser first (15.6M lines for IJB-C); a Python pass only to
    name the offending line when it fails (np.loadtxt's row numbers skip blank lines and start at 0)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            table = np.loadtxt(path, dtype=np.int64, comments=None, ndmin=2)
    except ValueError:
        table = None
    if table is not None and len(table) and table.shape[1] == 3:
        return table
    if table is not None and not len(table):
        raise ValueError(f"{path}: no pairs listed")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise _err(path, lineno, f"expected 3 fields (template1 template2 label), got {len(parts)}: "
                                         f"{line.strip()!r}")
            try:
                [int(x) for x in parts]
            except ValueError:
                raise _err(path, lineno, f"fields must be integers: {line.strip()!r}") from None
    raise ValueError(f"{path}: cannot be parsed as 'template1 template2 label' lines")


def _read_1n_csv(path: Path) -> TemplateSet:
    tids, sids, lines = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header with TEMPLATE_ID and SUBJECT_ID")
        cols = [h.strip().upper() for h in header]
        missing = [c for c in ("TEMPLATE_ID", "SUBJECT_ID") if c not in cols]
        if missing:
            raise _err(path, 1, f"header has no {' or '.join(missing)} column: {header}")
        ti, si = cols.index("TEMPLATE_ID"), cols.index("SUBJECT_ID")
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            if len(row) <= max(ti, si):
                raise _err(path, reader.line_num, f"{len(row)} columns, the header has {len(header)}: {row}")
            try:
                tids.append(int(row[ti]))
                sids.append(int(row[si]))
            except ValueError:
                raise _err(path, reader.line_num, f"TEMPLATE_ID and SUBJECT_ID must be integers, got "
                                                  f"{row[ti]!r}, {row[si]!r}") from None
            lines.append(reader.line_num)
    if not tids:
        raise ValueError(f"{path}: no rows after the header")
    tids, sids, lines = np.array(tids, np.int64), np.array(sids, np.int64), np.array(lines, np.int64)
    uniq, first, inverse = np.unique(tids, return_index=True, return_inverse=True)
    subjects = sids[first]
    bad = np.flatnonzero(sids != subjects[inverse])
    if bad.size:
        b = bad[0]
        raise _err(path, lines[b], f"template {tids[b]} has SUBJECT_ID {sids[b]} here but {subjects[inverse[b]]} on "
                                   f"line {lines[first[inverse[b]]]}: one subject per template is required")
    return TemplateSet(path=path, templates=uniq, subjects=subjects, lines=lines[first], images=len(tids))


def _known(unique_templates: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each id in the sorted ``unique_templates``, whether it is there)."""
    pos = np.searchsorted(unique_templates, ids)
    ok = pos < len(unique_templates)
    ok[ok] = unique_templates[pos[ok]] == ids[ok]
    return pos, ok


def _lookup_rows(unique_templates: np.ndarray, ids: np.ndarray, dtype=np.int64) -> np.ndarray | None:
    """Rows by a lookup table indexed by id (insightface's ``template2id``): one gather instead of a binary search
    per id (15.6M for IJB-C). None when an id is unknown or the ids are too spread out for a table."""
    if not len(unique_templates) or not len(ids) or unique_templates[0] < 0 or len(unique_templates) >= 2**31:
        return None
    top = int(unique_templates[-1])
    if top >= max(1 << 22, 4 * len(ids)) or int(ids.min()) < 0 or int(ids.max()) > top:
        return None
    table = np.full(top + 1, -1, dtype)
    table[unique_templates] = np.arange(len(unique_templates))
    pos = table[ids]
    return pos if pos.min() >= 0 else None


def template_rows(unique_templates, ids, what: str = "template ids", dtype=np.int64) -> np.ndarray:
    """Row of each template id in the sorted ``unique_templates``; ValueError naming the first unknown id.

    ``dtype``: of the rows a lookup table gives (int32 halves the memory of IJB-C's 15.6M pair rows); rows found by
    binary search (ids too spread out for a table) are int64."""
    ids = np.asarray(ids, np.int64)
    unique_templates = np.asarray(unique_templates)
    if unique_templates.dtype.kind in "iu":
        pos = _lookup_rows(unique_templates.astype(np.int64, copy=False), ids, dtype)
        if pos is not None:
            return pos
    pos, ok = _known(unique_templates, ids)
    if not ok.all():
        b = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"{what}: template {ids[b]} (entry {b}) has no images; {int((~ok).sum())} unknown in total")
    return pos


def load_ijb_meta(root: str | Path, name: str) -> IJBMeta:
    """Parse the IJB protocol files under ``root`` (module docstring) into an :class:`IJBMeta`.

    Checks: every line well formed (ValueError naming file and line); tid_mid and 5pts list the same images in the
    same order; pair templates and 1:N templates exist in tid_mid; pair labels are 0/1; one subject per 1:N template.
    The 1:N CSVs are optional (absent from insightface's release): all three or none.
    """
    root = Path(root)
    name = name.lower()
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    meta_dir = root / "meta" if (root / "meta" / f"{name}_face_tid_mid.txt").exists() else root
    paths = {k: meta_dir / f"{name}_{k}.txt" for k in ("face_tid_mid", "name_5pts_score", "template_pair_label")}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (looked in {root / 'meta'} and {root})")
    tid_path, pts_path, pair_path = paths["face_tid_mid"], paths["name_5pts_score"], paths["template_pair_label"]

    names, templates, medias, tid_lines = _read_tid_mid(tid_path)
    pts_names, landmarks, scores, pts_lines = _read_5pts(pts_path)
    if len(names) != len(pts_names):
        raise ValueError(f"{tid_path} lists {len(names)} images but {pts_path} lists {len(pts_names)}: the two files "
                         f"must list the same images in the same order")
    names, pts_names = np.array(names), np.array(pts_names)
    bad = np.flatnonzero(names != pts_names)
    if bad.size:
        b = bad[0]
        raise ValueError(f"{tid_path}, line {tid_lines[b]} names image {str(names[b])!r} but {pts_path}, line "
                         f"{pts_lines[b]} names {str(pts_names[b])!r}: the files must list the images in the same "
                         f"order ({bad.size} mismatches)")

    table = _read_pairs(pair_path)
    unique_templates = np.unique(templates)
    for col in (0, 1):
        ok = _known(unique_templates, table[:, col])[1]
        if not ok.all():
            b = int(np.flatnonzero(~ok)[0])
            raise _err(pair_path, _data_lines(pair_path)[b], f"template {table[b, col]} has no image in "
                                                             f"{tid_path.name} ({int((~ok).sum())} such pairs)")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise _err(pair_path, _data_lines(pair_path)[bad[0]], f"label must be 0 or 1, got {table[bad[0], 2]}")

    galleries = probes = None
    csv_paths = {}
    for key in ("1", "2"):  # IJB-C names its galleries G1/G2, IJB-B S1/S2
        found = [p for a in "GS" if (p := meta_dir / f"{name}_1N_gallery_{a}{key}.csv").is_file()]
        csv_paths[key] = found[0] if found else meta_dir / f"{name}_1N_gallery_G{key}.csv"
    csv_paths["probe"] = meta_dir / f"{name}_1N_probe_mixed.csv"
    present = [p.is_file() for p in csv_paths.values()]
    if any(present) and not all(present):
        missing = [str(p) for p, ok in zip(csv_paths.values(), present) if not ok]
        raise FileNotFoundError(f"1:N needs both galleries and the probe file; missing: {', '.join(missing)}")
    if all(present):
        sets = {key: _read_1n_csv(p) for key, p in csv_paths.items()}
        for ts in sets.values():
            ok = _known(unique_templates, ts.templates)[1]
            if not ok.all():
                b = int(np.flatnonzero(~ok)[0])
                raise _err(ts.path, ts.lines[b], f"template {ts.templates[b]} has no image in {tid_path.name}")
        galleries = {csv_paths[k].stem.rsplit("_", 1)[-1]: sets[k] for k in ("1", "2")}
        probes = sets["probe"]

    return IJBMeta(
        name=name, meta_dir=meta_dir, image_dir=root / "loose_crop", image_names=names, landmarks=landmarks,
        detector_scores=scores, templates=templates, medias=medias, pairs=table[:, :2].copy(),
        labels=table[:, 2].astype(np.int8), galleries=galleries, probes=probes,
    )



# --- images -----------------------------------------------------------------------------------------------------------


def load_aligned_image(path: str | Path, landmarks, size: int = 112) -> np.ndarray:
    """Read a loose crop and align it with its 5 points (``align_face``, black border): RGB uint8 size x size x 3."""
    data = Path(path).read_bytes()
    return align_face(decode_image(data, "rgb", source=str(path)), landmarks, size)[0]


def iter_aligned_batches(
    meta: IJBMeta, batch_size: int = 128, workers: int | None = None, size: int = 112, prefetch: int = 2
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, uint8 B x 3 x size x size RGB)`` over the images in 5pts order.

    A thread pool decodes and warps (OpenCV releases the GIL) up to ``prefetch`` batches ahead of the consumer, so
    decoding overlaps the model. A missing or broken file raises, naming it and its 5pts position.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = workers or min(8, os.cpu_count() or 1)
    n = len(meta.image_names)

    def load(i):
        path = meta.image_dir / meta.image_names[i]
        try:
            return load_aligned_image(path, meta.landmarks[i], size)
        except (OSError, ValueError) as e:
            raise type(e)(f"image {i} of the 5pts file ({meta.image_names[i]}): {e}") from e

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        starts = iter(range(0, n, batch_size))
        pending: deque = deque()

        def submit(start):
            pending.append((start, [pool.submit(load, i) for i in range(start, min(n, start + batch_size))]))

        for start in starts:
            submit(start)
            if len(pending) >= max(1, prefetch):
                break
        while pending:
            start, futures = pending.popleft()
            nxt = next(starts, None)
            if nxt is not None:
                submit(nxt)
            images = np.stack([f.result() for f in futures])
            yield start, torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

