"""``lafs demo`` end to end: run folders, the table, and equal steps for the compared arms under an uneven load.

One demo run (module fixture, about 2 minutes) serves every test here: LAFS and DINO pretrainings, then the three
few-shot finetunes, with one arm of each comparison artificially slowed (its optimizer steps take ten times as long
on the training loop's clock)."""

import contextlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lafs.cli import main
from lafs.config import load_config
from lafs.train.logging import read_metrics

# Seconds one optimizer step of each run takes on the training loop's clock (a virtual clock, so that the step
# counts do not depend on the load of the machine running the test). One arm of each comparison, not its first, is
# ten times slower than the others: timed on its own it would train the 6 steps a timing gives at least (1 untimed +
# 5 timed), where the first arms' timings give 12 (1.56 s / 0.125 s) and 7 (0.48 s / 0.0625 s).
SECONDS_PER_STEP = {"stage1_supervised": 0.5, "pretrain_lafs": 0.125, "pretrain_dino": 1.25,
                    "finetune_scratch": 0.0625, "finetune_lafs": 0.625, "finetune_dino": 0.0625}
SLOWED = ("pretrain_dino", "finetune_lafs")
PRETRAININGS = ("pretrain_lafs", "pretrain_dino")
FINETUNES = ("finetune_scratch", "finetune_lafs", "finetune_dino")


class Clock:
    """``time`` as the training loop sees it: ``perf_counter`` is advanced by the optimizer steps."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``lafs demo --budget-minutes 0.2 --dino --no-lfw`` in this process, every optimizer step of a run advancing
    the loop's clock by its SECONDS_PER_STEP; (folder, stdout, optimizer steps per run)."""
    import lafs.train.loop
    import lafs.train.run

    out = tmp_path_factory.mktemp("demo") / "demo"
    real_train, clock, stepped = lafs.train.run.train, Clock(), {}

    def train(cfg, *args, **kwargs):
        name = Path(cfg.out_dir).name
        stepped[name] = 0

        def step(optimizer, args, kwargs):
            stepped[name] += 1
            clock.now += SECONDS_PER_STEP[name]

        handle = register_optimizer_step_pre_hook(step)
        try:
            return real_train(cfg, *args, **kwargs)
        finally:
            handle.remove()

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(lafs.train.run, "train", train)
        mp.setattr(lafs.train.loop, "time", clock)
        rc = main(["demo", "--out", str(out), "--budget-minutes", "0.2", "--dino", "--no-lfw", "--quiet"])
    assert rc == 0
    return out, stdout.getvalue(), stepped


def _trained_steps(folder: Path) -> int:
    """What the run folder says it trained: its summary's last step, and its metrics' last logged step."""
    summary = json.loads((folder / "summary.json").read_text())
    last = max(r["step"] for r in read_metrics(folder / "metrics.jsonl") if "step" in r)
    assert summary["step"] == last, folder
    return summary["step"]


@pytest.mark.slow
def test_a_demo_refuses_a_folder_holding_one(tmp_path, capsys):
    stage = tmp_path / "demo" / "stage1_supervised" / "checkpoints"
    stage.mkdir(parents=True)
    (stage / "step_0000012.pt").write_bytes(b"a checkpoint")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--budget-minutes", "0.2", "--no-lfw", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"lafs: error: {tmp_path / 'demo'} already holds a demo (stage1_supervised); use another --out" in err
    assert [p.name for p in stage.iterdir()] == ["step_0000012.pt"]


def test_demo_end_to_end_writes_run_folder(demo):
    out, stdout, _ = demo
    assert ("| pretraining | pretraining steps | finetune steps | test accuracy | AUC | TAR@FAR=1e-2 |"
            in stdout)
    for stage in ("stage1_supervised", *PRETRAININGS, *FINETUNES):
        for name in ("config.yaml", "metrics.jsonl", "checkpoints/MODEL_CARD.md"):
            assert (out / stage / name).is_file(), (stage, name)
        assert list((out / stage / "tb").iterdir())
    # stage 1 trains 40 % of the budget, a finetune 4 %: their first steps are timed, the count follows
    assert load_config(out / "stage1_supervised" / "config.yaml").train.budget_minutes == pytest.approx(0.08)
    assert load_config(out / "finetune_scratch" / "config.yaml").train.budget_minutes == pytest.approx(0.008)
    # stage 1 chooses its checkpoint on identities 64..127, never on the test's (128 on); the finetunes imprint their
    # centres; the pretrainings run at lr 2e-3 unscaled, teacher momentum 0.99
    d = load_config(out / "stage1_supervised" / "config.yaml").data
    assert d.num_identities + d.val_identities == 128 and d.val_pairs > 0
    assert all(load_config(out / f / "config.yaml").finetune.head_init == "imprint" for f in FINETUNES)
    for p in PRETRAININGS:
        c = load_config(out / p / "config.yaml")
        assert (c.optim.lr, c.optim.lr_scale_batch, c.ssl.momentum_teacher) == (2e-3, None, 0.99), p
    summary = json.loads((out / "demo.json").read_text())
    budget = [r for r in read_metrics(out / "stage1_supervised" / "metrics.jsonl") if r["kind"] == "budget"]
    assert len(budget) == 1 and summary["stages"]["stage1"]["steps"] == budget[0]["steps"] >= 6
    assert set(summary["results"]) == {"scratch", "lafs", "dino"} and summary["lfw"] is None
    for r in summary["results"].values():
        values = [r["accuracy"], r["auc"], *r["tar_at_far"].values()]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), r
        assert f"| {100 * r['accuracy']:.2f} +- " in stdout
    # the floors, scored like the arms, as rows of the table and in demo.json
    assert set(summary["floors"]) == {"raw_pixels", "pca_whitened", "untrained"}
    assert summary["floors_fit_images"] == 128 * 64 and summary["test_pairs"] == 6000 and summary["test_set"] == "heldout"
    for key, label in (("raw_pixels", "raw pixels"), ("pca_whitened", "PCA-whitened pixels"),
                       ("untrained", "untrained network")):
        r = summary["floors"][key]
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["auc"] <= 1.0
        assert f"| floor: {label} | - | - | {100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} % |" in stdout
    sup = summary["supervised"]
    assert sup["steps"] == summary["stages"]["stage1"]["steps"] and 0.0 <= sup["accuracy"] <= 1.0
    assert (f"| supervised stage 1 (reference; its steps) | - | {sup['steps']} | {100 * sup['accuracy']:.2f} +- "
            in stdout)
    spread = summary["landmark_spread"]
    assert set(spread) == {"before", "after"} and all(0 < v < 0.5 for s in spread.values() for v in s.values())
    assert "landmark spread (std of x / y over a face" in stdout
    for pic in ("landmarks.png", "roc.png", "attention.png"):
        assert (out / pic).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_slowed_arm_still_trains_equal_steps(demo):
    """Issue 18: the first arm of a comparison times its steps, the others train its count, so an arm slowed by
    load (here: ten times the seconds per step of the others on the loop's clock) trains exactly as many steps as
    the others, and every run folder says so."""
    out, stdout, stepped = demo
    summary = json.loads((out / "demo.json").read_text())
    for arms in (PRETRAININGS, FINETUNES):
        steps = {arm: _trained_steps(out / arm) for arm in arms}
        assert len(set(steps.values())) == 1, steps  # from the run folders themselves
        first, *others = arms
        timing = [r for r in read_metrics(out / first / "metrics.jsonl") if r["kind"] == "budget"]
        assert len(timing) == 1 and timing[0]["steps"] == steps[first]  # the first arm timed its count
        for arm in others:  # the others were given it: no timing of their own
            cfg = load_config(out / arm / "config.yaml").train
            assert cfg.budget_minutes is None and cfg.steps == steps[first], arm
            assert not [r for r in read_metrics(out / arm / "metrics.jsonl") if r["kind"] == "budget"]
            assert summary["stages"][arm]["steps_of"] == first
        for arm in arms:
            assert summary["stages"][arm]["steps"] == steps[arm]
    # the first arms' timings gave more steps than a slowed arm's own timing would have (at least 6, 1 + 5 timed)
    for first, slowed in zip((PRETRAININGS[0], FINETUNES[0]), SLOWED):
        seconds = 60 * load_config(out / first / "config.yaml").train.budget_minutes
        assert int(seconds / SECONDS_PER_STEP[slowed]) < 6 < _trained_steps(out / first) == int(
            seconds / SECONDS_PER_STEP[first])
    assert {arm: stepped[arm] for arm in (*PRETRAININGS, *FINETUNES)} == {
        arm: _trained_steps(out / arm) for arm in (*PRETRAININGS, *FINETUNES)}  # the clock saw every step
    # every compared arm's steps, in demo.json and in the printed table
    r = summary["results"]
    n_pre, n_fine = _trained_steps(out / "pretrain_lafs"), _trained_steps(out / "finetune_scratch")
    assert {a: (v["pretrain_steps"], v["finetune_steps"]) for a, v in r.items()} == {
        "scratch": (None, n_fine), "lafs": (n_pre, n_fine), "dino": (n_pre, n_fine)}
    for arm in ("lafs", "dino"):
        assert f"| {arm} | {n_pre} | {n_fine} | " in stdout
    assert f"| scratch | - | {n_fine} | " in stdout


def test_landmark_spread_hand_computed():
    from lafs.cli.demo import landmark_spread

    # a 7 x 7 grid of pixel centres 4, 12, ..., 52 over a 56 px face: std 8 * sqrt((7^2 - 1) / 12) = 16 px = 0.286
    g = np.arange(4, 56, 8, dtype=np.float64)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(1, 49, 2)
    assert landmark_spread(grid, 56) == pytest.approx({"x": 16 / 56, "y": 16 / 56})
    # collapsed into a vertical band at x = 28: no x spread; averaged over faces
    band = grid.copy()
    band[..., 0] = 28.0
    assert landmark_spread(np.concatenate([grid, band]), 56) == pytest.approx({"x": 8 / 56, "y": 16 / 56})


def _celeba_like(root: Path, counts: list[int]) -> None:
    """``train/celeba64_train.rec`` (identity i: counts[i] images of 32 px) and ``celeba64/celeba64_val.bin``."""
    from lafs.data.datasets import encode_image
    from lafs.data.pairs import write_bin
    from lafs.data.recordio import write_face_records

    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "celeba64").mkdir()
    labels = [i for i, n in enumerate(counts) for _ in range(n)]
    write_face_records(root / "train" / "celeba64_train.rec",
                       [(lab, encode_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) for lab in labels])
    write_bin(root / "celeba64" / "celeba64_val.bin",
              [encode_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)], [True, False] * 2)


def test_real_source_splits_identities_and_reads_the_sets(tmp_path):
    """--real: stage 1 takes every image of the first half of the identities, the few-shot index `shots` images of
    each identity of the second half (fewer-image identities left out), the tests come from the .bin."""
    from lafs.cli.demo import RealSource
    from lafs.data.fewshot import load_index

    _celeba_like(tmp_path / "data", [3, 2, 4, 1, 3, 2])  # identities 0..5; the split is 3
    src = RealSource(tmp_path, 2, 0, None, tmp_path / "data", fraction=1.0)
    assert src.split == 3 and src.stage1_positions.tolist() == list(range(9))
    few = src.fewshot_positions
    # identity 3 (position 9) has one image: left out; identity 4 is at 10..12, identity 5 at 13, 14
    assert len(few) == 4 and set(few[:2]) <= {10, 11, 12} and few[2:].tolist() == [13, 14]
    stage1 = src.stage_data("stage1")
    assert "data.source=records" in stage1 and "data.geometry=celeba64" in stage1
    index = next(o for o in stage1 if o.startswith("data.index="))
    assert load_index(index.split("=", 1)[1])[0].tolist() == list(range(9))
    assert not any(o.startswith("data.index=") for o in src.stage_data("pretrain"))
    sets = src.eval_sets()
    assert list(sets) == ["celeba64_val"] and sets["celeba64_val"][0].shape == (8, 3, 64, 64)
    assert sets["celeba64_val"][1].tolist() == [True, False, True, False]
    assert src.fit_images().shape == (15, 3, 32, 32)


def test_real_source_fewshot_takes_a_seeded_fraction_of_the_identities(tmp_path):
    """The few-shot set takes round(fraction x eligible) second-half identities (at least one), `shots` images of
    each, chosen by the seed; the description says how many."""
    from lafs.cli.demo import RealSource

    # identities 0..9, 3 images each; the split is 5: identities 5..9 eligible at 2 shots
    _celeba_like(tmp_path / "data", [3] * 10)
    picks = set()
    for seed in range(6):
        src = RealSource(tmp_path, 2, seed, None, tmp_path / "data", fraction=0.4)
        few = src.fewshot_positions
        ids = sorted({int(p) // 3 for p in few})
        assert src.fewshot_identities == 2 and len(few) == 4 and len(ids) == 2 and all(5 <= i <= 9 for i in ids)
        assert "few-shot: 2 of identities 5..9 x 2 shots, 4 images" in src.describe()
        picks.add(tuple(ids))
    assert len(picks) > 1  # the seed chooses
    assert RealSource(tmp_path, 2, 0, None, tmp_path / "data", fraction=0.01).fewshot_identities == 1
    assert (RealSource(tmp_path, 2, 3, None, tmp_path / "data", fraction=0.4).fewshot_positions.tolist()
            == RealSource(tmp_path, 2, 3, None, tmp_path / "data", fraction=0.4).fewshot_positions.tolist())


def test_real_demo_errors_name_the_missing_file(tmp_path, capsys):
    assert main(["demo", "--real", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d"), "--no-lfw",
                 "--quiet"]) == 2
    assert f"--real: {tmp_path / 'nowhere' / 'train' / 'celeba64_train.rec'} not found" in capsys.readouterr().err
    assert main(["demo", "--data", str(tmp_path), "--out", str(tmp_path / "d"), "--no-lfw", "--quiet"]) == 2
    assert "--data needs --real" in capsys.readouterr().err
