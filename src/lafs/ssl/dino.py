"""DINO self-distillation components used by LAFS pretraining.

Reference: M. Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021, and
its released code (``main_dino.py``, ``utils.py``, ``vision_transformer.DINOHead``), which the official LAFS code
copies unchanged. What is here:

- ``DINOHead``: 3-layer MLP -> bottleneck -> L2-normalise -> weight-normalised linear layer to ``out_dim``
  prototypes with the weight norm ``g`` fixed at 1 (``norm_last_layer``), so every prototype row has unit norm.
- ``DINOLoss``: cross-entropy between the centred, sharpened teacher distribution of each global view and the
  student distribution of every *other* view, plus the EMA centre update (after the loss, all-reduced).
- Pure per-iteration / per-epoch schedules (teacher temperature, EMA momentum, weight decay), like
  ``lafs.train.optim.lr_at``, so resuming needs only the step. The momentum and weight-decay cosines span the
  whole run per iteration (as DINO's ``cosine_scheduler``); the temperature warm-up and the frozen prototype
  layer are per epoch as in DINO, or per step when given as fractions of the run (``lafs.train.schedules``).
- ``ema_update`` (teacher <- student, parameters only), ``clip_gradients_per_param`` (DINO ``clip_gradients``) and
  ``cancel_last_layer_grads`` (DINO ``cancel_gradients_last_layer``).
- Options from DINOv2 (Oquab et al., TMLR 2024, §4), off by default: Sinkhorn-Knopp centring of the teacher
  (``DINOLoss(centering="sinkhorn")``, SwAV's equipartition, Caron et al. 2020, §3.1) in place of the EMA centre,
  and the KoLeo regulariser (:func:`koleo_loss`, Sablayrolles et al., ICLR 2019, Eq. 6) on the student's embedding.
- Collapse diagnostics: mean entropy of the teacher's centred, sharpened distribution (~0: one-hot collapse,
  ~log(out_dim): uniform collapse) and the teacher-student KL.

Temperatures: the DINO paper warms the teacher temperature up 0.04 -> 0.07 over 30 epochs (its
code defaults to 0.04 -> 0.04); the LAFS code runs it *down* 0.07 -> 0.04 over 30 epochs. Both are presets in
``TEACHER_TEMP_PRESETS``. The LAFS code uses ``out_dim=100000`` (DINO: 65536; the LAFS paper gives neither).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = [
    "TEACHER_TEMP_PRESETS", "DINOHead", "DINOLoss", "teacher_temp_at", "teacher_temp_at_step", "cosine_at",
    "momentum_at", "weight_decay_at",
    "ema_update", "clip_gradients_per_param", "cancel_last_layer_grads", "teacher_entropy", "teacher_entropy_tensor",
    "mean_entropy",
    "teacher_student_kl", "sinkhorn_knopp", "koleo_loss", "CENTERINGS",
]

CENTERINGS = ("ema", "sinkhorn")  # DINOLoss teacher centring: DINO's EMA centre, or DINOv2's Sinkhorn-Knopp

# (warmup_teacher_temp, teacher_temp, warmup_epochs). "dino": the paper's setting; "lafs_code": the released LAFS
# script (decreasing; whether intended is unknown: the LAFS paper states no temperatures).
TEACHER_TEMP_PRESETS: dict[str, tuple[float, float, int]] = {
    "dino": (0.04, 0.07, 30),
    "lafs_code": (0.07, 0.04, 30),
}

LAST_LAYER = "last_layer"  # name prefix of the prototype layer; cancel_last_layer_grads matches on it


class DINOHead(nn.Module):
    """Projection head: MLP -> bottleneck -> L2-normalise -> weight-normalised Linear(bottleneck, out_dim, bias=False).

    The weight-normalised layer is built with ``torch.nn.utils.parametrizations.weight_norm``: its magnitude ``g``
    is ``last_layer.parametrizations.weight.original0`` (shape ``out_dim x 1``) and its direction ``v`` is
    ``...original1``. ``g`` starts at 1 (as in DINO) and, with ``norm_last_layer``, is frozen there, so the logits
    are cosine similarities between the normalised bottleneck feature and unit-norm prototypes (DINO found this
    stabilises training). All parameter names of the prototype layer start with ``last_layer.``.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        # DINO applies the trunc-normal init before creating last_layer, so the prototype directions keep the
        # default nn.Linear init; we do the same.
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)
        self.norm_last_layer = norm_last_layer

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _views(x: torch.Tensor | Sequence[torch.Tensor], n: int | None = None) -> list[torch.Tensor]:
    """A list of per-view tensors; a single tensor (views concatenated on dim 0, DINO style) is chunked into n."""
    if isinstance(x, torch.Tensor):
        if n is None:
            raise ValueError("pass the views as a list, or a concatenated tensor together with the number of views")
        return list(x.chunk(n))
    return list(x)


class DINOLoss(nn.Module):
    """DINO cross-view distillation loss with a centred, sharpened teacher (Caron et al. 2021, §3.1; LAFS Eq. 5).

    ``forward(student_out, teacher_out, teacher_temp)``: ``student_out`` is a list with one ``B x out_dim`` tensor
    per view (the first ``num_teacher_views`` are the global views the teacher also saw), ``teacher_out`` a list of
    ``num_teacher_views`` tensors. Returns

        L = mean over pairs (iq, v), v != iq, of mean_batch( -softmax((t_iq - c)/tau_t) . log_softmax(s_v/tau_s) )

    (18 pairs for 2 global + 8 local views). The teacher side is detached (the teacher is updated only by EMA).
    Afterwards the centre ``c`` (buffer, ``1 x out_dim``) is updated with the batch mean of all teacher outputs,
    so the loss of this step used the previous centre, as in DINO. Everything is computed in fp32: with
    tau_t = 0.04 and 65536+ logits, fp16 softmax/log-softmax loses too much.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, num_teacher_views: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9, centering: str = "ema", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.out_dim = out_dim
        self.num_teacher_views = num_teacher_views
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor | Sequence[torch.Tensor],
                teacher_out: torch.Tensor | Sequence[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        teacher = [t.detach().float() for t in _views(teacher_out, self.num_teacher_views)]
        students = _views(student_out, None if not isinstance(student_out, torch.Tensor) else
                          student_out.shape[0] // teacher[0].shape[0])
        if len(teacher) != self.num_teacher_views:
            raise ValueError(f"expected {self.num_teacher_views} teacher views, got {len(teacher)}")
        if len(students) < len(teacher):
            raise ValueError(f"the student must see the {len(teacher)} teacher views first; got {len(students)} views")
        log_p = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in students]
        center = self.center.float()
        total = torch.zeros((), device=log_p[0].device)
        n_terms = 0
        if self.centering == "sinkhorn":
            targets = sinkhorn_knopp(torch.cat(teacher), teacher_temp, self.sinkhorn_iterations).split(len(teacher[0]))
        else:
            targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
        for iq, q in enumerate(targets):
            for v, lp in enumerate(log_p):
                if v == iq:  # never match a view with itself
                    continue
                total = total + torch.sum(-q * lp, dim=-1).mean()
                n_terms += 1
        loss = total / n_terms
        self.update_center(teacher)  # also under Sinkhorn-Knopp: the centre then only feeds the entropy monitor
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """c <- m c + (1 - m) mean(teacher outputs over all views and the global batch).

        DINO all-reduces the sum and divides by ``len * world_size``, which assumes equal per-rank batches; we
        all-reduce the row count with the sum (one collective) so unequal batches also get the true global mean.
        """
        views = [t.detach().float() for t in _views(teacher_out, self.num_teacher_views)]
        rows = torch.cat(views, dim=0)
        stats = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype),
                                                    alpha=1.0 - self.center_momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV, Caron et al. 2020, §3.1 and Alg. 1; DINOv2 §4): ``N x K`` rows that
    each sum to 1 and whose columns are near-equally used over the global batch (``iterations`` alternating
    normalisations of ``exp(logits / temp)``: prototypes to mass 1/K, then samples to 1/N). It replaces the EMA centre
    of :class:`DINOLoss`: equipartition forbids the uniform and the one-prototype collapse in every batch, where the
    centre reacts over ~10 steps. Under DDP the prototype sums and the row count are all-reduced (DINOv2's code).
    Computed in fp32, the logits shifted by their maximum first (the exponent of a cosine / 0.04 fits fp32, but
    cosine / 0.01 would not)."""
    logits = teacher_logits.float() / teacher_temp
    q = torch.exp(logits - logits.max()).t()  # K x N
    n = torch.tensor(float(q.shape[1]), device=q.device)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(n)
    k = q.shape[0]
    total = q.sum()
    if distributed:
        dist.all_reduce(total)
    q = q / total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(rows)
        q = q / rows / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko regulariser (Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019,
    Eq. 6; DINOv2 §4): ``-mean_i log(min_{j != i} ||x_i - x_j||)`` over the L2-normalised rows of ``x`` (N x D),
    the log distance of each embedding to its nearest neighbour in the batch. Minimising it spreads the
    embeddings evenly over the sphere, which is what cosine verification reads. Computed in fp32."""
    if len(x) < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows, got {len(x)}")
    z = F.normalize(x.float(), dim=-1, eps=eps)
    sim = z @ z.t()
    sim.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
    nearest = sim.argmax(dim=1)
    dist_nn = (z - z[nearest]).norm(dim=-1)
    return -torch.log(dist_nn + eps).mean()


# ----------------------------------------------------------------------------------------------------------------
# collapse diagnostics

def _mean_entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    p = probs.float()
    return (-(p * torch.log(p.clamp_min(eps))).sum(dim=-1)).mean()


def mean_entropy(probs: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over rows of the entropy (nats) of row-stochastic ``probs`` (B x K)."""
    return float(_mean_entropy(probs, eps))


@torch.no_grad()
def teacher_entropy_tensor(teacher_out: torch.Tensor | Sequence[torch.Tensor], center: torch.Tensor,
                           teacher_temp: float) -> torch.Tensor:
    """:func:`teacher_entropy` as a 0-d tensor on the outputs' device (no host sync: per-step logging)."""
    t = torch.cat([x.float() for x in _views(teacher_out, 1)], dim=0)  # a tensor is one "view" here
    return _mean_entropy(F.softmax((t - center.float()) / teacher_temp, dim=-1))


def teacher_entropy(teacher_out: torch.Tensor | Sequence[torch.Tensor], center: torch.Tensor,
                    teacher_temp: float) -> float:
    """Mean entropy of softmax((t - c) / tau_t) over all teacher rows.

    ~0: every sample maps to one prototype (one-hot collapse: centring too weak / sharpening too strong);
    ~log(out_dim): uniform output (uniform collapse: centring dominates). DINO monitors this with the KL below.
    """
    return float(teacher_entropy_tensor(teacher_out, center, teacher_temp))


@torch.no_grad()
def teacher_student_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                       teacher_temp: float, student_temp: float = 0.1) -> float:
    """Mean KL(P_teacher || P_student) for the same view; DINO's collapse monitor (0 when both collapse alike).

    The DINO loss equals H(P_t) + KL(P_t || P_s), so a vanishing KL together with entropy ~0 or ~log K means collapse.
    """
    log_q = F.log_softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return float((log_q.exp() * (log_q - log_p)).sum(dim=-1).mean())


# ----------------------------------------------------------------------------------------------------------------
# schedules (pure functions, like lafs.train.optim.lr_at)

def teacher_temp_at(epoch: int, warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int) -> float:
    """Teacher temperature of ``epoch`` (0-based): DINO's ``np.linspace(warmup, final, warmup_epochs)`` per epoch,
    then ``teacher_temp``. Like DINO, the linspace has ``warmup_epochs`` points, so it reaches ``teacher_temp`` at
    epoch ``warmup_epochs - 1``. Presets: ``TEACHER_TEMP_PRESETS`` ("dino" 0.04->0.07, "lafs_code" 0.07->0.04)."""
    if epoch >= warmup_epochs:
        return float(teacher_temp)
    if warmup_epochs == 1:
        return float(warmup_teacher_temp)
    return float(warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * epoch / (warmup_epochs - 1))


def teacher_temp_at_step(step: int, warmup_teacher_temp: float, teacher_temp: float, warmup_steps: float) -> float:
    """Teacher temperature at optimizer step ``step`` (0-based) of a warm-up given as a fraction of the run
    (``ssl.warmup_teacher_temp_fraction``, resolved to ``warmup_steps`` by ``lafs.train.schedules``): linear per
    step from ``warmup_teacher_temp`` at step 0 to ``teacher_temp`` at step ``warmup_steps`` (the first step after
    the warm-up), constant after. ``warmup_steps`` 0: ``teacher_temp`` throughout.

    It generalises DINO's warm-up (Caron et al. 2021, §3 / appendix: 0.04 -> 0.07 over the first 30 of 100 epochs)
    to runs too short for epochs. The difference to :func:`teacher_temp_at`: DINO's ``np.linspace(w, t, E)`` holds
    each value for a whole epoch and, having both ends among its E points, reaches ``t`` at epoch E - 1; this ramp
    moves every step and reaches ``t`` when the warm-up ends. The two agree at every epoch start when
    ``warmup_steps = (E - 1) x steps per epoch``; DINO's 30 of 100 epochs is a fraction of 0.29, about 0.3.
    """
    if step >= warmup_steps:
        return float(teacher_temp)
    return float(warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * step / warmup_steps)


def cosine_at(step: int, total_steps: int, base: float, final: float) -> float:
    """The one cosine schedule of lafs: ``base`` at step 0 to ``final`` at ``total_steps``, held outside that span.

    DINO's ``cosine_scheduler``, final + 0.5 (base - final)(1 + cos(pi i / N)): the EMA momentum and the weight decay
    here, and the learning rate after its warm-up (``lafs.train.optim.lr_at``, the same curve as ``CosineAnnealingLR``).
    """
    t = min(1.0, max(0.0, step / max(1, total_steps)))
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def momentum_at(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA teacher momentum at iteration ``step`` (cosine base -> final; DINO §3.1). Spans the whole run
    (``total_steps``: the loop's final count, a budgeted run's once timed), as DINO's schedule over every
    iteration: already run-relative, no fraction key."""
    return cosine_at(step, total_steps, base, final)


def weight_decay_at(step: int, total_steps: int, base: float = 0.04, final: float = 0.4) -> float:
    """Weight decay at iteration ``step`` (cosine base -> final; applied to the regularised group only), over the
    whole run like :func:`momentum_at`."""
    return cosine_at(step, total_steps, base, final)


# ----------------------------------------------------------------------------------------------------------------
# teacher EMA and gradient handling

@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- m t + (1 - m) s`` for every parameter (not buffers, as in DINO), with fused ``torch._foreach`` ops.

    Parameters are paired by name, so a teacher built differently (other order, missing layer) raises instead of
    silently mixing unrelated tensors. Unwrap DDP (``student.module``) before calling.
    """
    t_named = dict(teacher.named_parameters())
    s_named = dict(student.named_parameters())
    if t_named.keys() != s_named.keys():
        only_t = sorted(t_named.keys() - s_named.keys())[:5]
        only_s = sorted(s_named.keys() - t_named.keys())[:5]
        raise ValueError(f"teacher and student parameters differ: only in teacher {only_t}, only in student {only_s}")
    t_params, s_params = [], []
    for name, tp in t_named.items():
        sp = s_named[name]
        if tp.shape != sp.shape:
            raise ValueError(f"parameter {name!r}: teacher shape {tuple(tp.shape)} != student {tuple(sp.shape)}")
        t_params.append(tp)
        s_params.append(sp.detach().to(dtype=tp.dtype, device=tp.device))
    if not t_params:
        return
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def clip_gradients_per_param(module: nn.Module, clip: float = 3.0) -> list[float]:
    """DINO ``clip_gradients``: clip each parameter's grad norm separately to ``clip``; returns the pre-clip norms.

    Unlike ``clip_grad_norm_`` (one global norm) this limits every tensor on its own. The ``+ 1e-6`` of the
    reference is kept, so a clipped grad ends with norm ``clip * n / (n + 1e-6)``. With AMP, unscale first.
    All norms and scalings are computed by fused ``torch._foreach`` ops with one host sync, not one per tensor;
    an unclipped gradient is multiplied by exactly 1 (unchanged).
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads, 2)
    coefs = [torch.clamp(clip / (n + 1e-6), max=1.0).to(g.dtype) for n, g in zip(norms, grads)]
    torch._foreach_mul_(grads, coefs)
    return torch.stack([n.float() for n in norms]).tolist()


def cancel_last_layer_grads(module: nn.Module, epoch: int, freeze_last_layer: float = 1) -> None:
    """During the first ``freeze_last_layer`` epochs drop the grads of the prototype layer (``last_layer.*``), as
    DINO does (Caron et al. 2021, appendix: the first epoch): keeping the prototypes fixed early helps the student
    escape a bad start. Call after backward (and after unscaling/clipping), before ``optimizer.step``; AdamW skips
    parameters whose grad is None. ``epoch`` and ``freeze_last_layer`` only need the same unit: with
    ``ssl.freeze_last_layer_fraction`` the task passes the optimizer step and the frozen phase in steps."""
    if epoch >= freeze_last_layer:
        return
    for name, p in module.named_parameters():
        if LAST_LAYER in name.split("."):
            p.grad = None
