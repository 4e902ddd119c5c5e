"""Learning monitors (lafs.train.monitors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lafs.train.monitors import DriftMonitor


def test_drift_is_the_relative_distance_from_the_start():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
        lin.bias.copy_(torch.tensor([4.0, 0.0]))
    mon = DriftMonitor({"student": lin})
    assert mon() == {"student_drift": 0.0}
    with torch.no_grad():
        lin.weight[1, 1] = 1.0  # ||delta|| = 1, ||theta_0|| = 5
    assert mon()["student_drift"] == pytest.approx(0.2)
    with torch.no_grad():
        lin.bias.zero_()  # delta = (1, -4): sqrt(17) / 5
    assert mon()["student_drift"] == pytest.approx(17 ** 0.5 / 5)


def test_the_snapshot_is_a_copy_and_modules_are_reported_apart():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    mon = DriftMonitor({"teacher": a, "student": b})
    with torch.no_grad():
        b.weight.mul_(2.0)
    r = mon()
    assert r["teacher_drift"] == 0.0 and r["student_drift"] > 0.1


def test_supervised_run_logs_the_backbone_drift_and_resume_keeps_theta_0(tmp_path):
    from conftest import TINY_RUN

    from lafs.config import load_config
    from lafs.train.logging import read_metrics
    from lafs.train.run import train

    def run(out, steps, resume=None):
        torch.manual_seed(0)
        cfg = load_config(None, TINY_RUN + [f"train.steps={steps}", "train.val_every=2", "data.val_pairs=40",
                                            "data.val_identities=8", f"out_dir={out}"])
        train(cfg, resume=resume, progress=False)
        return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "val" and "backbone_drift" in r]

    whole = run(tmp_path / "a", 4)
    assert [r["step"] for r in whole] == [2, 4]
    assert 0 < whole[0]["backbone_drift"] < whole[1]["backbone_drift"]
    # a resumed run rebuilds the task from the seed before loading, so it measures from the same theta_0: the drift
    # of the loaded step-2 weights equals the one logged at step 2
    from lafs.checkpoint import checkpoints_in
    from lafs.train.distributed import DistEnv
    from lafs.train.loop import Trainer
    from lafs.train.run import build_task, build_train_set

    cfg = load_config(None, TINY_RUN + ["train.steps=4", f"out_dir={tmp_path / 'a'}"])
    torch.manual_seed(cfg.train.seed)
    data = build_train_set(cfg)
    trainer = Trainer(cfg, build_task(cfg, data.num_identities, DistEnv(), log=lambda *_: None), data, DistEnv(),
                      progress=False)
    step2 = [p for p in checkpoints_in(tmp_path / "a" / "checkpoints") if p.stem.endswith("0000002")]
    trainer.load(step2[0])
    assert trainer.monitors["backbone_drift"] == pytest.approx(whole[0]["backbone_drift"])
    assert trainer.drift()["backbone_drift"] == pytest.approx(whole[0]["backbone_drift"], rel=1e-6)


def test_a_run_measures_its_floors_before_the_first_step(tmp_path):
    import json

    from conftest import TINY_RUN

    from lafs.config import load_config
    from lafs.eval.floors import floors_for_sets
    from lafs.train.logging import read_metrics
    from lafs.train.run import build_train_set, build_val_sets, train

    torch.manual_seed(0)
    cfg = load_config(None, TINY_RUN + ["data.val_pairs=40", "data.val_identities=8", "train.floors=true",
                                        f"out_dir={tmp_path}"])
    result = train(cfg, progress=False)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "floors"]
    assert len(rows) == 1 and rows[0]["step"] == 0
    floors = json.loads((tmp_path / "summary.json").read_text())["floors"]["synthetic_val"]
    assert set(floors) == {"raw_pixels", "pca_whitened", "untrained"}
    # the pixel floors are the library's on the same sets, PCA fitted on the run's 32 training images
    data = build_train_set(cfg)
    fit = torch.stack([data[i]["image"] for i in range(len(data))])
    images, issame, _ = build_val_sets(cfg, lambda *_: None)["synthetic_val"]
    lib = floors_for_sets({"v": (images, issame)}, fit, components=31)["v"]
    assert floors["raw_pixels"] == lib["raw_pixels"]["accuracy"]
    assert floors["pca_whitened"] == lib["pca_whitened"]["accuracy"]
    assert 0.0 <= floors["untrained"] <= 1.0 and result.val["synthetic_val"]["accuracy"] >= 0.0
    card = (tmp_path / "checkpoints" / "MODEL_CARD.md").read_text()
    assert f"floors: raw pixels {100 * floors['raw_pixels']:.2f} %" in card and "untrained network" in card
