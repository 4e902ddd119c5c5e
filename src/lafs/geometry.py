"""Face geometry, the lowest layer: where the five facial points sit in a crop and how points move between frames.

Models, data and evaluation all use it, and it imports nothing of lafs (numpy only), so any of them can.

- The five points, in image order: image-left eye, right eye, nose tip, left and right mouth corner. The 112x112
  ArcFace template (:data:`ARCFACE_TEMPLATE`, :func:`template` for other sizes) is where insightface's alignment
  puts them; :func:`flip_keypoints` gives the points of a mirrored image.
- A :class:`Geometry` names the mean position of the five points in a ``size x size`` crop: the geometry a model
  was trained in (``data.geometry``). ``arcface`` is the template; ``celeba64`` CelebA's own eye-aligned crops.
- The least-squares similarity (uniform scale, rotation, translation) between two point sets is Umeyama's
  (1991), "Least-squares estimation of transformation parameters between two point patterns", IEEE TPAMI 13(4),
  with its determinant correction, so the fit is never a mirror image: :func:`estimate_similarity`,
  batched in :func:`estimate_similarity_batch`.

Conventions: points are ``(x, y)`` pixels with pixel centres at integer coordinates (what ``cv2.warpAffine``
assumes). Affine matrices are ``(2, 3)`` float64 acting on column vectors ``(x, y, 1)``:
``p' = M[:, :2] @ p + M[:, 2]``. The image side (warping pixels with these matrices) is :mod:`lafs.data.align`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ARCFACE_TEMPLATE",
    "FLIP_ORDER",
    "GEOMETRIES",
    "Geometry",
    "check_affine",
    "estimate_similarity",
    "estimate_similarity_batch",
    "flip_keypoints",
    "get_geometry",
    "invert_affine",
    "set_geometry",
    "similarity_scale",
    "template",
    "transform_points",
    "transform_points_batch",
]

# insightface's ``arcface_dst`` (face_align), to the digit: the points ArcFace-style models were trained on.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye (image left)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float32,
)
ARCFACE_TEMPLATE.flags.writeable = False  # a shared constant: an in-place edit would silently move every crop

# A mirrored face's left eye is the original right eye: the 5 points swap eyes and mouth corners.
FLIP_ORDER = (1, 0, 2, 4, 3)


def flip_keypoints(keypoints, width: int):
    """5-point keypoints ``(..., 5, 2)`` of images ``width`` px wide -> those of the horizontally flipped images.

    x -> width - 1 - x (pixel centres at integers, as ``torch.flip``) and the left/right points swap labels
    (:data:`FLIP_ORDER`), so point 0 stays the image-left eye. numpy or torch in, the same type out.
    """
    if keypoints.shape[-2:] != (5, 2):
        raise ValueError(f"keypoints of shape {tuple(keypoints.shape)}: expected (..., 5, 2)")
    out = keypoints[..., list(FLIP_ORDER), :]  # advanced indexing: a copy, for numpy and torch alike
    out[..., 0] = (width - 1) - out[..., 0]
    return out


def template(size: int = 112) -> np.ndarray:
    """The ArcFace template for a ``size x size`` crop, float32 ``(5, 2)``.

    For ``size=112`` this is :data:`ARCFACE_TEMPLATE` exactly (a copy), the crop ArcFace-style models are
    trained on. Other sizes multiply the coordinates by ``size / 112``, as insightface does for multiples of
    112 (224 -> x2). With pixel centres at integers, a geometrically exact rescale of the same face region
    would be ``(p + 0.5) * s - 0.5``, i.e. ``(s - 1) / 2`` px further right and down (half a pixel at 224);
    the plain product is kept because it is what models trained on insightface crops saw. (insightface's
    ``norm_crop`` uses ``size / 128`` plus an 8-pixel x shift for sizes that are not multiples of 112; that
    variant is not reproduced.)
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"template size must be a positive integer, got {size!r}")
    if size == 112:
        return ARCFACE_TEMPLATE.copy()
    return (ARCFACE_TEMPLATE.astype(np.float64) * (size / 112.0)).astype(np.float32)


def _as_points(points, name: str, batched: bool = False) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    want = 3 if batched else 2
    shape = "(B, N, 2)" if batched else "(N, 2)"
    if arr.ndim != want or arr.shape[-1] != 2:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if arr.shape[-2] < 2:
        raise ValueError(f"{name} needs at least 2 points for a similarity fit, got {arr.shape[-2]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return arr


def _umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched Umeyama on ``(B, N, 2)`` arrays; returns M ``(B, 2, 3)`` and the src / dst variances ``(B,)``."""
    n = src.shape[1]
    mu_s = src.mean(axis=1)
    mu_d = dst.mean(axis=1)
    sc = src - mu_s[:, None]
    dc = dst - mu_d[:, None]
    var_s = (sc**2).sum(axis=(1, 2)) / n
    var_d = (dc**2).sum(axis=(1, 2)) / n
    cov = np.einsum("bni,bnj->bij", dc, sc) / n  # Umeyama's Sigma_xy, dst x src
    u, d, vt = np.linalg.svd(cov)
    # S = diag(1, det(U) det(V)) is Umeyama's correction: it turns the best orthogonal matrix into the best
    # rotation when the optimum would be a reflection, and picks the rotation when cov has rank 1 (collinear
    # points), where the sign of the zero singular value is arbitrary.
    sign = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    sign[sign == 0] = 1.0
    s = np.ones((src.shape[0], 2))
    s[:, 1] = sign
    rot = np.einsum("bij,bj,bjk->bik", u, s, vt)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (d * s).sum(axis=1) / var_s
    a = scale[:, None, None] * rot
    t = mu_d - np.einsum("bij,bj->bi", a, mu_s)
    return np.concatenate([a, t[:, :, None]], axis=2), var_s, var_d


def _degenerate(var: np.ndarray, pts: np.ndarray) -> np.ndarray:
    # Relative to the coordinates' magnitude, so that identical points far from the origin still count as
    # identical despite float rounding.
    mag = np.maximum(1.0, np.abs(pts).max(axis=(1, 2)))
    return var <= 1e-20 * mag**2


def estimate_similarity(src, dst) -> np.ndarray:
    """Least-squares similarity ``M`` (2x3 float64) mapping ``src`` onto ``dst`` (both ``(N, 2)``, N >= 2).

    Minimises ``sum_i ||M [src_i; 1] - dst_i||^2`` over uniform scale > 0, rotation and translation; never
    returns a reflection (``det M[:, :2] > 0``), even for mirrored point sets.
    """
    src = _as_points(src, "src")
    dst = _as_points(dst, "dst")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {src.shape} and {dst.shape}")
    m, var_s, var_d = _umeyama(src[None], dst[None])
    if _degenerate(var_s, src[None])[0]:
        raise ValueError("src points are degenerate: all points are identical, so no scale or rotation is defined")
    if _degenerate(var_d, dst[None])[0]:
        raise ValueError("dst points are degenerate: all points are identical, the fit would have zero scale")
    return m[0]


def estimate_similarity_batch(src, dst) -> np.ndarray:
    """:func:`estimate_similarity` for a batch: ``src (B, N, 2)`` onto ``dst (N, 2)`` or ``(B, N, 2)`` -> ``(B, 2, 3)``.

    Vectorised (one batched SVD); a degenerate entry raises ValueError naming its index.
    """
    src = _as_points(src, "src", batched=True)
    dst = np.asarray(dst, dtype=np.float64)
    if dst.ndim == 2:
        dst = _as_points(dst, "dst")
        dst = np.broadcast_to(dst, src.shape)
    else:
        dst = _as_points(dst, "dst", batched=True)
    if src.shape != dst.shape:
        raise ValueError(f"src {src.shape} and dst {dst.shape} do not match")
    if src.shape[0] == 0:
        return np.zeros((0, 2, 3))
    m, var_s, var_d = _umeyama(src, dst)
    for name, var, pts in (("src", var_s, src), ("dst", var_d, dst)):
        bad = np.flatnonzero(_degenerate(var, pts))
        if bad.size:
            raise ValueError(
                f"{name} points are degenerate (all identical) at batch index {int(bad[0])}"
                f" ({bad.size} degenerate entries in total)"
            )
    return m


def check_affine(m) -> np.ndarray:
    """``m`` as a finite (2, 3) float64 affine, or a ValueError saying what is wrong with it."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"affine matrix must have shape (2, 3), got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("affine matrix contains NaN or infinite entries")
    return m


def transform_points(points, m) -> np.ndarray:
    """Apply the affine ``m`` (2x3) to ``points`` of shape ``(..., 2)``.

    Computed in float64; the result is float32 when ``points`` is float32 (the keypoint convention), else
    float64.
    """
    m = check_affine(m)
    pts = np.asarray(points)
    if pts.ndim < 1 or pts.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {pts.shape}")
    out = pts.astype(np.float64) @ m[:, :2].T + m[:, 2]
    return out.astype(np.float32) if pts.dtype == np.float32 else out


def transform_points_batch(points, m) -> np.ndarray:
    """Per-item affines: points (N, K, 2) through m (N, 2, 3) -> float32 (N, K, 2), computed in float64."""
    pts = np.asarray(points, np.float64)
    m = np.asarray(m, np.float64)
    if pts.ndim != 3 or pts.shape[2] != 2 or m.shape != (len(pts), 2, 3):
        raise ValueError(f"points {pts.shape} and affines {m.shape}: expected (N, K, 2) and (N, 2, 3)")
    return (pts @ m[:, :, :2].transpose(0, 2, 1) + m[:, None, :, 2]).astype(np.float32)


def invert_affine(m) -> np.ndarray:
    """Inverse of the affine ``m`` (2x3), also 2x3 float64; ValueError if ``m`` is singular."""
    m = check_affine(m)
    a = m[:, :2]
    det = np.linalg.det(a)
    if abs(det) <= 1e-12 * max(1.0, np.abs(a).max() ** 2):
        raise ValueError(f"affine matrix is singular (det of the 2x2 part = {det:.3g}) and has no inverse")
    a_inv = np.linalg.inv(a)
    return np.concatenate([a_inv, (-a_inv @ m[:, 2])[:, None]], axis=1)


@dataclass(frozen=True)
class Geometry:
    """Mean (x, y) pixel positions of the five points (pixel centres at integers) in a ``size x size`` crop."""

    name: str
    points: tuple[tuple[float, float], ...]
    size: int

    def array(self) -> np.ndarray:
        return np.asarray(self.points, np.float64)

    def at_size(self, size: int) -> Geometry:
        """The same face layout in a ``size x size`` crop (every coordinate times ``size / self.size``)."""
        return Geometry(self.name, _points(self.array() * size / self.size), size)


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
    """The uniform scale of a similarity ``m`` (2x3): the square root of its 2x2 part's |determinant|."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(m, np.float64)[:, :2]))))
