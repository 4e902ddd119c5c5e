"""Pair verification: ROC AUC and the 10-fold protocol of LFW / CFP-FP / AgeDB-30 ``.bin`` files.

Protocol (lafs_spec §8; insightface/face.evoLVe ``verification.evaluate``, which LAFS's ``perform_val`` calls):
each image and its horizontal flip are embedded, the two embeddings summed, then L2-normalised; the score is the
squared Euclidean distance (= 2 - 2 cos); 10 contiguous, unshuffled folds; per fold the threshold from
``arange(0, 4, 0.01)`` with the best accuracy on the other 9 folds is applied to the held-out fold, and the mean
(± std) over folds is reported. A pair is accepted when ``dist < threshold`` (strict, as insightface).

Scaling: pixels go to the model as ``x / 127.5 - 1`` in [-1, 1], the training range, for every batch. The reference
``perform_val`` feeds ``x/255 - 0.5`` and leaves the last partial batch unscaled (lafs_spec §9 item 11); we do not
copy that, so scores here can differ slightly from numbers produced by the reference script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.datasets import decode_image, to_model_range
from ..data.pairs import read_bin


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


def ten_fold_accuracy(
    embeddings1,
    embeddings2,
    issame,
    nfolds: int = 10,
    thresholds=None,
    far_target: float = 1e-3,
    val_thresholds=None,
) -> dict:
    """insightface ``evaluate`` on pairs (embeddings1[k], embeddings2[k]); see the module docstring.

    Embeddings are L2-normalised here (a no-op for normalised input) because the threshold grid covers [0, 4].
    ``nfolds=1`` trains and tests on all pairs (insightface ``LFold``). Thresholds are sorted; on a tie in train
    accuracy the smallest threshold wins (``np.argmax``, as insightface on its ascending grid).

    VAL@FAR: per fold, the largest threshold of ``val_thresholds`` (default ``arange(0, 4, 0.001)``, insightface's grid)
    whose train-fold FAR is <= ``far_target`` is applied to the test fold; ``val_at_far`` / ``far`` are the means over
    folds (folds without genuine / impostor pairs are skipped). insightface instead interpolates the threshold with
    ``interp1d`` over a FAR curve full of repeated values, which is ill-defined (both pick a threshold where the train
    FAR crosses the target, but the values can differ slightly).

    Returns accuracy, accuracy_std, threshold (mean best threshold), fold_accuracies, fold_thresholds,
    val_at_far, val_std, far and auc (``roc_auc(-dist, issame)``).
    """
    e1 = np.asarray(embeddings1, np.float64)
    e2 = np.asarray(embeddings2, np.float64)
    issame = np.asarray(issame, bool).ravel()
    if e1.ndim != 2 or e1.shape != e2.shape or len(e1) != len(issame):
        raise ValueError(f"embeddings {e1.shape} and {e2.shape} for {len(issame)} pairs: expected two (pairs, D)")
    e1 = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-12)
    e2 = e2 / np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-12)
    dist = np.sum((e1 - e2) ** 2, axis=1)
    thresholds = np.sort(np.asarray(np.arange(0, 4, 0.01) if thresholds is None else thresholds, np.float64))
    val_thresholds = np.sort(
        np.asarray(np.arange(0, 4, 0.001) if val_thresholds is None else val_thresholds, np.float64)
    )

    n = len(issame)
    folds = fold_ids(n, nfolds)
    n_same = np.bincount(folds, weights=issame, minlength=nfolds).astype(np.int64)  # per test fold
    n_pairs = np.bincount(folds, minlength=nfolds)
    n_diff = n_pairs - n_same

    def train(count):  # train fold = all pairs minus the test fold (or all of them for a single fold)
        return count if nfolds == 1 else count.sum(axis=0, keepdims=True) - count

    # Accuracy: integer counts of correct decisions, so ties in argmax are exact.
    tp, fp = _accept_counts(dist, issame, folds, nfolds, thresholds)
    correct_train = train(tp) + (train(n_diff[:, None]) - train(fp))
    best = np.argmax(correct_train, axis=1)
    rows = np.arange(nfolds)
    fold_acc = (tp[rows, best] + n_diff - fp[rows, best]) / n_pairs

    # VAL@FAR: train FAR is non-decreasing in the threshold, so the last index with FAR <= target is a count - 1.
    tp_v, fp_v = _accept_counts(dist, issame, folds, nfolds, val_thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        far_train = train(fp_v) / train(n_diff[:, None])
        pick = np.maximum(np.sum(far_train <= far_target, axis=1) - 1, 0)
        val = tp_v[rows, pick] / n_same
        far = fp_v[rows, pick] / n_diff
    val, far = val[n_same > 0], far[n_diff > 0]

    return {
        "accuracy": float(fold_acc.mean()),
        "accuracy_std": float(fold_acc.std()),
        "threshold": float(thresholds[best].mean()),
        "fold_accuracies": fold_acc.tolist(),
        "fold_thresholds": thresholds[best].tolist(),
        "val_at_far": float(val.mean()) if len(val) else float("nan"),
        "val_std": float(val.std()) if len(val) else float("nan"),
        "far": float(far.mean()) if len(far) else float("nan"),
        "auc": roc_auc(-dist, issame),
    }


def load_bin(path: str | Path, color: str = "rgb", image_size: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """A ``.bin`` pair file -> (uint8 N x 3 x H x W RGB images, issame bool array of N / 2 pairs).

    Pair k is images 2k and 2k+1. All images must have one size: ``image_size`` (square) if given, else the size of
    image 0. ``color`` is the channel order the file stores (``decode_image``).
    """
    path = Path(path)
    encoded, issame = read_bin(path)
    if not encoded:
        raise ValueError(f"{path}: no images")
    out = None
    for i, data in enumerate(encoded):
        img = decode_image(data, color, source=f"{path}: image {i}")
        if out is None:
            h, w = (image_size, image_size) if image_size is not None else img.shape[:2]
            out = np.empty((len(encoded), 3, h, w), np.uint8)
        if img.shape[:2] != out.shape[2:]:
            raise ValueError(f"{path}: image {i} is {img.shape[1]}x{img.shape[0]}, expected {w}x{h} (W x H)")
        out[i] = img.transpose(2, 0, 1)
    return torch.from_numpy(out), issame


def embed_images(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int = 256,
    device="cpu",
    flip: bool = True,
) -> torch.Tensor:
    """uint8 N x 3 x H x W RGB -> float32 CPU N x D embeddings (not normalised), under ``torch.no_grad()``.

    ``embed_fn`` maps float B x 3 x H x W in [-1, 1] (on ``device``) to B x D, e.g. ``lambda x: model(x)["embedding"]``.
    Every batch, the last partial one included, is scaled ``x / 127.5 - 1``. ``flip`` adds the embedding of the
    horizontally flipped batch (flip test). The model's train/eval mode is left alone: call ``model.eval()`` first,
    or dropout and batch-norm statistics change the embeddings.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 N x 3 x H x W tensor, got {got}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_model_range(images[start : start + batch_size].to(device))
            emb = embed_fn(x)
            if flip:
                emb = emb + embed_fn(x.flip(3))
            if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or len(emb) != len(x):
                shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                raise ValueError(f"embed_fn must return a {len(x)} x D tensor for {len(x)} images, got {shape}")
            chunks.append(emb.float().cpu())
    if not chunks:
        raise ValueError("no images to embed")
    return torch.cat(chunks)


def evaluate_pairs(embed_fn, images, issame, batch_size=256, device="cpu", flip=True, nfolds=10) -> dict:
    """Embed (pair k = images 2k, 2k+1; flip summed), then ``ten_fold_accuracy`` (which L2-normalises)."""
    issame = np.asarray(issame, bool).ravel()
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    emb = embed_images(embed_fn, images, batch_size=batch_size, device=device, flip=flip).numpy()
    return ten_fold_accuracy(emb[0::2], emb[1::2], issame, nfolds=nfolds)


def evaluate_bin(
    embed_fn,
    path: str | Path,
    *,
    color: str = "rgb",
    image_size: int | None = None,
    batch_size: int = 256,
    device="cpu",
    flip: bool = True,
    nfolds: int = 10,
) -> dict:
    """``load_bin`` + ``evaluate_pairs``; the result also has ``name`` (file stem) and ``pairs``."""
    images, issame = load_bin(path, color=color, image_size=image_size)
    result = evaluate_pairs(embed_fn, images, issame, batch_size=batch_size, device=device, flip=flip, nfolds=nfolds)
    return {"name": Path(path).stem, "pairs": len(issame), **result}
