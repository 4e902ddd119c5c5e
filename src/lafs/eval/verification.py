"""Verification metrics on scored pairs (the full 10-fold protocol lands with the evaluation suite)."""

from __future__ import annotations

import numpy as np


def roc_auc(scores, issame) -> float:
    """Area under the ROC curve = P(genuine score > impostor score), ties counted half.

    Computed from average ranks (Mann-Whitney U / (n_pos n_neg)) in O(n log n), so it scales to the
    millions of pairs of IJB-C.
    """
    scores = np.asarray(scores, np.float64).ravel()
    issame = np.asarray(issame, bool).ravel()
    n_pos, n_neg = int(issame.sum()), int((~issame).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs genuine and impostor pairs, got {n_pos} and {n_neg}")
    order = np.argsort(scores, kind="mergesort")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = np.empty(len(scores))
    ranks[order] = ((ends - counts + 1 + ends) / 2.0)[inverse]  # tied scores share their mean rank
    return float((ranks[issame].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
