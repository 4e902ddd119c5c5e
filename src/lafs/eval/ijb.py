"""IJB-B / IJB-C 1:1 verification and 1:N identification (lafs_spec §8, kprpe_spec §5.1; InsightFace protocol).

Data layout (insightface's IJB release): ``root/loose_crop/<image>`` and, in ``root/meta/`` (or ``root`` itself),
``<name>_face_tid_mid.txt`` (image, template id, media id), ``<name>_name_5pts_score.txt`` (image, 5 (x, y)
landmarks, detector score), ``<name>_template_pair_label.txt`` (template 1, template 2, label) and, for 1:N, the
official protocol's ``<name>_1N_gallery_G1.csv`` / ``_G2.csv`` / ``_1N_probe_mixed.csv`` (IJB-B ships
``_S1`` / ``_S2``; both are accepted). ``name`` is ``ijbb`` or ``ijbc``. The two text files are line-aligned:
image features are indexed by the 5pts file, templates by the tid_mid file, exactly as the reference scripts do.

Pipeline (insightface ``recognition/arcface_torch/eval_ijbc.py``):

1. Each loose crop is aligned with its 5 points to the 112x112 ArcFace template (``lafs.data.align``) and embedded;
   pixels go to the model as ``x / 127.5 - 1``, the arcface_torch script's ``(x / 255 - 0.5) / 0.5`` (LAFS's copy
   feeds ``x / 255 - 0.5``, lafs_spec §9 item 11; not reproduced).
2. Test modes, rendered ``N?D?F?`` by :func:`mode_string`:
   F1 = flip test, the feature is emb(image) + emb(flipped image) (older insightface notebooks call this sum "F2",
   their F1 being a concatenation, not implemented); N1 = the feature norm is kept, N0 = each image feature is
   L2-normalised first; D1 = the feature is multiplied by the detector (faceness) score. Defaults: N1D1F1, the
   arcface_torch script's. (``evaluation/IJB/IJB_evals.py`` inverts its ``use_norm_score`` flag: its "N0" is our N1.)
3. Template feature: the image features of each (template, media) are averaged, the media features summed, and the
   sum L2-normalised (``image2template_feature``).
4. 1:1: cosine of the two template features of each pair; ROC as sklearn ``roc_curve``; TAR read at the ROC point
   whose FPR is nearest each target FAR (``FAR_RULES``); AUC as ``metrics.roc_auc``
   (``roc_1to1``: one sort of the scores for both). ``score_ijb`` scores the pairs in float32 and rescores in
   float64 only those near each target's threshold (``roc_1to1_pairs``): the TAR, FPR and threshold of float64
   scores in about a third of the time and half the memory of scoring every pair in float64 (IJB-C scale).
5. 1:N (``evaluation/IJB/IJB_evals.py``, ``evaluation_1N``): probe_mixed templates against each gallery separately;
   rank-1/5/10 (CMC) and TPIR at FPIR 0.01 / 0.1; see :func:`identification_1n`.

The 1:N CSVs list original protocol file names, which do not match the loose-crop names, so 1:N template features
are the 1:1 template features of the same TEMPLATE_ID (images from tid_mid), as in the reference script.
"""

from __future__ import annotations

import csv
import math
import os
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..data.align import align_face
from ..data.datasets import decode_image
from ..geometry import estimate_similarity_batch, template, transform_points_batch
from .embedding import embed_images
from .metrics import auc_from_counts, far_count, roc_counts

__all__ = [
    "FARS",
    "FAR_RULES",
    "FPIRS",
    "IJBMeta",
    "TemplateSet",
    "embed_ijb",
    "evaluate_ijb",
    "format_ijb_result",
    "identification_1n",
    "identification_1n_loop",
    "image2template_feature",
    "image2template_feature_loop",
    "iter_aligned_batches",
    "load_aligned_image",
    "load_ijb_meta",
    "mode_string",
    "pair_scores",
    "pair_scores_loop",
    "roc_1to1",
    "roc_1to1_pairs",
    "roc_curve",
    "score_ijb",
    "tar_at_far",
    "template_groups",
    "template_rows",
]

NAMES = ("ijbb", "ijbc")
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)
# "nearest": insightface's rule, the ROC point (sklearn roc_curve, drop_intermediate=True) with the smallest
# |FPR - FAR|, ties to the larger TPR. "floor": the largest TPR among all thresholds with FPR <= FAR.
FAR_RULES = ("nearest", "floor")
_EPS = 10 * np.finfo(np.float64).eps  # sklearn ``normalize`` treats norms below this as zero (keeps the row)


def mode_string(use_norm_score: bool = True, use_detector_score: bool = True, use_flip_test: bool = True) -> str:
    """Test mode as the insightface scripts print it, e.g. ``"N1D1F1"`` (module docstring, step 2)."""
    return f"N{int(bool(use_norm_score))}D{int(bool(use_detector_score))}F{int(bool(use_flip_test))}"


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


def template_rows(unique_templates, ids, what: str = "template ids") -> np.ndarray:
    """Row of each template id in the sorted ``unique_templates``; ValueError naming the first unknown id."""
    ids = np.asarray(ids, np.int64)
    unique_templates = np.asarray(unique_templates)
    if unique_templates.dtype.kind in "iu":
        pos = _lookup_rows(unique_templates.astype(np.int64, copy=False), ids)
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


# --- images and embeddings --------------------------------------------------------------------------------------------


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


def embed_ijb(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    meta: IJBMeta,
    batch_size: int = 128,
    device="cpu",
    workers: int | None = None,
    flip: bool = True,
) -> torch.Tensor:
    """float32 CPU N x D image features in 5pts order: ``embed_images`` per aligned batch (``x / 127.5 - 1``;
    ``flip`` sums the flipped image's embedding, the F1 mode). Call ``model.eval()`` first. A keypoint-aware
    ``embed_fn`` (``uses_keypoints``, KP-RPE) gets each crop's 5 points as the alignment put them."""
    kps = None
    if getattr(embed_fn, "uses_keypoints", False):
        kps = transform_points_batch(meta.landmarks, estimate_similarity_batch(meta.landmarks, template(112)))
    out = None
    for start, images in iter_aligned_batches(meta, batch_size, workers):
        k = None if kps is None else kps[start : start + len(images)]
        emb = embed_images(embed_fn, images, batch_size=len(images), device=device, flip=flip, keypoints=k)
        if out is None:
            out = torch.empty(len(meta), emb.shape[1], dtype=torch.float32)
        out[start : start + len(emb)] = emb
    if out is None:
        raise ValueError("no images to embed")
    return out


# --- template pooling -------------------------------------------------------------------------------------------------


def template_groups(templates, medias) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (sorted unique template ids (T,), template row of each image (N,), images in each image's
    (template, media) group (N,)). A media id shared by two templates forms one group per template."""
    templates = np.asarray(templates, np.int64).ravel()
    medias = np.asarray(medias, np.int64).ravel()
    if len(templates) != len(medias):
        raise ValueError(f"{len(templates)} template ids but {len(medias)} media ids")
    unique_templates, t_row = np.unique(templates, return_inverse=True)
    media_ids, m_row = np.unique(medias, return_inverse=True)
    key = t_row.astype(np.int64) * len(media_ids) + m_row
    _, group, count = np.unique(key, return_inverse=True, return_counts=True)
    return unique_templates, t_row, count[group]


def _normalize_rows_(x: torch.Tensor) -> torch.Tensor:
    """In-place L2 normalisation; rows with norm < 10 eps are left as they are (sklearn ``normalize``)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x.div_(torch.where(norm < _EPS, torch.ones_like(norm), norm))


def image2template_feature(
    image_features,
    templates,
    medias,
    *,
    detector_scores=None,
    use_norm_score: bool = True,
    use_detector_score: bool = False,
    chunk_size: int = 2048,
    dtype: torch.dtype = torch.float64,
    device=None,
    flip_features=None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Image features (N x D, flip already summed for F1) -> (L2-normalised template features T x D, sorted ids).

    Same result as insightface ``image2template_feature`` after its N/D preprocessing (module docstring, steps 2-3),
    vectorised: the mean of a media followed by the sum over medias is one weighted sum over images, weight
    1 / (images in the image's (template, media) group), times the detector score for D1, and 1 / ||f|| for N0. It
    is accumulated with ``index_add_`` in ``dtype`` (float64: the reference's accumulator) over chunks of images, so
    no N x D temporary is made. A zero feature stays zero under N0 (the reference would produce NaN).
    ``flip_features`` (N x D, the flipped images' embeddings): added to ``image_features`` chunk by chunk, the same
    sums (same dtype) as ``image_features + flip_features`` without that N x D temporary (F1).
    """
    feats = torch.as_tensor(image_features)
    if feats.ndim != 2:
        raise ValueError(f"image features must be N x D, got {tuple(feats.shape)}")
    flip = None
    if flip_features is not None:
        flip = torch.as_tensor(flip_features)
        if flip.shape != feats.shape:
            raise ValueError(f"flip features {tuple(flip.shape)} do not match features {tuple(feats.shape)}")
    unique_templates, t_row, media_size = template_groups(templates, medias)
    n = len(feats)
    if len(t_row) != n:
        raise ValueError(f"{n} image features for {len(t_row)} images in the template list")
    device = torch.device(device) if device is not None else feats.device
    weight = 1.0 / media_size.astype(np.float64)
    if use_detector_score:
        if detector_scores is None:
            raise ValueError("use_detector_score needs detector_scores")
        scores = np.asarray(detector_scores, np.float64).ravel()
        if len(scores) != n:
            raise ValueError(f"{len(scores)} detector scores for {n} images")
        weight = weight * scores
    weight = torch.from_numpy(weight).to(device=device, dtype=dtype)
    rows = torch.from_numpy(t_row.astype(np.int64)).to(device)
    out = torch.zeros(len(unique_templates), feats.shape[1], dtype=dtype, device=device)
    buf = torch.empty(min(chunk_size, n), feats.shape[1], dtype=dtype, device=device)  # reused: no page faults
    fbuf = None
    if flip is not None:  # the sum's dtype, as ``feats + flip`` would have it
        fbuf = torch.empty(len(buf), feats.shape[1], dtype=torch.promote_types(feats.dtype, flip.dtype),
                           device=feats.device)
    for s in range(0, n, chunk_size):
        k = min(chunk_size, n - s)
        src = feats[s : s + k] if flip is None else torch.add(feats[s : s + k], flip[s : s + k], out=fbuf[:k])
        x = buf[:k].copy_(src)
        if not use_norm_score:
            _normalize_rows_(x)
        out.index_add_(0, rows[s : s + chunk_size], x.mul_(weight[s : s + chunk_size, None]))
    return _normalize_rows_(out), unique_templates


def image2template_feature_loop(image_features, templates, medias, only=None) -> tuple[np.ndarray, np.ndarray]:
    """Reference for :func:`image2template_feature` (features already N/D-processed): a per-template Python loop
    like insightface's, each template found by a scan of all images (O(templates x images)), float64 numpy.
    ``only``: just these template ids, in this order (the benchmark times a sample at full-size scans)."""
    feats = np.asarray(image_features, np.float64)
    templates = np.asarray(templates).ravel()
    medias = np.asarray(medias).ravel()
    unique_templates = np.unique(templates) if only is None else np.asarray(only)
    out = np.zeros((len(unique_templates), feats.shape[1]))
    for k, t in enumerate(unique_templates):
        mine = np.flatnonzero(templates == t)
        for m in np.unique(medias[mine]):
            out[k] += feats[mine[medias[mine] == m]].mean(axis=0)
        norm = np.sqrt(np.sum(out[k] ** 2))
        out[k] /= norm if norm >= _EPS else 1.0
    return out, unique_templates


# --- 1:1 verification -------------------------------------------------------------------------------------------------


def _index_tensor(rows, device) -> torch.Tensor:
    """1-D int32 / int64 index tensor on ``device`` (int32 kept: half the memory for IJB-C's 15.6M pairs)."""
    a = np.asarray(rows)
    if a.dtype != np.int32:
        a = a.astype(np.int64, copy=False)
    return torch.as_tensor(a).to(device)


def pair_scores(
    template_features: torch.Tensor,
    rows1,
    rows2,
    *,
    chunk_size: int = 1 << 20,
    method: str = "auto",
    dense_factor: float = 16.0,
    block_elements: int = 1 << 27,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cosine score of each pair (``template_features`` rows ``rows1[k]``, ``rows2[k]``, unit rows), 1-D on its device.

    With R distinct first and C distinct second templates over all pairs: if R x C <= ``dense_factor`` x pairs
    (IJB's gallery x probe pairs are dense), the pairs are read from the R x C score matrix (compute-bound: IJB-C's
    15.6M pairs are one 3.5k x 19.6k product). Up to ``block_elements`` scores (1 GiB in float64 by default; IJB-C
    needs 69M) it is one product and one gather, with no sorting; beyond, the pairs are sorted by first template and
    the matrix is made in row blocks of that size. Otherwise the pairs,
    sorted by first template, go ``chunk_size`` at a time, each chunk dense the same way if it is dense on its own, else
    a row-wise dot of the gathered rows in slices of ~1 MB (memory-bound, several times slower per pair).
    ``method`` "gemm" / "gather" forces one path. ``dtype``: compute and return the scores in this dtype (default
    the features'); float64 features scored in float32 are rounded to float32 once, then multiplied in float32.
    """
    if method not in ("auto", "gemm", "gather"):
        raise ValueError(f"method must be auto, gemm or gather, got {method!r}")
    f = template_features
    if dtype is not None and dtype != f.dtype:
        f = f.to(dtype)  # T x D, small next to the pairs
    dev = f.device
    r1, r2 = _index_tensor(rows1, dev), _index_tensor(rows2, dev)
    if r1.shape != r2.shape or r1.ndim != 1:
        raise ValueError(f"rows1 {tuple(r1.shape)} and rows2 {tuple(r2.shape)} must be 1-D of one length")
    n, t = len(r1), len(f)
    out = torch.empty(n, dtype=f.dtype, device=dev)
    if n == 0:
        return out
    if int(min(r1.min(), r2.min())) < 0 or int(max(r1.max(), r2.max())) >= t:
        raise IndexError(f"pair rows must be in [0, {t})")
    present = torch.zeros(t, dtype=torch.bool, device=dev)

    def columns(b):
        present.zero_()
        if dev.type == "cpu":  # numpy's scatter: several times torch's with int32 indices
            present.numpy()[b.numpy()] = True
        else:
            present[b] = True
        return present.nonzero().squeeze(1), torch.cumsum(present, 0) - 1  # distinct rows, row of F -> position

    rows, row_of = columns(r1)
    cols, col_of = columns(r2)
    dense = method == "gemm" or (method == "auto" and len(rows) * len(cols) <= dense_factor * n)
    if dense and len(rows) * len(cols) <= block_elements:
        prod = (f[rows] @ f[cols].T).view(-1)
        step = 1 << 20  # index and gather a million pairs at a time: small temporaries
        for s in range(0, n, step):
            idx = torch.index_select(row_of, 0, r1[s : s + step]).mul_(len(cols))
            idx += torch.index_select(col_of, 0, r2[s : s + step])
            torch.index_select(prod, 0, idx, out=out[s : s + step])
        return out
    order = torch.sort(r1, stable=True).indices
    a_all, b_all = r1[order], r2[order]
    if dense:
        row_inv = row_of[a_all]
        g = f[cols]  # C x D, gathered once
        step = max(1, block_elements // len(cols))
        bounds = torch.searchsorted(row_inv, torch.arange(0, len(rows) + step, step, device=dev)).tolist()
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            if s == e:
                continue
            r0 = i * step
            prod = f[rows[r0 : r0 + step]] @ g.T
            out[order[s:e]] = prod.view(-1)[(row_inv[s:e] - r0) * len(cols) + col_of[b_all[s:e]]]
        return out
    # gather path: slices of ~1 MB per operand, reused, so the temporaries stay in cache
    slice_rows = max(64, (1 << 20) // (f.shape[1] * f.element_size()))
    buf_a = torch.empty(slice_rows, f.shape[1], dtype=f.dtype, device=dev)
    buf_b = torch.empty_like(buf_a)
    for s in range(0, n, chunk_size):
        idx = order[s : s + chunk_size]
        a, b = a_all[s : s + chunk_size], b_all[s : s + chunk_size]
        c_rows, c_inv = torch.unique_consecutive(a, return_inverse=True)
        c_cols, c_col_of = columns(b)
        if method == "auto" and len(c_rows) * len(c_cols) <= dense_factor * len(idx):
            prod = f[c_rows] @ f[c_cols].T
            out[idx] = prod.view(-1)[c_inv * len(c_cols) + c_col_of[b]]
            continue
        for u in range(0, len(idx), slice_rows):
            k = min(slice_rows, len(idx) - u)
            x = torch.index_select(f, 0, a[u : u + k], out=buf_a[:k])
            y = torch.index_select(f, 0, b[u : u + k], out=buf_b[:k])
            out[idx[u : u + k]] = x.mul_(y).sum(1)
    return out


def pair_scores_loop(template_features, rows1, rows2) -> np.ndarray:
    """Reference for :func:`pair_scores`: one Python dot per pair (float64)."""
    f = np.asarray(template_features, np.float64)
    return np.array([float(np.dot(f[i], f[j])) for i, j in zip(np.asarray(rows1), np.asarray(rows2))])


def _check_scores_labels(scores, labels):
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel()
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores for {len(y)} labels")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0/1 (or bool)")
    y = y.astype(bool)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(f"a ROC needs genuine and impostor pairs, got {n_pos} and {len(y) - n_pos}")
    return s, y


def roc_curve(scores, labels, drop_intermediate: bool = True, counts=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) exactly as ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=...)``.

    One point per distinct score (accept ``score >= threshold``), in decreasing threshold order, after a first point
    (0, 0) at threshold inf. ``drop_intermediate`` removes the points where neither the FP nor the TP count changes
    slope (sklearn's second-difference test); it never changes the AUC but it can change the "nearest" TAR.
    ``counts``: ``metrics.roc_counts(scores, labels)`` already computed (the scores are then not read).
    """
    fps, tps, thresholds = counts if counts is not None else roc_counts(*_check_scores_labels(scores, labels))
    if drop_intermediate and len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def _roc_points(scores, labels, fars, rule, counts=None) -> list[tuple[float, float, float]]:
    """(TAR, FPR, threshold) for each target FAR under ``rule`` (``FAR_RULES``)."""
    if rule not in FAR_RULES:
        raise ValueError(f"rule must be one of {FAR_RULES}, got {rule!r}")
    fars = [float(x) for x in fars]
    if any(not 0.0 <= x <= 1.0 for x in fars):
        raise ValueError(f"target FARs must be in [0, 1], got {fars}")
    if counts is None:
        counts = roc_counts(*_check_scores_labels(scores, labels))
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=(rule == "nearest"), counts=counts)
    fps = np.r_[0, counts[0]]  # impostors accepted at each point of the floor rule's full curve
    out = []
    for far in fars:
        if rule == "nearest":
            # insightface flips the curve, then takes the first argmin: among equally near points, the one with the
            # largest original index, i.e. the largest TPR at that FPR (and the larger FPR on an exact tie).
            i = len(fpr) - 1 - int(np.argmin(np.abs(fpr[::-1] - far)))
        else:
            # lafs's one TAR rule (metrics.tar_at_far): the last point accepting at most far_count impostors
            i = int(np.searchsorted(fps, far_count(far, int(fps[-1])), side="right")) - 1
        out.append((float(tpr[i]), float(fpr[i]), float(thr[i])))
    return out


def roc_1to1(scores, labels, fars=FARS, rule: str = "nearest") -> dict:
    """TAR, FPR and threshold at each target FAR (keys ``f"{far:g}"``) and the AUC, from one sort of the scores."""
    counts = roc_counts(*_check_scores_labels(scores, labels))
    points = _roc_points(scores, labels, fars, rule, counts)
    return {
        "tar_at_far": {_key(f): tar for f, (tar, _, _) in zip(fars, points)},
        "fpr_at_far": {_key(f): fpr for f, (_, fpr, _) in zip(fars, points)},
        "threshold_at_far": {_key(f): thr for f, (_, _, thr) in zip(fars, points)},
        "auc": auc_from_counts(counts[0], counts[1]),
    }


def tar_at_far(scores, labels, fars=FARS, rule: str = "nearest") -> dict[float, float]:
    """TAR at each target FAR, ``{far: tar}``.

    ``rule="nearest"`` is insightface's (``eval_ijbc.py`` / ``IJB_evals.py``): sklearn ``roc_curve`` (with its
    default ``drop_intermediate=True``), then the point with the smallest |FPR - FAR|, ties to the larger TPR. The
    chosen FPR can exceed the target (no interpolation between points), so published IJB numbers are read this way.
    ``rule="floor"``: the largest TPR over all distinct thresholds with FPR <= FAR (never exceeds the target), the
    rule of ``metrics.tar_at_far`` (same TAR and FAR; the threshold here is the ROC point's, accept ``>=``).
    """
    return {float(far): tar for far, (tar, _, _) in zip(fars, _roc_points(scores, labels, fars, rule))}


# --- 1:1 from template features: float32 scores, float64 where they decide the TAR ----------------------------------


def _f32_score_error_bound(features: torch.Tensor) -> float:
    """Bound on |float32 score - float64 score| of any two rows of ``features`` (float64), whatever the summation
    order of either product: rounding the rows to float32 (2u), a float32 dot of D terms (gamma_D), the float64 dot
    (gamma_D, u = 2^-53), each times sum |a_i b_i| <= ||a|| ||b|| (Higham, Accuracy and Stability, eq. 3.5);
    doubled as a margin, plus a subnormal floor."""
    d = features.shape[1]
    g32 = (d + 2) * 2.0**-24 / (1 - (d + 2) * 2.0**-24)
    g64 = (d + 2) * 2.0**-53 / (1 - (d + 2) * 2.0**-53)
    norm = float(torch.linalg.vector_norm(features, dim=1).max()) if len(features) else 0.0
    return 2.0 * (g32 * (1 + g32) + g64) * (norm * (1 + 2.0**-23)) ** 2 + d * 2.0**-126


def _dot_rows_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of ``a`` and ``b`` (k x D, ``a`` overwritten), summed in a fixed binary tree of
    elementwise adds (the last ceil(d/2) columns onto the first), so a pair's value does not depend on the batch it
    is in, the threads or the device (a reduction kernel's order can)."""
    x = a.mul_(b)
    d = x.shape[1]
    while d > 1:
        h = d // 2
        x[:, :h] += x[:, d - h : d]
        d -= h
    return x[:, 0]


def _f32_floor(x: float) -> np.float32:
    """The largest float32 <= x (``s32 >= _f32_floor(x)`` <=> ``s32 >= x`` for float32 s32 and x <= that bound)."""
    y = np.float32(x)
    return np.nextafter(y, np.float32(-np.inf)) if float(y) > x else y


def _f32_ceil(x: float) -> np.float32:
    y = np.float32(x)
    return np.nextafter(y, np.float32(np.inf)) if float(y) < x else y


class _Refiner:
    """TAR / FPR / threshold at target FARs as float64 scores give them, from float32 scores ``s32`` within ``err`` of
    the float64 ones and ``exact(idx)``, the float64 scores of pairs ``idx``.

    The ROC of ``roc_curve`` (every distinct score a point, sklearn's ``drop_intermediate``) and the FAR rules only
    depend on the order of the scores near each target. For a score interval [lo, hi] the float64 scores are exact
    for every pair whose float32 score is within ``err`` of it; that covers every pair whose float64 score is in
    [lo, hi], and the pairs above (float32 score > hi + err) are counted without recomputing. So the ROC points with
    thresholds in [lo, hi] are known exactly: their counts, and whether ``drop_intermediate`` keeps them (all but the
    last, whose next point is unknown unless nothing lies below lo). The window starts around the impostor score at
    the target's FPR, spanning two impostor scores on each side, and widens (4x as many each time)
    until the rule's answer provably lies inside it: "floor", the last point with FPR <= FAR is followed by one
    with FPR > FAR; "nearest", the kept points from the last one with FPR <= FAR on include the nearest, and the
    window's last point (no point after it is nearer) is farther. ``point`` returns None when more than
    ``max_refine`` pairs would be rescored in all (the caller then scores every pair in float64).
    """

    def __init__(self, s32: np.ndarray, y: np.ndarray, exact, err: float, max_refine: int) -> None:
        self.s32, self.y, self.exact, self.err, self.budget = s32, y, exact, err, max_refine
        self.imp, self.gen = s32[~y], s32[y]
        self.imp.sort()  # in place: no second copy
        self.gen.sort()
        self.n, self.n_neg, self.n_pos = len(s32), len(self.imp), len(self.gen)
        self.refined = 0
        self.pool_bl, self.pool_idx, self.pool_s = None, None, None
        self.done_idx, self.done_s = np.empty(0, np.int64), np.empty(0)  # rescored so far, by pair index

    def _exact(self, band: np.ndarray) -> np.ndarray | None:
        """float64 scores of the pairs ``band`` (ascending), each pair rescored once over all windows; None when
        that would exceed the budget."""
        pos = np.searchsorted(self.done_idx, band)
        hit = pos < len(self.done_idx)
        hit[hit] = self.done_idx[pos[hit]] == band[hit]
        new = band[~hit]
        if len(new) > self.budget:
            return None
        self.budget -= len(new)
        out = np.empty(len(band))
        out[hit] = self.done_s[pos[hit]]
        if len(new):
            out[~hit] = self.exact(new)
            self.refined += len(new)
            merged = np.r_[self.done_idx, new]
            order = np.argsort(merged, kind="stable")
            self.done_idx, self.done_s = merged[order], np.r_[self.done_s, out[~hit]][order]
        return out

    def auc(self) -> float:
        """AUC of the float32 scores, exactly (``auc_from_counts``' value): sum over genuine scores of the impostors
        below plus those equal, over 2 x genuine x impostor."""
        below = np.searchsorted(self.imp, self.gen, "left").sum(dtype=np.int64)
        below_or_equal = np.searchsorted(self.imp, self.gen, "right").sum(dtype=np.int64)
        return int(below + below_or_equal) / (2.0 * self.n_pos * self.n_neg)

    def _center(self, far: float) -> np.float32:
        k = min(max(math.ceil(far * self.n_neg) - 1, 0), self.n_neg - 1)
        return self.imp[self.n_neg - 1 - k]  # the impostor score with about far x impostors at or above it

    def _window(self, tau: np.float32, m: int) -> tuple[float, float]:
        """[lo, hi]: tau and ``m`` impostor float32 scores above and below it, and 2 err more."""
        above = int(np.searchsorted(self.imp, tau, "right")) + m - 1
        below = int(np.searchsorted(self.imp, tau, "left")) - m
        hi = float(self.imp[above]) + 2 * self.err if above < self.n_neg else math.inf
        lo = float(self.imp[below]) - 2 * self.err if below >= 0 else -math.inf
        return lo, hi

    def _band(self, bl: np.float32, bh: np.float32) -> np.ndarray:
        """Indices of the pairs with bl <= s32 <= bh (one pass over the scores above the lowest band seen first)."""
        if self.pool_bl is None or bl < self.pool_bl:
            self.pool_bl = bl
            self.pool_idx = np.flatnonzero(self.s32 >= bl)
            self.pool_s = self.s32[self.pool_idx]
        keep = self.pool_s <= bh
        keep &= self.pool_s >= bl
        return self.pool_idx[keep]

    def prepare(self, fars) -> None:
        """One pass for the first windows of all targets (most of them are never widened)."""
        lows = [self._window(self._center(far), 2)[0] for far in fars]
        if lows:
            self._band(_f32_floor(min(lows) - self.err), np.float32(-np.inf))

    def point(self, far: float, rule: str) -> tuple[float, float, float] | None:
        tau = self._center(far)
        m = 2
        while True:
            lo, hi = self._window(tau, m)
            found, cost = self._try(far, rule, lo, hi)
            if found is not None:
                return found
            if cost is None or (lo == -math.inf and hi == math.inf):
                return None  # over budget (a full window always decides)
            m *= 4

    def _try(self, far, rule, lo, hi):
        imp, gen, err = self.imp, self.gen, self.err
        bl = np.float32(-np.inf) if lo == -math.inf else _f32_floor(lo - err)
        bh = np.float32(np.inf) if hi == math.inf else _f32_ceil(hi + err)
        lo_i, hi_i = np.searchsorted(imp, bl, "left"), np.searchsorted(imp, bh, "right")
        lo_g, hi_g = np.searchsorted(gen, bl, "left"), np.searchsorted(gen, bh, "right")
        size = int(hi_i - lo_i + hi_g - lo_g)
        if size - len(self.done_idx) > self.budget:  # more pairs to rescore than the budget left, at least
            return None, None
        band = self._band(bl, bh)
        s, yb = self._exact(band), self.y[band]
        if s is None:
            return None, None
        above = s > hi
        base_fp = int(self.n_neg - hi_i) + int(np.count_nonzero(above & ~yb))
        base_tp = int(self.n_pos - hi_g) + int(np.count_nonzero(above & yb))
        inside = (s >= lo) & ~above
        v, yw = s[inside], yb[inside]
        if not len(v):
            return None, size
        is_last = base_fp + base_tp + len(v) == self.n  # nothing below lo: the window's last point is the ROC's
        has_prev = base_fp + base_tp > 0  # else the window's first point is the ROC's first
        order = np.argsort(-v, kind="stable")
        v, yw = v[order], yw[order]
        last = np.r_[np.flatnonzero(v[1:] != v[:-1]), len(v) - 1]
        fp = base_fp + np.cumsum(~yw)[last]
        tp = base_tp + np.cumsum(yw)[last]
        thr = v[last]
        q = len(fp)
        if rule == "nearest":  # roc_curve's drop_intermediate: keep where the (fp, tp) step changes
            kept, known = np.zeros(q, bool), np.ones(q, bool)
            pf, pt = np.r_[base_fp, fp], np.r_[base_tp, tp]
            kept[: q - 1] = (np.diff(pf, 2) != 0) | (np.diff(pt, 2) != 0)
            kept[q - 1] = known[q - 1] = is_last
            if not has_prev:
                kept[0] = known[0] = True
        else:
            kept, known = np.ones(q, bool), np.ones(q, bool)
        if not has_prev:  # roc_curve's first point (0, 0) at threshold inf
            fp, tp, thr = np.r_[0, fp], np.r_[0, tp], np.r_[np.inf, thr]
            kept, known = np.r_[True, kept], np.r_[True, known]
        fpr = fp / self.n_neg  # roc_curve's expressions, so equal floats compare equal
        dist = np.abs(fpr - far)
        below = np.flatnonzero(kept & known & (fpr <= far))
        if not len(below):
            return None, size
        a = int(below[-1])
        if rule == "floor":
            if a == len(fp) - 1 and not is_last:
                return None, size
            i = a
        else:
            cand = np.flatnonzero(kept & known)
            cand = cand[cand >= a]
            d = dist[cand]
            i = int(cand[np.flatnonzero(d == d.min())[-1]])  # ties to the larger TPR, as in _roc_points
            if not (is_last or (fpr[-1] >= far and dist[-1] > d.min())):
                return None, size
        return (float(tp[i] / self.n_pos), float(fpr[i]), float(thr[i])), size


def roc_1to1_pairs(
    template_features: torch.Tensor,
    rows1,
    rows2,
    labels,
    fars=FARS,
    rule: str = "nearest",
    *,
    max_refine: int | None = None,
    stats: dict | None = None,
) -> dict:
    """``roc_1to1(pair_scores(template_features, rows1, rows2), labels, ...)`` for float64 template features, with
    the pairs scored in float32 (one float32 matrix product and a gather: half the float64 work and memory).

    TAR, FPR and threshold at each FAR are those of the float64 scores, exactly: a float32 score is within a
    rigorous bound ``err`` of the float64 one (``_f32_score_error_bound``: 6e-5 for 512-d unit rows; checked on a
    sample of pairs, and the whole scoring redone in float64 if a float32 product ever misses it, e.g. under TF32 or
    bf16 matmul settings), so only the pairs scored within ``err`` of a window around each target's threshold are
    rescored in float64 (a row-wise dot, about 10k pairs per target at IJB-C scale; :class:`_Refiner`). If more
    than ``max_refine`` pairs would be (default a quarter of the pairs), every pair is scored in float64 instead.
    ``auc`` is the AUC of the float32 scores (it orders all the pairs; pairs closer than 1e-7 can swap, which moves
    it by about 1e-10 at IJB-C scale). ``stats``: a dict that receives ``pairs_s`` and ``roc_s`` (seconds),
    ``error_bound``, ``sample_error``, ``refined_pairs`` and ``float64_fallback``.
    """
    if rule not in FAR_RULES:
        raise ValueError(f"rule must be one of {FAR_RULES}, got {rule!r}")
    fars = [float(x) for x in fars]
    if any(not 0.0 <= x <= 1.0 for x in fars):
        raise ValueError(f"target FARs must be in [0, 1], got {fars}")
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    f = template_features.double()
    dev = f.device
    s32 = pair_scores(f, rows1, rows2, dtype=torch.float32).cpu().numpy()
    t1 = time.perf_counter()
    y = np.asarray(labels).ravel()
    if len(y) != len(s32):
        raise ValueError(f"{len(s32)} scores for {len(y)} labels")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0/1 (or bool)")
    y = y.astype(bool)
    if not np.isfinite(s32).all():
        raise ValueError(f"{int((~np.isfinite(s32)).sum())} scores are NaN or infinite")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(f"a ROC needs genuine and impostor pairs, got {n_pos} and {len(y) - n_pos}")
    r1, r2 = _index_tensor(rows1, dev), _index_tensor(rows2, dev)

    step = 1024
    buf_a = torch.empty(step, f.shape[1], dtype=f.dtype, device=dev)  # reused: cache-sized, no page faults
    buf_b = torch.empty_like(buf_a)

    def exact(idx: np.ndarray) -> np.ndarray:
        """float64 scores of pairs ``idx`` (:func:`_dot_rows`: the same value for a pair in any batch)."""
        out = torch.empty(len(idx), dtype=f.dtype, device=dev)
        i_all = torch.from_numpy(idx).to(dev)
        for s in range(0, len(idx), step):
            i = i_all[s : s + step]
            a = torch.index_select(f, 0, r1[i], out=buf_a[: len(i)])
            b = torch.index_select(f, 0, r2[i], out=buf_b[: len(i)])
            out[s : s + step] = _dot_rows_(a, b)
        return out.cpu().numpy()

    err = _f32_score_error_bound(f)
    sample = np.unique(np.linspace(0, len(s32) - 1, min(len(s32), 4096)).astype(np.int64))
    sample_error = float(np.abs(s32[sample] - exact(sample)).max())
    refiner = _Refiner(s32, y, exact, err, len(s32) // 4 if max_refine is None else max_refine)
    points = None
    if sample_error <= err / 2:  # else the float32 product is not IEEE float32 (TF32, bf16): bound void
        refiner.prepare(fars)
        points = [refiner.point(far, rule) for far in fars]
    fallback = points is None or any(p is None for p in points)
    if fallback:
        s64 = pair_scores(f, rows1, rows2).cpu().numpy()
        points = _roc_points(s64, y, fars, rule)
        del s64
    auc = refiner.auc()
    stats.update(pairs_s=t1 - t0, roc_s=time.perf_counter() - t1, error_bound=err, sample_error=sample_error,
                 refined_pairs=refiner.refined, float64_fallback=fallback)
    return {
        "tar_at_far": {_key(f): tar for f, (tar, _, _) in zip(fars, points)},
        "fpr_at_far": {_key(f): fpr for f, (_, fpr, _) in zip(fars, points)},
        "threshold_at_far": {_key(f): thr for f, (_, _, thr) in zip(fars, points)},
        "auc": auc,
    }


# --- 1:N identification -----------------------------------------------------------------------------------------------


def _threshold_at_fpir(nonmated_top: np.ndarray, fpir: float) -> float:
    # insightface ``evaluation_1N``: the ceil(n * fpir)-th highest non-mated top score (same float expression).
    ranked = np.sort(nonmated_top)[::-1]
    return float(ranked[int(np.ceil(len(ranked) * fpir)) - 1])


def _identification_summary(mated, ranks_of_mate, mate_score, correct, nonmated_top, n_gallery, n_multi, ranks, fpirs):
    n_probes, n_mated = len(mated), int(mated.sum())
    out = {
        "probes": n_probes, "mated": n_mated, "nonmated": n_probes - n_mated, "gallery_templates": n_gallery,
        "subjects_with_multiple_templates": n_multi,
        "rank_hits": {int(k): int((ranks_of_mate[mated] <= k).sum()) for k in ranks},
    }
    out["rank"] = {k: (h / n_mated if n_mated else float("nan")) for k, h in out["rank_hits"].items()}
    tpir, thresholds, achieved = {}, {}, {}
    for fpir in fpirs:
        fpir = float(fpir)
        if n_mated == 0 or len(nonmated_top) == 0 or fpir <= 0:
            tpir[fpir] = thresholds[fpir] = achieved[fpir] = float("nan")
            continue
        thr = _threshold_at_fpir(nonmated_top, fpir)
        thresholds[fpir] = thr
        achieved[fpir] = float((nonmated_top > thr).mean())
        tpir[fpir] = float((correct[mated] & (mate_score[mated] > thr)).sum() / n_mated)
    out.update(tpir_at_fpir=tpir, fpir_thresholds=thresholds, fpir_achieved=achieved)
    return out


def identification_1n(
    probe_features: torch.Tensor,
    probe_subjects,
    gallery_features: torch.Tensor,
    gallery_subjects,
    *,
    ranks=RANKS,
    fpirs=FPIRS,
    chunk_size: int = 4096,
) -> dict:
    """Closed-set CMC and open-set TPIR@FPIR of probe templates against one gallery (unit-norm features).

    As insightface ``evaluation_1N``: a probe is mated when its subject has a gallery template; its mate is the
    *first* gallery template of that subject (gallery order), and other templates of the same subject are treated as
    separate gallery entries (they compete in the ranking; ``subjects_with_multiple_templates`` counts such subjects:
    0 in the IJB-B/C galleries). rank = 1 + number of other gallery templates scoring >= the mate (exact ties count
    against the mate); rank-k = share of mated probes with rank <= k. Open set: threshold = the ceil(n * FPIR)-th
    highest top score of the n non-mated probes; TPIR = share of mated probes whose mate beats every other subject's
    template (strictly) and the threshold (strictly). ``fpir_achieved`` is the share of non-mated tops above it.
    """
    g = gallery_features
    p = probe_features.to(device=g.device, dtype=g.dtype)
    ps = np.asarray(probe_subjects, np.int64).ravel()
    gs = np.asarray(gallery_subjects, np.int64).ravel()
    if len(ps) != len(p) or len(gs) != len(g):
        raise ValueError(f"{len(p)} probes / {len(ps)} probe subjects, {len(g)} gallery / {len(gs)} gallery subjects")
    subj, first_col, counts = np.unique(gs, return_index=True, return_counts=True)
    pos = np.minimum(np.searchsorted(subj, ps), len(subj) - 1)
    mated = subj[pos] == ps
    mate_col = torch.from_numpy(first_col[pos]).to(g.device)
    gs_t, ps_t = torch.from_numpy(gs).to(g.device), torch.from_numpy(ps).to(g.device)
    rank, mate_score, correct, top = (np.empty(len(ps), t) for t in (np.int64, np.float64, bool, np.float64))
    for s in range(0, len(ps), chunk_size):
        e = min(len(ps), s + chunk_size)
        sim = p[s:e] @ g.T
        sm = sim.gather(1, mate_col[s:e, None])
        rank[s:e] = (sim >= sm).sum(1).cpu().numpy()
        others = sim.masked_fill(gs_t[None, :] == ps_t[s:e, None], -torch.inf).amax(1)
        correct[s:e] = (sm[:, 0] > others).cpu().numpy()
        mate_score[s:e] = sm[:, 0].double().cpu().numpy()
        top[s:e] = sim.amax(1).double().cpu().numpy()
    return _identification_summary(mated, rank, mate_score, correct, top[~mated], len(gs), int((counts > 1).sum()),
                                   ranks, fpirs)


def identification_1n_loop(probe_features, probe_subjects, gallery_features, gallery_subjects, *, ranks=RANKS,
                           fpirs=FPIRS) -> dict:
    """Reference for :func:`identification_1n`: one probe at a time in numpy (float64)."""
    p = np.asarray(probe_features, np.float64)
    g = np.asarray(gallery_features, np.float64)
    ps, gs = list(np.asarray(probe_subjects)), np.asarray(gallery_subjects)
    n = len(ps)
    mated, rank, mate_score, correct = np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n), np.zeros(n, bool)
    nonmated_top = []
    for i, subject in enumerate(ps):
        sim = g @ p[i]
        if subject in set(gs.tolist()):
            m = int(np.flatnonzero(gs == subject)[0])
            mated[i] = True
            rank[i] = 1 + sum(1 for j in range(len(gs)) if j != m and sim[j] >= sim[m])
            mate_score[i] = sim[m]
            others = sim[gs != subject]
            correct[i] = bool(sim[m] > others.max()) if len(others) else True
        else:
            nonmated_top.append(sim.max())
    _, counts = np.unique(gs, return_counts=True)
    return _identification_summary(mated, rank, mate_score, correct, np.array(nonmated_top), len(gs),
                                   int((counts > 1).sum()), ranks, fpirs)


# --- end to end -------------------------------------------------------------------------------------------------------


def _key(x: float) -> str:
    return f"{x:g}"


def score_ijb(
    image_features,
    meta: IJBMeta,
    *,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
    use_flip_test: bool = True,
    flip_features=None,
    fars=FARS,
    fpirs=FPIRS,
    far_rule: str = "nearest",
    identification: bool = True,
    device=None,
    dtype: torch.dtype = torch.float64,
    stats: dict | None = None,
) -> dict:
    """Metrics from precomputed image features (N x D, 5pts order).

    F1: if ``flip_features`` (embeddings of the flipped images) is given it is added here; if not, ``image_features``
    are taken to already hold the flip sum (``embed_ijb(flip=True)``). F0 ignores ``flip_features``. The mode is
    recorded in the result, so state it truthfully. Pooling and scoring run on ``device`` in ``dtype``; in float64
    (the default) the 1:1 pairs are scored by :func:`roc_1to1_pairs`: float32 products, with TAR, FPR and threshold
    exactly those of float64 scores (AUC from the float32 scores). ``stats``: a dict that receives the seconds of
    each 1:1 phase (``pooling_s``, ``prep_s`` (pair template rows), ``pairs_s``, ``roc_s``) and
    :func:`roc_1to1_pairs`' other ``stats``.

    Returns ``name``, ``mode``, counts, ``far_rule``, ``tar_at_far`` / ``fpr_at_far`` / ``threshold_at_far`` keyed
    by ``f"{far:g}"``, ``auc`` and, when the 1:N files are present, ``identification``: one entry per gallery
    (``identification_1n``; rank and TPIR keys as strings) and ``mean``: rank-k = all galleries' hits / probes and
    TPIR = mean over galleries (insightface's averaging).
    """
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    feats = torch.as_tensor(image_features)
    if feats.ndim != 2 or len(feats) != len(meta):
        raise ValueError(f"expected {len(meta)} x D image features for {meta.name}, got {tuple(feats.shape)}")
    flip = torch.as_tensor(flip_features) if use_flip_test and flip_features is not None else None
    device = torch.device(device) if device is not None else feats.device
    template_feats, unique_templates = image2template_feature(  # adds the flip features chunk by chunk
        feats, meta.templates, meta.medias, detector_scores=meta.detector_scores, use_norm_score=use_norm_score,
        use_detector_score=use_detector_score, dtype=dtype, device=device, flip_features=flip,
    )
    t1 = time.perf_counter()
    pair_ids = np.asarray(meta.pairs, np.int64)
    rows1, rows2 = (_lookup_rows(np.asarray(unique_templates, np.int64), pair_ids[:, k], np.int32) for k in (0, 1))
    if rows1 is None or rows2 is None:  # spread-out ids, or an unknown one (named by template_rows)
        rows1 = template_rows(unique_templates, meta.pairs[:, 0], "pair template 1")
        rows2 = template_rows(unique_templates, meta.pairs[:, 1], "pair template 2")
    t2 = time.perf_counter()
    stats.update(pooling_s=t1 - t0, prep_s=t2 - t1)
    if template_feats.dtype == torch.float64:
        roc = roc_1to1_pairs(template_feats, rows1, rows2, meta.labels, fars, far_rule, stats=stats)
    else:
        scores = pair_scores(template_feats, rows1, rows2).cpu().numpy()
        t3 = time.perf_counter()
        roc = roc_1to1(scores, meta.labels, fars, far_rule)
        stats.update(pairs_s=t3 - t2, roc_s=time.perf_counter() - t3)
    n_pairs = len(rows1)
    result = {
        "name": meta.name, "mode": mode_string(use_norm_score, use_detector_score, use_flip_test),
        "images": len(meta), "templates": len(unique_templates), "pairs": n_pairs,
        "genuine": int(meta.labels.sum()), "impostor": int(n_pairs - meta.labels.sum()), "far_rule": far_rule,
        **roc,
    }
    if identification and meta.galleries is not None and meta.probes is not None:
        probe = template_feats[torch.from_numpy(template_rows(unique_templates, meta.probes.templates)).to(device)]
        per = {}
        for key, gallery in meta.galleries.items():
            gal = template_feats[torch.from_numpy(template_rows(unique_templates, gallery.templates)).to(device)]
            r = identification_1n(probe, meta.probes.subjects, gal, gallery.subjects, fpirs=fpirs)
            r["rank"] = {str(k): v for k, v in r["rank"].items()}
            r["rank_hits"] = {str(k): v for k, v in r["rank_hits"].items()}
            for field in ("tpir_at_fpir", "fpir_thresholds", "fpir_achieved"):
                r[field] = {_key(k): v for k, v in r[field].items()}
            per[key] = r
        n_probes = len(meta.probes.templates)
        per["mean"] = {
            "rank": {k: sum(r["rank_hits"][k] for r in per.values()) / n_probes for k in map(str, RANKS)},
            "tpir_at_fpir": {_key(f): float(np.mean([r["tpir_at_fpir"][_key(f)] for r in per.values()]))
                             for f in fpirs},
        }
        result["identification"] = per
    return result


def evaluate_ijb(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    root: str | Path,
    name: str,
    batch_size: int = 128,
    device="cpu",
    workers: int | None = None,
    *,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
    use_flip_test: bool = True,
    fars=FARS,
    fpirs=FPIRS,
    far_rule: str = "nearest",
    identification: bool = True,
) -> dict:
    """``load_ijb_meta`` + ``embed_ijb`` (flip summed for F1) + ``score_ijb`` on ``device``; see those."""
    meta = load_ijb_meta(root, name)
    feats = embed_ijb(embed_fn, meta, batch_size=batch_size, device=device, workers=workers, flip=use_flip_test)
    return score_ijb(
        feats, meta, use_norm_score=use_norm_score, use_detector_score=use_detector_score,
        use_flip_test=use_flip_test, fars=fars, fpirs=fpirs, far_rule=far_rule, identification=identification,
        device=device,
    )


def format_ijb_result(result: dict) -> str:
    """A plain-text table of a ``score_ijb`` result, always with its mode (e.g. ``IJBC N1D1F1``)."""
    head = f"{result['name'].upper()} {result['mode']}"
    fars = list(result["tar_at_far"])
    lines = [
        f"{head}: {result['images']} images, {result['templates']} templates, {result['pairs']} pairs "
        f"({result['genuine']} genuine), TAR@FAR rule '{result['far_rule']}'",
        "  TAR@FAR " + " ".join(f"{f:>8}" for f in fars) + "      AUC",
        "          " + " ".join(f"{100 * result['tar_at_far'][f]:8.2f}" for f in fars)
        + f" {100 * result['auc']:8.4f}",
    ]
    ident = result.get("identification")
    if ident:
        for key, r in ident.items():
            ranks = " ".join(f"rank-{k} {100 * v:.2f}" for k, v in r["rank"].items())
            tpirs = " ".join(f"TPIR@FPIR={f} {100 * v:.2f}" for f, v in r["tpir_at_fpir"].items())
            lines.append(f"  1:N {key:<4} {ranks}  {tpirs}")
    return "\n".join(lines)
