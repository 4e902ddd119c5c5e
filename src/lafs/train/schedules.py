"""Run-relative schedules: fractions of a run resolved to whole optimizer steps (issue 19).

The papers give their schedules in epochs of long runs: DINO (Caron et al., ICCV 2021, §3 and appendix) warms the
learning rate up for 10 epochs, the teacher temperature for 30 and freezes the prototype layer for the first epoch
of 100; LAFS (CVPR 2024, §3.5, with the reference code's steps) drops the landmark weight beta 1000/100/1/0.11/0 at
epochs 0/8/14/21/28 of a 34-epoch finetune. Counted in epochs or fixed steps, those phases collapse in the short
CPU runs and minute budgets of this project: a 25-step run ended inside its 50-step warm-up, the beta of landmark
option (c) stayed at 1000 for a whole short finetune. A *fraction* of the run (``optim.warmup_fraction``,
``ssl.warmup_teacher_temp_fraction``, ``ssl.freeze_last_layer_fraction``, ``finetune.beta_fractions``) keeps the
phase's share of the run whatever its length. When set (not None) a fraction replaces the epoch/step key(s) of
the same phase (``lafs.config`` refuses both set, and fractions outside [0, 1]).

**The one rounding rule** (:func:`resolve_fraction`): a fraction resolves to ``round_half_up(fraction x
total_steps)`` optimizer steps, computed on the decimal the config wrote (``0.35 x 10 = 3.5 -> 4``, where binary
floating point would give 3.4999... -> 3). :func:`resolve_schedule` resolves every schedule of a run in one place,
against the run's *final* step count: ``train.steps``, the steps of ``train.epochs``, or the count a budgeted run
(``train.budget_minutes``) fixes after timing its first steps, when the loop resolves again. The values depend
only on the config and that count, so a resumed run resolves the same ones.

While a budgeted run times its first ``1 + train.budget_timed_steps`` steps its length is unknown; fractions then
resolve against a placeholder of 10^9 steps, i.e. every fractional phase sits at its start value (learning rate
~0 in a fractional warm-up, the warm-up teacher temperature, the prototype layer frozen, the first beta). From
the step after the timing on, every schedule follows the final count. Fixed step counts (``optim.warmup_steps``)
are exact from step 0 in that case too.

Already run-relative, untouched here: the cosine learning-rate decay (``lafs.train.optim.lr_at``: after the
warm-up, over the remaining steps of the run), the cosine weight decay ``optim.weight_decay ->
optim.weight_decay_end`` and the EMA teacher momentum ``ssl.momentum_teacher -> ssl.momentum_teacher_end``
(``lafs.ssl.dino``), all per optimizer step over the run's total (DINO's ``cosine_scheduler`` over
``epochs x len(data_loader)`` iterations), evaluated with the loop's current total at every step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

LONG_PHASE = 0.25  # a warm-up or frozen-head phase longer than this share of the run is warned about


class ScheduleWarning(UserWarning):
    """A schedule phase takes more than a quarter of the run (the message names the key, its steps and the total)."""


def resolve_fraction(fraction: float, total_steps: int) -> int:
    """Whole optimizer steps of ``fraction`` (in [0, 1]) of a ``total_steps`` run: round half up of
    ``fraction x total_steps``, on the fraction's shortest decimal form (``repr``), so that a fraction written
    as 0.35 of 10 steps is exactly 3.5 -> 4 steps and 0.25 of 10 is 2.5 -> 3. The only rounding of fractions in
    lafs: every run-relative schedule goes through here."""
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a fraction of the run must lie in [0, 1], got {fraction!r}")
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    exact = Decimal(repr(fraction)) * int(total_steps)
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class RunSchedule:
    """Every schedule of a run in optimizer steps (0-based step ``s`` is the ``s + 1``-th optimizer step).

    ``None`` marks a schedule given per epoch (the paper presets): it is applied per epoch, as before, by the
    task's ``set_epoch`` / ``after_backward(epoch)``. A number marks one given as a fraction, applied per step.
    """

    total_steps: int
    pending: bool  # total_steps is the placeholder of a budgeted run being timed
    warmup_steps: int  # learning-rate warm-up, whichever key gave it
    warmup_source: str  # the key(s) and value(s) that gave it, for messages
    teacher_temp_warmup_steps: int | None  # ssl.warmup_teacher_temp_fraction resolved; None = per epoch
    freeze_last_layer_steps: int | None  # ssl.freeze_last_layer_fraction resolved; None = per epoch
    frozen_steps: int  # the frozen-prototype phase in steps, however given (0 without pretraining)
    freeze_source: str
    beta_steps: tuple[int, ...] | None  # finetune.beta_fractions resolved; None = finetune.beta_epochs

    @property
    def fractional(self) -> bool:
        """Whether any schedule was given as a fraction of the run (the loop then logs :meth:`describe`)."""
        return ("fraction" in self.warmup_source or self.teacher_temp_warmup_steps is not None
                or self.freeze_last_layer_steps is not None or self.beta_steps is not None)

    def describe(self) -> str:
        """One line for the run log: every schedule resolved in steps."""
        if self.pending:
            return ("schedules: fractions of the run resolve once the budget has timed the first steps (until then "
                    "their phases hold their start values)")
        parts = [f"lr warm-up {self.warmup_steps} steps ({self.warmup_source})"]
        if self.teacher_temp_warmup_steps is not None:
            parts.append(f"teacher temperature warm-up {self.teacher_temp_warmup_steps} steps")
        if self.freeze_source:
            parts.append(f"prototype layer frozen {self.frozen_steps} steps ({self.freeze_source})")
        if self.beta_steps is not None:
            parts.append(f"beta from steps {list(self.beta_steps)}")
        return f"schedules over {self.total_steps} steps: " + ", ".join(parts)

    def long_phases(self) -> list[str]:
        """Messages for the lr warm-up and frozen-prototype phases longer than a quarter of the run (in steps: more
        than ``resolve_fraction(0.25, total_steps)``), however they were given; none while the length is timed."""
        if self.pending or self.total_steps <= 0:
            return []
        # a quarter in steps by the same rounding as the fractions, so a fraction of 0.25 itself never warns
        limit = resolve_fraction(LONG_PHASE, self.total_steps)
        found = []
        if self.warmup_steps > limit:
            hint = "" if "fraction" in self.warmup_source else " (optim.warmup_fraction scales with the run)"
            found.append(f"{self.warmup_source} gives a learning-rate warm-up of {self.warmup_steps} steps, more than "
                         f"a quarter of the run's {self.total_steps} steps{hint}")
        if self.freeze_source and self.frozen_steps > limit:
            hint = "" if "fraction" in self.freeze_source else " (ssl.freeze_last_layer_fraction scales with the run)"
            found.append(f"{self.freeze_source} freezes the prototype layer for {self.frozen_steps} steps, more than a "
                         f"quarter of the run's {self.total_steps} steps{hint}")
        return found


def resolve_schedule(cfg, total_steps: int, batches_per_epoch: int, pending: bool = False) -> RunSchedule:
    """Resolve every schedule of ``cfg`` against a run of ``total_steps`` optimizer steps of ``batches_per_epoch``
    micro-batches per epoch (``train.accumulation`` micro-batches a step). Checks the fraction keys first
    (``lafs.config.check_fractions``: range, both-set conflicts), for configs not built by ``load_config``."""
    from ..config import check_fractions

    check_fractions(cfg)
    o, s, ft = cfg.optim, cfg.ssl, cfg.finetune
    acc = cfg.train.accumulation
    if o.warmup_fraction is not None:
        warmup = resolve_fraction(o.warmup_fraction, total_steps)
        warmup_source = f"optim.warmup_fraction={_fmt(o.warmup_fraction)}"
    else:
        # unchanged from before fractions: epochs in micro-batches, rounded (half to even), plus the fixed steps
        warmup = round(o.warmup_epochs * batches_per_epoch / acc) + o.warmup_steps
        given = [f"optim.warmup_epochs={_fmt(o.warmup_epochs)}"] if o.warmup_epochs else []
        given += [f"optim.warmup_steps={o.warmup_steps}"] if o.warmup_steps or not given else []
        warmup_source = " + ".join(given)
    temp = None if s.warmup_teacher_temp_fraction is None else resolve_fraction(s.warmup_teacher_temp_fraction,
                                                                                 total_steps)
    freeze, frozen, freeze_source = None, 0, ""
    if s.method != "none":
        if s.freeze_last_layer_fraction is not None:
            freeze = frozen = resolve_fraction(s.freeze_last_layer_fraction, total_steps)
            freeze_source = f"ssl.freeze_last_layer_fraction={_fmt(s.freeze_last_layer_fraction)}"
        else:
            # per epoch: frozen while the step's first micro-batch lies in the first freeze_last_layer epochs
            frozen = min(total_steps, max(0, math.ceil(s.freeze_last_layer * batches_per_epoch / acc)))
            freeze_source = f"ssl.freeze_last_layer={s.freeze_last_layer} (epochs)"
    elif s.freeze_last_layer_fraction is not None:
        freeze = resolve_fraction(s.freeze_last_layer_fraction, total_steps)
    beta = None if ft.beta_fractions is None else tuple(resolve_fraction(f, total_steps) for f in ft.beta_fractions)
    return RunSchedule(total_steps=int(total_steps), pending=pending, warmup_steps=warmup, warmup_source=warmup_source,
                       teacher_temp_warmup_steps=temp, freeze_last_layer_steps=freeze, frozen_steps=frozen,
                       freeze_source=freeze_source, beta_steps=beta)


def warn_long_phases(schedule: RunSchedule) -> list[str]:
    """A :class:`ScheduleWarning` for every phase longer than a quarter of the run; returns the messages."""
    messages = schedule.long_phases()
    for message in messages:
        warnings.warn(message, ScheduleWarning, stacklevel=2)
    return messages
