"""Initialise a backbone from another run's checkpoint, reporting every key it did not use.

Accepted files: our checkpoints (``{"model": {"backbone.*": ...}}``), SSL checkpoints holding a ``teacher``
or ``student`` (the LAFS code finetunes from the *teacher*), or a bare state dict. Wrapper prefixes
(``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``, ``backbone.``) are stripped. Keys the target
does not have (SSL projection heads, a classifier with another class count) and keys with another shape are
skipped and listed in the report, never silently dropped and never a crash (the official LAFS teacher holds an
unused 30000-class classifier); a checkpoint of which not one tensor fits (another architecture) is an error naming
both architectures (:func:`require_match`).

A safetensors model folder (``lafs export CKPT --safetensors DIR``) or its ``model.safetensors`` is read as the
backbone's state dict. Files and folders open through :func:`lafs.checkpoint.read_checkpoint` (``weights_only``): a
file holding other pickled objects is refused before anything in it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_checkpoint
from ..io_safe import safetensors_folder

SOURCES = ("teacher", "model", "state_dict", "student")
PREFIXES = ("module.", "_orig_mod.", "backbone.")


@dataclass
class LoadReport:
    path: str
    source: str
    loaded: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # same name, other shape
    missing: list[str] = field(default_factory=list)  # in the model, not in the file

    def summary(self) -> str:
        lines = [f"{self.path} [{self.source}]: loaded {len(self.loaded)} tensors"]
        for what, keys in (("skipped (not in the model)", self.unexpected),
                           ("skipped (shape differs)", self.mismatched),
                           ("left at initialisation (not in the file)", self.missing)):
            if keys:
                lines.append(f"  {what}: {len(keys)}: " + ", ".join(keys))
        return "\n".join(lines)


def _strip(key: str, prefixes: tuple[str, ...] = PREFIXES) -> str:
    """``key`` without any leading wrapper prefixes (DDP ``module.``, ``torch.compile`` ``_orig_mod.``, ...)."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def read_state(path: str | Path, source: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a checkpoint file and the entry it came from."""
    path = Path(path)
    if safetensors_folder(path) is not None:
        if source not in (None, "safetensors"):
            raise KeyError(f"{path}: a safetensors folder holds one state dict (the backbone), not '{source}'")
        return read_checkpoint(path)["backbone"], "safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    ckpt = read_checkpoint(path, "a checkpoint with weights")
    names = (source,) if source else SOURCES
    for name in names:
        if isinstance(ckpt.get(name), dict):
            return ckpt[name], name
    if source:
        raise KeyError(f"{path}: no '{source}' entry; entries: {', '.join(map(str, ckpt))}")
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, "state dict"
    raise ValueError(f"{path}: no state dict found (looked for {', '.join(SOURCES)}); entries: {', '.join(map(str, ckpt))}")


def load_pretrained(module: nn.Module, path: str | Path, source: str | None = None, only_prefix: str = "",
                    ) -> LoadReport:
    """Copy matching tensors from ``path`` into ``module``; ``only_prefix`` restricts to e.g. ``landmark_cnn.``."""
    state, src = read_state(path, source)
    target = module.state_dict()
    report = LoadReport(str(path), src)
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = _strip(key)
        if only_prefix and not k.startswith(only_prefix):
            continue
        if k not in target:
            report.unexpected.append(key)
        elif tuple(target[k].shape) != tuple(value.shape):
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target[k].shape)}")
        else:
            clean[k] = value
    module.load_state_dict(clean, strict=False)
    report.loaded = sorted(clean)
    report.missing = sorted(k for k in target if k not in clean and k.startswith(only_prefix))
    return report


def _stored_model(path: str | Path) -> dict:
    """The ``model`` block of the config a checkpoint or safetensors folder stores; {} when it stores none."""
    import yaml

    from ..checkpoint import config_text

    try:
        return (yaml.safe_load(config_text(path) or "") or {}).get("model") or {}
    except (ValueError, OSError, yaml.YAMLError):
        return {}


def source_architecture(path: str | Path) -> str:
    """``name-size`` of the model a checkpoint or safetensors folder stores its config for, else a phrase saying so."""
    model = _stored_model(path)
    if not model.get("name"):
        return "an architecture it does not name (no stored config)"
    return f"{model['name']}-{model.get('size', '?')}"


def require_same_rescale(path: str | Path, rescale: str | None, what: str) -> None:
    """A ``ValueError`` when the checkpoint at ``path`` stores a landmark CNN trained with another min-max rescale
    (``model.landmark_rescale``, models/landmark_cnn.py) than this run's: its weights would place the landmarks
    elsewhere. None and an absent value (also a file with no stored config) both mean the reference's ``joint``."""
    held, want = _stored_model(path).get("landmark_rescale") or "joint", rescale or "joint"
    if held != want:
        raise ValueError(f"{what}: {path} holds a landmark CNN trained with model.landmark_rescale={held}, this run "
                         f"has {want}; set model.landmark_rescale={held}")


def require_match(report: LoadReport, target: str, what: str) -> LoadReport:
    """``report``, or a ``ValueError`` naming the checkpoint and both architectures when not one tensor fitted the
    model ``target`` (``name-size``): a finetune from random weights would otherwise pass for a finetune."""
    if report.loaded:
        return report
    held = len(report.unexpected) + len(report.mismatched)
    raise ValueError(f"{what}: {report.path} is a checkpoint of {source_architecture(report.path)}; none of its "
                     f"{held} tensors [{report.source}] fits this run's model {target} ({len(report.mismatched)} "
                     "of another shape, the rest not in the model). Initialise from a checkpoint of the same "
                     "architecture (model.name / model.size)")
