"""ROC AUC against hand-counted values."""

import numpy as np
import pytest

from lafs.eval.verification import roc_auc


def test_roc_auc_by_hand():
    # genuine 0.9, 0.4; impostor 0.5, 0.1: 3 of 4 genuine-impostor orderings are right.
    assert roc_auc([0.9, 0.5, 0.4, 0.1], [True, False, True, False]) == 0.75
    # one tie between a genuine and an impostor score counts half: (1 + 0.5) / 2.
    assert roc_auc([0.7, 0.3, 0.3], [True, True, False]) == 0.75
    assert roc_auc([1.0, 0.0], [True, False]) == 1.0 and roc_auc([0.0, 1.0], [True, False]) == 0.0


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    same = rng.random(300) < 0.4
    diff = scores[same][:, None] - scores[~same][None, :]
    assert roc_auc(scores, same) == pytest.approx((diff > 0).mean() + 0.5 * (diff == 0).mean())
    with pytest.raises(ValueError, match="genuine and impostor"):
        roc_auc([0.1, 0.2], [True, True])
