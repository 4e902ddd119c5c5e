"""Run-relative schedules (issue 19): fractions of the run resolved to steps with one rounding rule, equal to the
epoch schedules where the two coincide, the config rules around them, the quarter-of-run warning, budgeted runs
and resume, and a short `lafs pretrain` run whose logged learning rate and teacher temperature follow them."""

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lafs.checkpoint import checkpoints_in
from lafs.cli import main
from lafs.config import ConfigError, load_config
from lafs.heads import build_head
from lafs.models import build_backbone
from lafs.ssl.dino import teacher_temp_at, teacher_temp_at_step
from lafs.train.logging import read_metrics
from lafs.train.optim import lr_at
from lafs.train.pretrain import build_pretrain_task
from lafs.train.run import train
from lafs.train.schedules import ScheduleWarning, resolve_fraction, resolve_schedule, warn_long_phases
from lafs.train.supervised import SupervisedTask

REPO = Path(__file__).resolve().parents[1]
# a tiny DINO pretraining on fViT-micro (no landmark CNN needed): 128 synthetic images / 32 = 4 steps per epoch
PRETRAIN = [
    "model.name=fvit", "model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0", "model.drop_path=0.0",
    "model.token_init=trunc_normal", "data.source=synthetic", "data.num_identities=16",
    "data.images_per_identity=8", "data.val_pairs=0", "data.workers=0", "train.batch_size=32", "train.log_every=1",
    "train.ckpt_every=1000", "optim.lr=1e-3", "optim.weight_decay=0.04", "optim.clip_grad=3.0",
    "optim.clip_mode=per_param", "ssl.method=dino", "ssl.out_dim=256", "ssl.hidden_dim=128",
    "ssl.bottleneck_dim=32", "ssl.num_local=2", "ssl.momentum_teacher=0.99",
]


def cfg_of(*overrides: str):
    return load_config(None, list(overrides))


def train_records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}


def caught_schedule_warnings(schedule) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_long_phases(schedule)
    return [w for w in caught if issubclass(w.category, ScheduleWarning)]


# ----------------------------------------------------------------------------- the rounding rule


@pytest.mark.parametrize("fraction,total,steps", [
    (0.2, 100, 20), (0.0, 7, 0), (1.0, 7, 7), (0.5, 0, 0),
    (0.25, 10, 3),   # 2.5: half up, not Python's half-to-even round (2)
    (0.05, 30, 2),   # 1.5 -> 2
    (0.1, 25, 3),    # 2.5 -> 3
    (0.35, 10, 4),   # 3.5 -> 4
    (0.145, 100, 15),  # 14.5 -> 15: in binary 0.145 x 100 = 14.499999999999998, which would round to 14
    (0.29, 100, 29),   # binary 28.999999999999996
    (0.3333, 3, 1),  # 0.9999 -> 1
    (0.124, 10, 1),  # 1.24 -> 1
])
def test_resolve_fraction_rounds_half_up_on_the_written_decimal(fraction, total, steps):
    assert resolve_fraction(fraction, total) == steps


def test_resolve_fraction_refuses_out_of_range():
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            resolve_fraction(bad, 10)


# ----------------------------------------------------------------------------- fractions == epochs where they coincide
# steps_per_epoch = 10 (10 micro-batches an epoch, no accumulation), a 100-step run


def test_warmup_fraction_equals_warmup_epochs_at_every_step():
    by_epochs = resolve_schedule(cfg_of("optim.warmup_epochs=2"), 100, 10)
    by_fraction = resolve_schedule(cfg_of("optim.warmup_fraction=0.2"), 100, 10)
    assert by_epochs.warmup_steps == by_fraction.warmup_steps == 20
    for step in range(100):
        assert lr_at(step, 100, 1e-3, by_fraction.warmup_steps, 1e-6) == lr_at(step, 100, 1e-3, by_epochs.warmup_steps,
                                                                               1e-6)
    # and it scales with the run, where the epochs do not
    assert resolve_schedule(cfg_of("optim.warmup_fraction=0.2"), 25, 10).warmup_steps == 5
    assert resolve_schedule(cfg_of("optim.warmup_epochs=2"), 25, 10).warmup_steps == 20


def pretrain_task(*overrides: str):
    torch.manual_seed(0)
    return build_pretrain_task(load_config(None, PRETRAIN + list(overrides)), log=lambda *_: None)


def test_teacher_temperature_fraction_equals_epochs_at_epoch_starts_and_moves_per_step():
    temps = ["ssl.warmup_teacher_temp=0.04", "ssl.teacher_temp=0.07"]
    epochs, fraction = "ssl.warmup_teacher_temp_epochs=3", "ssl.warmup_teacher_temp_fraction=0.2"
    by_epochs, by_fraction = pretrain_task(*temps, epochs), pretrain_task(*temps, fraction)
    by_epochs.set_schedule(resolve_schedule(load_config(None, PRETRAIN + temps + [epochs]), 100, 10))
    by_fraction.set_schedule(resolve_schedule(load_config(None, PRETRAIN + temps + [fraction]), 100, 10))
    assert by_fraction.temp_warmup_steps == 20 and by_epochs.temp_warmup_steps is None
    got = {}
    for step in range(100):
        for name, task in (("epochs", by_epochs), ("fraction", by_fraction)):
            task.set_epoch(step // 10)
            task.set_step(step)
            got.setdefault(name, []).append(task.teacher_temp)
    # DINO's linspace over 3 epochs: 0.04, 0.055, 0.07 from epochs 0, 1, 2; the per-step ramp meets it there
    for epoch in range(10):
        assert got["fraction"][10 * epoch] == pytest.approx(got["epochs"][10 * epoch])
        assert got["epochs"][10 * epoch] == pytest.approx(teacher_temp_at(epoch, 0.04, 0.07, 3))
    assert got["fraction"][10] == pytest.approx(0.055) and got["fraction"][20] == pytest.approx(0.07)
    # ... and in between moves every step (DINO holds each value for the epoch)
    assert got["fraction"][5] == pytest.approx(0.04 + 0.03 * 5 / 20) and got["epochs"][5] == pytest.approx(0.04)
    assert all(a < b for a, b in zip(got["fraction"][:20], got["fraction"][1:21]))
    assert got["fraction"][20:] == [pytest.approx(0.07)] * 80


def test_teacher_temp_at_step_hand_values():
    assert teacher_temp_at_step(0, 0.07, 0.04, 10) == pytest.approx(0.07)
    assert teacher_temp_at_step(5, 0.07, 0.04, 10) == pytest.approx(0.055)
    assert teacher_temp_at_step(10, 0.07, 0.04, 10) == pytest.approx(0.04)
    assert teacher_temp_at_step(3, 0.07, 0.04, 0) == pytest.approx(0.04)  # no warm-up


def frozen_steps(task, total: int = 100, steps_per_epoch: int = 10) -> list[bool]:
    """Which steps have the prototype layer's grads cancelled by the task's after_backward."""
    frozen = []
    for step in range(total):
        for p in task.student.parameters():
            p.grad = torch.ones_like(p)
        task.set_epoch(step // steps_per_epoch)
        task.set_step(step)
        task.after_backward(step // steps_per_epoch)
        frozen.append(task.student.head.last_layer.parametrizations.weight.original1.grad is None)
    return frozen


def test_freeze_last_layer_fraction_equals_one_epoch():
    by_epochs = pretrain_task("ssl.freeze_last_layer=1")
    by_fraction = pretrain_task("ssl.freeze_last_layer_fraction=0.1")
    s_epochs = resolve_schedule(load_config(None, PRETRAIN + ["ssl.freeze_last_layer=1"]), 100, 10)
    s_fraction = resolve_schedule(load_config(None, PRETRAIN + ["ssl.freeze_last_layer_fraction=0.1"]), 100, 10)
    assert s_epochs.freeze_last_layer_steps is None and s_fraction.freeze_last_layer_steps == 10
    assert s_epochs.frozen_steps == s_fraction.frozen_steps == 10
    by_epochs.set_schedule(s_epochs)
    by_fraction.set_schedule(s_fraction)
    expected = [True] * 10 + [False] * 90
    assert frozen_steps(by_epochs) == expected
    assert frozen_steps(by_fraction) == expected
    # the rest of the head always trains
    assert by_fraction.student.head.mlp[0].weight.grad is not None


def test_fractional_phases_sit_at_their_start_until_the_run_length_is_known():
    task = pretrain_task("ssl.warmup_teacher_temp=0.02", "ssl.teacher_temp=0.04",
                         "ssl.warmup_teacher_temp_fraction=0.1", "ssl.freeze_last_layer_fraction=0.1")
    task.set_step(500)
    assert task.teacher_temp == pytest.approx(0.02)
    assert frozen_steps(task, total=3)[-1]


def beta_task(**kw) -> SupervisedTask:
    torch.manual_seed(0)
    backbone = build_backbone("part_fvit", "micro", dropout=0.0, emb_dropout=0.0, drop_path=0.0)
    return SupervisedTask(backbone, build_head("cosface", backbone.embedding_size, 8), landmark_option="c", **kw)


def test_beta_fractions_equal_beta_epochs_at_every_step():
    values = [1000.0, 100.0, 1.0, 0.11, 0.0]
    by_epochs = beta_task(beta_schedule=(values, [0, 2, 4, 6, 8]))
    by_fraction = beta_task(beta_schedule=(values, [0, 8, 14, 21, 28]), beta_fractions=[0, 0.2, 0.4, 0.6, 0.8])
    schedule = resolve_schedule(cfg_of("finetune.beta_fractions=[0, 0.2, 0.4, 0.6, 0.8]"), 100, 10)
    assert schedule.beta_steps == (0, 20, 40, 60, 80)
    by_epochs.set_schedule(schedule)  # per epoch: no fractions, nothing changes
    by_fraction.set_schedule(schedule)
    betas = {"epochs": [], "fraction": []}
    for step in range(100):
        for name, task in (("epochs", by_epochs), ("fraction", by_fraction)):
            task.set_epoch(step // 10)
            task.set_step(step)
            betas[name].append(task.beta)
    assert betas["fraction"] == betas["epochs"]
    assert [betas["fraction"][s] for s in (0, 19, 20, 39, 40, 60, 79, 80, 99)] == [
        1000.0, 1000.0, 100.0, 100.0, 1.0, 0.11, 0.11, 0.0, 0.0]
    # a 25-step run reaches every beta (epochs 0/2/4/6/8 would stop at 100 after step 20)
    short = resolve_schedule(cfg_of("finetune.beta_fractions=[0, 0.2, 0.4, 0.6, 0.8]"), 25, 10)
    assert short.beta_steps == (0, 5, 10, 15, 20)


def test_beta_fractions_in_a_task_validate_like_epochs():
    with pytest.raises(ValueError, match="equal length"):
        beta_task(beta_schedule=([1.0, 0.0], [0, 8, 14]), beta_fractions=[0.0, 0.5, 0.7])
    task = beta_task(beta_schedule=([1.0, 0.0], [0, 8, 14]), beta_fractions=[0.0, 0.5])  # epochs ignored
    assert task.beta == 1.0


# ----------------------------------------------------------------------------- configuration rules


@pytest.mark.parametrize("override,key", [
    ("optim.warmup_fraction=1.5", "optim.warmup_fraction"),
    ("optim.warmup_fraction=-0.1", "optim.warmup_fraction"),
    ("ssl.warmup_teacher_temp_fraction=2", "ssl.warmup_teacher_temp_fraction"),
    ("ssl.freeze_last_layer_fraction=-1", "ssl.freeze_last_layer_fraction"),
    ("finetune.beta_fractions=[0, 0.5, 1.2, 1.5, 2]", "finetune.beta_fractions"),
])
def test_fraction_out_of_range_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'.*\[0, 1\]"):
        load_config(None, [override])


@pytest.mark.parametrize("fraction,other", [
    ("optim.warmup_fraction=0.1", "optim.warmup_epochs=2"),
    ("optim.warmup_fraction=0.1", "optim.warmup_steps=50"),
    ("ssl.warmup_teacher_temp_fraction=0.3", "ssl.warmup_teacher_temp_epochs=30"),
    ("ssl.freeze_last_layer_fraction=0.1", "ssl.freeze_last_layer=2"),
    ("finetune.beta_fractions=[0, 0.2, 0.4, 0.6, 0.8]", "finetune.beta_epochs=[0, 2, 4, 6, 8]"),
])
def test_fraction_and_epoch_key_both_set_is_a_config_error_naming_both(fraction, other):
    for order in ([fraction, other], [other, fraction]):
        with pytest.raises(ConfigError) as err:
            load_config(None, order)
        message = str(err.value)
        assert fraction.split("=")[0] in message and other.split("=")[0] in message, message


def test_fraction_with_the_epoch_key_at_its_default_is_fine():
    cfg = load_config(None, ["ssl.freeze_last_layer=1", "ssl.freeze_last_layer_fraction=0.05",
                             "optim.warmup_steps=0", "optim.warmup_fraction=0.1"])
    assert cfg.ssl.freeze_last_layer_fraction == 0.05 and cfg.optim.warmup_fraction == 0.1


@pytest.mark.parametrize("overrides,match", [
    (["finetune.beta_fractions=[0, 0.5]"], "has 2 fractions but 'finetune.beta_schedule' has 5"),
    (["finetune.beta_fractions=[0.1, 0.2, 0.4, 0.6, 0.8]"], "start at 0 and increase"),
    (["finetune.beta_fractions=[0, 0.4, 0.2, 0.6, 0.8]"], "start at 0 and increase"),
    (["finetune.beta_fractions=[]"], "finetune.beta_fractions"),
])
def test_beta_fractions_shape_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_resolver_checks_configs_not_built_by_load_config():
    cfg = load_config(None, [])
    cfg.optim.warmup_fraction, cfg.optim.warmup_steps = 0.1, 10
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        resolve_schedule(cfg, 100, 10)


def test_presets_micro_use_fractions_paper_presets_epochs():
    for name in ("pretrain_dino_real", "pretrain_lafs_real"):
        cfg = load_config(REPO / "src" / "lafs" / "presets" / "configs" / "micro" / f"{name}.yaml")
        assert cfg.optim.warmup_fraction is not None and cfg.ssl.freeze_last_layer_fraction is not None
        assert cfg.ssl.warmup_teacher_temp_fraction is not None
    cfg = load_config(REPO / "src" / "lafs" / "presets" / "configs" / "micro" / "fewshot_celeba_real.yaml")
    assert cfg.optim.warmup_fraction is not None and len(cfg.finetune.beta_fractions) == len(cfg.finetune.beta_schedule)
    # the CPU presets are short runs: every schedule they have is a fraction of the run
    cpu = sorted((REPO / "src" / "lafs" / "presets" / "configs" / "cpu").glob("*.yaml"))
    assert len(cpu) >= 3, cpu
    for path in cpu:
        cfg = load_config(path)
        assert cfg.optim.warmup_fraction is not None, path
        if cfg.ssl.method != "none":
            assert cfg.ssl.freeze_last_layer_fraction is not None and cfg.ssl.warmup_teacher_temp_fraction is not None
    for path in sorted((REPO / "src" / "lafs" / "presets" / "configs" / "paper").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert not any(k.endswith(("_fraction", "_fractions")) for section in raw.values() if isinstance(section, dict)
                       for k in section), path
        load_config(path)


# ----------------------------------------------------------------------------- the quarter-of-run warning


def test_long_warmup_warns_with_key_steps_and_total():
    schedule = resolve_schedule(cfg_of("optim.warmup_steps=50"), 25, 10)
    with pytest.warns(ScheduleWarning, match=r"optim.warmup_steps=50 .* 50 steps.* 25 steps"):
        warn_long_phases(schedule)
    schedule = resolve_schedule(cfg_of("optim.warmup_fraction=0.3"), 100, 10)
    with pytest.warns(ScheduleWarning, match=r"optim.warmup_fraction=0.3 .* 30 steps.* 100 steps"):
        warn_long_phases(schedule)


def test_long_frozen_head_warns_with_key_steps_and_total():
    # 90 batches an epoch, 100 steps: one epoch frozen is 90 steps
    schedule = resolve_schedule(cfg_of("ssl.method=dino", "ssl.freeze_last_layer=1"), 100, 90)
    with pytest.warns(ScheduleWarning, match=r"ssl.freeze_last_layer=1 .* 90 steps.* 100 steps"):
        warn_long_phases(schedule)
    schedule = resolve_schedule(cfg_of("ssl.method=dino", "ssl.freeze_last_layer_fraction=0.5"), 100, 90)
    with pytest.warns(ScheduleWarning, match=r"ssl.freeze_last_layer_fraction=0.5 .* 50 steps.* 100 steps"):
        warn_long_phases(schedule)


def test_no_warning_up_to_a_quarter_or_while_the_length_is_timed():
    assert not caught_schedule_warnings(resolve_schedule(cfg_of("optim.warmup_fraction=0.25"), 100, 10))
    # 0.25 of 6 steps rounds up to 2 steps: a quarter rounded the same way, not more
    assert not caught_schedule_warnings(resolve_schedule(cfg_of("optim.warmup_fraction=0.25"), 6, 10))
    assert caught_schedule_warnings(resolve_schedule(cfg_of("optim.warmup_steps=3"), 6, 10))  # this one is more
    assert not caught_schedule_warnings(resolve_schedule(cfg_of("optim.warmup_steps=25"), 100, 10))
    assert not caught_schedule_warnings(resolve_schedule(cfg_of("ssl.method=dino", "ssl.freeze_last_layer_fraction=0.25",
                                                            "optim.warmup_epochs=2.5"), 100, 10))
    # supervised runs have no prototype layer: freeze_last_layer (1 epoch) is not theirs
    assert not caught_schedule_warnings(resolve_schedule(cfg_of("ssl.freeze_last_layer=1"), 100, 90))
    assert not caught_schedule_warnings(resolve_schedule(cfg_of("optim.warmup_steps=50"), 10**9, 10, pending=True))


# ----------------------------------------------------------------------------- end to end


FRACTIONS = ["optim.warmup_fraction=0.25", "ssl.warmup_teacher_temp=0.02", "ssl.teacher_temp=0.04",
             "ssl.warmup_teacher_temp_fraction=0.5", "ssl.freeze_last_layer_fraction=0.25"]


def test_pretrain_run_logs_the_fractional_schedules(tmp_path, capsys):
    """`lafs pretrain` for 8 steps: warm-up 2 steps, teacher temperature 0.02 -> 0.04 over 4 steps, prototypes
    frozen for 2 steps; metrics.jsonl's step k is optimizer step k - 1 (0-based)."""
    torch.manual_seed(0)
    assert main(["pretrain", "--quiet", *PRETRAIN, *FRACTIONS, "train.steps=8", f"out_dir={tmp_path}"]) == 0
    assert "lr warm-up 2 steps (optim.warmup_fraction=0.25)" in capsys.readouterr().out
    records = train_records(tmp_path)
    assert sorted(records) == list(range(1, 9))
    expected_temp = [0.02, 0.025, 0.03, 0.035, 0.04, 0.04, 0.04, 0.04]
    assert [records[k]["teacher_temp"] for k in range(1, 9)] == pytest.approx(expected_temp)
    assert [records[k]["lr"] for k in range(1, 9)] == pytest.approx(
        [lr_at(k - 1, 8, 1e-3, 2, 1e-6) for k in range(1, 9)])
    assert records[1]["lr"] == pytest.approx(5e-4) and records[2]["lr"] == pytest.approx(1e-3)
    saved = load_config(tmp_path / "config.yaml")
    assert saved.optim.warmup_fraction == 0.25 and saved.ssl.freeze_last_layer_fraction == 0.25


def test_pretrain_run_warns_about_a_long_warmup(tmp_path):
    with pytest.warns(ScheduleWarning, match=r"optim.warmup_steps=5 .* 5 steps.* 4 steps"):
        train(load_config(None, PRETRAIN + ["optim.warmup_steps=5", "train.steps=4", f"out_dir={tmp_path}"]),
              progress=False)


def test_fractional_pretraining_resumes_exactly(tmp_path):
    cfg = load_config(None, PRETRAIN + FRACTIONS + ["train.steps=6", "train.ckpt_every=3", f"out_dir={tmp_path}"])
    torch.manual_seed(0)
    train(cfg, progress=False)
    first = train_records(tmp_path)
    ckpts = checkpoints_in(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step_0000003.pt", "step_0000006.pt"]
    torch.manual_seed(123)
    train(cfg, resume=str(ckpts[0]), progress=False)
    again = train_records(tmp_path)
    for k in range(1, 7):
        assert again[k]["lr"] == first[k]["lr"] and again[k]["teacher_temp"] == first[k]["teacher_temp"]
        assert again[k]["loss"] == pytest.approx(first[k]["loss"], rel=1e-6, abs=0)


def test_budgeted_run_resolves_fractions_against_its_timed_count(tmp_path, monkeypatch):
    """The clock is faked (0.5 s a call), so the timing fixes a known count; the schedules after the timing
    follow that count, and a resumed run resolves the same ones."""
    import lafs.train.loop as loop_module

    clock = iter(range(10**6))
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: 0.5 * next(clock))
    out = tmp_path / "b"
    cfg = load_config(None, PRETRAIN + FRACTIONS + [
        "train.budget_minutes=0.3", "train.budget_timed_steps=2", "train.ckpt_every=4", "train.keep_last=100",
        f"out_dir={out}"])
    torch.manual_seed(0)
    result = train(cfg, progress=False)
    metrics = read_metrics(out / "metrics.jsonl")
    total = next(r for r in metrics if r["kind"] == "budget")["steps"]
    assert total == result.step and total >= 8, "too few steps for this test: raise the budget"
    records = train_records(out)
    warmup, temp_steps = resolve_fraction(0.25, total), resolve_fraction(0.5, total)
    # step 1 + 2 timed steps ran before the count was known: start values (lr ~0, warm-up temperature)
    assert records[1]["lr"] < 1e-9 and records[1]["teacher_temp"] == pytest.approx(0.02)
    for k in range(4, total + 1):
        assert records[k]["lr"] == pytest.approx(lr_at(k - 1, total, 1e-3, warmup, 1e-6)), k
        assert records[k]["teacher_temp"] == pytest.approx(teacher_temp_at_step(k - 1, 0.02, 0.04, temp_steps)), k
    for path in checkpoints_in(out / "checkpoints")[1:]:  # back to step 4, after the timing
        path.unlink()
    monkeypatch.undo()
    again = train(cfg, resume="auto", progress=False)
    assert again.step == total
    records_again = train_records(out)
    for k in range(5, total + 1):
        assert records_again[k]["lr"] == records[k]["lr"] and records_again[k]["teacher_temp"] == records[k][
            "teacher_temp"]


def test_finetune_run_logs_beta_at_fractions_of_the_run(tmp_path):
    """Landmark option (c) for 8 steps with beta 10 -> 1 -> 0 at 0 / 0.25 / 0.5 of the run: steps 0-1, 2-3, 4-7."""
    torch.manual_seed(0)
    backbone = build_backbone("part_fvit", "micro")
    ckpt = tmp_path / "sup.pt"
    torch.save({"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, ckpt)
    out = tmp_path / "ft"
    args = ["model.name=part_fvit", "model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0",
            "model.drop_path=0.0", "data.source=synthetic", "data.num_identities=8", "data.images_per_identity=8",
            "data.val_pairs=0", "data.workers=0", "augment.preset=none", "train.batch_size=16", "train.log_every=1",
            "train.steps=8", "optim.warmup_fraction=0.25", "finetune.landmark=c", "finetune.beta_schedule=[10, 1, 0]",
            "finetune.beta_fractions=[0, 0.25, 0.5]", f"out_dir={out}"]
    assert main(["finetune", "--quiet", "--landmark-init", str(ckpt), *args]) == 0
    records = train_records(out)
    assert [records[k]["beta"] for k in range(1, 9)] == [10.0, 10.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert "landmark_loss" in records[1] and "landmark_loss" not in records[8]  # beta 0: no MSE term
