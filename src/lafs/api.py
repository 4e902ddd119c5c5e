"""The Python API: what ``lafs embed``, ``lafs verify`` and ``lafs eval`` do, from a script or a notebook.

It wraps the same code as the commands (``lafs.embedder``, ``lafs.inference``, ``lafs.eval.report``), so a number
from the API and the same number from the command line agree::

    import lafs

    model = lafs.load("runs/micro/checkpoints/best.pt")       # a checkpoint, TorchScript or ONNX file
    emb = lafs.embed(model, ["a.jpg", "b.jpg"])               # 2 x D float32, rows of unit norm
    emb @ emb.T                                               # cosine similarities
    lafs.verify(model, "a.jpg", "b.jpg")                      # {'score': ..., 'threshold': ..., 'same': ...}
    lafs.evaluate(model, "lfw.bin")["accuracy"]               # 10-fold accuracy, as lafs eval prints it

Files are decoded like ``lafs embed``: an aligned 112 x 112 crop is used as it is, any other photo goes through the
optional detector and alignment (extra ``detect``). Arrays and tensors are taken as aligned crops (any square size:
the model resizes them); align raw photos first, or pass their files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
    import torch

    from .embedder import Embedder

PathLike = Union[str, "os.PathLike[str]"]
#: a model: an :class:`~lafs.embedder.Embedder` from :func:`load`, or the path of a model file (loaded on each call)
ModelLike = Union["Embedder", str, "os.PathLike[str]"]
#: images: file paths, a uint8 RGB array N x H x W x 3 (or one H x W x 3), or a uint8 tensor N x 3 x H x W (or one)
Images = Union[PathLike, Sequence[PathLike], np.ndarray, "torch.Tensor"]

__all__ = ["embed", "evaluate", "load", "verify"]


def load(path: PathLike, device: str = "cpu", amp: str = "none", compile: bool = False) -> Embedder:
    """Open a model file once, for many :func:`embed` / :func:`verify` / :func:`evaluate` calls.

    ``path``: a ``lafs train`` / ``finetune`` / ``pretrain`` checkpoint, a TorchScript module or an ONNX file (see
    ``lafs.embedder``). ``amp="bf16"`` (or ``"fp16"`` on a GPU) runs a lafs checkpoint under autocast; embeddings
    stay float32. The model remembers ``device``, so later calls move their images there.

    >>> model = lafs.load("runs/micro/checkpoints/best.pt")  # doctest: +SKIP
    >>> model.description, model.threshold  # doctest: +SKIP
    ('part_fvit-micro (model of best.pt, step 2000)', 0.31)
    """
    from .embedder import load_embedder

    model = load_embedder(path, device, amp=amp, compile=compile)
    model.device = str(device)
    return model


def _model(model: ModelLike, device: str | None) -> Embedder:
    from .embedder import Embedder

    if isinstance(model, Embedder):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load(model, device or "cpu")
    raise TypeError(f"model must be an Embedder (lafs.load) or a model file path, got {type(model).__name__}")


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _crops(images: Any) -> torch.Tensor:
    """An array / tensor of aligned crops -> uint8 N x 3 x H x W tensor (contiguous); errors name the shape."""
    import torch

    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 RGB (0-255), got {images.dtype}")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"an image array must be N x H x W x 3 (or H x W x 3) RGB, got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"image tensors must be uint8 RGB (0-255), got {images.dtype}")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"an image tensor must be N x 3 x H x W (or 3 x H x W) RGB, got shape "
                             f"{tuple(images.shape)}")
        return images.detach().cpu().contiguous()
    raise TypeError(f"images must be file paths, a uint8 numpy array or a uint8 torch tensor, got "
                    f"{type(images).__name__}")


def embed(model: ModelLike, images: Images, *, batch_size: int = 64, flip: bool = True, detect: str = "auto",
          device: str | None = None) -> np.ndarray:
    """Unit-norm face embeddings, one float32 row per image, in order: N x D.

    ``images``: a list of image files (decoded, and detected + aligned when they are not 112 x 112 crops, as
    ``lafs embed`` does; ``detect`` is its ``--detect``), a uint8 RGB array N x H x W x 3 (or one H x W x 3 image),
    or a uint8 tensor N x 3 x H x W; arrays and tensors are aligned crops, used as they are. ``flip`` adds the
    horizontally flipped image's embedding before normalising (the flip test of every reported number). ``device``
    defaults to the one the model was loaded on.

    >>> emb = lafs.embed(model, ["a.jpg", "b.jpg"])  # doctest: +SKIP
    >>> emb.shape, float(emb[0] @ emb[1])  # doctest: +SKIP
    ((2, 512), 0.64)
    >>> lafs.embed(model, np.zeros((4, 112, 112, 3), np.uint8)).shape  # doctest: +SKIP
    (4, 512)
    """
    from .inference import embed_crops, embed_files

    m = _model(model, device)
    device = device or m.device
    if _is_path(images):
        images = [images]
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = list(images)
        if not items:
            raise ValueError("no images given")
        if all(_is_path(p) for p in items):
            return embed_files(m, items, detect, batch_size, flip, device)
        if all(isinstance(p, np.ndarray) for p in items):
            images = np.stack(items)
        else:
            raise TypeError("a list of images must hold only file paths or only H x W x 3 arrays")
    return embed_crops(m, _crops(images), batch_size=batch_size, flip=flip, device=device)


def verify(model: ModelLike, image_a: Images, image_b: Images, threshold: float | None = None, *,
           detect: str = "auto", device: str | None = None) -> dict[str, Any]:
    """Are two face images the same person? As ``lafs verify``: the cosine similarity of their (flip-test, unit)
    embeddings against ``threshold``, by default the one stored with the model by its latest validation.

    Each image is a file path, an H x W x 3 uint8 array or a 3 x H x W uint8 tensor. Returns ``score``,
    ``threshold`` (None when neither given nor stored), ``threshold_source`` and ``same`` (None without a threshold).

    >>> lafs.verify(model, "a.jpg", "b.jpg")  # doctest: +SKIP
    {'score': 0.64, 'threshold': 0.31, 'threshold_source': 'synthetic_val validation at step 2000, ...', 'same': True}
    """
    from .inference import decide

    m = _model(model, device)
    if _is_path(image_a) and _is_path(image_b):
        emb = embed(m, [image_a, image_b], detect=detect, device=device)
    else:
        emb = np.concatenate([embed(m, image_a, detect=detect, device=device),
                              embed(m, image_b, detect=detect, device=device)])
    if len(emb) != 2:
        raise ValueError(f"verify compares two images, got {len(emb)}: pass one image for each of image_a and image_b")
    return decide(m, float(emb[0] @ emb[1]), threshold)


def evaluate(model: ModelLike, bin_path: PathLike, *, batch_size: int = 256, flip: bool = True,
             flip_mode: str = "sum", color: str = "rgb", keypoints: PathLike | None = None,
             thresholds: str = "reference", cache_dir: PathLike | None = None,
             device: str | None = None) -> dict[str, Any]:
    """The 10-fold verification protocol on a ``.bin`` pair set (LFW, CFP-FP, AgeDB-30, ...), as ``lafs eval --sets``.

    Options mirror ``lafs eval``: ``flip`` / ``flip_mode`` (flip test), ``color`` (channel order the .bin stores),
    ``keypoints`` (N x 5 x 2 .npy for keypoint models; default the ``<set>_kps.npy`` sidecar), ``thresholds``
    (``"reference"``: insightface's grid, comparable with papers; ``"exact"``: every midpoint) and ``cache_dir``
    (embedding cache; none by default). Returns ``accuracy``, ``accuracy_std``, ``auc``, ``eer``, ``tar_at_far``,
    ``threshold``, ``fold_accuracies``, ... (``lafs.eval.metrics.ten_fold_accuracy``), with ``name``, ``pairs``
    and ``cached``.

    >>> r = lafs.evaluate(model, "../shared/data/lfw/lfw.bin")  # doctest: +SKIP
    >>> f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} %"  # doctest: +SKIP
    '99.12 +- 0.41 %'
    """
    from .eval import report

    if thresholds not in ("reference", "exact"):
        raise ValueError(f"thresholds must be 'reference' or 'exact', got {thresholds!r}")
    if not Path(bin_path).is_file():
        raise FileNotFoundError(f"verification set not found: {bin_path}")
    m = _model(model, device)
    emb, issame, cached = report.set_embeddings(m, bin_path, m.file_hash, color=color, batch_size=batch_size,
                                                device=device or m.device, flip=flip, flip_mode=flip_mode,
                                                cache_dir=cache_dir, keypoints_path=keypoints)
    r = report.score_pairs(emb, issame, Path(bin_path).stem, None if thresholds == "reference" else thresholds)
    out = {k: v for k, v in r.items() if not k.startswith("_")}  # _dist / _issame: arrays for lafs eval's plots
    out["cached"] = cached
    return out
