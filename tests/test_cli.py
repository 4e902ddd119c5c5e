"""The ``lafs`` console script: models table, config errors, the smallest end-to-end run."""

import json
import math
import subprocess
import sys

import pytest

from lafs.cli import main, models_table
from lafs.config import load_config
from lafs.train.logging import read_metrics


def test_models_table_lists_every_backbone_and_size():
    table = models_table()
    for needle in ("part_fvit  tiny", "fvit       base", "iresnet    r50", "15.28", "2.477", "66.96", "64.08", "43.59"):
        assert needle in table, needle


def test_models_with_override_shows_the_configured_model(capsys):
    assert main(["models", "model.name=fvit", "model.size=tiny", "model.depth=6"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("fvit")]
    assert len(rows) == 1
    # Three more blocks of 2 LN + qkv + out + FFN = 4,068,864 params each on top of 12,407,808.
    per_block = 2 * 1024 + 512 * 3 * 704 + (704 * 512 + 512) + (512 * 2560 + 2560 + 2560 * 512 + 512)
    assert per_block == 4_068_864
    assert f"{(12_407_808 + 3 * per_block) / 1e6:.2f}" in rows[0]


def test_config_error_exit_code_and_message(capsys):
    assert main(["models", "model.detph=6"]) == 2
    err = capsys.readouterr().err
    assert "model.detph" in err and "model.depth" in err


def test_option_not_taken_by_backbone(capsys):
    assert main(["models", "model.name=iresnet", "model.size=r18", "model.num_landmarks=9"]) == 2
    assert "num_landmarks" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end_writes_run_folder(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "lafs.cli", "demo", "--out", str(out), "--budget-minutes", "0.2", "--no-dino",
         "--no-lfw", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| pretraining | held-out accuracy | AUC | TAR@FAR=1e-2 |" in proc.stdout
    for stage in ("stage1_supervised", "pretrain_lafs", "finetune_scratch", "finetune_lafs"):
        for name in ("config.yaml", "metrics.jsonl", "checkpoints/MODEL_CARD.md"):
            assert (out / stage / name).is_file(), (stage, name)
        assert list((out / stage / "tb").iterdir())
    # stage 1 trains 32 % of the budget: its first steps are timed, the count follows
    assert load_config(out / "stage1_supervised" / "config.yaml").train.budget_minutes == pytest.approx(0.064)
    summary = json.loads((out / "demo.json").read_text())
    budget = [r for r in read_metrics(out / "stage1_supervised" / "metrics.jsonl") if r["kind"] == "budget"]
    assert len(budget) == 1 and summary["stages"]["stage1"]["steps"] == budget[0]["steps"] >= 6
    assert set(summary["results"]) == {"scratch", "lafs"} and summary["lfw"] is None
    for r in summary["results"].values():
        values = [r["accuracy"], r["auc"], *r["tar_at_far"].values()]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), r
        assert f"| {100 * r['accuracy']:.2f} +- " in proc.stdout
    for pic in ("landmarks.png", "roc.png", "attention.png"):
        assert (out / pic).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
