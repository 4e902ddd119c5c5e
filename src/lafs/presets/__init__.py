"""The presets shipped inside the package: run configs (``configs/``) and experiment grids (``experiments/``).

They live here, not at the repository root, so that a non-editable ``pip install`` keeps them: ``lafs train
micro/supervised_synthetic`` works from any folder. A preset is named by its path below its folder, without
``.yaml`` (``paper/part_fvit_b_webface4m_aug``); the repository-era spelling ``configs/micro/x.yaml`` (or
``experiments/NAME.yaml``) names the same preset, so command lines recorded in grids and run folders keep working.
A file that exists at the given path always wins over a preset of the same name, so a local copy can be edited and
used without renaming it. Data paths inside the presets (``../shared/data/...``) stay relative to the working
folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..config import ConfigError

ROOT = Path(__file__).resolve().parent
KINDS = {"configs": "config", "experiments": "experiment grid"}


def folder(kind: str) -> Path:
    """The packaged folder of ``kind`` (``configs`` or ``experiments``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    return ROOT / kind


def names(kind: str = "configs") -> list[str]:
    """Every preset of ``kind``, as the name that selects it (``micro/supervised_synthetic``), sorted."""
    base = folder(kind)
    return sorted(p.relative_to(base).with_suffix("").as_posix() for p in base.rglob("*.yaml"))


def _preset_name(name: str, kind: str) -> str:
    """``configs/micro/x.yaml``, ``./configs/micro/x``, ``micro/x.yaml`` -> ``micro/x``."""
    n = name.replace("\\", "/").removeprefix("./")
    n = n.removeprefix(f"{kind}/")
    for suffix in (".yaml", ".yml"):
        n = n.removesuffix(suffix)
    return n


def find(name: str | Path, kind: str = "configs") -> Path | None:
    """The file ``name`` stands for: itself when it exists on disk, else the packaged preset; None when neither."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = folder(kind) / f"{_preset_name(str(name), kind)}.yaml"
    return candidate if candidate.is_file() else None


def resolve(name: str | Path, kind: str = "configs") -> Path:
    """Like :func:`find`, but an unknown name is a :class:`ConfigError` naming the closest presets."""
    found = find(name, kind)
    if found is not None:
        return found
    known = names(kind)
    wanted = _preset_name(str(name), kind)
    # close by full name, or by the last part alone (``supervised_synthetic`` -> ``micro/supervised_synthetic``)
    close = difflib.get_close_matches(wanted, known, n=5, cutoff=0.5)
    by_stem: dict[str, list[str]] = {}
    for k in known:
        by_stem.setdefault(k.rsplit("/", 1)[-1], []).append(k)
    for stem in difflib.get_close_matches(wanted.rsplit("/", 1)[-1], list(by_stem), n=5, cutoff=0.6):
        close += by_stem[stem]
    close = list(dict.fromkeys(close))[:5]
    if close:
        hint = f"; close presets: {', '.join(close)}"
    elif len(known) <= 12:
        hint = f"; known: {', '.join(known)}"
    else:
        hint = ""
    raise ConfigError(f"no {KINDS[kind]} named {str(name)!r}: file not found, and no packaged preset {wanted!r}"
                      f"{hint} (`lafs presets` lists all {len(known)})")


def listing() -> str:
    """The text of ``lafs presets``: every config and grid name, one per line, under its folder's heading."""
    lines = []
    for kind, what in KINDS.items():
        lines.append(f"{what}s ({folder(kind)}):")
        lines += [f"  {n}" for n in names(kind)]
    lines.append("use a name as it is (lafs train micro/supervised_synthetic, lafs experiment fewshot); a file at "
                 "that path wins over the preset")
    return "\n".join(lines)
