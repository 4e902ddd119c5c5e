"""A model over face images: embeddings of a set (flip test included), and a ``.bin``'s pairs scored by them.

The embedding step between the data (:mod:`lafs.data.pairs` reads a ``.bin``) and the metrics
(:mod:`lafs.eval.metrics`): a ``.bin`` reaches its accuracy as ``load_bin`` -> :func:`embed_images` ->
``ten_fold_accuracy`` (:func:`evaluate_bin`). Any embedding function works: a ``lafs.embedder.Embedder``, a
training task's ``embed``, a lambda.

- Flip test (``flip`` / ``flip_mode``): ``"sum"`` (the reference: emb(x) + emb(flip x), as insightface /
  face.evoLVe's ``perform_val``) or ``"concat"`` ([emb(x), emb(flip x)], 2D-dimensional; the halves are not
  normalised separately, the whole vector is L2-normalised by ``ten_fold_accuracy``).
- Scaling: pixels go to the model as ``x / 127.5 - 1`` in [-1, 1], the training range, for every batch. The
  official LAFS code's ``perform_val`` feeds ``x/255 - 0.5`` and leaves the last partial batch unscaled; we do not
  copy that, so scores here can differ slightly from numbers produced by the reference script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.datasets import to_model_range
from ..data.pairs import load_bin
from ..geometry import flip_keypoints
from .metrics import ten_fold_accuracy


def embed_images(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int = 256,
    device="cpu",
    flip: bool = True,
    flip_mode: str = "sum",
    keypoints=None,
) -> torch.Tensor:
    """uint8 N x 3 x H x W RGB -> float32 CPU N x D embeddings (not normalised), under ``torch.no_grad()``.

    ``embed_fn`` maps float B x 3 x H x W in [-1, 1] (on ``device``) to B x D, e.g. ``lambda x: model(x)["embedding"]``.
    Every batch, the last partial one included, is scaled ``x / 127.5 - 1``. ``flip`` adds the embedding of the
    horizontally flipped batch (flip test): ``flip_mode="sum"`` returns emb(x) + emb(flip x) (N x D, the reference),
    ``"concat"`` returns [emb(x), emb(flip x)] (N x 2D, halves not normalised). ``flip_mode`` needs ``flip=True``
    to mean anything; ``"concat"`` with ``flip=False`` is an error. The model's train/eval mode is left alone: call
    ``model.eval()`` first, or dropout and batch-norm statistics change the embeddings.

    ``keypoints`` (N x 5 x 2 pixels of ``images``), for keypoint-aware models: ``embed_fn(x, keypoints=k)`` is called,
    and the flipped batch gets the flipped keypoints (``lafs.geometry.flip_keypoints``: mirrored x, left/right swapped).
    """
    if flip_mode not in ("sum", "concat"):
        raise ValueError(f"flip_mode must be 'sum' or 'concat', got {flip_mode!r}")
    if flip_mode == "concat" and not flip:
        raise ValueError("flip_mode='concat' needs flip=True (there is no flipped embedding to concatenate)")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 N x 3 x H x W tensor, got {got}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if keypoints is not None:
        keypoints = torch.as_tensor(np.asarray(keypoints, np.float32))
        if keypoints.shape != (len(images), 5, 2):
            raise ValueError(f"keypoints of shape {tuple(keypoints.shape)} for {len(images)} images: expected "
                             f"({len(images)}, 5, 2)")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_model_range(images[start : start + batch_size].to(device))
            if keypoints is None:
                embs = [embed_fn(x)] + ([embed_fn(x.flip(3))] if flip else [])
            else:
                k = keypoints[start : start + batch_size].to(device)
                embs = [embed_fn(x, keypoints=k)]
                if flip:
                    embs.append(embed_fn(x.flip(3), keypoints=flip_keypoints(k, x.shape[-1])))
            for emb in embs:
                if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or len(emb) != len(x):
                    shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                    raise ValueError(f"embed_fn must return a {len(x)} x D tensor for {len(x)} images, got {shape}")
            emb = embs[0] if not flip else (embs[0] + embs[1] if flip_mode == "sum" else torch.cat(embs, dim=1))
            chunks.append(emb.float().cpu())
    if not chunks:
        raise ValueError("no images to embed")
    return torch.cat(chunks)


def evaluate_pairs(
    embed_fn,
    images,
    issame,
    batch_size=256,
    device="cpu",
    flip=True,
    nfolds=10,
    *,
    flip_mode: str = "sum",
    thresholds=None,
    keypoints=None,
) -> dict:
    """Embed (pair k = images 2k, 2k+1; flip summed or concatenated; ``keypoints`` for keypoint models, see
    ``embed_images``), then ``ten_fold_accuracy`` (L2-normalises)."""
    issame = np.asarray(issame, bool).ravel()
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    emb = embed_images(embed_fn, images, batch_size=batch_size, device=device, flip=flip, flip_mode=flip_mode,
                       keypoints=keypoints).numpy()
    return ten_fold_accuracy(emb[0::2], emb[1::2], issame, nfolds=nfolds, thresholds=thresholds)


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
    flip_mode: str = "sum",
    thresholds=None,
) -> dict:
    """``load_bin`` + ``evaluate_pairs``; the result also has ``name`` (file stem) and ``pairs``."""
    images, issame = load_bin(path, color=color, image_size=image_size)
    result = evaluate_pairs(embed_fn, images, issame, batch_size=batch_size, device=device, flip=flip, nfolds=nfolds,
                            flip_mode=flip_mode, thresholds=thresholds)
    return {"name": Path(path).stem, "pairs": len(issame), **result}
