"""IJB 1:1 from template features: pairs scored in float32, with the TAR, FPR and threshold of float64 scores.

Scoring IJB-C's 15.6M pairs in float64 is the slow, memory-hungry step of the protocol. A float32 score is within a
rigorous bound of the float64 one, so only the pairs near each target's threshold decide the answer; they are
rescored in float64 (:class:`_Refiner`) and the rest keep their float32 scores (:func:`roc_1to1_pairs`).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .ijb_roc import FARS, check_scores_labels, check_targets, roc_points, roc_result
from .ijb_templates import index_tensor, pair_scores

__all__ = ["roc_1to1_pairs"]


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
    fars = check_targets(fars, rule)
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    f = template_features.double()
    dev = f.device
    s32 = pair_scores(f, rows1, rows2, dtype=torch.float32).cpu().numpy()
    t1 = time.perf_counter()
    _, y = check_scores_labels(s32, labels, np.float32)  # float32: no float64 copy of 15.6M scores
    r1, r2 = index_tensor(rows1, dev), index_tensor(rows2, dev)

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
        points = roc_points(s64, y, fars, rule)
        del s64
    auc = refiner.auc()
    stats.update(pairs_s=t1 - t0, roc_s=time.perf_counter() - t1, error_bound=err, sample_error=sample_error,
                 refined_pairs=refiner.refined, float64_fallback=fallback)
    return roc_result(fars, points, auc)

