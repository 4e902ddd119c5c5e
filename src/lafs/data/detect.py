"""Optional 5-point face detector for raw photos (``pip install "lafs-face[detect]"``).

Package: ``dlib-bin`` (prebuilt dlib wheels, Boost Software License 1.0; dlib's HOG frontal-face detector, whose
weights are compiled into dlib) and ``face_recognition_models`` >= 0.3.0, which ships
``shape_predictor_5_face_landmarks.dat`` (Davis King; released into the public domain, the package's LICENSE is
CC0 1.0; trained on the dlib 5-point dataset, 7198 internet faces he annotated himself). Weights are in the
packages: nothing is downloaded. The same package also ships a 68-point model trained on iBUG 300-W, whose licence
excludes commercial use; it is never loaded here. The model file is found without importing
``face_recognition_models`` (its ``__init__`` needs ``pkg_resources``, gone from setuptools >= 81).

Point mapping. dlib's 5 points are the outer and inner corner of each eye and the bottom of the nose
(subnasale), not the ArcFace points (eye centres, nose tip, mouth corners). They are moved by the least-squares
similarity (:func:`~lafs.geometry.estimate_similarity`) onto the fixed shape :data:`_DLIB_MEAN` (zero mean,
unit RMS radius); there the ArcFace points are the affine function ``[x, 1] @ _TO_ARCFACE`` of the 10
normalised coordinates ``x``, mapped back with the inverse similarity. Both constants were fitted by least
squares to the MTCNN points of ``lfw_unaligned_kps.npy`` on 3741 crops of ``lfw_unaligned.bin`` (every third
index with ``i % 24 != 0``). On the 500 held-out crops (``i % 24 == 0``, 112 px) it finds 487 faces, whose
points land a mean 2.28 px / median 1.65 px from MTCNN's (eyes 1.2, nose 1.7, mouth corners 3.7). dlib does not
locate the mouth: its corners are predicted from the eyes and nose, so they do not follow an open mouth or a
smile. Output is in ArcFace order: left eye, right eye, nose tip, left and right mouth corner, "left" meaning
the smaller x. Coordinates are ``(x, y)`` pixels with pixel centres at integers (``data/align.py``).
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..geometry import estimate_similarity, invert_affine, transform_points

__all__ = ["INSTALL_HINT", "Detection", "detect_faces", "detect_keypoints"]

INSTALL_HINT = 'pip install "lafs-face[detect]" (in a clone of the repository: pip install -e ".[detect]")'

# dlib's points 0..4: image-right eye outer and inner corner, image-left eye outer and inner corner, nose bottom.
_DLIB_MEAN = np.array(
    [[1.21796, -0.30537], [0.52490, -0.26947], [-1.23129, -0.25025], [-0.53642, -0.24615], [0.02486, 1.07123]]
)
# rows: x0, y0, ..., x4, y4 of the normalised dlib points, then 1; columns: x, y of the 5 ArcFace points
_TO_ARCFACE = np.array(
    [
        [-0.41121, 0.10842, 0.09259, -0.00211, -0.60838, 0.17046, 0.46764, -0.41630, 0.67294, -0.52579],
        [-0.04423, -0.04026, 0.08381, 0.08811, 0.37184, -0.62010, 0.25086, 1.01530, -0.11503, 1.08915],
        [-0.05603, -0.06920, 0.27590, 0.03698, 0.16759, 0.48074, -0.98782, -1.25144, -0.07461, -1.03909],
        [0.02005, -0.05703, -0.20435, 0.07721, 0.22306, -0.03837, -0.56355, -0.89937, -0.27778, -0.77707],
        [0.18852, 0.14542, -0.32586, -0.21751, -0.61093, -0.20379, 0.76907, 0.83690, 0.43200, 0.37074],
        [-0.03397, 0.03577, 0.09080, -0.04335, -0.35357, -0.61471, 0.19750, 1.12788, -0.23967, 1.11313],
        [0.36730, -0.01804, 0.02939, -0.00642, 0.20683, -0.44333, -0.02615, 0.99131, -0.80244, 1.10548],
        [0.16345, 0.18420, -0.01923, -0.09094, -0.26429, 0.06947, 0.12591, -0.88043, 0.65031, -1.17233],
        [-0.08858, -0.16660, -0.07201, 0.18906, 0.84489, -0.00408, -0.22275, -0.16047, -0.22788, 0.08865],
        [-0.10531, -0.12267, 0.04897, -0.03103, 0.02296, 1.20371, -0.01072, -0.36339, -0.01782, -0.25288],
        [0.23938, -0.03103, 0.23785, -0.55033, 0.04533, -1.78993, 0.19022, 4.91079, 0.21503, 4.24611],
    ]
)
for _a in (_DLIB_MEAN, _TO_ARCFACE):
    _a.flags.writeable = False

_MODELS = None  # (HOG detector, 5-point shape predictor), loaded on first use (~0.7 s)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Detection:
    """One face: ``box`` (x1, y1, x2, y2), the first and last pixel (centres) inside dlib's box; ``score`` the HOG
    detector's SVM margin (not a probability, > ``threshold``); ``keypoints`` float32 (5, 2), ArcFace order."""

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray


def _models():
    global _MODELS
    if _MODELS is None:
        with _LOCK:
            if _MODELS is None:
                try:
                    import dlib

                    spec = importlib.util.find_spec("face_recognition_models")
                except ImportError as e:
                    raise ImportError(f"face detection needs dlib and face_recognition_models: {INSTALL_HINT}") from e
                if spec is None or not spec.submodule_search_locations:
                    raise ImportError(f"face detection needs the face_recognition_models package: {INSTALL_HINT}")
                path = Path(next(iter(spec.submodule_search_locations))) / "models/shape_predictor_5_face_landmarks.dat"
                if not path.is_file():
                    raise ImportError(f"{path} not found (face_recognition_models < 0.3.0?): {INSTALL_HINT}")
                _MODELS = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path)))
    return _MODELS


def _to_arcface(points: np.ndarray) -> np.ndarray:
    """dlib's 5 points (5, 2) -> the 5 ArcFace points (5, 2) float32 (see the module docstring)."""
    m = estimate_similarity(points, _DLIB_MEAN)
    x = transform_points(points, m).reshape(-1)
    return transform_points((np.append(x, 1.0) @ _TO_ARCFACE).reshape(5, 2), invert_affine(m)).astype(np.float32)


def detect_faces(image, upsample: int | None = None, threshold: float = 0.0) -> list[Detection]:
    """All faces of an RGB uint8 ``H x W x 3`` image, highest score first.

    ``upsample``: how many times dlib doubles the image before the scan (its smallest face is about 80 px, 40 px
    after one doubling; each doubling costs about 4x the time); default 1 when the longer side is at most 640 px,
    else 0. ``threshold``: added to dlib's detection threshold; negative finds more faces (and false ones).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 H x W x 3 image, got {img.dtype} of shape {img.shape}")
    detector, predictor = _models()
    img = np.ascontiguousarray(img)
    if upsample is None:
        upsample = 1 if max(img.shape[:2]) <= 640 else 0
    rects, scores, _ = detector.run(img, int(upsample), float(threshold))
    out = []
    for rect, score in zip(rects, scores):
        shape = predictor(img, rect)
        pts = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
        box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
        out.append(Detection(box=box, score=float(score), keypoints=_to_arcface(pts)))
    return sorted(out, key=lambda d: d.score, reverse=True)


def detect_keypoints(image, name: str = "image", **kwargs) -> np.ndarray:
    """The 5 ArcFace keypoints (5, 2) float32 of the highest-scoring face; ValueError naming ``name`` if none.

    ``kwargs`` go to :func:`detect_faces` (``upsample``, ``threshold``).
    """
    faces = detect_faces(image, **kwargs)
    if not faces:
        raise ValueError(f"no face found in {name}")
    return faces[0].keypoints
