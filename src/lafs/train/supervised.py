"""Supervised training and finetuning as one task: backbone -> margin head, with the LAFS landmark options.

Stage 1 (Part fViT, BMVC 2022, §3: the landmark CNN learns from the identity loss alone) and finetuning from a
pretrained ViT (LAFS, CVPR 2024, §3.5). The landmark options of LAFS §3.5 for a Part fViT:

- ``a``: the landmark CNN is frozen (eval mode, no gradient); only the ViT and the head train.
- ``b``: the landmark CNN trains freely with the identity loss (the released code's default).
- ``c``: as (b) plus ``beta * MSE(r_hat / (S-1), r / (S-1))`` (Eq. 7; S = image size, 111 at 112 px), where
  ``r`` are the trainable CNN's landmarks and ``r_hat`` those of a frozen copy of the initial CNN on the
  same (augmented) image; ``beta`` follows a per-epoch step schedule (reference 1000/100/1/0.11/0 from
  epochs 0/8/14/21/28). The paper uses (c) for all its results. In a short run those epochs may never come
  (beta 1000 throughout): ``finetune.beta_fractions`` puts the steps at fractions of the run instead, applied per
  optimizer step (``lafs.train.schedules``).

The task takes uint8 images straight from the loader: scaling to [-1, 1], resizing to the model's input
size and the augmentations all run batched on the training device.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment.supervised import MIXUP_PRESETS, Mixup, SupervisedAugment
from ..config import LANDMARK_OPTIONS
from ..data.datasets import resize_keypoints, to_model_input
from ..heads import build_head
from .optim import step_schedule


class SupervisedTask(nn.Module):
    """``forward(images uint8, labels) -> {"loss", "id_loss", ...}``; ``embed(x in [-1, 1])`` for evaluation."""

    def __init__(self, backbone: nn.Module, head: nn.Module, augment: nn.Module | None = None,
                 mixup: Mixup | None = None, landmark_option: str = "b",
                 beta_schedule: tuple[list[float], list[int]] = ([0.0], [0]),
                 beta_fractions: list[float] | None = None) -> None:
        super().__init__()
        if landmark_option not in LANDMARK_OPTIONS:
            raise ValueError(f"landmark option must be one of {LANDMARK_OPTIONS}, got {landmark_option!r}")
        self.backbone = backbone
        self.head = head
        self.augment = augment
        self.mixup = mixup
        self.landmark_option = landmark_option
        self.beta_values, self.beta_epochs = list(beta_schedule[0]), list(beta_schedule[1])
        # beta_fractions (fractions of the run) replace the epochs; the loop resolves them to steps (set_schedule)
        self.beta_fractions = None if beta_fractions is None else list(beta_fractions)
        # validates the schedule now, not at epoch 8
        step_schedule(0, self.beta_values, self.beta_epochs if beta_fractions is None else self.beta_fractions)
        self.beta_steps: list[int] | None = None
        self.beta = 0.0
        self.img_size = backbone.img_size
        self.uses_keypoints = bool(getattr(backbone, "uses_keypoints", False))  # KP-RPE: keypoints ride along
        has_cnn = hasattr(backbone, "landmark_cnn")
        if landmark_option != "b" and not has_cnn:
            raise ValueError(f"landmark option {landmark_option!r} needs a Part fViT (this backbone has no landmark CNN)")
        self.reference_landmarks = None
        if landmark_option == "a":
            backbone.landmark_cnn.requires_grad_(False)
        self.set_epoch(0)

    def freeze_reference(self) -> None:
        """Option (c): snapshot the landmark CNN as it is now (after loading its initialisation)."""
        if self.landmark_option == "c":
            self.reference_landmarks = copy.deepcopy(self.backbone.landmark_cnn).requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen CNNs stay in eval mode: no dropout on the landmark head, BatchNorm statistics fixed
        if self.landmark_option == "a":
            self.backbone.landmark_cnn.eval()
        if self.reference_landmarks is not None:
            self.reference_landmarks.eval()
        return self

    def set_schedule(self, schedule) -> None:
        """The run's schedules in steps (:class:`~lafs.train.schedules.RunSchedule`): ``finetune.beta_fractions``
        resolved against the run's length."""
        if self.beta_fractions is not None:
            if schedule.beta_steps is None or len(schedule.beta_steps) != len(self.beta_values):
                raise ValueError(f"the run's beta steps {schedule.beta_steps} do not match this task's beta fractions "
                                 f"{self.beta_fractions} (finetune.beta_fractions)")
            self.beta_steps = list(schedule.beta_steps)

    def set_epoch(self, epoch: int) -> None:
        if self.beta_fractions is None:
            self.beta = step_schedule(epoch, self.beta_values, self.beta_epochs) if self.landmark_option == "c" else 0.0
        elif self.beta_steps is None:  # the run's length is not known yet: the schedule's start
            self.beta = float(self.beta_values[0]) if self.landmark_option == "c" else 0.0

    def set_step(self, step: int) -> None:
        """Optimizer step ``step`` (0-based) is next: beta moves per step when given as fractions of the run."""
        if self.beta_steps is not None and self.landmark_option == "c":
            self.beta = step_schedule(step, self.beta_values, self.beta_steps)

    def _run(self, x: Tensor, keypoints: Tensor | None) -> dict[str, Tensor]:
        if not self.uses_keypoints:
            return self.backbone(x)
        if keypoints is None:
            raise ValueError("this backbone uses keypoints (KP-RPE): the data must carry them (a <stem>_kps.npy "
                             "sidecar for records, the synthetic faces' own)")
        return self.backbone(x, keypoints=keypoints)

    def embed(self, x: Tensor, keypoints: Tensor | None = None) -> Tensor:
        width = x.shape[-1]
        x = to_model_input(x, self.img_size)
        kp = None if keypoints is None else resize_keypoints(keypoints, width, x.shape[-1])
        return self._run(x, kp)["embedding"]

    def monitored_modules(self) -> dict[str, nn.Module]:
        """The trunk whose drift from its start (random or pretrained weights) the loop logs (``train.monitors``)."""
        return {"backbone": self.backbone}

    def forward(self, images: Tensor, labels: Tensor, keypoints: Tensor | None = None) -> dict[str, Tensor]:
        """``keypoints`` (B x 5 x 2 pixels of ``images``) are used by KP-RPE backbones: resized with the images and
        moved by every geometric augmentation. Mixup keeps the first image's keypoints."""
        kp = None
        if self.uses_keypoints and keypoints is not None:
            kp = resize_keypoints(keypoints, images.shape[-1], self.img_size)
        x = to_model_input(images, self.img_size)
        if self.augment is not None:
            if kp is None:
                x = self.augment(x)
            else:
                x, kp = self.augment(x, kp)
        labels_b, lam = None, 1.0
        if self.mixup is not None:
            x, labels, labels_b, lam = self.mixup(x, labels)
        out = self._run(x, kp)
        if labels_b is None:
            id_loss = self.head(out["embedding"], labels)
        else:
            id_loss = self.head(out["embedding"], labels, labels_b, lam)
        result = {"loss": id_loss, "id_loss": id_loss.detach()}
        if self.landmark_option == "c":
            if self.reference_landmarks is None:
                raise RuntimeError("landmark option c: call freeze_reference() after loading the landmark CNN")
            result["beta"] = torch.tensor(self.beta)
            if self.beta > 0:
                with torch.no_grad():
                    r_hat = self.reference_landmarks(x)
                s = float(self.img_size - 1)
                lm_loss = F.mse_loss(out["landmarks"].float() / s, r_hat.float() / s)
                result["loss"] = id_loss + self.beta * lm_loss
                result["landmark_loss"] = lm_loss.detach()
        return result


def build_augment(cfg) -> tuple[nn.Module | None, Mixup | None]:
    """The ``augment`` section -> (batched augmentation or None, mixup or None)."""
    preset = cfg.augment.preset
    augment = None if preset == "none" else SupervisedAugment.preset(preset)
    alpha, prob = MIXUP_PRESETS[preset]
    alpha = alpha if cfg.augment.mixup_alpha is None else cfg.augment.mixup_alpha
    prob = prob if cfg.augment.mixup_prob is None else cfg.augment.mixup_prob
    return augment, (Mixup(alpha, prob) if prob > 0 else None)


def build_classifier(cfg, embedding_size: int, num_classes: int, rank: int = 0, world_size: int = 1) -> nn.Module:
    kwargs = dict(scale=cfg.head.scale, margin=cfg.head.margin, h=cfg.head.h, t_alpha=cfg.head.t_alpha)
    if cfg.head.partial_fc or cfg.head.sample_rate < 1.0:
        from ..heads.partial_fc import build_partial_fc

        return build_partial_fc(cfg.head.name, embedding_size, num_classes, cfg.head.sample_rate,
                                rank=rank, world_size=world_size, **kwargs)
    return build_head(cfg.head.name, embedding_size, num_classes, **kwargs)
