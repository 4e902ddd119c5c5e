"""Using a trained model on image files: ``lafs embed`` and ``lafs verify``.

An image file is taken as an aligned face when it already has the aligned crop's size (112 x 112, the ArcFace
template's; its keypoints are then the template's). Any other image is a raw photo: the optional 5-point
detector (``data/detect.py``, extra ``detect``) finds the most confident face and ``data/align.py`` warps it onto the
template, as the training data were prepared. ``detect="always"`` runs the detector on aligned-size files too,
``"never"`` refuses raw photos. Embeddings are the flip-test sum, L2-normalised, so a pair's score is the dot
product (cosine similarity); ``lafs verify`` compares it with the threshold stored with the model (the 10-fold
threshold of its latest validation) or ``--threshold``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.align import align_face, align_keypoints
from .data.datasets import decode_image
from .eval.embedding import embed_images
from .geometry import template

ALIGNED_SIZE = 112
DETECT_MODES = ("auto", "always", "never")


def load_face(path: str | Path, detect: str = "auto") -> tuple[np.ndarray, np.ndarray, bool]:
    """An image file -> (aligned RGB uint8 112 x 112 x 3, its 5 keypoints (5, 2), whether the detector ran)."""
    if detect not in DETECT_MODES:
        raise ValueError(f"detect must be one of {DETECT_MODES}, got {detect!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    img = decode_image(path.read_bytes(), "rgb", source=str(path))
    aligned_size = img.shape[0] == img.shape[1] == ALIGNED_SIZE
    if detect == "never" or (detect == "auto" and aligned_size):
        if not aligned_size:
            raise ValueError(f"{path}: {img.shape[1]}x{img.shape[0]} is not an aligned {ALIGNED_SIZE}x{ALIGNED_SIZE} "
                             f"face; use --detect auto (needs the detect extra: pip install \"lafs-face[detect]\")")
        return img, template(ALIGNED_SIZE), False
    from .data.detect import detect_keypoints

    kps = detect_keypoints(img, str(path))
    aligned, m = align_face(img, kps, ALIGNED_SIZE)
    return aligned, align_keypoints(kps, m), True


def embed_crops(embedder, images: torch.Tensor, keypoints=None, batch_size: int = 64, flip: bool = True,
                device="cpu") -> np.ndarray:
    """Unit-norm embeddings (N x D float32) of aligned face crops, uint8 N x 3 x H x W RGB (flip-test sum, then L2
    normalisation), the one path that files, arrays and tensors take (``lafs embed``, ``lafs.embed``).

    A keypoint model (``uses_keypoints``) gets ``keypoints`` (N x 5 x 2 pixels of ``images``) or, without them, the
    ArcFace template at the crops' size: an aligned crop's keypoints are the template's by construction.
    """
    if getattr(embedder, "uses_keypoints", False):
        if keypoints is None:
            if images.shape[-1] != images.shape[-2]:
                raise ValueError(f"{images.shape[-1]}x{images.shape[-2]} crops: a keypoint model needs square aligned "
                                 "crops, or their keypoints")
            keypoints = np.repeat(template(int(images.shape[-1]))[None], len(images), axis=0)
    else:
        keypoints = None
    if getattr(embedder, "geometry", None) is not None:
        # aligned crops are in the ArcFace geometry (or their keypoints say where the face is): bring them to the
        # geometry the model was trained in, as lafs eval does for its sets (lafs.data.align.to_geometry)
        from .data.align import to_geometry
        from .geometry import get_geometry

        images, moved, _ = to_geometry(images, get_geometry(embedder.geometry), keypoints, name="crops")
        keypoints = moved if keypoints is not None else None
    emb = embed_images(embedder, images, batch_size=batch_size, device=device, flip=flip, keypoints=keypoints)
    return torch.nn.functional.normalize(emb.double(), dim=1).float().numpy()


def load_faces(paths, detect: str = "auto") -> tuple[torch.Tensor, np.ndarray]:
    """Image files -> (aligned uint8 N x 3 x 112 x 112 RGB, their keypoints N x 5 x 2), in order (``load_face``)."""
    faces = [load_face(p, detect) for p in paths]
    if not faces:
        raise ValueError("no images given")
    images = torch.from_numpy(np.stack([f[0] for f in faces])).permute(0, 3, 1, 2).contiguous()
    return images, np.stack([f[1] for f in faces])


def embed_files(embedder, paths, detect: str = "auto", batch_size: int = 64, flip: bool = True,
                device="cpu") -> np.ndarray:
    """Unit-norm embeddings (N x D float32) of image files, in order (flip-test sum, then L2 normalisation)."""
    images, kps = load_faces(paths, detect)
    return embed_crops(embedder, images, kps, batch_size=batch_size, flip=flip, device=device)


def decide(embedder, score: float, threshold: float | None = None) -> dict:
    """A pair's cosine ``score`` and the same/different decision at ``threshold`` (default: the model's stored one;
    ``same`` is None when there is none)."""
    source = "given"
    if threshold is None:
        threshold, source = getattr(embedder, "threshold", None), getattr(embedder, "threshold_source", "")
    return {"score": score, "threshold": threshold, "threshold_source": source,
            "same": None if threshold is None else bool(score >= threshold)}


def verify(embedder, a: str | Path, b: str | Path, threshold: float | None = None, detect: str = "auto") -> dict:
    """Cosine similarity of two face images and the decision at ``threshold`` (default: the model's stored one)."""
    emb = embed_files(embedder, [a, b], detect)
    return decide(embedder, float(emb[0] @ emb[1]), threshold)
