"""Self-supervised pretraining as a task of the shared loop: DINO and LAFS (LAFS §3, Eq. 5, Algorithm 1).

One student and one teacher *branch* (backbone trunk + :class:`~lafs.ssl.dino.DINOHead`), the teacher an EMA copy
of the student. Per iteration, on uint8 images straight from the loader:

- **DINO** (Caron et al., ICCV 2021): :class:`~lafs.augment.multicrop.MultiCropViews` gives 2 global crops at the
  model's input size and ``num_local`` smaller local crops. The teacher sees the globals; the student sees every crop.
- **LAFS** (Sun et al., CVPR 2024, §3.2-§3.4): :class:`~lafs.augment.multicrop.LAFSViews` gives 2 + ``num_local``
  full-size crops, each clean and photometrically augmented. Landmarks come from the *clean* crops (the frozen landmark
  CNN of a supervised Part fViT, or the fixed patch grid for fViT), patches from the augmented ones. The 2 teacher views
  keep all R landmarks, the student views ``subset_size`` of them (:func:`~lafs.ssl.lafs.landmark_view`: perturbation
  Eq. 6, subset sampling, landmark shuffle §3.3).

The loss is Eq. 5 / DINO's multi-crop loss: each teacher view against every other student view. The student
makes one pass per view shape (globals together, locals together), as the reference's ``MultiCropWrapper``.
Around the optimizer step the loop calls :meth:`PretrainTask.after_backward` (prototype layer frozen for the
first ``freeze_last_layer`` epochs, or the first ``freeze_last_layer_fraction`` of the run's steps) and
:meth:`PretrainTask.after_step` (EMA teacher update with the cosine momentum of that iteration); before each
step ``set_epoch`` / ``set_step`` set the teacher temperature (per epoch as DINO, per step when its warm-up is a
fraction of the run; the steps come from the loop's :class:`~lafs.train.schedules.RunSchedule`, ``set_schedule``); the loop itself applies per-parameter clipping (``optim.clip_mode=per_param``),
the cosine weight-decay schedule (``optim.weight_decay_end``) and the LR rule ``optim.lr_scale_batch``.

The frozen landmark CNN runs in fp32 outside autocast, in eval mode and without gradient (LAFS §3.2). The teacher
runs in eval mode (no dropout / drop-path) unless ``ssl.teacher_mode=train`` asks for the reference code's
stochastic teacher. Checkpoints carry, besides the loop's state, a ``teacher`` and a ``student`` entry:
the backbone trunk (with the landmark CNN for Part fViT), which ``lafs finetune --init`` loads (teacher first).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment.multicrop import LAFSViews, MultiCropViews, dino_photometrics
from ..models.fvit import FViT, grid_landmarks
from ..data.datasets import to_model_input
from ..ssl import METHODS
from ..ssl.dino import (
    TEACHER_TEMP_PRESETS, DINOHead, DINOLoss, cancel_last_layer_grads, ema_update, momentum_at,
    koleo_loss, teacher_entropy_tensor, teacher_temp_at, teacher_temp_at_step,
)
from ..ssl.lafs import landmark_view

REFERENCE_SIZE = 112  # perturb_alpha and the DINO local-crop size are defined on a 112 x 112 face


class Branch(nn.Module):
    """Backbone trunk + projection head: one side of the self-distillation."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor, landmarks: Tensor | None = None, positions: Tensor | None = None,
                with_embedding: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if landmarks is None:
            out = self.backbone(images)
        else:
            out = self.backbone(images, landmarks=landmarks, positions=positions)
        logits = self.head(out["embedding"])
        return (logits, out["embedding"]) if with_embedding else logits


def teacher_temperatures(ssl) -> tuple[float, float, int]:
    """(warmup_teacher_temp, teacher_temp, warmup epochs): the named preset, each value overridable."""
    w, t, e = TEACHER_TEMP_PRESETS[ssl.teacher_temp_schedule]
    return (w if ssl.warmup_teacher_temp is None else ssl.warmup_teacher_temp,
            t if ssl.teacher_temp is None else ssl.teacher_temp,
            e if ssl.warmup_teacher_temp_epochs is None else ssl.warmup_teacher_temp_epochs)


class PretrainTask(nn.Module):
    """``forward(images uint8, labels ignored) -> {"loss", "teacher_temp", "teacher_entropy"}``.

    ``backbone``: a Part fViT (its landmark CNN is taken out and frozen; load it first), an fViT, or (DINO only)
    an IResNet. ``embed`` gives the teacher's embedding, so verification during pretraining tracks the model
    that finetuning will start from.
    """

    def __init__(self, backbone: nn.Module, ssl) -> None:
        super().__init__()
        if ssl.method not in METHODS:
            raise ValueError(f"ssl.method must be one of {METHODS}, got {ssl.method!r}")
        self.method = ssl.method
        self.img_size = backbone.img_size
        patch_size = getattr(backbone, "patch_size", None)
        self.landmark_cnn: nn.Module | None = None
        if getattr(backbone, "landmark_cnn", None) is not None:
            self.landmark_cnn = backbone.landmark_cnn.requires_grad_(False).eval()
            backbone.landmark_cnn = None  # the trunks carry no CNN: nothing of it in the EMA or the optimizer
            self.num_landmarks = backbone.num_landmarks
        elif isinstance(backbone, FViT):
            self.register_buffer("grid", grid_landmarks(backbone.img_size, backbone.patch_size), persistent=False)
            self.num_landmarks = backbone.num_tokens
        elif ssl.method == "lafs":
            raise ValueError(f"LAFS needs a token model (part_fvit or fvit); {type(backbone).__name__} has no tokens")
        else:
            self.num_landmarks = 0
        token_model = self.landmark_cnn is not None or isinstance(backbone, FViT)

        head = DINOHead(backbone.embedding_size, ssl.out_dim, ssl.hidden_dim, ssl.bottleneck_dim, ssl.head_layers,
                        ssl.norm_last_layer)
        self.student = Branch(backbone, head)
        # the teacher starts as a copy of the student and is only ever updated by EMA
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.loss_fn = DINOLoss(ssl.out_dim, 2, ssl.student_temp, ssl.center_momentum, ssl.centering)
        self.koleo_weight = float(ssl.koleo_weight)
        self.temps = teacher_temperatures(ssl)
        self.momentum = (ssl.momentum_teacher, ssl.momentum_teacher_end)
        self.freeze_last_layer = ssl.freeze_last_layer
        # fractions of the run (ssl.*_fraction) become steps once the loop knows the run's length (set_schedule);
        # until then their phases have not ended: the start values, as while a budgeted run is being timed
        self.temp_warmup_steps: float | None = None if ssl.warmup_teacher_temp_fraction is None else math.inf
        self.freeze_steps: float | None = None if ssl.freeze_last_layer_fraction is None else math.inf
        self.step = 0
        self.teacher_mode = ssl.teacher_mode
        scale = self.img_size / REFERENCE_SIZE
        if len(ssl.blur_sigma) != 2:
            raise ValueError(f"ssl.blur_sigma must be [low, high] in pixels of a 112 px face, got {ssl.blur_sigma}")
        try:
            photometrics = dino_photometrics((ssl.blur_sigma[0] * scale, ssl.blur_sigma[1] * scale),
                                             tuple(ssl.color_jitter), ssl.grayscale_prob)
        except ValueError as e:
            raise ValueError(f"ssl.color_jitter / ssl.blur_sigma: {e}") from None
        if self.method == "lafs":
            self.views = LAFSViews(self.img_size, 2 + ssl.num_local, tuple(ssl.global_scale), **photometrics)
            self.subset_size = ssl.subset_size or max(1, round(self.num_landmarks * 36 / 196))
            if not ssl.replacement and self.subset_size > self.num_landmarks:
                raise ValueError(f"ssl.subset_size {self.subset_size} > num_landmarks {self.num_landmarks} "
                                 "without replacement")
            self.replacement, self.shuffle = ssl.replacement, ssl.shuffle
            self.perturb_alpha = ssl.perturb_alpha * scale
        else:
            local = ssl.local_size or round(48 * scale)
            if patch_size:
                local = max(patch_size, local // patch_size * patch_size)
            if not token_model and local != self.img_size and ssl.num_local > 0:
                raise ValueError(f"{type(backbone).__name__} takes only {self.img_size} px inputs: set "
                                 f"ssl.local_size={self.img_size} (or ssl.num_local=0)")
            self.views = MultiCropViews(self.img_size, local, ssl.num_local, tuple(ssl.global_scale),
                                        tuple(ssl.local_scale), **photometrics)
        self.teacher_temp = self.temps[0]  # the warm-up value (also a fractional warm-up's before set_schedule)

    # ------------------------------------------------------------------------------------------ loop hooks
    def monitored_modules(self) -> dict[str, nn.Module]:
        """The trunks whose drift from initialisation the loop logs (``train.monitors``)."""
        return {"student": self.student.backbone, "teacher": self.teacher.backbone}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.landmark_cnn is not None:
            self.landmark_cnn.eval()  # frozen: BatchNorm running statistics, no dropout
        if self.teacher_mode == "eval":
            self.teacher.eval()
            # DINO's teacher runs in train mode; "eval" here only turns off its dropout / drop-path. BatchNorm
            # keeps DINO's behaviour: batch statistics, and running statistics updated by the teacher's own
            # forward passes. (The EMA covers parameters only, so an eval-mode BatchNorm would normalise with its
            # initial mean 0 / variance 1 forever: a CNN teacher such as IResNet would never see its own scale.)
            for m in self.teacher.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(mode)
        return self

    def set_schedule(self, schedule) -> None:
        """The run's schedules in steps (:class:`~lafs.train.schedules.RunSchedule`); ``None`` fields stay per epoch."""
        self.temp_warmup_steps = schedule.teacher_temp_warmup_steps
        self.freeze_steps = schedule.freeze_last_layer_steps

    def set_epoch(self, epoch: int) -> None:
        if self.temp_warmup_steps is None:  # DINO's per-epoch linspace (ssl.warmup_teacher_temp_epochs)
            self.teacher_temp = teacher_temp_at(epoch, *self.temps)

    def set_step(self, step: int) -> None:
        """Optimizer step ``step`` (0-based) is next: the per-step schedules (fractions of the run) move."""
        self.step = step
        if self.temp_warmup_steps is not None:
            self.teacher_temp = teacher_temp_at_step(step, self.temps[0], self.temps[1], self.temp_warmup_steps)

    def after_backward(self, epoch: int) -> None:
        if self.freeze_steps is None:
            cancel_last_layer_grads(self.student, epoch, self.freeze_last_layer)
        else:
            cancel_last_layer_grads(self.student, self.step, self.freeze_steps)

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher with the momentum of iteration ``step`` (0-based)."""
        ema_update(self.teacher, self.student, momentum_at(step, total_steps, *self.momentum))

    def checkpoint_extras(self) -> dict:
        """Backbone trunks for finetuning (``load_pretrained`` reads ``teacher`` first), with the frozen CNN."""
        extras = {"ssl_method": self.method}
        for name, branch in (("teacher", self.teacher), ("student", self.student)):
            state = dict(branch.backbone.state_dict())
            if self.landmark_cnn is not None:
                state.update({f"landmark_cnn.{k}": v for k, v in self.landmark_cnn.state_dict().items()})
            extras[name] = state
        return extras

    # ------------------------------------------------------------------------------------------ landmarks
    @torch.no_grad()
    def landmarks(self, images: Tensor) -> Tensor:
        """R landmarks (pixels of ``images``) from the frozen CNN in fp32, or the fixed grid for fViT."""
        n, _, h, w = images.shape
        if self.landmark_cnn is None:
            lm = self.grid.expand(n, -1, -1)
        else:
            with torch.autocast(images.device.type, enabled=False):
                x = images.float()
                if h != self.img_size or w != self.img_size:
                    x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                                      antialias=False)
                lm = self.landmark_cnn(x)
        if h != self.img_size:
            lm = (lm + 0.5) * (h / self.img_size) - 0.5  # pixel-centre convention
        return lm

    def embed(self, x: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """The teacher's embedding (validation); keypoints are unused, SSL models do not take them."""
        x = to_model_input(x, self.img_size)
        if self.landmark_cnn is not None:
            return self.teacher.backbone(x, landmarks=self.landmarks(x))["embedding"]
        return self.teacher.backbone(x)["embedding"]

    # ------------------------------------------------------------------------------------------ views
    def view_groups(self, x: Tensor) -> list[dict]:
        """Inputs per view shape: ``[globals (2B), locals (num_local B)]``, each images (+ landmarks, positions)."""
        b = len(x)
        # the views are pixel arithmetic, made in fp32 outside the step's autocast (bf16 crops and blurs would both
        # lose precision and fail in kornia's in-place index writes)
        with torch.autocast(x.device.type, enabled=False):
            views = self.views(x.float())
        if self.method == "lafs":
            clean, aug = views
            lm = self.landmarks(torch.cat(clean))
            g_lm, g_pos = landmark_view(lm[: 2 * b], student=False, shuffle=self.shuffle,
                                        perturb_alpha=self.perturb_alpha)
            groups = [{"images": torch.cat(aug[:2]), "landmarks": g_lm, "positions": g_pos}]
            if len(aug) > 2:
                l_lm, l_pos = landmark_view(lm[2 * b:], student=True, subset_size=self.subset_size,
                                            replacement=self.replacement, shuffle=self.shuffle,
                                            perturb_alpha=self.perturb_alpha)
                groups.append({"images": torch.cat(aug[2:]), "landmarks": l_lm, "positions": l_pos})
            return groups
        groups = [{"images": torch.cat(views[:2])}]
        if len(views) > 2:
            groups.append({"images": torch.cat(views[2:])})
        if self.landmark_cnn is not None:  # DINO on Part fViT: the frozen CNN places the patches on every crop
            for g in groups:
                g["landmarks"] = self.landmarks(g["images"])
        return groups

    def forward(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        x = to_model_input(images, self.img_size)
        b = len(x)
        groups = self.view_groups(x)
        with torch.no_grad():
            teacher_out = self.teacher(**groups[0]).chunk(2)
        student_out, out = [], {}
        for i, g in enumerate(groups):
            if i == 0 and self.koleo_weight > 0:
                logits, emb = self.student(**g, with_embedding=True)
                # DINOv2 §4: KoLeo per global view, over the batch (each rank's own, as DINOv2's code)
                out["koleo"] = sum(koleo_loss(e) for e in emb.split(b)) / 2
            else:
                logits = self.student(**g)
            student_out += list(logits.split(b))
        # before the centre update; a tensor, so the loop's one all-reduce per step is the only host sync
        entropy = teacher_entropy_tensor(list(teacher_out), self.loss_fn.center, self.teacher_temp)
        dino = self.loss_fn(student_out, list(teacher_out), self.teacher_temp)
        loss = dino + self.koleo_weight * out["koleo"] if "koleo" in out else dino
        return {"loss": loss, "teacher_temp": torch.tensor(self.teacher_temp), "teacher_entropy": entropy,
                **({"dino_loss": dino.detach(), "koleo": out["koleo"].detach()} if "koleo" in out else {})}


def build_pretrain_task(cfg, log=print) -> PretrainTask:
    """Backbone from ``model``, its landmark CNN from ``ssl.landmark_init`` (Part fViT), the task from ``ssl``."""
    from ..config import ConfigError
    from ..models import build_backbone
    from .pretrained import load_pretrained, require_same_rescale

    ssl = cfg.ssl
    backbone = build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides())
    if hasattr(backbone, "landmark_cnn"):
        if not ssl.landmark_init:
            raise ConfigError("ssl.landmark_init: pretraining a Part fViT needs a trained landmark CNN (the checkpoint "
                              "of a supervised Part fViT run, `lafs train`); it stays frozen (LAFS §3.2)")
        try:
            require_same_rescale(ssl.landmark_init, cfg.model.landmark_rescale, "ssl.landmark_init")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        report = load_pretrained(backbone, ssl.landmark_init, only_prefix="landmark_cnn.")
        if not report.loaded:
            raise ConfigError(f"ssl.landmark_init: {ssl.landmark_init} holds no landmark_cnn.* tensors of this shape")
        log(report.summary())
    elif ssl.landmark_init:
        raise ConfigError(f"ssl.landmark_init is set but model.name={cfg.model.name} has no landmark CNN")
    try:
        return PretrainTask(backbone, ssl)
    except ValueError as err:
        raise ConfigError(str(err)) from None
