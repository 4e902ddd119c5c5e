"""Evaluation, a straight pipe beside training (it never imports it): ``embedding`` (a model over images, the flip
test) -> ``metrics`` (numpy: ROC, AUC, EER, TAR@FAR, the 10-fold protocol) -> ``report``. Sets come from ``lafs.data``
(``.bin`` pairs and their keypoints, ``lafs.data.pairs``)."""
