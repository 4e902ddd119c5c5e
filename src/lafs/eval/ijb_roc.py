"""IJB 1:1 ROC: sklearn's ``roc_curve`` and the two TAR@FAR readings of it.

``roc_curve`` is sklearn's (one point per distinct score, ``drop_intermediate``); a target FAR is read on it by
insightface's ``nearest`` rule (the point whose FPR is closest, ``eval_ijbc.py``), which published IJB numbers use,
or by lafs's one TAR rule ``floor`` (:func:`lafs.eval.metrics.tar_at_far`). :mod:`lafs.eval.ijb_refine` gives the
same points from float32 pair scores.
"""

from __future__ import annotations

import numpy as np

from .metrics import auc_from_counts, far_count, roc_counts

__all__ = ["FARS", "FAR_RULES", "check_scores_labels", "check_targets", "far_key", "roc_1to1", "roc_curve",
           "roc_points", "roc_result", "tar_at_far"]

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# "nearest": insightface's rule, the ROC point (sklearn roc_curve, drop_intermediate=True) with the smallest
# |FPR - FAR|, ties to the larger TPR. "floor": the largest TPR among all thresholds with FPR <= FAR.
FAR_RULES = ("nearest", "floor")


def far_key(far: float) -> str:
    """The key of a target FAR (or FPIR) in a result dict: ``f"{far:g}"``."""
    return f"{far:g}"


def check_targets(fars, rule: str) -> list[float]:
    """The target FARs as floats, or ValueError for an unknown ``rule`` or a FAR outside [0, 1]."""
    if rule not in FAR_RULES:
        raise ValueError(f"rule must be one of {FAR_RULES}, got {rule!r}")
    fars = [float(x) for x in fars]
    if any(not 0.0 <= x <= 1.0 for x in fars):
        raise ValueError(f"target FARs must be in [0, 1], got {fars}")
    return fars


def check_scores_labels(scores, labels, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(scores as 1-D ``dtype``, labels as bool), or ValueError: lengths, 0/1 labels, finite scores, both classes."""
    s = np.asarray(scores, dtype).ravel()
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
    fps, tps, thresholds = counts if counts is not None else roc_counts(*check_scores_labels(scores, labels))
    if drop_intermediate and len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def roc_points(scores, labels, fars, rule, counts=None) -> list[tuple[float, float, float]]:
    """(TAR, FPR, threshold) for each target FAR under ``rule`` (``FAR_RULES``)."""
    fars = check_targets(fars, rule)
    if counts is None:
        counts = roc_counts(*check_scores_labels(scores, labels))
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
    counts = roc_counts(*check_scores_labels(scores, labels))
    points = roc_points(scores, labels, fars, rule, counts)
    return roc_result(fars, points, auc_from_counts(counts[0], counts[1]))


def roc_result(fars, points, auc: float) -> dict:
    """The 1:1 result: ``tar_at_far``, ``fpr_at_far`` and ``threshold_at_far`` keyed by :func:`far_key`, ``auc``."""
    return {
        "tar_at_far": {far_key(f): tar for f, (tar, _, _) in zip(fars, points)},
        "fpr_at_far": {far_key(f): fpr for f, (_, fpr, _) in zip(fars, points)},
        "threshold_at_far": {far_key(f): thr for f, (_, _, thr) in zip(fars, points)},
        "auc": auc,
    }


def tar_at_far(scores, labels, fars=FARS, rule: str = "nearest") -> dict[float, float]:
    """TAR at each target FAR, ``{far: tar}``.

    ``rule="nearest"`` is insightface's (``eval_ijbc.py`` / ``IJB_evals.py``): sklearn ``roc_curve`` (with its
    default ``drop_intermediate=True``), then the point with the smallest |FPR - FAR|, ties to the larger TPR. The
    chosen FPR can exceed the target (no interpolation between points), so published IJB numbers are read this way.
    ``rule="floor"``: the largest TPR over all distinct thresholds with FPR <= FAR (never exceeds the target), the
    rule of ``metrics.tar_at_far`` (same TAR and FAR; the threshold here is the ROC point's, accept ``>=``).
    """
    return {float(far): tar for far, (tar, _, _) in zip(fars, roc_points(scores, labels, fars, rule))}

