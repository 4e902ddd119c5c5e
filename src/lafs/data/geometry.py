"""Face geometry: where the five facial points sit in a crop, and bringing a set of crops to another geometry.

A model learns the geometry of its training crops. Train on CelebA's tight eye-aligned 64 px crops and test on
LFW's 112 px ArcFace crops resized to 64 px, and every test face is 14 % smaller and sits 4 px higher than any
face the model saw: the accuracy then measures that gap as much as recognition. A :class:`Geometry` names the
mean position of the five points (ArcFace order: image-left eye, right eye, nose tip, left and right mouth
corner) in a ``size x size`` crop.

:func:`to_geometry` brings a whole verification set into the training geometry with **one** least-squares
similarity (Umeyama, as :mod:`lafs.data.align`) from the set's mean keypoints to the target points, so each crop
keeps the alignment it was made with (no per-image re-alignment with noisy keypoints) and only the frame changes.
A set already in the target geometry (within half a pixel) is returned unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .align import ARCFACE_TEMPLATE, _cv2, estimate_similarity, transform_points

__all__ = ["GEOMETRIES", "Geometry", "get_geometry", "set_geometry", "similarity_scale", "to_geometry", "warp_images"]


@dataclass(frozen=True)
class Geometry:
    """Mean (x, y) pixel positions of the five points (pixel centres at integers) in a ``size x size`` crop."""

    name: str
    points: tuple[tuple[float, float], ...]
    size: int

    def array(self) -> np.ndarray:
        return np.asarray(self.points, np.float64)


def _points(a) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in np.asarray(a, np.float64))


GEOMETRIES: dict[str, Geometry] = {
    # insightface's arcface_dst: every .bin verification set, IJB and the MS1M / WebFace records
    "arcface": Geometry("arcface", _points(ARCFACE_TEMPLATE), 112),
    # CelebA's img_align_celeba crops at 64 px (celeba64 in ../shared/data): the mean of 500 detected faces
    "celeba64": Geometry("celeba64", ((20.55, 33.69), (43.80, 33.62), (32.09, 47.51), (21.76, 58.87),
                                      (42.52, 58.84)), 64),
}


def get_geometry(name: str) -> Geometry:
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise KeyError(f"unknown face geometry {name!r}; known: {', '.join(GEOMETRIES)}") from None


def set_geometry(keypoints, size: int, name: str = "set") -> Geometry:
    """The geometry of a set of ``size x size`` crops: the mean of its (N, 5, 2) keypoints (NaN rows ignored)."""
    kps = np.asarray(keypoints, np.float64)
    if kps.ndim != 3 or kps.shape[1:] != (5, 2):
        raise ValueError(f"{name}: keypoints of shape {kps.shape}, expected (N, 5, 2)")
    good = np.isfinite(kps).all(axis=(1, 2))
    if not good.any():
        raise ValueError(f"{name}: no finite keypoints to take the set's geometry from")
    return Geometry(name, _points(kps[good].mean(0)), int(size))


def similarity_scale(m: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(np.asarray(m, np.float64)[:, :2]))))


def warp_images(images: torch.Tensor, m: np.ndarray, size: int) -> torch.Tensor:
    """uint8 N x 3 x H x W -> uint8 N x 3 x size x size through the 2x3 affine ``m`` (source -> output pixels).

    Shrinking by more than 10 % first area-averages the source (``cv2.INTER_AREA``) to about the output scale, so
    the bilinear warp does not alias; borders replicate the edge pixels (a black frame would be a feature that
    training crops never show).
    """
    cv2 = _cv2()
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError("images must be a uint8 N x 3 x H x W tensor")
    m = np.asarray(m, np.float64)
    h, w = images.shape[2:]
    scale = similarity_scale(m)
    pre = None
    if scale < 0.9:  # area-average first: p_small = (p + 0.5) * r - 0.5, so m' = m o (small -> source)
        r = scale
        sw, sh = max(1, round(w * r)), max(1, round(h * r))
        rx, ry = sw / w, sh / h
        back = np.array([[1 / rx, 0, 0.5 / rx - 0.5], [0, 1 / ry, 0.5 / ry - 0.5]])  # small -> source pixels
        m = np.concatenate([m[:, :2] @ back[:, :2], (m[:, :2] @ back[:, 2] + m[:, 2])[:, None]], axis=1)
        pre = (sw, sh)
    out = np.empty((len(images), size, size, 3), np.uint8)
    src = images.permute(0, 2, 3, 1).numpy()
    for i in range(len(images)):
        img = np.ascontiguousarray(src[i])
        if pre is not None:
            img = cv2.resize(img, pre, interpolation=cv2.INTER_AREA)
        out[i] = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def to_geometry(images: torch.Tensor, target: Geometry, keypoints=None, *, source: Geometry | None = None,
                name: str = "set") -> tuple[torch.Tensor, np.ndarray | None, str]:
    """Bring a set of crops (uint8 N x 3 x H x W) to ``target`` with one similarity for the whole set.

    The set's own geometry is ``source`` if given, else the mean of ``keypoints`` (N x 5 x 2 pixels of the
    images), else the ArcFace template at the images' size (the convention of insightface ``.bin`` files).
    Returns (images at ``target.size``, keypoints moved with the pixels or None, a one-line account). A set within
    half a pixel of the target (every point, same size) is returned as it is.
    """
    size = int(images.shape[-1])
    how = "given"
    if source is None:
        if keypoints is not None:
            source, how = set_geometry(keypoints, size, name), "its mean keypoints"
        else:
            a = GEOMETRIES["arcface"]
            source = Geometry("arcface", _points(a.array() * size / a.size), size)
            how = "assumed ArcFace (no keypoints)"
    src, dst = source.array(), target.array()
    if size == target.size and np.abs(src - dst).max() <= 0.5:
        return images, keypoints, f"{name}: already in the {target.name} geometry ({how}), unchanged"
    m = estimate_similarity(src, dst)
    moved = None if keypoints is None else transform_points(np.asarray(keypoints, np.float32), m)
    rms = float(np.sqrt(((transform_points(src, m) - dst) ** 2).sum(1).mean()))
    note = (f"{name}: {size} px crops ({how}) -> {target.name} geometry at {target.size} px by one similarity "
            f"(scale {similarity_scale(m):.3f}, residual {rms:.2f} px)")
    return warp_images(images, m, target.size), moved, note
