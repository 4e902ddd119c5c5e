"""Run logs: metrics.jsonl records, and progress as a bar on a terminal but plain lines in a file or pipe."""

from __future__ import annotations

import json

from lafs.train import logging as run_logging
from lafs.train.logging import RunLogger


def _log_three_steps(tmp_path, monkeypatch, terminal: bool):
    monkeypatch.setattr(run_logging, "_is_terminal", lambda: terminal)
    logger = RunLogger(tmp_path, total_steps=3, tensorboard=False, progress=True)
    for step in (1, 2, 3):
        rate = logger.progress(step, 64, 1.0 / step, 0.1)
        logger.log(step, {"loss": 1.0 / step, "lr": 0.1, "images_per_s": rate})
    logger.log(3, {"celeba64_val_acc": 0.8}, kind="val")
    bar = logger.bar
    logger.close()
    return bar


def test_not_a_terminal_gives_one_plain_line_per_logged_step(tmp_path, monkeypatch, capsys):
    assert _log_three_steps(tmp_path, monkeypatch, terminal=False) is None
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert "loss 0.5000" in lines[1] and "lr 1.00e-01" in lines[1]
    assert "\r" not in captured.err and "step/s" not in captured.err  # no tqdm redraws
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "train", "train", "val"]


def test_a_terminal_gets_the_bar_and_no_plain_lines(tmp_path, monkeypatch, capsys):
    assert _log_three_steps(tmp_path, monkeypatch, terminal=True) is not None
    assert capsys.readouterr().out == ""
