"""``data.workers``: "auto" sized from the cores, integers as given, clear errors; OpenCV on one thread in workers."""

import pytest

import lafs.data.workers as workers_mod
from lafs.config import ConfigError, load_config
from lafs.data.workers import auto_workers, resolve_workers


@pytest.mark.parametrize("cores, expected", [(1, 0), (2, 0), (3, 2), (4, 3), (8, 7), (9, 8), (16, 8), (128, 8)])
def test_auto_rule(cores, expected):
    assert auto_workers(cores) == expected
    assert resolve_workers("auto", cores=cores) == expected
    assert resolve_workers(" AUTO ", cores=cores) == expected


def test_auto_shares_the_cores_among_the_local_processes(monkeypatch):
    monkeypatch.setattr(workers_mod, "available_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers("auto") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on this node: 4 cores each
    assert resolve_workers("auto") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_workers("auto") == 0


@pytest.mark.parametrize("value, expected", [(0, 0), (1, 1), (12, 12), ("3", 3)])
def test_integers_are_used_as_given(value, expected):
    assert resolve_workers(value, cores=2) == expected


@pytest.mark.parametrize("value", [-1, 2.5, True, None, "two", "", [1]])
def test_invalid_values_are_named(value):
    with pytest.raises(ValueError, match=r"data.workers must be 'auto' or an integer >= 0"):
        resolve_workers(value)


def test_config_default_is_auto_and_resolves_to_an_integer(monkeypatch):
    monkeypatch.setattr(workers_mod, "available_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert load_config().data.workers == 0
    monkeypatch.setattr(workers_mod, "available_cores", lambda: 6)
    assert load_config().data.workers == 5
    assert load_config(overrides=["data.workers=auto"]).data.workers == 5
    assert load_config(overrides=["data.workers=3"]).data.workers == 3
    assert load_config(overrides=["data.workers=0"]).data.workers == 0


def test_config_rejects_bad_workers_with_a_clear_error(tmp_path):
    for bad in ("-2", "many", "1.5", "[2]"):
        with pytest.raises(ConfigError, match=r"data.workers must be 'auto' or an integer >= 0"):
            load_config(overrides=[f"data.workers={bad}"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {workers: lots}\n")
    with pytest.raises(ConfigError, match="got 'lots'"):
        load_config(cfg)
