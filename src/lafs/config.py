"""Typed run configuration: dataclass schemas, YAML files and dotted command-line overrides.

``load_config("x.yaml", ["model.depth=6"])`` merges, in order, the schema defaults, the YAML file and the
overrides, and checks every key and value against the schema (OmegaConf structured configs). A key that
the schema does not have, a value of the wrong type or a value outside a field's ``choices`` is a
:class:`ConfigError` that names the key, where it came from and, for a typo, the closest valid key.
``save_config`` writes the resolved config next to a run's outputs.

Model fields left at ``None`` take the value of the chosen size preset (``models/registry.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .io import atomic_write_bytes


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and its source."""


def choice(default: Any, choices: tuple, help: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


@dataclass
class ModelConfig:
    name: str = choice("part_fvit", ("part_fvit", "fvit", "iresnet"), "backbone")
    size: str = "micro"
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    num_landmarks: Optional[int] = None
    dim: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    dim_head: Optional[int] = None
    mlp_dim: Optional[int] = None
    dropout: Optional[float] = None
    emb_dropout: Optional[float] = None
    attn_dropout: Optional[float] = None
    drop_path: Optional[float] = None
    drop_path_schedule: Optional[str] = choice(None, (None, "constant", "linear"))
    attn_scale: Optional[str] = choice(None, (None, "dim", "head_dim"), "dim: reference code; head_dim: standard")
    pool: Optional[str] = choice(None, (None, "cls", "mean"))
    embedding_size: Optional[int] = None
    patch_layout: Optional[str] = choice(None, (None, "centred", "reference"))
    landmark_width_mult: Optional[float] = None
    landmark_dropout: Optional[float] = None
    width: Optional[int] = None

    def overrides(self) -> dict[str, Any]:
        """The options set explicitly (not None), as keyword arguments for ``build_backbone``."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("name", "size") and getattr(self, f.name) is not None
        }


@dataclass
class HeadConfig:
    name: str = choice("cosface", ("cosface", "arcface", "adaface"), "margin softmax")
    scale: Optional[float] = None  # s; None = the head's paper value (64)
    margin: Optional[float] = None  # m; None = paper value (CosFace 0.4, ArcFace 0.5, AdaFace 0.4)
    h: float = 0.333  # AdaFace
    t_alpha: float = 0.01  # AdaFace


@dataclass
class OptimConfig:
    name: str = choice("adamw", ("adamw", "sgd"))
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD only


@dataclass
class DataConfig:
    """Toy data for the smallest end-to-end step (a Gaussian identity mixture until the data layer lands)."""

    num_identities: int = 16
    images_per_identity: int = 8
    val_pairs: int = 200


@dataclass
class TrainConfig:
    batch_size: int = 32
    steps: int = 60
    seed: int = 0
    device: str = "cpu"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/demo"


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, key + ".")
    return keys


def _explain(err: OmegaConfBaseException, source: str, schema: type, key: str = "?") -> ConfigError:
    key = getattr(err, "full_key", None) or key
    msg = str(err).splitlines()[0]
    if "not in" in msg or "Missing key" in msg or "ConfigKeyError" in type(err).__name__:
        valid = _all_keys(schema())
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"unknown config key '{key}' in {source}{hint}")
    return ConfigError(f"invalid value for config key '{key}' in {source}: {msg}")


def _check_choices(node: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join(repr(c) if c is not None else "null" for c in f.metadata["choices"])
            raise ConfigError(f"config key '{prefix}{f.name}' is {value!r}; allowed: {allowed}")


def _merge(base: DictConfig, other: Any, source: str, schema: type, key: str = "?") -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, source, schema, key) from None


def parse_override(item: str) -> tuple[str, Any]:
    """``'model.depth=6'`` -> ``('model.depth', 6)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.depth=6)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot parse value: {err}") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), schema: type = Config) -> Any:
    """Schema defaults <- YAML file <- dotted overrides, validated; returns a ``schema`` instance."""
    cfg = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
        cfg = _merge(cfg, data, f"file {path}", schema)
    for item in overrides:
        key, value = parse_override(item)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = _merge(cfg, nested, f"override '{item}'", schema, key)
    obj = OmegaConf.to_object(cfg)
    _check_choices(obj)
    return obj


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into ``out_dir`` (atomically) and return its path."""
    return atomic_write_bytes(Path(out_dir) / name, to_yaml(cfg).encode())
