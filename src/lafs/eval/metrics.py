"""Metrics of pair scores: ROC counts and AUC, EER, TAR@FAR (one rule for verification, IJB and identification)
and the 10-fold protocol of LFW / CFP-FP / AgeDB-30 pairs. numpy only: scores in, numbers out.

Protocol (insightface/face.evoLVe ``verification.evaluate``, which the official LAFS code's ``perform_val`` calls):
each image and its horizontal flip are embedded, the two embeddings summed, then L2-normalised; the score is the
squared Euclidean distance (= 2 - 2 cos); 10 contiguous, unshuffled folds; per fold the threshold from
``arange(0, 4, 0.01)`` with the best accuracy on the other 9 folds is applied to the held-out fold, and the mean
(± std) over folds is reported. A pair is accepted when ``dist < threshold`` (strict, as insightface).

Options beyond the reference protocol (defaults reproduce it; the flip test's ``flip_mode`` is
:mod:`lafs.eval.embedding`'s):

- ``thresholds`` (``ten_fold_accuracy`` and the wrappers): the threshold grid searched on the training folds.

  * ``"reference"`` (default, also ``None``): ``np.arange(0, 4, 0.01)`` on the squared distance, the insightface /
    LAFS grid. Keep it to compare with published numbers: the grid is coarse (0.01 in squared distance is 0.005 in
    cosine), so the chosen threshold is the best *grid point*, not the best threshold.
  * ``"exact"``: every midpoint between consecutive sorted distinct distances of the training folds, plus the smallest
    training distance (accepts no training pair) and the next float above the largest (accepts all). Accuracy is a
    step function of the threshold that only changes at the training distances, so this grid contains the exact
    optimum of the 9-fold accuracy (``fold_train_accuracies`` >= the reference grid's). The *test*-fold accuracy is
    not guaranteed to be higher: it is another, finer threshold estimate. Ties go to the smallest threshold.
  * an array: that grid (sorted).

Extra metrics (``verification_metrics``, computed once on all pairs, no folds; included in ``ten_fold_accuracy``):
``best_threshold`` / ``best_accuracy`` (the threshold of the chosen grid with the highest accuracy over all pairs:
an optimistic, in-sample figure), ``eer``, ``tar_at_far`` and ``auc``.

- TAR@FAR convention: the most permissive operating point whose FAR does not exceed the target, i.e. for distances
  the *largest* threshold t with FAR(t) = #{impostor d < t} / n_impostor <= target. With k = the largest integer with
  k / n_impostor <= target, that threshold is the (k+1)-th smallest impostor distance, read from the sorted impostor
  scores (no grid, no interpolation); TAR = #{genuine d < t} / n_genuine (``tar_far`` holds the FAR actually
  reached, <= target). It equals max TAR over all ROC points with FAR <= target. This is the one TAR rule of lafs
  (:func:`tar_at_far`, its allowance :func:`far_count`): ``verification_metrics``, MegaFace's verification
  (``lafs.eval.identification``) and IJB's ``floor`` rule (read on its ROC, ``lafs.eval.ijb``) all use it.
  InsightFace's IJB script instead reads TAR at the ROC point whose FPR is *closest* to the target (possibly above
  it), IJB's default ``nearest`` rule, kept to compare with published numbers; with few impostors (k = 0) ours is
  TAR at zero false accepts.
- EER: the ROC is the polyline through (FAR, FRR) at every distinct score (plus accept-all); FAR rises and FRR falls,
  and the EER is the value where the polyline crosses FAR = FRR (linear interpolation on the crossing segment;
  the ``brentq(1 - x - interp1d(fpr, tpr)(x))`` definition of FaceNet-style evaluations).
"""

from __future__ import annotations

import warnings

import numpy as np


class CoarseThresholdGridWarning(UserWarning):
    """The reference grid ``arange(0, 4, 0.01)`` cannot separate the pairs' distances (see :func:`ten_fold_accuracy`)."""


# how far (in accuracy over all pairs) the reference grid's best threshold may fall under the exact one before the
# 10-fold figure is flagged: a grid point every 0.01 of squared distance costs well under a point on spread-out
# distances, but when every distance falls between two grid points it reads 50 %
COARSE_GRID_GAP = 0.02


def roc_counts(scores, issame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fps, tps, thresholds): at each distinct score t, in decreasing order, the impostor and genuine pairs with
    score >= t (the counts behind sklearn's ``roc_curve``). One sort of the score values (no argsort, no permuted
    labels) and a binary search of the genuine scores, so IJB-C's 15.6M pairs take about a second. NaN is an error;
    +-inf are ordinary values."""
    s, y = _check_scores(scores, issame)
    desc = np.sort(s)[::-1]
    last = np.r_[np.flatnonzero(desc[1:] != desc[:-1]), len(desc) - 1]  # last position of each distinct score
    thresholds = desc[last]
    genuine = np.sort(s[y])
    tps = len(genuine) - np.searchsorted(genuine, thresholds, side="left")
    return 1 + last - tps, tps, thresholds


def roc_auc(scores, issame) -> float:
    """Area under the ROC curve = P(genuine score > impostor score), ties counted half.

    The trapezoid over :func:`roc_counts` in exact integer arithmetic (a tie group's diagonal step counts half), so
    it scales to the millions of pairs of IJB-C.
    """
    return auc_from_counts(*roc_counts(scores, issame)[:2])


def auc_from_counts(fps: np.ndarray, tps: np.ndarray) -> float:
    """:func:`roc_auc` from :func:`roc_counts`' cumulative impostor / genuine counts."""
    n_neg, n_pos = int(fps[-1]), int(tps[-1])
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs genuine and impostor pairs, got {n_pos} and {n_neg}")
    fps, tps = np.r_[0, fps].astype(np.int64), np.r_[0, tps].astype(np.int64)
    twice_area = int(np.sum(np.diff(fps) * (tps[1:] + tps[:-1])))
    return twice_area / (2.0 * n_pos * n_neg)


def fold_ids(n: int, nfolds: int) -> np.ndarray:
    """Fold of each of ``n`` pairs: contiguous blocks, the first ``n % nfolds`` one longer (unshuffled KFold)."""
    if not 1 <= nfolds <= n:
        raise ValueError(f"nfolds must be in [1, {n}] for {n} pairs, got {nfolds}")
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    return np.repeat(np.arange(nfolds), sizes)


def _accept_counts(dist, issame, folds, nfolds, thresholds):
    """(nfolds, T) counts of genuine / impostor pairs per fold with ``dist < thresholds[t]`` (thresholds ascending).

    One histogram instead of a loop over thresholds: pair i is accepted from the first threshold > dist on.
    """
    T = len(thresholds)
    first = np.searchsorted(thresholds, dist, side="right")  # first threshold index with dist < t
    out = []
    for mask in (issame, ~issame):
        hist = np.bincount(folds[mask] * (T + 1) + first[mask], minlength=nfolds * (T + 1)).reshape(nfolds, T + 1)
        out.append(np.cumsum(hist, axis=1)[:, :T])
    return out


REFERENCE_THRESHOLDS = "reference"
EXACT_THRESHOLDS = "exact"
DEFAULT_FAR_TARGETS = (1e-4, 1e-3, 1e-2)


def reference_thresholds() -> np.ndarray:
    """The insightface / LAFS grid on squared distance: ``np.arange(0, 4, 0.01)`` (400 thresholds)."""
    return np.arange(0, 4, 0.01)


def _sorted_groups(dist_sorted: np.ndarray, same_sorted: np.ndarray):
    """Distinct values of an ascending array and cumulative genuine / impostor counts below each.

    Returns (u, cum_gen, cum_imp): ``u`` the m distinct distances; ``cum_gen[j]`` / ``cum_imp[j]`` (j = 0..m) the
    genuine / impostor pairs with ``d < u[j]`` (``j = m``: all pairs), i.e. accepted once ``j`` groups are.
    """
    new = np.empty(len(dist_sorted), bool)
    new[:1] = True
    np.not_equal(dist_sorted[1:], dist_sorted[:-1], out=new[1:])
    start = np.flatnonzero(new)
    gen = np.add.reduceat(same_sorted.astype(np.int64), start) if len(start) else np.zeros(0, np.int64)
    size = np.diff(np.append(start, len(dist_sorted)))
    zero = np.zeros(1, np.int64)
    return dist_sorted[start], np.concatenate([zero, np.cumsum(gen)]), np.concatenate([zero, np.cumsum(size - gen)])


def _exact_grid(u: np.ndarray) -> np.ndarray:
    """The m + 1 thresholds that realise every distinct decision on values ``u`` (ascending, distinct) with ``d < t``.

    ``u[0]`` (accepts none), the midpoints (u[j-1] + u[j]) / 2 (accept the first j values), the next float above
    ``u[-1]`` (accepts all). A midpoint that rounds down onto u[j-1] (values one ulp apart) is replaced by u[j].
    """
    mid = u[:-1] + (u[1:] - u[:-1]) / 2.0
    mid = np.where(mid > u[:-1], mid, u[1:])
    return np.concatenate([u[:1], mid, np.nextafter(u[-1:], np.inf)])


def _exact_best(dist_sorted: np.ndarray, same_sorted: np.ndarray) -> tuple[float, int]:
    """Exact best threshold (smallest on ties) and its number of correct decisions on ascending ``dist_sorted``."""
    u, cum_gen, cum_imp = _sorted_groups(dist_sorted, same_sorted)
    correct = cum_gen + (cum_imp[-1] - cum_imp)
    j = int(np.argmax(correct))
    return float(_exact_grid(u)[j]), int(correct[j])


def _check_scores(scores, issame) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).ravel()
    issame = np.asarray(issame, bool).ravel()
    if len(scores) != len(issame):
        raise ValueError(f"{len(scores)} scores for {len(issame)} labels")
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} scores are NaN (of {len(scores)}; NaN embeddings?)")
    return scores, issame


def far_count(target: float, n: int) -> int:
    """Largest integer k with k / n <= target (the false accepts a FAR target allows among n impostor pairs)."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"FAR targets must be in [0, 1], got {target}")
    k = min(int(np.floor(target * n)), n)
    while k < n and (k + 1) / n <= target:
        k += 1
    while k > 0 and k / n > target:
        k -= 1
    return k


def tar_at_far(genuine, impostor, far_targets, *, kind: str = "distance", n_impostor: int | None = None,
               ) -> tuple[dict, dict, dict]:
    """TAR at each target FAR under the one rule of lafs (module docstring): (TAR, FAR reached, threshold) dicts keyed
    by the targets.

    ``kind="distance"``: a pair is accepted when its score is < t; ``"similarity"``: when > t (thresholds in the units
    of the scores; +-inf when a target allows every impostor). The threshold is the (k+1)-th best impostor score,
    k = :func:`far_count` (target, impostors): ``impostor`` may hold only the best ``k + 1`` of ``n_impostor`` impostor
    scores (a streamed evaluation keeps no more), in any order.
    """
    if kind not in ("distance", "similarity"):
        raise ValueError(f"kind must be 'distance' or 'similarity', got {kind!r}")
    sign = 1.0 if kind == "distance" else -1.0
    gen = sign * np.asarray(genuine).ravel()  # accept gen < t throughout: similarity thresholds are -t
    imp = np.sort(sign * np.asarray(impostor).ravel())
    n_imp = len(imp) if n_impostor is None else int(n_impostor)
    tar, far, thr = {}, {}, {}
    for target in far_targets:
        k = far_count(float(target), n_imp)
        # the largest t with #{impostor < t} <= k is the (k+1)-th smallest impostor score
        t = imp[k] if k < n_imp else np.inf
        tar[target] = float(np.count_nonzero(gen < t) / len(gen))
        far[target] = float(np.searchsorted(imp, t, side="left") / n_imp)
        thr[target] = sign * t
    return tar, far, thr


def verification_metrics(
    scores,
    issame,
    *,
    kind: str = "distance",
    thresholds="exact",
    far_targets=DEFAULT_FAR_TARGETS,
) -> dict:
    """Threshold-free and best-threshold metrics of pair scores over all pairs (no folds): see the module docstring.

    ``kind="distance"``: genuine pairs score low and a pair is accepted when ``score < t``; ``"similarity"`` (e.g.
    cosine): genuine pairs score high, accepted when ``score > t``. Both strict; thresholds are reported in the
    units of ``scores``. ``thresholds``: ``"exact"`` (every distinct decision, default here), ``"reference"``
    (``arange(0, 4, 0.01)``; squared distances only) or an array (in the units of ``scores``).

    Returns ``best_threshold``, ``best_accuracy`` (first best in the accepting direction: the smallest distance /
    largest similarity threshold), ``exact_best_accuracy`` (the same at the exact optimum, whatever the grid),
    ``eer``, ``tar_at_far`` / ``tar_far`` / ``tar_threshold`` (dicts keyed by the FAR targets: TAR, the FAR reached,
    the threshold; +-inf when the target allows every impostor), ``auc``, ``n_genuine``, ``n_impostor``. Everything
    is computed from one sort, O(n log n).
    """
    if kind not in ("distance", "similarity"):
        raise ValueError(f"kind must be 'distance' or 'similarity', got {kind!r}")
    scores, issame = _check_scores(scores, issame)
    n_gen, n_imp = int(issame.sum()), int((~issame).sum())
    if n_gen == 0 or n_imp == 0:
        raise ValueError(f"verification metrics need genuine and impostor pairs, got {n_gen} and {n_imp}")
    sign = 1.0 if kind == "distance" else -1.0
    dist = sign * scores  # accept dist < t throughout; similarity thresholds are -t
    order = np.argsort(dist, kind="stable")
    ds, ss = dist[order], issame[order]
    u, cum_gen, cum_imp = _sorted_groups(ds, ss)

    # best accuracy over all pairs on the chosen grid; the exact optimum always (a coarse grid is judged against it)
    exact_correct = cum_gen + (n_imp - cum_imp)
    if isinstance(thresholds, str) and thresholds == EXACT_THRESHOLDS:
        j = int(np.argmax(exact_correct))
        best_t, best_correct = float(_exact_grid(u)[j]), int(exact_correct[j])
    else:
        if isinstance(thresholds, str) and thresholds == REFERENCE_THRESHOLDS:
            if kind != "distance":
                raise ValueError("thresholds='reference' is a squared-distance grid: use kind='distance'")
            grid = reference_thresholds()
        elif isinstance(thresholds, str):
            raise ValueError(f"thresholds must be 'reference', 'exact' or an array, got {thresholds!r}")
        else:
            grid = np.sort(sign * np.asarray(thresholds, np.float64).ravel())
            if len(grid) == 0:
                raise ValueError("empty threshold grid")
        accepted = np.searchsorted(ds, grid, side="left")  # pairs with d < t
        gen_acc = np.concatenate([[0], np.cumsum(ss)])[accepted]
        correct = gen_acc + (n_imp - (accepted - gen_acc))
        j = int(np.argmax(correct))
        best_t, best_correct = float(grid[j]), int(correct[j])

    # EER: first ROC point with FAR >= FRR, interpolated on the segment from the point before (FAR - FRR < 0 there).
    far = cum_imp / n_imp
    frr = 1.0 - cum_gen / n_gen
    diff = far - frr  # -1 at j = 0 (accept none), +1 at j = m (accept all)
    j = int(np.argmax(diff >= 0))
    a = -diff[j - 1] / (diff[j] - diff[j - 1])
    eer = float(far[j - 1] + a * (far[j] - far[j - 1]))

    tar, far_at, thr = tar_at_far(ds[ss], ds[~ss], far_targets)
    return {
        "best_threshold": sign * best_t,
        "best_accuracy": best_correct / len(dist),
        "exact_best_accuracy": int(exact_correct.max()) / len(dist),
        "eer": eer,
        "tar_at_far": tar,
        "tar_far": far_at,
        "tar_threshold": {target: float(sign * t) for target, t in thr.items()},
        "auc": roc_auc(-dist, issame),
        "n_genuine": n_gen,
        "n_impostor": n_imp,
    }


def pair_distances(embeddings1, embeddings2) -> np.ndarray:
    """Squared Euclidean distance of the L2-normalised rows (float64): 2 - 2 cos, in [0, 4].

    Expanded as |a|^2/n_a^2 + |b|^2/n_b^2 - 2 a.b/(n_a n_b) with row-wise einsums: three times faster than
    normalising and subtracting copies and equal to it within 1e-15; clamped at 0 so identical rows give 0. A zero
    row normalises to the zero vector (distance 1 to any unit row), as in the normalise-then-subtract form.
    """
    e1 = np.asarray(embeddings1, np.float64)
    e2 = np.asarray(embeddings2, np.float64)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise ValueError(f"embeddings {e1.shape} and {e2.shape}: expected two (pairs, D) arrays of one shape")
    aa = np.einsum("ij,ij->i", e1, e1)
    bb = np.einsum("ij,ij->i", e2, e2)
    ab = np.einsum("ij,ij->i", e1, e2)
    na = np.maximum(np.sqrt(aa), 1e-12)
    nb = np.maximum(np.sqrt(bb), 1e-12)
    return np.maximum(aa / (na * na) + bb / (nb * nb) - 2.0 * ab / (na * nb), 0.0)


def ten_fold_accuracy(
    embeddings1,
    embeddings2,
    issame,
    nfolds: int = 10,
    thresholds=None,
    far_target: float = 1e-3,
    val_thresholds=None,
    far_targets=DEFAULT_FAR_TARGETS,
) -> dict:
    """insightface ``evaluate`` on pairs (embeddings1[k], embeddings2[k]); see the module docstring.

    Embeddings are L2-normalised here (a no-op for normalised input) because the threshold grid covers [0, 4].
    ``nfolds=1`` trains and tests on all pairs (insightface ``LFold``). ``thresholds``: ``None`` / ``"reference"``
    (``arange(0, 4, 0.01)``, the default, comparable with published numbers), ``"exact"`` (per fold, every midpoint
    between the training folds' sorted distinct distances: the exact 9-fold optimum) or an array (sorted here). On a
    tie in train accuracy the smallest threshold wins (``np.argmax``, as insightface on its ascending grid). A pair with
    a NaN embedding gets distance +inf: never accepted, as ``NaN < t`` is false in insightface (no error mid-training).

    VAL@FAR: per fold, the largest threshold of ``val_thresholds`` (default ``arange(0, 4, 0.001)``, insightface's grid)
    whose train-fold FAR is <= ``far_target`` is applied to the test fold; ``val_at_far`` / ``far`` are the means over
    folds (folds without genuine / impostor pairs are skipped). insightface instead interpolates the threshold with
    ``interp1d`` over a FAR curve full of repeated values, which is ill-defined (both pick a threshold where the train
    FAR crosses the target, but the values can differ slightly).

    The reference grid, when its best threshold over all pairs is right on more than ``COARSE_GRID_GAP`` fewer
    pairs than the exact best threshold, is too coarse for the distances at hand (an early model whose embeddings all
    lie within 0.01 of squared distance of each other reads 50 % whatever its AUC): ``coarse_grid`` is then True and a
    :class:`CoarseThresholdGridWarning` names the exact figure.

    Returns accuracy, accuracy_std, threshold (mean best threshold), fold_accuracies, fold_thresholds,
    fold_train_accuracies (accuracy of the chosen threshold on the training folds), val_at_far, val_std, far,
    auc (``roc_auc(-dist, issame)``), coarse_grid, and from ``verification_metrics(dist, issame, thresholds=<same grid>)`` on all
    pairs: best_threshold, best_accuracy, eer, tar_at_far, tar_far, tar_threshold (dicts keyed by ``far_targets``).
    """
    issame = np.asarray(issame, bool).ravel()
    e1 = np.asarray(embeddings1)
    e2 = np.asarray(embeddings2)
    if e1.ndim != 2 or e1.shape != e2.shape or len(e1) != len(issame):
        raise ValueError(f"embeddings {e1.shape} and {e2.shape} for {len(issame)} pairs: expected two (pairs, D)")
    dist = pair_distances(e1, e2)
    dist[np.isnan(dist)] = np.inf  # NaN embeddings: never accepted, as ``dist < t`` in insightface (no crash mid-run)
    if thresholds is None or (isinstance(thresholds, str) and thresholds == REFERENCE_THRESHOLDS):
        mode, grid = REFERENCE_THRESHOLDS, reference_thresholds()
    elif isinstance(thresholds, str) and thresholds == EXACT_THRESHOLDS:
        mode, grid = EXACT_THRESHOLDS, None
    elif isinstance(thresholds, str):
        raise ValueError(f"thresholds must be 'reference', 'exact', None or an array, got {thresholds!r}")
    else:
        mode, grid = "custom", np.sort(np.asarray(thresholds, np.float64).ravel())
        if len(grid) == 0:
            raise ValueError("empty threshold grid")
    val_thresholds = np.sort(
        np.asarray(np.arange(0, 4, 0.001) if val_thresholds is None else val_thresholds, np.float64)
    )

    n = len(issame)
    folds = fold_ids(n, nfolds)
    n_same = np.bincount(folds, weights=issame, minlength=nfolds).astype(np.int64)  # per test fold
    n_pairs = np.bincount(folds, minlength=nfolds)
    n_diff = n_pairs - n_same
    n_train = np.full(nfolds, n) if nfolds == 1 else n - n_pairs

    def train(count):  # train fold = all pairs minus the test fold (or all of them for a single fold)
        return count if nfolds == 1 else count.sum(axis=0, keepdims=True) - count

    rows = np.arange(nfolds)
    if grid is not None:
        # Accuracy: integer counts of correct decisions, so ties in argmax are exact.
        tp, fp = _accept_counts(dist, issame, folds, nfolds, grid)
        correct_train = train(tp) + (train(n_diff[:, None]) - train(fp))
        best = np.argmax(correct_train, axis=1)
        fold_acc = (tp[rows, best] + n_diff - fp[rows, best]) / n_pairs
        fold_thr = grid[best]
        train_acc = correct_train[rows, best] / n_train
    else:
        # Exact grid: one global sort; each training set is the sorted order minus its test fold (O(n) per fold).
        order = np.argsort(dist, kind="stable")
        ds, ss, fs = dist[order], issame[order], folds[order]
        fold_thr, train_acc = np.empty(nfolds), np.empty(nfolds)
        for f in range(nfolds):
            keep = slice(None) if nfolds == 1 else fs != f
            fold_thr[f], correct = _exact_best(ds[keep], ss[keep])
            train_acc[f] = correct / n_train[f]
        right = ((dist < fold_thr[folds]) == issame).astype(np.float64)
        fold_acc = np.bincount(folds, weights=right, minlength=nfolds) / n_pairs

    # VAL@FAR: train FAR is non-decreasing in the threshold, so the last index with FAR <= target is a count - 1.
    tp_v, fp_v = _accept_counts(dist, issame, folds, nfolds, val_thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        far_train = train(fp_v) / train(n_diff[:, None])
        pick = np.maximum(np.sum(far_train <= far_target, axis=1) - 1, 0)
        val = tp_v[rows, pick] / n_same
        far = fp_v[rows, pick] / n_diff
    val, far = val[n_same > 0], far[n_diff > 0]

    metrics = verification_metrics(
        dist, issame, thresholds=EXACT_THRESHOLDS if grid is None else grid, far_targets=far_targets
    )
    exact_best = metrics["exact_best_accuracy"]
    coarse = mode == REFERENCE_THRESHOLDS and exact_best - metrics["best_accuracy"] > COARSE_GRID_GAP
    if coarse:
        finite = dist[np.isfinite(dist)]
        warnings.warn(
            f"the {mode} threshold grid is too coarse for these distances ({len(finite)} in [{finite.min():.5f}, "
            f"{finite.max():.5f}]): its best threshold is right on {metrics['best_accuracy']:.2%} of the pairs, "
            f"the exact one on {exact_best:.2%}, so the 10-fold accuracy understates the embeddings (AUC "
            f"{metrics['auc']:.3f}); score them with thresholds='exact' (lafs eval --thresholds exact)",
            CoarseThresholdGridWarning, stacklevel=2)
    result = {
        "accuracy": float(fold_acc.mean()),
        "accuracy_std": float(fold_acc.std()),
        "threshold": float(fold_thr.mean()),
        "fold_accuracies": fold_acc.tolist(),
        "fold_thresholds": fold_thr.tolist(),
        "fold_train_accuracies": train_acc.tolist(),
        "thresholds": mode,
        "val_at_far": float(val.mean()) if len(val) else float("nan"),
        "val_std": float(val.std()) if len(val) else float("nan"),
        "far": float(far.mean()) if len(far) else float("nan"),
        "auc": metrics["auc"],  # roc_auc(-dist, issame)
        "coarse_grid": bool(coarse),  # reference grid only: its best all-pairs accuracy > COARSE_GRID_GAP under exact
        "exact_best_accuracy": exact_best,  # all pairs at the exact optimum threshold (what a finer grid can reach)
    }
    for key in ("best_threshold", "best_accuracy", "eer", "tar_at_far", "tar_far", "tar_threshold"):
        result[key] = metrics[key]
    return result
