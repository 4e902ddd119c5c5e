"""The training loop every method uses (supervised, finetuning, DINO: Caron et al., ICCV 2021; LAFS: Sun et al.,
CVPR 2024).

A *task* is an ``nn.Module`` whose ``forward(images, labels)`` returns a dict with a scalar ``loss`` (plus
any detached scalars to log) and whose ``embed(x)`` gives embeddings for verification; the loop does not
know which method runs. Per optimizer step the loop:

1. sets the learning rate from the step (``optim.lr_at``) and tells the task the epoch (``set_epoch``) and the
   step (``set_step``, where the task has it: schedules given as fractions of the run move per step);
2. runs ``accumulation`` micro-batches under autocast (bf16 on CPU/GPU, fp16 + GradScaler on GPU), with
   DDP's gradient all-reduce only on the last one (``no_sync``);
3. skips the step if any rank's loss is not finite (all ranks agree, so none waits on a collective);
4. clips the gradients if asked (one global norm, or each tensor's own norm, as DINO's ``utils.clip_gradients``),
   calls the task's ``after_backward(epoch)`` hook, steps, and undoes the step if it made a weight non-finite
   (``guard.py``: weights, buffers and optimizer state restored; so no checkpoint ever holds a non-finite weight;
   ``train.step_guard=false`` turns this off, leaving only the loss check); after ``max_nonfinite`` consecutive
   skipped steps, or more than ``max_skipped_fraction`` of the steps so far (and more than
   ``max_nonfinite``), it stops with :class:`NonFiniteLossError`, naming the last checkpoint;
5. counts the bad records the data skipped (``bad_records.py``: ``data.max_bad_records`` over the run; in the
   logs, the checkpoint, ``summary.json`` and the model card);
6. calls ``after_step(step, total_steps)`` (the EMA teacher of DINO/LAFS), logs (JSONL, TensorBoard, tqdm with
   images/s and ETA), verifies on ``.bin`` pairs and checkpoints when due. The weight decay follows a cosine
   schedule when ``optim.weight_decay_end`` is set.

Schedules are resolved to steps in one place, :func:`~lafs.train.schedules.resolve_schedule`, against the run's
final step count (again once a budgeted run has timed its count); the task gets the result (``set_schedule``).
A warm-up or frozen-prototype phase longer than a quarter of the run is warned about (``ScheduleWarning``).

Exact resume: a checkpoint (its entries: ``lafs.checkpoint``) holds the model, optimizer, GradScaler, every rank's
RNG states, the step, torch's thread count and the data position (micro-batches consumed, and the global samples
of the epoch seen; ``data/sampler.py`` turns it into epoch + batch). The learning rate is a function of the step. A
run killed mid-epoch and resumed on the same number of processes and threads repeats the uninterrupted run's losses
exactly (CPU, same seed). Resuming checks what it resumes (``lafs.checkpoint.check_resume``): another model, head,
data, batch size, world size, seed or thread count is refused with the keys listed, unless ``--resume-anyway``.
A classifier whose centres are sharded over the ranks (Partial FC) is saved gathered with its optimizer state, through
its own hooks (``lafs.heads.base.ClassifierState``; the loop never asks which head it holds), so a run can resume on
another number of processes (then at the same sample of its epoch, with fresh RNG streams, reported). ``--resume``
with no file takes the run's newest readable checkpoint, setting aside (``step_N.pt.damaged``) newer ones that do not.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import (DAMAGED, FORMAT, check_resume, checkpoints_in, data_position, latest_readable,
                          read_training_checkpoint, resume_position, rng_state, set_rng_state, shape_mismatches,
                          write_checkpoint)
from ..config import SELECT_LAST, save_config, to_yaml
from ..data.sampler import EpochBatchSampler, collate
from ..eval.embedding import evaluate_pairs
from ..ssl.dino import clip_gradients_per_param, weight_decay_at
from ..io import atomic_write_bytes
from ..models.precision import AMP_DTYPES, resolve_amp
from .bad_records import BadRecordLedger
from .distributed import DistEnv, all_gather_objects, all_reduce_mean, any_rank, barrier, broadcast_object
from .guard import StepGuard, too_many_skipped
from .logging import RunLogger
from .model_card import model_card
from .optim import build_optimizer, lr_at, param_groups, set_lr
from .monitors import DriftMonitor
from .sync_bn import convert_sync_batchnorm
from .schedules import RunSchedule, resolve_schedule, warn_long_phases

BUDGET_UNSET = 10**9  # total_steps while train.budget_minutes is being timed


class NonFiniteLossError(RuntimeError):
    """Too many skipped steps (non-finite losses or updates), in a row or in all; the message lists the steps."""


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)
    bad_records: list[str] = field(default_factory=list)  # training records skipped (data.max_bad_records)
    val: dict = field(default_factory=dict)
    best: float | None = None
    resumed_from: str | None = None
    first_steps_s: float | None = None  # wall time of the untimed first steps (compilation included)


class Trainer:
    def __init__(self, cfg, task: nn.Module, train_set, env: DistEnv, val_sets: dict | None = None,
                 progress: bool = True) -> None:
        self.cfg, self.task, self.env = cfg, task.to(env.device), env
        if cfg.train.channels_last:  # only 4-D (conv) weights change layout; their outputs follow them
            self.task.to(memory_format=torch.channels_last)
        self.train_set, self.val_sets = train_set, val_sets or {}
        self.uses_keypoints = bool(getattr(task, "uses_keypoints", False))
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.progress = progress
        t = cfg.train
        self.amp = resolve_amp(t.amp, env.device.type)  # train.amp=auto: bf16 only where it pays
        if self.amp == "fp16" and env.device.type != "cuda":
            raise ValueError("train.amp=fp16 needs CUDA (a GradScaler); use train.amp=bf16 on CPU")
        if t.accumulation < 1:
            raise ValueError(f"train.accumulation must be >= 1, got {t.accumulation}")
        if not 0 <= t.max_skipped_fraction <= 1:
            raise ValueError(f"train.max_skipped_fraction must be in [0, 1], got {t.max_skipped_fraction}")
        self.sampler = EpochBatchSampler(len(train_set), t.batch_size, env.rank, env.world_size, t.seed)
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.steps_per_epoch = max(1, self.batches_per_epoch // t.accumulation)
        self.total_steps = t.steps if t.epochs is None else math.ceil(t.epochs * self.batches_per_epoch / t.accumulation)
        # train.budget_minutes: the step count is fixed by timing the first steps; until then schedules see a long run
        self.budget_pending = t.budget_minutes is not None
        if self.budget_pending:
            if not t.budget_minutes > 0 or t.budget_timed_steps < 1:
                raise ValueError(f"train.budget_minutes must be > 0 and train.budget_timed_steps >= 1, got "
                                 f"{t.budget_minutes} and {t.budget_timed_steps}")
            self.total_steps = BUDGET_UNSET
        self.budget: dict = {}
        o = cfg.optim

        # the classifier's own hooks (lafs.heads.base.ClassifierState) say how its state spans the ranks; a head
        # whose centres are split over them (``sharded``) stays out of DDP and is checkpointed gathered
        head = getattr(task, "head", None)
        self.sharded_head = head if getattr(head, "sharded", False) else None
        named = list(task.named_parameters())
        self.optimizer = build_optimizer(
            param_groups(named, o.weight_decay, o.landmark_weight_decay, layer_decay=o.layer_decay), o.name, o.lr,
            o.momentum, tuple(o.betas), o.fused)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # train.step_guard=false: no snapshot and no check of the weights (benchmarks/bench_step_guard.py: its cost)
        self.guard = StepGuard(task, self.optimizer) if t.step_guard else None
        for g in self.optimizer.param_groups:
            g["base_weight_decay"] = g["weight_decay"]
        global_batch = t.batch_size * env.world_size * t.accumulation
        self.base_lr = o.lr * (global_batch / o.lr_scale_batch if o.lr_scale_batch else 1.0)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.net: nn.Module = task
        if env.distributed:
            module = task
            if t.sync_bn:
                module = convert_sync_batchnorm(module)  # any backend (train/sync_bn.py), gloo on CPU too
            if self.sharded_head is not None:
                # the sharded centres differ per rank: DDP must neither broadcast nor average them
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    module, [f"head.{k}" for k, _ in self.sharded_head.named_parameters()]
                    + [f"head.{k}" for k, _ in self.sharded_head.named_buffers()]
                )
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        # the first step compiles: it and, with compile, the next one (a backward or guard recompile) are untimed
        self.untimed_steps = 2 if t.compile else 1
        self._embed = self.task.embed
        if t.compile:
            if env.device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
                # inductor would fail at the first step with a long traceback; say it before any work is done
                raise ValueError("train.compile=true on CPU needs a C++ compiler (torch.compile's inductor backend "
                                 "builds its kernels with one): install g++ or set train.compile=false")
            self.net = torch.compile(self.net)
            self._embed = torch.compile(self.task.embed)
        self.step = 0
        self.micro_batches = 0
        self.nonfinite_steps: list[int] = []
        self.bad = BadRecordLedger(train_set, cfg.data.max_bad_records, env.device)  # skipped records, each once
        self.last_checkpoint: Path | None = None  # written or resumed from: the one a stop message names
        self.best: float | None = None
        self.val_last: dict = {}  # the latest validation, saved with the checkpoint (lafs verify's threshold)
        self.schedule: RunSchedule
        self._resolve_schedule()
        # drift of the trunks from their start (train.monitors): built here, before any resume, so theta_0 is the
        # seeded initialisation or the pretrained weights, the same for a resumed run
        modules = task.monitored_modules() if hasattr(task, "monitored_modules") else {}
        self.drift = DriftMonitor(modules) if modules and env.is_main and t.monitors else None
        self.monitors: dict = {}  # the latest drift, saved with the checkpoint and shown on the model card
        self.floors: dict = {}  # set -> {raw_pixels, pca_whitened, untrained} accuracies (train.floors), measured once

    def _resolve_schedule(self) -> None:
        """Every schedule in steps against the run's step count (a budgeted run's placeholder until timed; then
        again with the final count): config + total steps only, so a resumed run resolves the same values."""
        self.schedule = resolve_schedule(self.cfg, self.total_steps, self.batches_per_epoch,
                                         pending=self.budget_pending)
        self.warmup_steps = self.schedule.warmup_steps
        if hasattr(self.task, "set_schedule"):
            self.task.set_schedule(self.schedule)
        if self.env.is_main:
            warn_long_phases(self.schedule)  # nothing while a budgeted run is being timed

    # ---------------------------------------------------------------- checkpoints
    def _model_state(self) -> tuple[dict, dict | None]:
        state = self.task.state_dict()
        if self.sharded_head is None:
            return state, None
        return {k: v for k, v in state.items() if not k.startswith("head.")}, self.sharded_head.full_state_dict()

    def _map_shard_state(self, opt_state: dict, fn) -> dict:
        """Apply ``fn`` (the sharded head's gather or shard of rows) to the optimizer state of its parameters."""
        if self.sharded_head is not None:
            shard_ids = {id(p) for p in self.sharded_head.parameters()}
            for i, p in enumerate(self.params):  # optimizer state is keyed by position in the groups
                if id(p) in shard_ids and i in opt_state["state"]:
                    opt_state["state"][i] = {
                        k: (fn(v) if torch.is_tensor(v) and v.ndim >= 1 else v) for k, v in opt_state["state"][i].items()
                    }
        return opt_state

    def _optimizer_state(self) -> dict:
        return self._map_shard_state(self.optimizer.state_dict(), lambda t: self.sharded_head.gather_rows(t))

    def save(self, best: bool = False) -> Path | None:
        """Every rank calls this (gathering is collective); rank 0 writes ``step_<n>.pt`` atomically."""
        model, pfc = self._model_state()
        state = {
            "format": FORMAT, "step": self.step, "micro_batches": self.micro_batches,
            "model": model, "partial_fc": pfc, "optimizer": self._optimizer_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": all_gather_objects(rng_state()), "world_size": self.env.world_size,
            "nonfinite_steps": self.nonfinite_steps, "bad_records": self.bad.records, "best": self.best,
            "config": to_yaml(self.cfg),
            "val": self.val_last, "total_steps": self.total_steps, "budget": self.budget,
            "monitors": self.monitors, "floors": self.floors, "threads": torch.get_num_threads(),
            "data_position": data_position(self.micro_batches, self.batches_per_epoch,
                                           self.cfg.train.batch_size * self.env.world_size),
        }
        bad = self.bad.gathered()
        path = None
        extras = getattr(self.task, "checkpoint_extras", None)
        if extras is not None:
            state.update(extras())
        if self.env.is_main:
            path = write_checkpoint(state, self.ckpt_dir / f"step_{self.step:07d}.pt")
            self.last_checkpoint = path
            if best:
                tmp = self.ckpt_dir / ".best.pt.link"
                tmp.unlink(missing_ok=True)
                os.link(path, tmp)  # a second name for the same bytes, swapped in atomically
                os.replace(tmp, self.ckpt_dir / "best.pt")
            # supervised tasks hold ``backbone``; pretraining's teacher branch holds the trunk that gets exported
            backbone = getattr(self.task, "backbone", None) or getattr(getattr(self.task, "teacher", None),
                                                                       "backbone", None)
            card = model_card(self.cfg, step=self.step, total_steps=self.total_steps,
                              params=sum(p.numel() for p in (backbone or self.task).parameters()),
                              embedding_size=getattr(backbone, "embedding_size", None), val=self.val_last,
                              best=self.best, checkpoint=path.name, has_best=(self.ckpt_dir / "best.pt").exists(),
                              monitors=self.monitors, floors=self.floors,
                              skipped={"steps": self.nonfinite_steps, "records": bad,
                                       "max_bad_records": self.cfg.data.max_bad_records})
            atomic_write_bytes(self.ckpt_dir / "MODEL_CARD.md", card.encode())
            for old in checkpoints_in(self.ckpt_dir)[: -self.cfg.train.keep_last]:
                old.unlink()
        barrier()
        return path

    def load(self, path: str | Path, state: dict | None = None, anyway: bool = False) -> None:
        """Resume from the checkpoint ``path`` (its entries ``state`` when already read). A run configured otherwise
        is refused unless ``anyway`` (``lafs.checkpoint.check_resume``); tensors of another shape are named."""
        path = Path(path)
        # weights_only (lafs.io_safe): a file holding anything but tensors and plain values is refused unopened
        state = read_training_checkpoint(path) if state is None else state
        threads = torch.get_num_threads() if self.env.device.type == "cpu" else None  # GPU math ignores the count
        for diff in check_resume(path, state, to_yaml(self.cfg), self.env.world_size, threads, anyway):
            print(f"--resume-anyway: {diff}")
        shapes = shape_mismatches(state["model"], self.task.state_dict())
        if shapes:
            raise ValueError(f"{path}: tensors of another shape than this config's model: " + "; ".join(shapes[:5])
                             + (f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else ""))
        missing, unexpected = self.task.load_state_dict(state["model"], strict=False)
        if self.sharded_head is not None:
            missing = [k for k in missing if not k.startswith("head.")]
            try:
                self.sharded_head.load_full_state_dict(state["partial_fc"])
            except ValueError as err:
                raise ValueError(f"{path}: {type(self.sharded_head).__name__} centres: {err}") from None
        if missing or unexpected:
            raise ValueError(f"{path}: model keys differ from this config; missing {missing[:5]}, unexpected {unexpected[:5]}")
        try:
            self.optimizer.load_state_dict(
                self._map_shard_state(state["optimizer"], lambda t: self.sharded_head.shard_rows(t))
            )
        except ValueError as err:
            raise ValueError(f"{path}: optimizer state: {err}") from None
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.micro_batches, note = resume_position(state, len(self.train_set),
                                                   self.cfg.train.batch_size * self.env.world_size)
        if note:
            print(note)
        self.last_checkpoint = path
        self.nonfinite_steps, self.best = list(state["nonfinite_steps"]), state["best"]
        self.bad.restore(state.get("bad_records", []))
        self.val_last = state.get("val", {})
        self.monitors = state.get("monitors", {})
        self.floors = state.get("floors", {})
        if self.cfg.train.budget_minutes is not None and "steps" in state.get("budget", {}):
            # a budgeted run resumes with the step count it measured, not a new timing (and the same schedules)
            self.total_steps, self.budget, self.budget_pending = state["total_steps"], state["budget"], False
            self._resolve_schedule()
        if state["world_size"] == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank])
        else:
            torch.manual_seed(self.cfg.train.seed + 1000 * self.step + self.env.rank)
            print(f"resumed {state['world_size']}-process checkpoint on {self.env.world_size} processes: "
                  "model, optimizer and data position restored; random streams restart (not bit-exact)")

    def find_resume(self, resume: str) -> tuple[Path | None, dict | None]:
        """(checkpoint, its entries) to resume: the file ``resume``, or with ``auto`` the run's newest checkpoint that
        reads; each newer one that does not is named with its reason and set aside as ``<name>.damaged`` (by rank 0,
        once every rank has read)."""
        if resume != "auto":
            return Path(resume), None
        path, state, skipped = latest_readable(self.ckpt_dir)
        for bad, why in skipped:
            print(f"skipped {bad.name}: {why}; set aside as {bad.name}{DAMAGED}")
        if skipped and path is None:
            names = ", ".join(b.name for b, _ in skipped)
            raise ValueError(f"no checkpoint in {self.ckpt_dir} reads (skipped {names}); nothing to resume")
        barrier()
        if self.env.is_main:
            for bad, _ in skipped:
                os.replace(bad, bad.with_name(bad.name + DAMAGED))
        return path, state

    # ---------------------------------------------------------------- data
    def _stream(self):
        """Micro-batches from position ``self.micro_batches`` on, across epochs: (epoch, batch)."""
        workers = self.cfg.data.workers
        loader = DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
            pin_memory=self.env.device.type == "cuda", persistent_workers=workers > 0,
            # its own generator: creating a loader iterator must not consume the global RNG (exact resume)
            generator=torch.Generator(),
        )
        epoch, batch = divmod(self.micro_batches, self.batches_per_epoch)
        while True:
            self.sampler.set_position(epoch, batch)
            for item in loader:
                yield epoch, item
            epoch, batch = epoch + 1, 0

    def _set_weight_decay(self) -> None:
        """Cosine ``weight_decay -> weight_decay_end`` per iteration on every group that decays (DINO, Caron et al.,
        ICCV 2021, §3.2: 0.04 -> 0.4)."""
        o = self.cfg.optim
        wd = weight_decay_at(self.step, self.total_steps, o.weight_decay, o.weight_decay_end)
        for g in self.optimizer.param_groups:
            base = g["base_weight_decay"]
            # groups keep their ratio to the main decay (the landmark group's own value scales along)
            g["weight_decay"] = base * wd / o.weight_decay if o.weight_decay else 0.0

    # ---------------------------------------------------------------- evaluation
    def validate(self) -> dict:
        results = {}
        if self.env.is_main and self.val_sets:
            was_training = self.task.training
            self.task.eval()
            amp = self.amp
            with torch.autocast(self.env.device.type, AMP_DTYPES.get(amp, torch.float32), enabled=amp != "none"):
                for name, (images, issame, *kps) in self.val_sets.items():
                    kp = kps[0] if kps and self.uses_keypoints else None
                    r = evaluate_pairs(lambda x, keypoints=None: self._embed(x, keypoints).float(), images,
                                       issame, batch_size=256, device=self.env.device, keypoints=kp)
                    # the 10-fold threshold on squared distances of unit embeddings, as a cosine: 1 - d / 2
                    results[name] = {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"], "auc": r["auc"],
                                     "cosine_threshold": 1.0 - r["threshold"] / 2.0}
                    if r["coarse_grid"]:  # the grid understates the run: keep the flag and the exact optimum
                        results[name] |= {"coarse_grid": True, "exact_best_accuracy": r["exact_best_accuracy"]}
            self.task.train(was_training)
        return broadcast_object(results)

    def select_on(self, val: dict) -> str | None:
        """The set whose accuracy chooses ``best.pt``: ``train.select_on``, else the first (list validation pairs first
        in ``data.val``, test sets such as LFW after them); None for ``last``: no selection, the last step is kept."""
        name = self.cfg.train.select_on or next(iter(val))
        if name != SELECT_LAST and name not in val:
            raise ValueError(f"train.select_on={name!r} is not a validation set of this run: {', '.join(val)}")
        return None if name == SELECT_LAST else name

    def measure_floors(self, logger) -> dict:
        """The floors of every validation set, before the first step (``train.floors``): the untrained network (this
        run's own initial weights, through :meth:`validate`), raw-pixel cosine and PCA-whitened pixels fitted on up
        to 20,000 of the run's training images, labels unused (``lafs.eval.floors``). Every rank calls it
        (validation is collective); the main process measures."""
        untrained = self.validate()
        # a finetune starts from pretrained weights: its step-0 accuracy is the start, not an untrained floor
        key = "start" if (self.cfg.finetune.init or self.cfg.finetune.landmark_init) else "untrained"
        floors: dict = {}
        if self.env.is_main and self.val_sets:
            from ..eval.floors import floors_for_sets, subsample_indices

            idx = subsample_indices(len(self.train_set), 20000, seed=0)
            fit = torch.stack([self.train_set[int(i)]["image"] for i in idx])
            sets = {name: (images, issame) for name, (images, issame, *_) in self.val_sets.items()}
            pixels = floors_for_sets(sets, fit, components=min(256, len(fit) - 1))
            for name in sets:
                floors[name] = {"raw_pixels": pixels[name]["raw_pixels"]["accuracy"],
                                "pca_whitened": pixels[name]["pca_whitened"]["accuracy"],
                                key: untrained[name]["accuracy"]}
            logger.log(self.step, {f"{n}_{k}": v for n, r in floors.items() for k, v in r.items()}, kind="floors")
            logger.write("floors: " + "; ".join(f"{n} raw pixels {100 * r['raw_pixels']:.2f} %, PCA-whitened "
                                                f"{100 * r['pca_whitened']:.2f} % ({len(fit)} training images), "
                                                f"{key} {100 * r[key]:.2f} %" for n, r in floors.items()))
        return broadcast_object(floors)

    # ---------------------------------------------------------------- the loop
    def _time_budget(self, logger) -> None:
        """After each step until the budget is fixed: time ``budget_timed_steps`` steps (the first step, with its
        warm-up costs, untimed) and set ``total_steps`` to what fits in ``budget_minutes`` (rank 0's timing)."""
        t = self.cfg.train
        now = time.perf_counter()
        if not self.budget:
            if self.step - self.start_step >= self.untimed_steps:
                self.budget = {"from_step": self.step, "t0": now}
            return
        timed = self.step - self.budget["from_step"]
        if timed < t.budget_timed_steps:
            return
        seconds = broadcast_object((now - self.budget["t0"]) / timed)
        self.total_steps = max(self.step, int(t.budget_minutes * 60 / seconds))
        self.budget = {"minutes": t.budget_minutes, "seconds_per_step": seconds, "timed_steps": timed,
                       "steps": self.total_steps}
        self.budget_pending = False
        logger.set_total(self.total_steps)
        logger.log(self.step, self.budget, kind="budget")
        logger.write(f"budget {t.budget_minutes:g} min: {seconds:.3f} s/step over {timed} steps -> "
                     f"{self.total_steps} steps")
        self._resolve_schedule()  # every fraction of the run against the count just fixed
        if self.schedule.fractional:
            logger.write(self.schedule.describe())

    def _skip(self, what: str, consecutive: int, logger, record: dict) -> int:
        """Undo this step (weights, buffers, optimizer state as before it), count and log it as skipped; stop with
        :class:`NonFiniteLossError` when too many were, in a row or in all. Returns the count in a row."""
        t = self.cfg.train
        if self.guard is not None:
            self.guard.restore()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1  # steps are numbered from 1; a skipped one still counts (schedules move on)
        self.nonfinite_steps.append(self.step)
        consecutive += 1
        logger.log(self.step, {**record, "skipped": 1, "nonfinite": what})
        cause = "non-finite loss" if what == "loss" else "the update made a weight non-finite"
        logger.write(f"step {self.step}: {cause}, step skipped and undone ({consecutive} in a row, "
                     f"{len(self.nonfinite_steps)} in all)")
        why = too_many_skipped(what, consecutive, self.nonfinite_steps, self.step, t.max_nonfinite,
                               t.max_skipped_fraction)
        if why is None:
            return consecutive
        if self.last_checkpoint is None:
            last = f"no checkpoint of this run was written to {self.ckpt_dir}"
        else:  # every saved step passed the guard, and a resumed checkpoint was checked when read
            last = f"the last checkpoint, {self.last_checkpoint}, holds finite weights (every saved step was checked)"
        raise NonFiniteLossError(f"{why}; stopped, nothing of the skipped steps was saved: {last}. Lower optim.lr, "
                                 "set optim.clip_grad or train.amp=none, then --resume.")

    def run(self, resume: str | None = None, anyway: bool = False) -> TrainResult:
        """Train to the end; ``resume``: a checkpoint file or ``auto``, ``anyway``: resume a run configured
        otherwise (``--resume-anyway``)."""
        t, env = self.cfg.train, self.env
        resumed_from = None
        if resume:
            path, state = self.find_resume(resume)
            if path is not None:
                self.load(path, state, anyway)
                resumed_from = str(path)
        if env.is_main:  # after the resume checks: a refused resume leaves the folder's config as it was
            save_config(self.cfg, self.out)
        logger = RunLogger(self.out, enabled=env.is_main, total_steps=None if self.budget_pending else self.total_steps, start_step=self.step,
                           progress=self.progress)
        if resumed_from:
            logger.write(f"resumed from {resumed_from} at step {self.step}")
        if self.schedule.fractional:
            logger.write(self.schedule.describe())
        if t.floors and not resumed_from and self.step == 0:
            self.floors = self.measure_floors(logger)
        result = TrainResult(step=self.step, resumed_from=resumed_from)
        self.start_step, run_t0 = self.step, time.perf_counter()
        amp_dtype = AMP_DTYPES.get(self.amp, torch.float32)
        ckpt_every = t.ckpt_every or self.steps_per_epoch
        stream = self._stream()
        consecutive = 0
        self.bad.check()
        self.task.train()
        try:
            while self.step < self.total_steps:
                o = self.cfg.optim
                lr = lr_at(self.step, self.total_steps, self.base_lr, self.warmup_steps, o.min_lr, o.schedule)
                set_lr(self.optimizer, lr)
                if o.weight_decay_end is not None:
                    self._set_weight_decay()
                epoch = self.micro_batches // self.batches_per_epoch
                self.task.set_epoch(epoch)
                if hasattr(self.task, "set_step"):
                    self.task.set_step(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                if self.guard is not None:
                    self.guard.snapshot()  # before the forward: BatchNorm statistics move there
                losses, extras, images, finite, new_bad = [], {}, 0, True, False
                for micro in range(t.accumulation):
                    _, batch = next(stream)
                    self.micro_batches += 1
                    new_bad |= self.bad.note(batch.get("bad_records"), logger)
                    x = batch["image"].to(env.device, non_blocking=True)
                    y = batch["label"].to(env.device, non_blocking=True)
                    kp = batch.get("keypoints") if self.uses_keypoints else None
                    inputs = (x, y) if kp is None else (x, y, kp.to(env.device, non_blocking=True))
                    images += len(y) * env.world_size
                    sync = self.net.no_sync() if env.distributed and micro < t.accumulation - 1 else contextlib.nullcontext()
                    with sync:
                        with torch.autocast(env.device.type, amp_dtype, enabled=self.amp != "none"):
                            out = self.net(*inputs)
                        loss = out["loss"].float()
                        if any_rank(not bool(torch.isfinite(loss)), env.device):
                            finite = False
                            break
                        scaled = loss / t.accumulation
                        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    losses.append(loss.detach())
                    for k, v in out.items():
                        if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                            extras.setdefault(k, []).append(v.detach().float())
                self.bad.check()
                if not finite:
                    consecutive = self._skip("loss", consecutive, logger, {"loss": float("nan"), "lr": lr})
                    continue
                record = {"lr": lr}
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                if o.clip_grad and o.clip_mode == "per_param":  # one of optim.CLIP_MODES
                    record["grad_norm_max"] = max(clip_gradients_per_param(self.task, o.clip_grad), default=0.0)
                elif o.clip_grad:
                    record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, o.clip_grad))
                if hasattr(self.task, "after_backward"):
                    self.task.after_backward(epoch)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                if self.guard is not None and any_rank(self.guard.nonfinite(), env.device):  # one fused check
                    loss_value = float(all_reduce_mean(torch.stack(losses).mean()))
                    consecutive = self._skip("update", consecutive, logger, {"loss": loss_value, "lr": lr})
                    continue
                consecutive = 0
                if hasattr(self.task, "after_step"):
                    self.task.after_step(self.step, self.total_steps)
                self.step += 1
                first_steps = self.step - self.start_step == self.untimed_steps
                if first_steps:
                    # compile and warm-up time, kept apart from every timing (budget); logged with this step
                    result.first_steps_s = time.perf_counter() - run_t0
                    record.update(first_steps=self.untimed_steps, first_steps_s=result.first_steps_s)
                if self.budget_pending:
                    self._time_budget(logger)
                # the loss and every logged scalar in one all-reduce (one host sync per step), on the loss's device
                names, loss_mean = ["loss", *extras], torch.stack(losses).mean()
                means = torch.stack([loss_mean] + [torch.stack(v).mean().to(loss_mean.device) for v in extras.values()])
                record.update(zip(names, all_reduce_mean(means).tolist()))
                loss_value = record["loss"]
                result.losses.append(loss_value)
                record["epoch"] = self.micro_batches / self.batches_per_epoch
                record["images_per_s"] = logger.progress(self.step, images, loss_value, lr)
                if self.bad.records:
                    record["bad_records"] = len(self.bad.records)  # this rank's count so far
                if (self.step % t.log_every == 0 or self.step == self.total_steps or self.step == 1 or first_steps
                        or new_bad):
                    logger.log(self.step, record)
                improved = False
                last = self.step == self.total_steps
                if (t.val_every and self.step % t.val_every == 0) or last:
                    drift = self.drift() if self.drift is not None else {}
                    if drift:
                        self.monitors = {"step": self.step, **drift}
                    val = self.validate()
                    if drift and not val:
                        logger.log(self.step, drift, kind="val")
                    if val:
                        result.val = val
                        self.val_last = {"step": self.step, "sets": val}
                        # best.pt: chosen on one set (train.select_on, else the first), never a test set; or the last
                        name = self.select_on(val)
                        chosen = float(val[name or next(iter(val))]["accuracy"])
                        improved = name is None or self.best is None or chosen > self.best
                        self.best = chosen if name is None else max(chosen, self.best or chosen)
                        flat = {f"{n}_{k}": v for n, r in val.items() for k, v in r.items()} | drift
                        logger.log(self.step, flat, kind="val")
                        logger.write(f"step {self.step}: " + ", ".join(
                            f"{n} {r['accuracy'] * 100:.2f}% (AUC {r['auc']:.3f})" for n, r in val.items()))
                if self.step % ckpt_every == 0 or last or improved:
                    self.save(best=improved)
        finally:
            logger.close()
        result.step = self.step
        result.nonfinite_steps = list(self.nonfinite_steps)
        result.bad_records = self.bad.gathered()
        result.best = self.best
        return result
