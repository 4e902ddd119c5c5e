"""Robustness to misalignment: unaligned evaluation and the affine-sensitivity curve (KP-RPE paper §4.4, Fig. 5).

The KP-RPE paper evaluates on *unaligned* faces, the detector crop resized to 112x112 without any landmark warp
(the paper's Table 1), and plots verification accuracy while the affine transform is moved step by step from the
detector crop (t = 0) to the 5-point aligned face (t = 1). Everything here starts from a set of detector crops, its
pairs and the 5 keypoints of each crop (``lfw_unaligned.bin`` + ``lfw_unaligned_kps.npy`` in ``../shared/data``):

- :func:`alignment_affines`: per crop, the least-squares similarity onto the ArcFace template (``data/align.py``);
- :func:`interpolate_affines`: the transform at step t. The paper leaves the interpolation unspecified. Default
  ``"similarity"``: scale geometric (s^t), rotation angle linear (t·θ), and the crop centre's image moving on a
  straight line, so every step is itself a similarity, a plausible "partly aligned" crop. ``"linear"``: (1 - t) I +
  t M entry-wise, which shrinks the face mid-way for large rotations (the option for comparison);
- :func:`warp_crops`: resample every crop (``cv2.warpAffine``, bilinear, black border: ``align_face``'s warp) and
  move its keypoints with it, so keypoint-aware models (KP-RPE) see keypoints that match the pixels;
- :func:`affine_sensitivity`: at each t, embed (flip test; keypoints flipped with their left/right labels swapped),
  then the 10-fold protocol of ``metrics.py``. t = 0 *is* the unaligned evaluation and t = 1 the aligned one.

An embedding function that takes keypoints says so with an attribute ``uses_keypoints = True`` and is then called
``fn(x, keypoints=kps)`` (keypoints in pixels of ``x``); any other is called ``fn(x)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..geometry import estimate_similarity_batch, template, transform_points_batch
from .embedding import embed_images
from .metrics import ten_fold_accuracy

INTERPOLATIONS = ("similarity", "linear")


def alignment_affines(keypoints, size: int = 112, template_points=None) -> np.ndarray:
    """(N, 5, 2) keypoints of ``size x size`` crops -> (N, 2, 3) similarities onto ``template_points`` (5 x 2 pixels;
    default the ArcFace template at ``size``)."""
    kps = np.asarray(keypoints, np.float64)
    if kps.ndim != 3 or kps.shape[1:] != (5, 2):
        raise ValueError(f"keypoints of shape {kps.shape}: expected (N, 5, 2), the 5 ArcFace points of each crop")
    if not np.all(np.isfinite(kps)):
        bad = int(np.flatnonzero(~np.isfinite(kps).all(axis=(1, 2)))[0])
        raise ValueError(f"keypoints of crop {bad} are not finite: {kps[bad].tolist()}")
    return estimate_similarity_batch(kps, template(size) if template_points is None else template_points)


def _similarity_parts(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, 3) similarities -> (scale, angle); ValueError if one is not a similarity (shear, mirror, anisotropy)."""
    a, b = m[:, 0, 0], m[:, 1, 0]
    scale = np.hypot(a, b)
    off = np.abs(m[:, 0, 0] - m[:, 1, 1]) + np.abs(m[:, 0, 1] + m[:, 1, 0])
    bad = np.flatnonzero(off > 1e-6 * np.maximum(scale, 1e-12))
    if bad.size:
        raise ValueError(f"affine {int(bad[0])} is not a similarity ({m[bad[0]].tolist()}); use interpolation='linear'")
    return scale, np.arctan2(b, a)


def interpolate_affines(m, t: float, size: int = 112, interpolation: str = "similarity") -> np.ndarray:
    """The transform a fraction ``t`` of the way from the identity (t = 0) to ``m`` (t = 1), for (N, 2, 3) ``m``.

    ``"similarity"``: s_t = s^t, θ_t = t θ and the crop centre c = ((size - 1) / 2, (size - 1) / 2) is sent to
    (1 - t) c + t M(c). ``"linear"``: (1 - t) [I | 0] + t M. Both are exact at t = 0 and t = 1.
    """
    m = np.asarray(m, np.float64)
    if m.ndim != 3 or m.shape[1:] != (2, 3):
        raise ValueError(f"affines of shape {m.shape}: expected (N, 2, 3)")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    eye = np.broadcast_to(np.eye(2, 3), m.shape)
    if interpolation == "linear":
        return (1.0 - t) * eye + t * m
    scale, angle = _similarity_parts(m)
    s_t, th_t = scale**t, angle * t
    cos, sin = s_t * np.cos(th_t), s_t * np.sin(th_t)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (N, 2, 2)
    c = np.full(2, (size - 1) / 2.0)
    c_t = (1.0 - t) * c + t * (m[:, :, :2] @ c + m[:, :, 2])
    out = np.concatenate([rot, (c_t - rot @ c)[:, :, None]], axis=2)
    if t == 1.0:
        out = m.copy()  # exactly the alignment, not a round trip through (s, θ)
    return out


def warp_crops(images: torch.Tensor, keypoints, affines, size: int | None = None,
               border: str = "constant") -> tuple[torch.Tensor, np.ndarray]:
    """Warp uint8 (N, 3, H, W) crops by (N, 2, 3) affines to ``size`` (default W) -> (uint8 crops, moved keypoints).

    ``cv2.warpAffine`` bilinear, the warp of ``data.align.align_face``; ``border`` fills what the crop does not
    cover: ``"constant"`` (black, as ``align_face`` and insightface), ``"replicate"`` or ``"reflect"``. A detector crop
    is usually tighter than the aligned field of view, so aligning it leaves such a border. An exact identity is
    copied, not resampled.
    """
    import cv2

    from ..data.align import _border

    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("images must be a uint8 (N, 3, H, W) tensor")
    m = np.asarray(affines, np.float64)
    kps = np.asarray(keypoints, np.float64)
    if len(m) != len(images) or len(kps) != len(images):
        raise ValueError(f"{len(images)} crops, {len(kps)} keypoint rows and {len(m)} affines: expected one each")
    size = size or images.shape[-1]
    moved = transform_points_batch(kps, m)
    if size == images.shape[-1] == images.shape[-2] and np.array_equal(m, np.broadcast_to(np.eye(2, 3), m.shape)):
        return images.clone(), moved
    src = images.permute(0, 2, 3, 1).numpy()
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i in range(len(images)):
        out[i] = cv2.warpAffine(np.ascontiguousarray(src[i]), m[i], (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=_border(cv2, border), borderValue=0)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), moved


def random_similarities(n: int, size: int, *, rotate: float = 30.0, scale=(0.7, 1.3), shift: float = 0.15,
                        seed: int = 0) -> tuple[np.ndarray, dict]:
    """``n`` seeded similarities of ``size x size`` crops about the crop centre: rotation uniform in +-``rotate``
    degrees, scale uniform in ``scale``, shift of each axis uniform in +-``shift`` x size. The KP-RPE paper's
    robustness claim (§4.4) is about misalignment; this makes a test set beyond the training range of the
    ``misalign`` augmentation (+-20 degrees, scale 0.8-1.2, shift 10 %). Returns ((n, 2, 3) affines, the draws:
    ``angle`` degrees, ``scale``, ``shift`` (n, 2) pixels)."""
    lo, hi = (float(v) for v in scale)
    if not rotate >= 0 or not shift >= 0:
        raise ValueError(f"rotate ({rotate}) and shift ({shift}) must be >= 0")
    if not 0 < lo <= hi:
        raise ValueError(f"scale range ({lo}, {hi}) must satisfy 0 < low <= high")
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-rotate, rotate, n)
    s = rng.uniform(lo, hi, n)
    d = rng.uniform(-shift, shift, (n, 2)) * size
    th = np.deg2rad(angle)
    m = np.zeros((n, 2, 3))
    m[:, 0, 0], m[:, 0, 1] = s * np.cos(th), -s * np.sin(th)
    m[:, 1, 0], m[:, 1, 1] = s * np.sin(th), s * np.cos(th)
    c = np.full(2, (size - 1) / 2.0)  # pixel centres at integer coordinates, as cv2.warpAffine
    m[:, :, 2] = c + d - np.einsum("nij,j->ni", m[:, :, :2], c)
    return m, {"angle": angle, "scale": s, "shift": d}


def affine_sensitivity(
    embed_fn: Callable,
    images: torch.Tensor,
    issame,
    keypoints,
    steps=6,
    *,
    interpolation: str = "similarity",
    batch_size: int = 256,
    device="cpu",
    flip: bool = True,
    flip_mode: str = "sum",
    thresholds=None,
    border: str = "constant",
    template_points=None,
) -> dict:
    """Verification accuracy along the detector-crop -> aligned-face path (KP-RPE Fig. 5).

    ``images``: uint8 (2P, 3, S, S) detector crops, pair k = images 2k, 2k+1; ``keypoints``: (2P, 5, 2) in crop
    pixels. ``steps``: the number of evenly spaced t in [0, 1], or the t values themselves. ``template_points``: the
    5 x 2 pixel positions t = 1 aligns onto (default the ArcFace template at S; a model trained in another geometry
    is aligned onto its own, see ``report.sensitivity_report``). Returns ``{"t": [...], "interpolation", "points":
    [per-t ten_fold_accuracy dict + "t" and "keypoint_error" (mean distance of the moved keypoints to the template,
    px)]}``.
    """
    issame = np.asarray(issame, bool).ravel()
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"crops of shape {tuple(images.shape)}: expected square (N, 3, S, S)")
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} crops for {len(issame)} pairs (expected {2 * len(issame)})")
    ts = np.linspace(0.0, 1.0, steps) if np.isscalar(steps) else np.asarray(steps, np.float64).ravel()
    if len(ts) == 0 or (np.isscalar(steps) and steps < 2):
        raise ValueError(f"steps must be >= 2 (t = 0 and t = 1) or a list of t values, got {steps!r}")
    size = images.shape[-1]
    dst = (template(size) if template_points is None else np.asarray(template_points)).astype(np.float64)
    m = alignment_affines(keypoints, size, dst)
    with_kps = bool(getattr(embed_fn, "uses_keypoints", False))
    points = []
    for t in ts:
        crops, kps = warp_crops(images, keypoints, interpolate_affines(m, float(t), size, interpolation),
                                border=border)
        emb = embed_images(embed_fn, crops, batch_size=batch_size, device=device, flip=flip, flip_mode=flip_mode,
                           keypoints=kps if with_kps else None).numpy()
        r = ten_fold_accuracy(emb[0::2], emb[1::2], issame, thresholds=thresholds)
        r["t"] = float(t)
        r["keypoint_error"] = float(np.linalg.norm(kps - dst, axis=-1).mean())
        points.append(r)
    return {"t": ts.tolist(), "interpolation": interpolation, "border": border, "pairs": len(issame),
            "points": points}


def format_sensitivity(result: dict) -> str:
    lines = [f"affine sensitivity ({result['interpolation']} interpolation, {result['border']} border, "
             f"{result['pairs']} pairs): "
             "t = 0 detector crop, t = 1 aligned",
             f"{'t':>5}  {'kp error px':>11}  {'accuracy %':>10}  {'+-':>5}  {'AUC':>6}"]
    for p in result["points"]:
        lines.append(f"{p['t']:>5.2f}  {p['keypoint_error']:>11.2f}  {100 * p['accuracy']:>10.2f}  "
                     f"{100 * p['accuracy_std']:>5.2f}  {p['auc']:>6.4f}")
    return "\n".join(lines)
