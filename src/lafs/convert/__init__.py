"""Released face-recognition weights -> lafs checkpoints (``lafs convert SRC -o OUT [--from FORMAT]``).

A converted checkpoint is an ordinary lafs checkpoint: the ``config`` YAML (``lafs.config.to_yaml``) whose model
section rebuilds the released network exactly, and ``model`` with the weights under ``backbone.*``. So ``lafs eval``,
``lafs embed``, ``lafs verify``, ``lafs export`` and ``lafs finetune --init`` take it as they take a trained run's
checkpoint. A ``MODEL_CARD.md`` beside it records where the weights came from and what was assumed (a card already
there that describes another model, such as a training run's, is never overwritten: convert into a folder of its own).

Formats (:data:`FORMATS`; detected from the key names when ``--from`` is not given), one module each:
``part_fvit_official`` (:mod:`lafs.convert.part_fvit`), ``insightface_iresnet`` (:mod:`lafs.convert.iresnet`),
``cvlface_vit`` and ``cvlface_vit_kprpe`` (:mod:`lafs.convert.cvlface`); the registry and the renaming tools are
:mod:`lafs.convert.formats`.

Files are read with ``torch.load(weights_only=True)`` (``argparse.Namespace``, which the LAFS pretraining checkpoint
stores as ``args``, is the one class allowed besides tensors) or ``safetensors``. Wrapper prefixes (``module.``,
``_orig_mod.``, ``backbone.``, ``model.``, ``net.``) are stripped; a checkpoint holding several state dicts is read
from ``teacher``, ``state_dict``, ``model`` or ``student``, in that order.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ..train.pretrained import _strip as strip_prefixes
from . import cvlface, iresnet, part_fvit
from .formats import FORMATS, Converted, ConvertError, Format, detect_format, register_format

__all__ = ["FORMATS", "ConvertError", "Converted", "Format", "convert_file", "convert_state", "detect_format",
           "model_card", "read_meta", "read_weights", "register_format"]

ENTRIES = ("teacher", "state_dict", "model", "student")
PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "net.")
CARD_NAME = "MODEL_CARD.md"

# registered in this order, the order in which `lafs convert --help` and detection errors list them
for _format in (part_fvit.FORMAT, iresnet.FORMAT, cvlface.VIT_FORMAT, cvlface.KPRPE_FORMAT):
    register_format(_format)


# ------------------------------------------------------------------------------------------------ reading

def _strip(key: str) -> str:
    return strip_prefixes(key, PREFIXES)


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The state dict in ``path`` (``.safetensors`` or a torch file) and the entry it came from, prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading .safetensors needs the safetensors package "
                              "(pip install safetensors)") from None
        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            # weights only: a state dict is tensors; the LAFS pretraining checkpoint also pickles its argparse args
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise ConvertError(f"{path}: not a weights file torch.load can read safely (weights_only): "
                               f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if isinstance(obj, dict) and isinstance(obj.get("config"), str) and isinstance(obj.get("model"), dict):
        raise ConvertError(f"{path}: already a lafs checkpoint; use it as it is")
    entry = "state dict"
    if not _is_state(obj):
        found = next((e for e in ENTRIES if isinstance(obj, dict) and _is_state(obj.get(e))), None)
        if found is None:
            what = f"entries {', '.join(map(str, obj))}" if isinstance(obj, dict) else type(obj).__name__
            raise ConvertError(f"{path}: no state dict of tensors (looked for the file itself and "
                               f"{', '.join(ENTRIES)}; found {what})")
        obj, entry = obj[found], found
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        k = _strip(key)
        if k in state:
            raise ConvertError(f"{path}: keys {key!r} and another both become {k!r} without their wrapper prefixes")
        state[k] = value
    return state, entry


def read_meta(path: str | Path) -> tuple[dict[str, Any], str]:
    """The model config CVLface saves beside its weights: ``model.yaml`` next to ``model.pt`` (``save_pretrained``),
    ``pretrained_model/model.yaml`` or the hub's ``config.json`` (``conf``). ({}, "") when there is none."""
    path = Path(path)
    for cand in (path.with_suffix(".yaml"), path.parent / "pretrained_model" / "model.yaml",
                 path.parent / "config.json"):
        if not cand.is_file() or cand == path:
            continue
        try:
            data = json.loads(cand.read_text()) if cand.suffix == ".json" else yaml.safe_load(cand.read_text())
        except (ValueError, yaml.YAMLError) as err:
            raise ConvertError(f"{cand}: the config beside the weights does not parse: {err}") from None
        if isinstance(data, dict) and isinstance(data.get("conf"), dict):
            data = data["conf"]
        if isinstance(data, dict) and ("name" in data or "rpe_config" in data or "color_space" in data):
            return data, str(cand)
    return {}, ""


def convert_state(state: dict[str, Tensor], fmt: str | None = None, meta: dict[str, Any] | None = None,
                  path: str | Path = "weights") -> Converted:
    """Prefix-stripped foreign ``state`` -> :class:`Converted`, checked against the lafs model's own state dict
    (built on the meta device: names and shapes, no memory)."""
    from ..models import build_backbone

    name = fmt or detect_format(state.keys(), path)
    if name not in FORMATS:
        raise ConvertError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    try:
        conv = FORMATS[name].to_lafs(state, meta or {})
    except ConvertError as err:
        raise ConvertError(f"{path}: {err}") from None
    conv.fmt, conv.source = name, str(path)
    with torch.device("meta"):
        target = build_backbone(conv.model, conv.size, **conv.overrides).state_dict()
    for key in target:  # BatchNorm's counter is absent from files saved by old PyTorch versions
        if key.endswith("num_batches_tracked") and key not in conv.state:
            conv.state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in target if k not in conv.state]
    unexpected = [k for k in conv.state if k not in target]
    shapes = [f"{k} {tuple(conv.state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in conv.state and conv.state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConvertError(f"{path} ({name}): the converted weights do not fit {conv.model}-{conv.size}: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}, other shapes {shapes[:5]}")
    cast = sorted({str(v.dtype) for v in conv.state.values() if v.is_floating_point() and v.dtype != torch.float32})
    if cast:
        conv.notes.append(f"{', '.join(cast)} tensors stored as float32")
    conv.state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in conv.state.items()}
    return conv


def _config_text(conv: Converted, out: Path) -> str:
    from ..config import Config, ModelConfig, load_config, to_yaml

    cfg = Config()
    cfg.model = ModelConfig(name=conv.model, size=conv.size, **conv.overrides)
    # every source trained on insightface-aligned 112 x 112 crops (MS1M / WebFace, the ArcFace template)
    cfg.data.geometry = "arcface"
    cfg.data.workers = "auto"  # resolved on the machine that loads it, not frozen to this one's
    if conv.head:
        cfg.head.name = conv.head
    cfg.out_dir = str(out.parent)
    text = to_yaml(cfg)
    load_config(text=text, source="the converted config")  # the checkpoint must load: fail here, not later
    return text


def convert_file(src: str | Path, out: str | Path, fmt: str | None = None) -> Converted:
    """Convert ``src`` into the lafs checkpoint ``out`` and write ``MODEL_CARD.md`` beside it."""
    from ..checkpoint import write_checkpoint
    from ..io import atomic_write_bytes, file_hash

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ConvertError(f"{out}: the output would overwrite the weights it is converted from")
    card = out.parent / CARD_NAME
    # the card describes one model: never overwrite a training run's card or another conversion's
    if card.is_file() and f"- **Checkpoint**: `{out.name}`, written by `lafs convert`" not in card.read_text():
        raise ConvertError(f"{card} already describes another model; convert into a folder of its own")
    state, entry = read_weights(src)
    meta, meta_path = read_meta(src)
    conv = convert_state(state, fmt, meta, src)
    conv.entry, conv.sha256 = entry, file_hash(src, digits=None)
    if meta_path:
        conv.notes.append(f"config beside the weights: {meta_path}")
    text = _config_text(conv, out)
    write_checkpoint({"config": text, "model": {f"backbone.{k}": v for k, v in conv.state.items()}, "step": 0,
                 "converted": {"source": str(src.resolve()), "sha256": conv.sha256, "format": conv.fmt,
                               "entry": entry, "dropped": conv.dropped, "notes": conv.notes}}, out)
    atomic_write_bytes(card, model_card(conv, out, text).encode())
    return conv


def model_card(conv: Converted, out: Path, config_text: str) -> str:
    """``MODEL_CARD.md`` of a converted checkpoint: origin, mapping, assumptions, config, how to use it."""
    from .. import __version__

    fmt = FORMATS[conv.fmt]
    model_cfg = {k: v for k, v in yaml.safe_load(config_text)["model"].items() if v is not None}  # None: preset's
    model_yaml = yaml.safe_dump({"model": model_cfg}, sort_keys=False, allow_unicode=True).strip()
    overrides = " ".join(f"model.{k}={v}" for k, v in conv.overrides.items())
    params = sum(v.numel() for k, v in conv.state.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    dropped = ""
    if conv.dropped:
        shown = ", ".join(f"`{k}`" for k in conv.dropped[:8]) + (", ..." if len(conv.dropped) > 8 else "")
        dropped = f"; dropped {len(conv.dropped)} not part of the backbone: {shown}"
    lines = [
        f"# Model card: {conv.model}-{conv.size} converted from {fmt.name}",
        "",
        f"- **Checkpoint**: `{out.name}`, written by `lafs convert` (lafs {__version__}).",
        (f"- **Weights from**: `{conv.source}` (entry `{conv.entry}`), sha256 `{conv.sha256}`. These weights "
         "were trained by others, not by lafs: they keep the licence and terms of their source."),
        f"- **Source layout**: {fmt.description}; defined in {fmt.origin}.",
        (f"- **Mapping**: {len(conv.state)} tensors ({params:,} parameters), each from one source tensor, onto "
         f"lafs `{conv.model}`{dropped}."),
        "- **Input**: RGB faces aligned to the ArcFace 5-point template, 112 x 112 (or the model size below), pixels "
        "x / 127.5 - 1 (`data.geometry: arcface`)."
        + (" KP-RPE: five keypoints per face (pixels of the input)." if conv.model == "vit_kprpe" else ""),
        ("- **Not verified here**: the accuracy of these weights. `lafs eval` measures it; compare with the "
         "numbers their authors published."),
        "",
        "## Inferred or assumed",
        "",
        *[f"- {n}" for n in conv.notes],
        "",
        "## Model config (stored in the checkpoint)",
        "",
        "```yaml",
        model_yaml,
        "```",
        "",
        "## Use",
        "",
        "```bash",
        f"lafs eval {out} --sets ../shared/data/lfw/lfw.bin",
        f"lafs embed {out} a.jpg b.jpg -o emb.npy",
        f"lafs finetune CONFIG.yaml --init {out} model.name={conv.model} model.size={conv.size} {overrides}",
        "```",
        "",
        ("`lafs finetune --init` reads the backbone weights by name; the finetuning config must build the same "
         "model (the overrides above), or its report lists the tensors it skipped."),
    ]
    return "\n".join(lines) + "\n"
