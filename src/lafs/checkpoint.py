"""The lafs checkpoint: what it holds, how it is written, and the one way it is read.

A checkpoint is a dict of tensors and plain values, so that it opens ``weights_only``:

- every checkpoint: ``config`` (the run's YAML), ``model`` (the task's state dict, the backbone under
  ``backbone.``) and ``step``;
- a training checkpoint (``format`` = :data:`FORMAT`, written by ``lafs.train.loop``) adds ``micro_batches``,
  ``partial_fc``, ``optimizer``, ``scaler``, ``rng`` (every rank's :func:`rng_state`), ``world_size``,
  ``nonfinite_steps``, ``best``, ``val`` (the latest validation: its cosine threshold is the model's decision
  threshold, :func:`stored_threshold`), ``total_steps``, ``budget``, ``monitors`` and ``floors``; pretraining adds the
  ``teacher`` and ``student`` branches;
- a converted checkpoint (``lafs convert``) adds ``converted`` (where the weights came from and how they were mapped).

A safetensors model folder (``lafs export --safetensors``) reads as the entries ``config``, ``backbone`` (the
backbone's own keys), ``step`` and ``val``.

Writing is atomic (a temporary file renamed into place). Reading goes through :func:`read_checkpoint` alone, for
resuming, finetuning from, evaluating, exporting and showing a model: files open with
:func:`lafs.io_safe.load_checkpoint` (weights only, a file naming other Python objects is refused unopened),
folders with :func:`lafs.io_safe.read_safetensors_folder`.
"""

from __future__ import annotations

import json
import random
import re
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


def write_checkpoint(state: dict, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically: a crash mid-write leaves the previous file intact."""
    return atomic_write(path, lambda fh: torch.save(state, fh))


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
    """A checkpoint that ``lafs.train.loop`` can resume from (its ``format`` is :data:`FORMAT`)."""
    state = read_checkpoint(path, "a lafs training checkpoint")
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lafs training checkpoint (format {FORMAT})")
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
