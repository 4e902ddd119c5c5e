"""Probing a representation with identities it never saw: k-NN and linear identification on held-out images.

Self-supervised pretraining has no classifier to read, so DINO (Caron et al. 2021, §4.1 and Appendix) judges its
features by a weighted k-NN classifier and a linear classifier on frozen features. For faces the labels are
identities: from a labelled set, every identity with at least two images gives one *probe* image (drawn with a
seed) and keeps the rest as its *gallery* (k-NN) or *training* images (linear probe). Accuracy is the fraction of
probes given their identity, closed set, chance = 1 / identities.

- k-NN: cosine similarity; k = 1 is the nearest gallery image, k > 1 DINO's vote, each of the k neighbours
  weighted by exp(similarity / 0.07).
- linear: multinomial logistic regression on the L2-normalised, frozen embeddings (full batch, L-BFGS, a small
  L2 penalty), trained on the gallery images, tested on the probes.

Both take any N x D features, so raw pixels and PCA-whitened pixels (``lafs.eval.floors``) are probed by the same
code as models: the floors of the probe.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy", "linear_probe_accuracy", "probe_features", "split_probe_gallery"]


def split_probe_gallery(labels, identities: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(gallery indices, probe indices) of ``labels``: up to ``identities`` identities with >= 2 images (drawn with
    ``seed``; all of them when None), one probe image each, the rest gallery. Sorted indices."""
    labels = np.asarray(labels).ravel()
    ids, counts = np.unique(labels, return_counts=True)
    usable = ids[counts >= 2]
    if len(usable) < 2:
        raise ValueError(f"probing needs >= 2 identities with >= 2 images each; the labels have {len(usable)}")
    rng = np.random.default_rng(seed)
    if identities is not None:
        if identities < 2:
            raise ValueError(f"identities must be >= 2, got {identities}")
        usable = np.sort(rng.choice(usable, min(identities, len(usable)), replace=False))
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], usable)
    ends = np.searchsorted(labels[order], usable, side="right")
    probes, gallery = [], []
    for s, e in zip(starts, ends):
        members = order[s:e]
        pick = int(rng.integers(len(members)))
        probes.append(members[pick])
        gallery.extend(np.delete(members, pick))
    return np.sort(np.asarray(gallery)), np.sort(np.asarray(probes))


def _unit(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if t.ndim != 2 or len(t) == 0:
        raise ValueError(f"{name} must be a non-empty N x D array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: {int((~torch.isfinite(t)).any(1).sum())} rows have non-finite values")
    return F.normalize(t, dim=1)


def knn_accuracy(gallery, gallery_labels, probes, probe_labels, k: int = 1, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
    """Closed-set identification accuracy of a cosine k-NN (k = 1 nearest; k > 1 DINO's exp(s / T) weighted vote)."""
    g, p = _unit(gallery, "gallery"), _unit(probes, "probes")
    gl = torch.as_tensor(np.asarray(gallery_labels)).long().ravel()
    pl = torch.as_tensor(np.asarray(probe_labels)).long().ravel()
    if len(gl) != len(g) or len(pl) != len(p):
        raise ValueError(f"{len(g)} gallery rows with {len(gl)} labels, {len(p)} probes with {len(pl)} labels")
    if not 1 <= k <= len(g):
        raise ValueError(f"k must be in 1..{len(g)} (gallery size), got {k}")
    classes, gl_idx = torch.unique(gl, return_inverse=True)
    correct = 0
    for s in range(0, len(p), chunk):
        sims = p[s:s + chunk] @ g.T
        top, idx = sims.topk(k, dim=1)
        if k == 1:
            pred = classes[gl_idx[idx[:, 0]]]
        else:
            votes = torch.zeros(len(top), len(classes))
            votes.scatter_add_(1, gl_idx[idx], (top / temperature).exp())
            pred = classes[votes.argmax(1)]
        correct += int((pred == pl[s:s + chunk]).sum())
    return correct / len(p)


def linear_probe_accuracy(train, train_labels, test, test_labels, weight_decay: float = 1e-4,
                          iterations: int = 100, seed: int = 0) -> float:
    """Multinomial logistic regression on unit-normalised frozen features (L-BFGS, full batch), test accuracy.

    Test labels that never occur in training count as errors (a linear classifier cannot name them)."""
    x, xt = _unit(train, "train"), _unit(test, "test")
    y_raw = np.asarray(train_labels).ravel()
    yt_raw = np.asarray(test_labels).ravel()
    if len(y_raw) != len(x) or len(yt_raw) != len(xt):
        raise ValueError(f"{len(x)} train rows with {len(y_raw)} labels, {len(xt)} test rows with {len(yt_raw)}")
    classes = np.unique(y_raw)
    y = torch.as_tensor(np.searchsorted(classes, y_raw)).long()
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(x.shape[1], len(classes), generator=gen) * 0.01)
    b = torch.nn.Parameter(torch.zeros(len(classes)))
    # the features are unit vectors, so logits need a scale; a learned one would trade off against the penalty
    scale = 16.0
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(scale * (x @ w) + b, y) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = classes[(scale * (xt @ w) + b).argmax(1).numpy()]
    return float(np.mean(pred == yt_raw))


def probe_features(features, labels, *, identities: int | None = None, seed: int = 0, ks=(1, 20),
                   linear: bool = True) -> dict:
    """k-NN (each k in ``ks``) and linear-probe accuracy of N x D ``features`` of images with ``labels``."""
    features = np.asarray(features)
    labels = np.asarray(labels).ravel()
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    gal, pro = split_probe_gallery(labels, identities, seed)
    out = {"identities": len(pro), "gallery": len(gal), "probes": len(pro),
           "chance": 1.0 / len(pro)}
    for k in ks:
        if k <= len(gal):
            out[f"knn{k}"] = knn_accuracy(features[gal], labels[gal], features[pro], labels[pro], k=k)
    if linear:
        out["linear"] = linear_probe_accuracy(features[gal], labels[gal], features[pro], labels[pro], seed=seed)
    return out
