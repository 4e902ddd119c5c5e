"""What every converter shares: the :class:`Format` registry, the :class:`Converted` result and the key-renaming
tools (regex rules, block counts, required keys, the size preset a converted model is named after)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["FORMATS", "ConvertError", "Converted", "Format", "Rule", "depth_of", "detect_format", "need", "pick_size",
           "refuse_unmatched", "register_format", "rename_keys"]


@dataclass
class Converted:
    """The result of one format's ``to_lafs``: a lafs backbone (name, size preset, config overrides) and its state."""

    model: str
    size: str
    overrides: dict[str, Any]
    state: dict[str, Tensor]  # backbone state dict, lafs names (without "backbone.")
    dropped: list[str] = field(default_factory=list)  # source keys deliberately not converted (classifier, ...)
    notes: list[str] = field(default_factory=list)  # what was inferred or assumed, for the log and the card
    head: str | None = None  # the margin head the source was trained with, where known
    fmt: str = ""
    source: str = ""  # file the weights came from
    entry: str = ""  # the entry of the file that held the state dict
    sha256: str = ""

    def summary(self) -> str:
        lines = [f"{self.source} [{self.entry}] ({self.fmt}): {len(self.state)} tensors -> {self.model}-{self.size}"]
        if self.dropped:
            lines.append(f"  dropped (not part of the backbone): {len(self.dropped)}: " + ", ".join(self.dropped[:8])
                         + (", ..." if len(self.dropped) > 8 else ""))
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class Format:
    """A foreign layout: ``detect(keys)`` on the prefix-stripped key names; ``to_lafs(state, meta)`` (``meta``: the
    config saved beside the weights, or {})."""

    name: str
    description: str
    origin: str  # where the layout is defined (repository, file, commit)
    detect: Callable[[Collection[str]], bool]
    to_lafs: Callable[[dict[str, Tensor], dict[str, Any]], Converted]


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


class ConvertError(ValueError):
    """A file that cannot be converted; the message names the file and the keys."""


# ----------------------------------------------------------------------------------------------------- renaming

Rule = tuple[str, str | Callable[[re.Match], str]]


def rename_keys(state: dict[str, Tensor], rules: list[Rule], drop: tuple[str, ...] = ()
            ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Apply the first matching ``(regex, template)`` rule to every key -> (renamed state, dropped keys, unmatched
    keys). ``drop``: regexes of keys that are known and deliberately not converted."""
    compiled = [(re.compile(p), t) for p, t in rules]
    dropping = [re.compile(p) for p in drop]
    out: dict[str, Tensor] = {}
    dropped, unmatched = [], []
    for key, value in state.items():
        for pattern, template in compiled:
            m = pattern.fullmatch(key)
            if m:
                out[template(m) if callable(template) else m.expand(template)] = value
                break
        else:
            (dropped if any(d.fullmatch(key) for d in dropping) else unmatched).append(key)
    return out, dropped, unmatched


def depth_of(state: dict[str, Tensor], prefix: str) -> int:
    """1 + the largest block index ``i`` of keys ``{prefix}{i}.*``."""
    idx = [int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)]
    return max(idx) + 1 if idx else 0


def need(state: dict[str, Tensor], key: str, fmt: str) -> Tensor:
    if key not in state:
        raise ConvertError(f"{fmt}: the weights lack {key!r}, which every such model has")
    return state[key]


def pick_size(model: str, structural: dict[str, Any]) -> str:
    """The first size preset of ``model`` whose values equal ``structural``; else the last preset (every structural
    option is set explicitly in the config anyway, so the preset only names the model)."""
    from ..models.registry import get_backbone

    entry = get_backbone(model)
    # options a preset leaves out take the builder's defaults (IResNet's width 64, embedding 512)
    builder = {k: p.default for k, p in inspect.signature(entry.builder).parameters.items()
               if p.default is not inspect.Parameter.empty}
    for size, preset in entry.sizes.items():
        merged = {**builder, **entry.defaults, **preset}
        if all(merged.get(k) == v for k, v in structural.items()):
            return size
    return list(entry.sizes)[-1]


def refuse_unmatched(fmt: str, unmatched: list[str]) -> None:
    if unmatched:
        raise ConvertError(f"{fmt}: {len(unmatched)} keys this layout does not have: {', '.join(unmatched[:10])}"
                           + (", ..." if len(unmatched) > 10 else ""))


def detect_format(keys: Collection[str], path: str | Path = "weights") -> str:
    """The one registered format whose ``detect`` accepts ``keys``; an error listing the first keys otherwise."""
    hits = [name for name, f in FORMATS.items() if f.detect(keys)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ConvertError(f"{path}: the keys fit several formats ({', '.join(hits)}); choose one with --from")
    first = list(keys)[:12]
    raise ConvertError(f"{path}: unknown weight layout ({len(keys)} tensors); known formats: {', '.join(FORMATS)}. "
                       f"First keys: {', '.join(first)}" + (", ..." if len(keys) > len(first) else ""))

