"""LAFS landmark views (Sun et al., CVPR 2024, §3.2-§3.4, Algorithm 1).

A view of an image is a set of landmark tokens. The frozen landmark CNN predicts R landmarks on the clean
crop; then, per image:

- **perturbation** (Eq. 6): ``r + perturb_alpha * u``, u ~ N(0, 1) in pixels of the crop, independent per
  image, landmark and coordinate, on every view, no clamping (samples outside the image read 0). The paper's
  best alpha is 2; the released code uses 5.
- **subset sampling** (student views): ``subset_size`` of the R landmarks (36 of 196, the token count of a
  48 px DINO local crop). The reference draws them *with* replacement (``randint``), so duplicates occur;
  ``replacement=False`` draws distinct landmarks.
- **landmark shuffle** (§3.3, Eq. 4): the tokens take position embeddings 1..k in a random landmark order,
  so a position embedding no longer identifies a landmark. Without shuffle each token keeps the position
  embedding of its own landmark. Scope: ``student`` (the released code: only the subset views are
  shuffled, implicitly by the random draw order), ``both`` (the paper's Eq. 4 and Algorithm 1 line 7), or
  ``none``.

:func:`landmark_view` returns the landmarks in token order and the position index of each token, which the
encoder adds as ``pos_embedding[1 + position]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

SHUFFLE_SCOPES = ("student", "both", "none")


def perturb_landmarks(landmarks: Tensor, perturb_alpha: float) -> Tensor:
    """Eq. 6: add ``perturb_alpha`` pixels of standard-normal noise to every coordinate (B x R x 2)."""
    if perturb_alpha < 0:
        raise ValueError(f"perturb_alpha must be >= 0, got {perturb_alpha}")
    if perturb_alpha == 0:
        return landmarks
    return landmarks + perturb_alpha * torch.randn_like(landmarks)


def sample_subset(batch: int, num_landmarks: int, subset_size: int, replacement: bool = True,
                  device: torch.device | str = "cpu") -> Tensor:
    """B x subset_size landmark indices per image, in random order (uniform; with or without replacement)."""
    if subset_size < 1:
        raise ValueError(f"subset_size must be >= 1, got {subset_size}")
    if replacement:
        return torch.randint(0, num_landmarks, (batch, subset_size), device=device)
    if subset_size > num_landmarks:
        raise ValueError(f"subset_size {subset_size} > num_landmarks {num_landmarks} without replacement")
    return torch.rand(batch, num_landmarks, device=device).argsort(dim=1)[:, :subset_size]


def random_permutation(batch: int, num: int, device: torch.device | str = "cpu") -> Tensor:
    """An independent random permutation of 0..num-1 per image (B x num)."""
    return torch.rand(batch, num, device=device).argsort(dim=1)


def landmark_view(landmarks: Tensor, student: bool, subset_size: int | None = None, replacement: bool = True,
                  shuffle: str = "student", perturb_alpha: float = 0.0) -> tuple[Tensor, Tensor]:
    """One LAFS view from the CNN's landmarks (B x R x 2): ``(landmarks B x k x 2, positions B x k)``.

    Teacher views (``student=False``) keep all R landmarks; student views take ``subset_size`` of them.
    ``positions[b, j]`` is the position-embedding index of token j: 0..k-1 when shuffled, the token's own
    landmark index otherwise.
    """
    if shuffle not in SHUFFLE_SCOPES:
        raise ValueError(f"shuffle must be one of {SHUFFLE_SCOPES}, got {shuffle!r}")
    b, r, _ = landmarks.shape
    landmarks = perturb_landmarks(landmarks, perturb_alpha)
    shuffled = shuffle == "both" or (shuffle == "student" and student)
    if student and subset_size is not None:
        idx = sample_subset(b, r, subset_size, replacement, landmarks.device)
        if not shuffled:
            idx = idx.sort(dim=1).values  # canonical landmark order; each token keeps its landmark's embedding
    elif shuffled:
        idx = random_permutation(b, r, landmarks.device)
    else:
        idx = torch.arange(r, device=landmarks.device).expand(b, r)
    picked = landmarks.gather(1, idx[..., None].expand(-1, -1, 2))
    k = idx.shape[1]
    positions = torch.arange(k, device=landmarks.device).expand(b, k) if shuffled else idx
    return picked, positions
