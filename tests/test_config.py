"""Config schema: YAML + dotted overrides, errors that name the bad key, resolved config written per run."""

import pytest
import yaml

from lafs.config import Config, ConfigError, load_config, parse_override, save_config


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("model:\n  name: fvit\n  size: tiny\n  depth: 4\nhead:\n  name: arcface\n")
    cfg = load_config(f, ["model.depth=6", "optim.lr=0.01"])
    assert isinstance(cfg, Config)
    assert (cfg.model.name, cfg.model.size, cfg.model.depth) == ("fvit", "tiny", 6)
    assert cfg.head.name == "arcface"
    assert cfg.optim.lr == 0.01
    assert cfg.model.overrides() == {"depth": 6}


def test_unknown_key_in_override_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.detph'.*did you mean 'model\.depth'"):
        load_config(None, ["model.detph=6"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"'train\.batch_sise' in file .*bad\.yaml.*'train\.batch_size'"):
        load_config(f)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"'modle'"):
        load_config(None, ["modle.depth=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'model\.depth'.*'abc'"):
        load_config(None, ["model.depth=abc"])


def test_value_outside_choices_is_named():
    with pytest.raises(ConfigError, match=r"'head\.name' is 'sphereface'.*'cosface'"):
        load_config(None, ["head.name=sphereface"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.depth"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_parse_override_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.depth=5", "head.margin=0.3"])
    path = save_config(cfg, tmp_path / "run")
    assert path.read_text().count("depth: 5") == 1
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["head"]["margin"] == 0.3


def test_every_shipped_config_loads_and_builds():
    from lafs.models import build_backbone
    from lafs.presets import folder

    files = sorted(folder("configs").rglob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        cfg = load_config(f)
        build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides())


def test_package_does_not_require_torchvision_or_timm():
    from importlib.metadata import packages_distributions, requires

    # the distribution that provides `import lafs` (lafs-face; an old development install may still say lafs)
    reqs = " ".join(requires(packages_distributions()["lafs"][0]) or [])
    assert "torch" in reqs
    assert "torchvision" not in reqs and "timm" not in reqs and "mxnet" not in reqs


def test_choices_are_the_registries_names():
    import dataclasses

    from lafs.augment.supervised import PRESETS
    from lafs.config import AugmentConfig, HeadConfig, ModelConfig, SSLConfig, allowed_values
    from lafs.heads.margin import HEADS
    from lafs.models import vit
    from lafs.models.registry import BACKBONES
    from lafs.ssl import METHODS, TEACHER_TEMP_PRESETS

    def allowed(schema, name):
        return allowed_values(next(f for f in dataclasses.fields(schema) if f.name == name))

    assert allowed(ModelConfig, "name") == tuple(BACKBONES)
    assert allowed(ModelConfig, "pool") == (None, *vit.POOLS)  # None: the size preset's value
    assert allowed(HeadConfig, "name") == HEADS
    assert allowed(AugmentConfig, "preset") == tuple(PRESETS)
    assert allowed(SSLConfig, "method") == ("none", *METHODS)
    assert allowed(SSLConfig, "teacher_temp_schedule") == tuple(TEACHER_TEMP_PRESETS)


@pytest.mark.parametrize("key,module,name,extra", [
    ("optim.name", "lafs.train.optim", "OPTIMIZERS", ()),
    ("optim.schedule", "lafs.train.optim", "LR_SCHEDULES", ()),
    ("optim.clip_mode", "lafs.train.optim", "CLIP_MODES", ()),
    ("data.source", "lafs.data.datasets", "SOURCES", ()),
    ("train.amp", "lafs.models.precision", "AMP_CHOICES", ()),  # none: fp32, auto: bf16 where it pays
    ("data.geometry", "lafs.geometry", "GEOMETRIES", (None,)),  # None: no warp
])
def test_an_unknown_value_names_the_key_and_the_registrys_values(key, module, name, extra):
    """The choices are the registry's names, so a name added there is valid here and the error lists it."""
    import importlib

    names = (*extra, *getattr(importlib.import_module(module), name))
    allowed = ", ".join(repr(c) if c is not None else "null" for c in names)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=nonsense"])
    assert str(err.value) == f"config key '{key}' is 'nonsense'; allowed: {allowed}"


def test_an_optimizer_registered_later_is_a_valid_name(monkeypatch):
    from lafs.train import optim

    monkeypatch.setitem(optim.OPTIMIZERS, "lion", optim.OPTIMIZERS["sgd"])
    assert load_config(None, ["optim.name=lion"]).optim.name == "lion"
    with pytest.raises(ConfigError, match="'lion'"):
        load_config(None, ["optim.name=nonsense"])


def test_a_backbone_registered_later_is_a_valid_model_name():
    from lafs.models import IResNet
    from lafs.models.registry import BACKBONES, IRESNET_OPTIONS, IRESNET_SIZES, BackboneEntry, register_backbone

    register_backbone(BackboneEntry("iresnet_copy", "test", IResNet, IRESNET_SIZES, IRESNET_OPTIONS))
    try:
        assert load_config(overrides=["model.name=iresnet_copy", "model.size=micro"]).model.name == "iresnet_copy"
    finally:
        del BACKBONES["iresnet_copy"]
    with pytest.raises(ConfigError, match="model.name"):
        load_config(overrides=["model.name=iresnet_copy"])
