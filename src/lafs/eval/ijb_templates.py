"""IJB templates: image features pooled into template features, and the cosine scores of template pairs.

Pooling (insightface ``image2template_feature``): the image features of each (template, media) are averaged, the
media features summed, and the sum L2-normalised; the N/D preprocessing of :mod:`lafs.eval.ijb` (feature norm kept
or not, detector-score weighting) is folded into the same weighted sum. Pair scores are the dot products of the unit
template features of each pair, read from a dense product where the pairs are dense (IJB's gallery x probe pairs).
Each vectorised function has a loop reference (``*_loop``) that the tests and benchmarks compare it with.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["image2template_feature", "image2template_feature_loop", "index_tensor", "pair_scores", "pair_scores_loop",
           "template_groups"]

_EPS = 10 * np.finfo(np.float64).eps  # sklearn ``normalize`` treats norms below this as zero (keeps the row)


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

    Same result as insightface ``image2template_feature`` after its N/D preprocessing (``lafs.eval.ijb``, steps 2-3),
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



# --- pair scores ------------------------------------------------------------------------------------------------------


def index_tensor(rows, device) -> torch.Tensor:
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
    r1, r2 = index_tensor(rows1, dev), index_tensor(rows2, dev)
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

