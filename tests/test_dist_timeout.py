"""The distributed timeout is the run's (train.dist_timeout_minutes), so a stopped rank fails the run in minutes
rather than stalling it for torch's fixed 30."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lafs.cli import main
from lafs.train import distributed


def test_setup_passes_the_configured_timeout_to_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: seen.update(
        backend=backend, timeout=timeout))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    env = distributed.setup("cpu", timeout_minutes=2.5)
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=2.5)}
    assert (env.rank, env.world_size) == (1, 2)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_timeout_that_is_not_positive_is_refused(tmp_path, capsys, value):
    assert main(["train", "micro/supervised_synthetic", f"train.dist_timeout_minutes={value}", "train.steps=1",
                 "--out", str(tmp_path)]) == 2
    assert "train.dist_timeout_minutes must be > 0" in capsys.readouterr().err
