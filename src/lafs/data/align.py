"""Aligning face images: one face onto the ArcFace template by its five points, or a whole set onto a geometry.

:func:`align_face` is the ArcFace / insightface ``norm_crop`` protocol: the least-squares similarity from the five
keypoints to the 112x112 template (:mod:`lafs.geometry`, Umeyama 1991), then ``cv2.warpAffine`` (bilinear).

:func:`to_geometry` brings a whole verification set into a model's training geometry (:class:`lafs.geometry.Geometry`)
with **one** similarity from the set's mean keypoints to the target points, so each crop keeps the alignment it was
made with (no per-image re-alignment with noisy keypoints) and only the frame changes. A model learns the geometry
of its training crops: train on CelebA's tight eye-aligned 64 px crops and test on LFW's 112 px ArcFace crops
resized to 64 px, and every test face is 14 % smaller and sits 4 px higher than any face the model saw, so the
accuracy measures that gap as much as recognition. A set already in the target geometry (within half a pixel) is
returned unchanged.

Conventions (as :mod:`lafs.geometry`): images are RGB uint8 ``H x W x 3`` (sets: ``N x 3 x H x W`` tensors);
keypoints are ``(x, y)`` pixels with pixel centres at integer coordinates, which is also what ``cv2.warpAffine``
assumes, so no half-pixel shifts appear here. Affine matrices are ``(2, 3)`` float64.
"""

from __future__ import annotations

import numpy as np
import torch

from ..geometry import (
    GEOMETRIES,
    Geometry,
    check_affine,
    estimate_similarity,
    invert_affine,
    set_geometry,
    similarity_scale,
    template,
    transform_points,
)

__all__ = ["BORDERS", "align_face", "align_keypoints", "inverse_warp", "to_geometry", "warp_images"]

BORDERS = ("constant", "replicate", "reflect")


def _cv2():
    try:
        import cv2
    except ImportError as e:  # only the image warps need OpenCV; the point maths (lafs.geometry) does not
        raise ImportError("lafs.data.align image warping needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def _border(cv2, border: str) -> int:
    modes = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101}
    if border not in modes:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    return modes[border]


def _check_image(image, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be an RGB uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return image


def align_face(image, keypoints, size: int = 112, border: str = "constant") -> tuple[np.ndarray, np.ndarray]:
    """Crop ``image`` to ``size x size`` so that ``keypoints`` (5, 2) land on :func:`template` ``(size)``.

    Returns ``(aligned, M)``: the RGB uint8 crop (bilinear, as ``norm_crop``) and the 2x3 float64 similarity
    from the original frame to the crop. ``border`` fills pixels outside the image: ``"constant"`` (black,
    insightface's choice), ``"replicate"`` or ``"reflect"``.
    """
    cv2 = _cv2()
    image = _check_image(image)
    kps = np.asarray(keypoints, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"keypoints must have shape (5, 2), got {kps.shape}")
    flag = _border(cv2, border)
    m = estimate_similarity(kps, template(size))
    aligned = cv2.warpAffine(
        np.ascontiguousarray(image), m, (size, size), flags=cv2.INTER_LINEAR, borderMode=flag, borderValue=0
    )
    return aligned, m


def align_keypoints(keypoints, m) -> np.ndarray:
    """Keypoints ``(..., 2)`` in the original frame -> the aligned crop's frame, float32."""
    return transform_points(np.asarray(keypoints, dtype=np.float32), m)


def inverse_warp(aligned, m, out_shape, border: str = "constant") -> np.ndarray:
    """Paste an aligned crop back into the original frame (``out_shape`` = ``(h, w)`` or ``(h, w, c)``).

    For visualisation: pixels the crop does not cover are filled per ``border`` (black by default).
    """
    cv2 = _cv2()
    aligned = _check_image(aligned, "aligned")
    m = check_affine(m)
    if len(out_shape) not in (2, 3) or int(out_shape[0]) <= 0 or int(out_shape[1]) <= 0:
        raise ValueError(f"out_shape must be (h, w) or (h, w, c) with positive h, w, got {tuple(out_shape)}")
    invert_affine(m)  # a singular M would otherwise give a silently black image
    h, w = int(out_shape[0]), int(out_shape[1])
    # WARP_INVERSE_MAP makes OpenCV sample the crop at M @ p for every original-frame pixel p: exactly the
    # inverse warp, without forming the inverse matrix.
    return cv2.warpAffine(
        aligned,
        m,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=_border(cv2, border),
        borderValue=0,
    )


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
            source = GEOMETRIES["arcface"].at_size(size)
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
