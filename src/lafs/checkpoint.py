"""The lafs checkpoint: what it holds, how it is written, and the one way it is read.

A checkpoint is a dict of tensors and plain values, so that it opens ``weights_only``:

- every checkpoint: ``config`` (the run's YAML), ``model`` (the task's state dict, the backbone under
  ``backbone.``) and ``step``;
- a training checkpoint (``format`` = :data:`FORMAT`, written by ``lafs.train.loop``) adds ``micro_batches``,
  ``partial_fc`` (None, or the gathered ``full_state_dict`` of a head sharded over the ranks, whose keys are then
  left out of ``model``; the name is that of the first such head, Partial FC), ``optimizer``, ``scaler``, ``rng`` (every rank's :func:`rng_state`), ``world_size``,
  ``nonfinite_steps``, ``best``, ``val`` (the latest validation: its cosine threshold is the model's decision
  threshold, :func:`stored_threshold`), ``total_steps``, ``budget``, ``monitors``, ``floors``, ``threads`` (torch's
  thread count: CPU losses depend on it) and ``data_position`` (the epoch and the global samples of it consumed, so a
  run resumed on another batch or world size goes on where it stopped); pretraining adds the ``teacher`` and
  ``student`` branches;
- a converted checkpoint (``lafs convert``) adds ``converted`` (where the weights came from and how they were mapped).

A safetensors model folder (``lafs export --safetensors``) reads as the entries ``config``, ``backbone`` (the
backbone's own keys), ``step`` and ``val``.

Writing is atomic (a temporary file renamed into place); a full disk is a :class:`DiskFullError` naming the file.
Resuming checks what it resumes (:func:`resume_mismatches`, :func:`shape_mismatches`) and skips a damaged latest
checkpoint for the one before it (:func:`latest_readable`). Reading goes through :func:`read_checkpoint` alone, for
resuming, finetuning from, evaluating, exporting and showing a model: files open with
:func:`lafs.io_safe.load_checkpoint` (weights only, a file naming other Python objects is refused unopened),
folders with :func:`lafs.io_safe.read_safetensors_folder`.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .io import atomic_write
from .io_safe import CONFIG_FILE, load_checkpoint, read_safetensors_folder, safetensors_folder

if TYPE_CHECKING:
    from .config import Config

FORMAT = "lafs-train-1"
BEST = "best.pt"
DAMAGED = ".damaged"  # suffix of a checkpoint set aside because it did not read


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space; the message names the file (the previous one is intact)."""

    def __str__(self) -> str:
        return str(self.strerror)


class ResumeMismatchError(ValueError):
    """The run being resumed was configured otherwise; the message lists the differing keys."""


class _WriteErrors:
    """A file whose write errors are remembered: ``torch.save`` reports a failed write as a bare ``RuntimeError``
    ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def _is_full(err: BaseException | None) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def write_checkpoint(state: dict, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically: a crash mid-write leaves the previous file intact. A full disk (or
    quota) is a :class:`DiskFullError` naming ``path``; the temporary file is removed."""
    path = Path(path)
    seen: list[_WriteErrors] = []

    def save(fh) -> None:
        seen.append(_WriteErrors(fh))
        torch.save(state, seen[0])

    try:
        return atomic_write(path, save)
    except (OSError, RuntimeError) as err:
        cause = err if _is_full(err) else (seen[0].error if seen else None)
        if not _is_full(cause):
            raise
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(cause.errno, f"the disk is full: writing checkpoint {path} failed ({free} on that "
                            f"disk; {os.strerror(cause.errno)}); the previous checkpoint is intact. Free some "
                            "space (or lower train.keep_last), then --resume") from err


def read_checkpoint(path: str | Path, expected: str = "a lafs checkpoint", *, mmap: bool = False,
                    need_model: bool = False) -> dict:
    """The entries of a checkpoint file or a safetensors model folder (module docstring).

    A file naming Python objects other than tensors and plain values is an ``UnsafeFileError``, any other file that
    is not a dict checkpoint a ``ValueError`` naming it and ``expected``; ``need_model`` also refuses a file without
    a ``model`` entry. ``mmap`` maps a file's tensors instead of reading them.
    """
    path = Path(path)
    if safetensors_folder(path) is not None:
        return _folder_state(path)
    state = load_checkpoint(path, expected, mmap=mmap)
    if need_model and "model" not in state:
        raise ValueError(f"{path}: not {expected} (no 'model' entry)")
    return state


def read_training_checkpoint(path: str | Path) -> dict:
    """A checkpoint that ``lafs.train.loop`` can resume from (its ``format`` is :data:`FORMAT`), with finite weights
    (a ``ValueError`` naming the non-finite tensors otherwise: resuming from them would only train NaN)."""
    state = read_checkpoint(path, "a lafs training checkpoint")
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lafs training checkpoint (format {FORMAT})")
    bad = [k for k, v in state["model"].items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path} holds non-finite weights ({len(bad)} tensors: {', '.join(bad[:3])})")
    return state


def _folder_state(path: Path) -> dict:
    """A safetensors folder as checkpoint entries: ``config``, ``backbone`` (the weights), ``step`` and ``val`` (its
    stored validation, for the verification threshold)."""
    weights, config, meta, _ = read_safetensors_folder(path)
    step = meta.get("lafs_step")
    try:
        val = json.loads(meta.get("lafs_val") or "{}")
    except json.JSONDecodeError:
        val = {}
    return {"config": config, "backbone": weights, "step": int(step) if step and step.isdigit() else step,
            "val": val if isinstance(val, dict) else {}}


# ---- what a checkpoint holds ----

def stored_config(path: str | Path, state: dict) -> Config:
    """The run config stored in a checkpoint's ``config`` entry (the model is rebuilt from it)."""
    from .config import load_config

    text = state.get("config")
    if not isinstance(text, str):
        raise ValueError(f"{path}: a lafs checkpoint without its config; cannot rebuild the model")  # noqa: TRY004
    return load_config(text=text, source=f"the config stored in {path}")


def config_text(path: str | Path) -> str | None:
    """The run config of a checkpoint file or safetensors folder as YAML text, None when it stores none. A folder's
    ``config.yaml`` is read without its weights, a file's tensors are memory-mapped, not read."""
    folder = safetensors_folder(path)
    if folder is not None:
        return (folder / CONFIG_FILE).read_text()
    text = read_checkpoint(path, mmap=True).get("config")
    return text if isinstance(text, str) else None


def backbone_weights(path: str | Path, state: dict) -> tuple[dict[str, torch.Tensor], str]:
    """(the backbone's own state dict, the entry it came from): a folder's weights, a pretraining checkpoint's
    ``teacher`` (the branch finetuning starts from), else the ``backbone.*`` keys of ``model``."""
    if isinstance(state.get("backbone"), dict):
        return state["backbone"], "model.safetensors"
    if isinstance(state.get("teacher"), dict):
        return state["teacher"], "teacher"
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}, "model"


def stored_threshold(state: dict) -> tuple[float | None, str]:
    """The cosine threshold of a checkpoint's latest validation (the 10-fold threshold of its first set)."""
    val = state.get("val") or {}
    for name, r in (val.get("sets") or {}).items():
        if "cosine_threshold" in r:
            return float(r["cosine_threshold"]), (f"{name} validation at step {val.get('step')}, "
                                                  f"accuracy {100 * r['accuracy']:.2f} %")
    return None, ""


def rng_state() -> dict:
    """Every RNG's state in plain types (tensors, ints, floats, str): a checkpoint opens with ``weights_only=True``
    and no numpy objects (numpy's legacy tuple holds an ndarray; its uint32 key is stored as an int64 tensor)."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_state = {"bit_generator": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["gauss"]))
    else:  # checkpoints written before the plain form hold numpy's own tuple
        np.random.set_state(n)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- a run's checkpoints ----

def checkpoints_in(folder: Path) -> list[Path]:
    """``step_*.pt`` files of a run, oldest first."""
    return sorted(Path(folder).glob("step_*.pt"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))


def best_or_latest(folder: Path) -> Path:
    """``best.pt`` of a run's checkpoint folder when it has one (chosen on validation), else its latest step."""
    folder = Path(folder)
    if (folder / BEST).is_file():
        return folder / BEST
    found = checkpoints_in(folder) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no checkpoint in {folder}")
    return found[-1]


def latest_readable(folder: Path) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The newest ``step_*.pt`` of a run that reads as a training checkpoint with finite weights: (its path, its
    entries, [(each newer file skipped, why)]). A file asking for code (``UnsafeFileError``) is refused, not skipped:
    that is no accident of a crash."""
    from .io_safe import UnsafeFileError

    skipped: list[tuple[Path, str]] = []
    for path in reversed(checkpoints_in(folder)):
        try:
            return path, read_training_checkpoint(path), skipped
        except UnsafeFileError:
            raise
        except ValueError as err:
            skipped.append((path, str(err)))
    return None, None, skipped


# ---- resuming: what must match ----

# what a resumed run shares with its checkpoint to continue the same run: the model, its head, the data and its order
# (batch size, accumulation, seed); the world size and torch's thread count are compared from their own entries
RESUME_SECTIONS = ("model", "head", "data")
RESUME_KEYS = ("train.batch_size", "train.accumulation", "train.seed")
# these change how the data is loaded or what is measured (the validation sets, the geometry they are brought to,
# the held-out synthetic identities: synthetic faces are a function of seed, identity and image), never what is trained
RESUME_FREE = ("data.workers", "data.val", "data.val_color", "data.geometry", "data.val_pairs", "data.val_identities")


def _flat(node: Any, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _config_dict(text: Any) -> dict:
    import yaml

    loaded = yaml.safe_load(text) if isinstance(text, str) else None
    return _flat(loaded) if isinstance(loaded, dict) else {}


def resume_mismatches(state: dict, config_yaml: str, world_size: int, threads: int | None) -> list[str]:
    """What differs between a training checkpoint and the run resuming it, one ``key: then, now`` line each: the keys
    above of the stored config, the world size and torch's thread count (``threads`` None: not compared). Keys a
    checkpoint does not store (older versions) are not compared."""
    then, now = _config_dict(state.get("config")), _config_dict(config_yaml)
    diffs = [f"{k}: {then[k]!r} in the checkpoint, {now[k]!r} now" for k in sorted(then)
             if k in now and then[k] != now[k] and k not in RESUME_FREE
             and (k.split(".")[0] in RESUME_SECTIONS or k in RESUME_KEYS)]
    if state.get("world_size", world_size) != world_size:
        diffs.append(f"world size: {state['world_size']} processes in the checkpoint, {world_size} now")
    if threads is not None and state.get("threads", threads) != threads:
        diffs.append(f"torch threads: {state['threads']} in the checkpoint, {threads} now (CPU losses depend on the "
                     "count; OMP_NUM_THREADS sets it)")
    return diffs


def check_resume(path: str | Path, state: dict, config_yaml: str, world_size: int, threads: int | None,
                 anyway: bool = False) -> list[str]:
    """:func:`resume_mismatches`, refused with a :class:`ResumeMismatchError` listing them unless ``anyway``
    (``--resume-anyway``); returns them (for a warning)."""
    diffs = resume_mismatches(state, config_yaml, world_size, threads)
    if diffs and not anyway:
        raise ResumeMismatchError(
            f"{path} was written by a run configured otherwise; resuming it here would not continue that run:\n  "
            + "\n  ".join(diffs) + "\nResume with the checkpoint's settings, or pass --resume-anyway to continue "
            "with these (not bit-exact)")
    return diffs


def shape_mismatches(saved: dict, target: dict) -> list[str]:
    """``name: shape then, shape now`` for every tensor of ``saved`` whose shape differs in ``target``."""
    return [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(target[k].shape)} now" for k, v in saved.items()
            if k in target and torch.is_tensor(v) and tuple(v.shape) != tuple(target[k].shape)]


def data_position(micro_batches: int, batches_per_epoch: int, global_batch: int) -> dict:
    """The data position in global samples (the ``data_position`` entry): independent of the batch and world size."""
    epoch, batch = divmod(micro_batches, batches_per_epoch)
    return {"epoch": epoch, "epoch_samples": batch * global_batch, "global_batch": global_batch}


def resume_position(state: dict, num_samples: int, global_batch: int) -> tuple[int, str | None]:
    """(micro-batches consumed, a note or None) for a run resuming ``state`` with global batches of ``global_batch``.

    Every epoch visits one permutation of the samples (``data/sampler.py``), whatever the batch, so the position is
    the samples of the current epoch already seen; with another global batch the run goes on at the batch holding
    the next unseen sample (the few before it in that batch are seen twice, none skipped)."""
    pos = state.get("data_position")
    if pos is None:  # older checkpoints: the position from their batch size and world size
        batch_size = _config_dict(state.get("config")).get("train.batch_size")
        if not isinstance(batch_size, int):
            return state["micro_batches"], None
        then = batch_size * state.get("world_size", 1)
        pos = data_position(state["micro_batches"], max(1, num_samples // then), then)
    if pos["global_batch"] == global_batch:
        return state["micro_batches"], None
    per_epoch = num_samples // global_batch
    batch = min(per_epoch, pos["epoch_samples"] // global_batch)
    again = pos["epoch_samples"] - batch * global_batch
    note = (f"data position: {pos['epoch_samples']} samples of epoch {pos['epoch']} seen in global batches of "
            f"{pos['global_batch']}; going on at batch {batch} of {global_batch}"
            + (f" ({again} samples seen again)" if again else ""))
    return pos["epoch"] * per_epoch + batch, note
