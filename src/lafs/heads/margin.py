"""Margin-based softmax classifiers on the hypersphere: CosFace, ArcFace, AdaFace.

All three compute cos(theta_j) between the L2-normalised embedding and L2-normalised class centres W_j,
change the target logit only, scale by s and apply softmax cross-entropy:

- CosFace (Wang et al. 2018, Eq. 4):  s * (cos(theta_y) - m), s = 64, m = 0.4.
- ArcFace (Deng et al. 2019, Eq. 3):  s * cos(theta_y + m), s = 64, m = 0.5. Where theta_y + m would pass pi,
  cos(theta + m) stops decreasing; there the target logit is s * (cos(theta_y) - m * sin(m)) instead (the
  insightface fallback), which keeps it monotone in theta and its gradient finite at theta = pi.
- AdaFace (Kim et al., CVPR 2022, Eq. 9-12; its official head.py): the margin adapts to the feature norm, an
  image-quality proxy. z = clip(h * (||f|| - mu) / (sigma + 1e-3), -1, 1) with running mean/std (mu, sigma) of the
  detached, clipped norms (EMA weight t_alpha, updated before use, initialised to 20 and 100); target logit s *
  (cos(clip(theta_y - m z, eps, pi - eps)) - (m + m z)). m = 0.4, h = 0.333, s = 64.

Interface: ``head(embeddings, labels) -> loss`` and ``head.logits(embeddings, labels=None)``; the margin
itself is :meth:`MarginHead.margin_logits` on cosines, so a sampled classifier (Partial FC) reuses it.
Cosines are computed in fp32 even under autocast.

Mixup (margin-aware soft targets, as the official LAFS code's CosFace takes them): ``head(embeddings, labels, labels_b,
lam)`` applies the margin to column ``labels`` with weight ``lam`` and to ``labels_b`` with weight ``1 - lam`` (logit =
cos + w * (margin(cos) - cos); for CosFace that is s * (cos - m * y_j), the reference code's soft one-hot mask) and
returns ``lam * CE(labels) + (1 - lam) * CE(labels_b)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ClassifierState

HEADS = ("cosface", "arcface", "adaface")


class MarginHead(ClassifierState, nn.Module, ABC):
    """Base class: class centres W (num_classes x embedding_size) and the scaled-cosine classifier (replicated on
    every rank: :class:`~lafs.heads.base.ClassifierState`'s defaults)."""

    default_scale = 64.0
    default_margin = 0.0

    def __init__(
        self, embedding_size: int, num_classes: int, scale: float | None = None, margin: float | None = None
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.scale = float(self.default_scale if scale is None else scale)
        self.margin = float(self.default_margin if margin is None else margin)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, embeddings: Tensor, weight: Tensor | None = None) -> Tensor:
        """B x C cosines to the centres (``weight``, default all of ``self.weight``), in fp32."""
        weight = self.weight if weight is None else weight
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(weight.float(), dim=1))

    @abstractmethod
    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        """Margin-adjusted cosines of the targets (before scaling): what each loss defines.

        ``cos_target`` is B x T (T target columns per row: 1, or 2 with mixup), ``norms`` is B.
        """

    def margin_logits(
        self, cosine: Tensor, labels: Tensor, norms: Tensor | None = None,
        labels_b: Tensor | None = None, lam: float = 1.0,
    ) -> Tensor:
        """Scaled logits with the margin on each row's target column. Rows labelled -1 get no margin.

        With ``labels_b`` (mixup) the margins of both targets are weighted by ``lam`` and ``1 - lam``; both
        columns go through one ``target_logit`` call, so AdaFace updates its norm statistics once per batch.
        """
        if norms is None:
            norms = cosine.new_ones(cosine.shape[0])
        mixed = labels_b is not None and lam != 1.0
        targets = (torch.stack([labels, labels_b], 1) if mixed else labels[:, None]).long()
        idx = targets.clamp_min(0)
        cos_target = cosine.gather(1, idx)
        delta = self.target_logit(cos_target, norms) - cos_target
        delta = torch.where(targets >= 0, delta, torch.zeros_like(delta))
        if mixed:  # a == b adds lam + (1 - lam) = the full margin
            delta = delta * delta.new_tensor([lam, 1.0 - lam])
        return cosine.scatter_add(1, idx, delta) * self.scale

    def logits(
        self, embeddings: Tensor, labels: Tensor | None = None, labels_b: Tensor | None = None, lam: float = 1.0
    ) -> Tensor:
        """Scaled logits; with ``labels`` the margin is applied (training), without it not (inference)."""
        cosine = self.cosine(embeddings)
        if labels is None:
            return cosine * self.scale
        return self.margin_logits(cosine, labels, embeddings.float().norm(dim=1), labels_b, lam)

    def forward(self, embeddings: Tensor, labels: Tensor, labels_b: Tensor | None = None, lam: float = 1.0) -> Tensor:
        logits = self.logits(embeddings, labels, labels_b, lam)
        loss = F.cross_entropy(logits, labels.long(), ignore_index=-1)
        if labels_b is None or lam == 1.0:
            return loss
        return lam * loss + (1.0 - lam) * F.cross_entropy(logits, labels_b.long(), ignore_index=-1)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.scale}, m={self.margin}"


class CosFace(MarginHead):
    """Large margin cosine loss: target logit s * (cos(theta_y) - m)."""

    default_margin = 0.4

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        return cos_target - self.margin


class ArcFace(MarginHead):
    """Additive angular margin: target logit s * cos(theta_y + m), safe near theta = pi."""

    default_margin = 0.5

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        m = self.margin
        # clamp keeps d sin/d cos finite at |cos| = 1
        sin_target = (1.0 - cos_target.square()).clamp_min(1e-12).sqrt()
        cos_theta_m = cos_target * math.cos(m) - sin_target * math.sin(m)
        # theta + m > pi  <=>  cos(theta) < cos(pi - m)
        return torch.where(cos_target > math.cos(math.pi - m), cos_theta_m, cos_target - m * math.sin(m))


class AdaFace(MarginHead):
    """Quality-adaptive margin (AdaFace); keeps running mean/std of the feature norms as buffers."""

    default_margin = 0.4

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float | None = None,
        margin: float | None = None,
        h: float = 0.333,
        t_alpha: float = 0.01,
        eps: float = 1e-3,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale, margin)
        self.h = h
        self.t_alpha = t_alpha
        self.eps = eps
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @torch.no_grad()
    def update_norm_stats(self, safe_norms: Tensor) -> None:
        """EMA update of the norm statistics (training mode only; std needs two samples)."""
        a = self.t_alpha
        self.batch_mean.mul_(1 - a).add_(a * safe_norms.mean())
        if safe_norms.numel() > 1:
            self.batch_std.mul_(1 - a).add_(a * safe_norms.std())

    def margin_scaler(self, norms: Tensor) -> Tensor:
        """z in [-1, 1]: the normalised feature norm (no gradient flows through it)."""
        safe = norms.detach().float().clamp(0.001, 100.0)
        if self.training:
            self.update_norm_stats(safe)
        z = (safe - self.batch_mean) / (self.batch_std + self.eps) * self.h
        return z.clamp(-1.0, 1.0)

    def margin_logits(
        self, cosine: Tensor, labels: Tensor, norms: Tensor | None = None,
        labels_b: Tensor | None = None, lam: float = 1.0,
    ) -> Tensor:
        if norms is None:
            raise ValueError("AdaFace needs the embedding norms (pass un-normalised embeddings to logits())")
        return super().margin_logits(cosine.clamp(-1 + self.eps, 1 - self.eps), labels, norms, labels_b, lam)

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        z, m = self.margin_scaler(norms)[:, None], self.margin
        theta_m = (cos_target.acos() - m * z).clamp(self.eps, math.pi - self.eps)
        return theta_m.cos() - (m + m * z)


def build_head(name: str, embedding_size: int, num_classes: int, **kwargs) -> MarginHead:
    heads = {"cosface": CosFace, "arcface": ArcFace, "adaface": AdaFace}
    if name not in heads:
        raise KeyError(f"unknown head {name!r}; heads: {', '.join(heads)}")
    if name != "adaface":  # h and t_alpha only mean something to AdaFace
        kwargs = {k: v for k, v in kwargs.items() if k not in ("h", "t_alpha")}
    return heads[name](embedding_size, num_classes, **kwargs)
