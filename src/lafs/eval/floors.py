"""Floors: the verification accuracies a face model must beat before its own accuracy means anything.

A pair set is never 50 % hard: lighting, pose, background and image statistics shared by the two images of a genuine
pair already separate many pairs, so a model with "60 %" may have learnt nothing at all. Each accuracy is therefore
shown beside three floors, scored by the same 10-fold protocol (``metrics.ten_fold_accuracy``, flip test
included):

- ``raw_pixels``: the cosine of the pixel vectors, in the model's input range ``x / 127.5 - 1`` (the identity
  "network"; at the images' own size unless ``raw_size``);
- ``pca_whitened``: pixels area-downsampled to ``size`` x ``size``, projected on the top ``components`` principal
  directions of *unlabelled training images* and whitened (Turk & Pentland's eigenfaces with the variance of each
  direction equalised): what second-order image statistics alone give, with no identity labels;
- ``untrained``: the model's own architecture at its random initialisation (the run's seed), embedded exactly like
  the trained model: what the architecture's inductive bias gives before any learning.

The images fed to the floors must be in the geometry the model sees (the same aligned crops, the same ``.bin``):
the caller passes them, nothing here crops or aligns. Numpy and torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .embedding import evaluate_pairs
from .metrics import ten_fold_accuracy

FLOOR_KEYS = ("raw_pixels", "pca_whitened", "untrained")


def _as_images(images, what: str) -> torch.Tensor:
    """uint8 N x 3 x H x W (torch or numpy) -> torch tensor; anything else is a ValueError naming ``what``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{what} must be a uint8 N x 3 x H x W tensor, got {got}")
    if len(images) == 0:
        raise ValueError(f"{what}: no images")
    return images


def area_downsample(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Area (box) downsampling: every output pixel is the mean of its input pixels, so no detail is invented."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="area")


def raw_pixel_embeddings(images, size: int | None = None) -> np.ndarray:
    """uint8 N x 3 x H x W -> float64 N x D: the pixels as one vector, in the model's input range ``x / 127.5 - 1``
    (optionally area-downsampled to ``size`` x ``size`` first).

    Centring on 0 is what the model receives; the cosine of uncentred 0..255 vectors would put every pair near 1,
    finer than the reference threshold grid resolves.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 (or None for the images' own size), got {size}")
    x = _as_images(images, "images").to(torch.float64).div_(127.5).sub_(1.0)
    return area_downsample(x, size).flatten(1).numpy()


def subsample_indices(n: int, max_images: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most ``max_images`` of ``n`` images, drawn without replacement with ``seed`` (all of
    them, in order, when ``n <= max_images``). Sorted so records are read front to back."""
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if n <= max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))


class PCAWhitening:
    """PCA whitening of area-downsampled pixels: ``transform(x) = (x - mean) @ directions / scale``.

    ``scale`` is the standard deviation of the fit images along each direction (their singular value / sqrt(n - 1)),
    so the transformed fit images have zero mean and identity covariance. Pixels are in the model's range
    ``x / 127.5 - 1`` (whitening makes the scale irrelevant; the choice only fixes the units of ``mean``).
    """

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None  # D (float32)
        self.directions: torch.Tensor | None = None  # D x components (orthonormal columns, float32)
        self.singular_values: torch.Tensor | None = None  # components, descending (float64)
        self.scale: torch.Tensor | None = None  # components: std along each direction (float64)
        self.size = 0
        self.n_images = 0

    @property
    def components(self) -> int:
        return 0 if self.directions is None else int(self.directions.shape[1])

    def _vectors(self, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        """float32 N x 3*size*size, in batches (full-size float copies of 20000 images would not fit in memory)."""
        d = 3 * self.size * self.size
        out = torch.empty(len(images), d, dtype=torch.float32)
        for s in range(0, len(images), batch):
            x = images[s : s + batch].to(torch.float32).div_(127.5).sub_(1.0)
            out[s : s + batch] = area_downsample(x, self.size).flatten(1)
        return out

    def fit(self, images, components: int = 256, size: int = 32, max_images: int = 20000,
            seed: int = 0) -> PCAWhitening:
        """Fit on unlabelled uint8 N x 3 x H x W images (at most ``max_images``, a seeded subsample); returns self.

        ``torch.svd_lowrank`` (q = components + 10, 4 power iterations) in float32 finds the subspace: a full SVD of
        20000 x 3072 takes minutes on 2 cores. The directions are then rotated to the exact principal axes *within*
        that subspace (an eigendecomposition of the projected k x k covariance, in float64), so the whitened fit
        images have identity covariance however rough the randomized subspace is.
        """
        images = _as_images(images, "PCA fit images")
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        idx = subsample_indices(len(images), max_images, seed)
        if len(idx) < len(images):
            images = images[torch.from_numpy(idx)]
        n, d = len(images), 3 * size * size
        if components >= n:
            raise ValueError(f"PCA with {components} components needs more than {components} fit images, got {n} "
                             f"(fewer components, or more fit images)")
        if components > d:
            raise ValueError(f"{components} components exceed the {d} dimensions of 3 x {size} x {size} images "
                             f"(fewer components or a larger size)")
        self.size = size
        x = self._vectors(images)
        mean = x.mean(0)
        x -= mean
        if not bool(torch.any(x != 0)):
            raise ValueError(f"the {n} PCA fit images are all identical: there is no variance to whiten")
        with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global RNG: seeded, and left untouched
            torch.manual_seed(seed)
            _, _, v = torch.svd_lowrank(x, q=min(components + 10, n, d), niter=4)
        v = v[:, :components]
        y = (x @ v).to(torch.float64)
        evals, rot = torch.linalg.eigh(y.T @ y)  # ascending
        evals, rot = evals.flip(0).clamp_min(0.0), rot.flip(1)
        self.mean = mean
        self.directions = (v.to(torch.float64) @ rot).to(torch.float32)
        self.singular_values = evals.sqrt()
        std = self.singular_values / math.sqrt(n - 1)
        # directions without variance (fewer distinct images than components) would divide by ~0: cap their gain
        self.scale = std.clamp_min(float(std[0]) * 1e-6)
        self.n_images = n
        return self

    def transform(self, images) -> np.ndarray:
        """uint8 N x 3 x H x W (any size; area-downsampled to the fitted size) -> float64 N x components, whitened."""
        if self.directions is None:
            raise ValueError("PCAWhitening.transform before fit: call fit(images) first")
        images = _as_images(images, "images")
        y = (self._vectors(images) - self.mean) @ self.directions
        return (y.to(torch.float64) / self.scale).numpy()


def _pair_cosines(embed: Callable[[torch.Tensor], np.ndarray], images: torch.Tensor, flip: bool, flip_mode: str,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cos, zero1, zero2) per pair k = images 2k, 2k+1, embedding ``batch_size`` images at a time; the flip test as
    ``embed_images`` (sum, or concatenation). Zero vectors are flagged: ``pair_distances`` treats them apart."""
    n = len(images) // 2
    cos, z1, z2 = np.zeros(n), np.zeros(n, bool), np.zeros(n, bool)
    step = max(2, batch_size - batch_size % 2)  # an even number of images: pairs never straddle batches
    for s in range(0, len(images), step):
        x = images[s : s + step]
        e = embed(x)
        if flip:
            f = embed(x.flip(3))
            e = e + f if flip_mode == "sum" else np.concatenate([e, f], axis=1)
        a, b = e[0::2], e[1::2]
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        k = slice(s // 2, s // 2 + len(a))
        z1[k], z2[k] = na == 0, nb == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            cos[k] = np.where(z1[k] | z2[k], 0.0, np.einsum("ij,ij->i", a, b) / (na * nb))
    return np.clip(cos, -1.0, 1.0), z1, z2


def _score_cosines(cos: np.ndarray, zero1: np.ndarray, zero2: np.ndarray, issame, nfolds: int, thresholds) -> dict:
    """``ten_fold_accuracy`` of pairs known only by their cosine: pair k becomes two 2-D vectors with cosine cos[k]
    (zero vectors stay zero), which is all the protocol looks at. Raw 112 px LFW as float64 rows would be 3.6 GB."""
    e1 = np.stack([np.where(zero1, 0.0, 1.0), np.zeros_like(cos)], axis=1)
    e2 = np.stack([cos, np.sqrt(1.0 - cos * cos)], axis=1)
    e2[zero2] = 0.0
    return ten_fold_accuracy(e1, e2, issame, nfolds=nfolds, thresholds=thresholds)


def _with_std(result: dict) -> dict:
    result["std"] = result["accuracy_std"]  # the short name the floor tables use
    return result


def floor_accuracies(
    images,
    issame,
    fit_images=None,
    untrained_embed_fn: Callable[..., torch.Tensor] | None = None,
    *,
    size: int = 32,
    components: int = 256,
    flip: bool = True,
    flip_mode: str = "sum",
    raw_size: int | None = None,
    max_images: int = 20000,
    seed: int = 0,
    nfolds: int = 10,
    thresholds=None,
    batch_size: int = 256,
    device="cpu",
    keypoints=None,
    untrained_embeddings: np.ndarray | None = None,
    scores: bool = False,
) -> dict:
    """The floors of one pair set (pair k = images 2k, 2k+1, as ``evaluate_pairs``); see the module docstring.

    Returns ``raw_pixels``, ``pca_whitened`` (when ``fit_images`` is given: uint8 images to fit on, or a fitted
    :class:`PCAWhitening`) and ``untrained`` (when ``untrained_embed_fn``, e.g. an ``Embedder`` of a freshly built
    backbone in eval mode, or its precomputed ``untrained_embeddings``, one row per image, are given), each the
    ``ten_fold_accuracy`` result plus ``std`` (= ``accuracy_std``), and ``settings``. ``flip``, ``flip_mode``,
    ``nfolds`` and ``thresholds`` should be the model's own, so the comparison is like for like; ``keypoints``
    (N x 5 x 2) go to a keypoint-aware untrained network. ``scores``: each floor also carries ``cosines``, the
    per-pair cosine it was scored on (flip test included), e.g. for a ROC picture; raw pixels and PCA only.
    """
    images = _as_images(images, "images")
    issame = np.asarray(issame, bool).ravel()
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (expected {2 * len(issame)}: pair k is "
                         "images 2k, 2k+1)")
    if flip_mode not in ("sum", "concat"):
        raise ValueError(f"flip_mode must be 'sum' or 'concat', got {flip_mode!r}")
    out: dict = {}
    cos = _pair_cosines(lambda x: raw_pixel_embeddings(x, raw_size), images, flip, flip_mode, batch_size)
    out["raw_pixels"] = _with_std(_score_cosines(*cos, issame, nfolds, thresholds))
    if scores:
        out["raw_pixels"]["cosines"] = cos[0]
    pca = None
    if fit_images is not None:
        pca = fit_images if isinstance(fit_images, PCAWhitening) else PCAWhitening().fit(
            fit_images, components=components, size=size, max_images=max_images, seed=seed)
        cos = _pair_cosines(pca.transform, images, flip, flip_mode, batch_size)
        out["pca_whitened"] = _with_std(_score_cosines(*cos, issame, nfolds, thresholds))
        if scores:
            out["pca_whitened"]["cosines"] = cos[0]
    if untrained_embeddings is not None:
        emb = np.asarray(untrained_embeddings)
        if emb.ndim != 2 or len(emb) != len(images):
            raise ValueError(f"untrained_embeddings of shape {emb.shape} for {len(images)} images: expected one row "
                             "per image")
        out["untrained"] = _with_std(ten_fold_accuracy(emb[0::2], emb[1::2], issame, nfolds=nfolds,
                                                       thresholds=thresholds))
    elif untrained_embed_fn is not None:
        out["untrained"] = _with_std(evaluate_pairs(untrained_embed_fn, images, issame, batch_size=batch_size,
                                                    device=device, flip=flip, nfolds=nfolds, flip_mode=flip_mode,
                                                    thresholds=thresholds, keypoints=keypoints))
    out["settings"] = {
        "raw_size": raw_size if raw_size is not None else int(images.shape[-1]),
        "size": pca.size if pca is not None else size,
        "components": pca.components if pca is not None else components,
        "fit_images": pca.n_images if pca is not None else 0,
        "flip": flip,
        "flip_mode": flip_mode,
        "nfolds": nfolds,
        "thresholds": thresholds if isinstance(thresholds, str) or thresholds is None else "custom",
    }
    return out


def floors_for_sets(sets: dict, fit_images=None, untrained_embed_fn: Callable[..., torch.Tensor] | None = None,
                    **kwargs) -> dict[str, dict]:
    """``floor_accuracies`` of several sets, ``{name: (images, issame)}`` or ``{name: (images, issame, keypoints)}``
    (the training loop's validation sets); the PCA is fitted once on ``fit_images`` and shared. ``kwargs`` go to
    ``floor_accuracies`` (``size``, ``components``, ``max_images`` and ``seed`` also to the fit)."""
    if fit_images is not None and not isinstance(fit_images, PCAWhitening):
        fit_images = PCAWhitening().fit(fit_images, components=kwargs.get("components", 256),
                                        size=kwargs.get("size", 32), max_images=kwargs.get("max_images", 20000),
                                        seed=kwargs.get("seed", 0))
    out = {}
    for name, value in sets.items():
        if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
            raise ValueError(f"set {name!r}: expected (images, issame) or (images, issame, keypoints)")
        images, issame = value[0], value[1]
        kps = value[2] if len(value) == 3 else None
        try:
            out[name] = floor_accuracies(images, issame, fit_images, untrained_embed_fn, keypoints=kps, **kwargs)
        except ValueError as err:
            raise ValueError(f"set {name!r}: {err}") from None
    return out
