"""lafs experiment: grid expansion, references, skipping, equal steps across seeds, and the tables from run folders."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from lafs.cli import experiment as ex
from lafs.cli import experiment_tables as tables
from lafs.cli import main
from lafs.config import ConfigError

GRID = {
    "name": "toy",
    "seeds": [0, 1, 2],
    "budget": 2.0,
    "stages": [
        {"name": "train_{arm}_s{seed}", "cli": ["train", "cfg.yaml"],
         "axes": {"arm": {"a": ["model.name=vit"], "b": ["model.name=vit_kprpe"]}}, "budget": 1.5},
        {"name": "eval_{arm}_{shots}_s{seed}", "cli": ["eval", "@train_{arm}_s{seed}", "--out", "{out}"],
         "axes": {"arm": ["a", "b"], "shots": [1, "all"]}},
    ],
    "tables": [
        {"title": "acc", "runs": "eval_{arm}_{shots}_s{seed}", "rows": ["arm"], "columns": "shots",
         "metric": "lfw:accuracy", "scale": 100},
        {"title": "curve", "runs": "eval_{arm}_{shots}_s{seed}", "rows": ["arm", "shots"],
         "metrics": {"t=0": "crops@0:accuracy", "tar": "lfw:tar_at_far/0.001"}, "digits": 1,
         "labels": {"all": "every image"}},
    ],
}


def _grid(tmp_path, grid=GRID) -> dict:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(grid))
    return ex.load_grid(path)


def test_expand_names_arguments_budgets_and_order(tmp_path):
    runs = ex.expand(_grid(tmp_path), tmp_path / "root")
    assert len(runs) == 3 * (2 + 4)
    assert [r.name for r in runs[:6]] == ["train_a_s0", "train_b_s0", "eval_a_1_s0", "eval_a_all_s0", "eval_b_1_s0",
                                          "eval_b_all_s0"]  # seed by seed, stages in order
    train_b1 = next(r for r in runs if r.name == "train_b_s1")
    assert train_b1.argv == ["train", "cfg.yaml", "model.name=vit_kprpe", f"out_dir={tmp_path / 'root' / 'train_b_s1'}",
                             "train.seed=1"]
    assert train_b1.budget == pytest.approx(3.0) and train_b1.values == {"arm": "b"}
    ev = next(r for r in runs if r.name == "eval_b_all_s2")
    assert ev.needs == ["train_b_s2"] and ev.budget is None
    assert ev.argv[-1] == str(tmp_path / "root" / "eval_b_all_s2")
    # --budget and --seeds override the grid's
    runs = ex.expand(_grid(tmp_path), tmp_path, seeds=[5], budget=4.0)
    assert {r.seed for r in runs} == {5} and runs[0].budget == pytest.approx(6.0)


def test_grid_errors_name_the_fault(tmp_path):
    bad = dict(GRID, stages=[dict(GRID["stages"][1])])  # eval refers to a train run that no stage makes
    with pytest.raises(ConfigError, match="refers to .*train_a_s0.*no earlier run"):
        ex.expand(_grid(tmp_path, bad), tmp_path)
    bad = dict(GRID, stages=[{"name": "train_{arm}", "cli": ["train"], "axes": {"arm": ["a"]}}])
    with pytest.raises(ConfigError, match="run names repeat"):
        ex.expand(_grid(tmp_path, bad), tmp_path)
    bad = dict(GRID, stages=[{"name": "x_{nope}_s{seed}", "cli": ["train"]}])
    with pytest.raises(ConfigError, match=r"\{nope\}"):
        ex.expand(_grid(tmp_path, bad), tmp_path)
    bad = dict(GRID, stages=[{"name": "x", "cli": ["train"], "epochs": 3}])
    with pytest.raises(ConfigError, match="unknown keys.*epochs"):
        _grid(tmp_path, bad)
    with pytest.raises(ConfigError, match="no experiment grid named 'nope'.*fewshot"):
        ex.find_grid("nope")


def test_references_resolve_to_checkpoints_and_files(tmp_path):
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a" / "checkpoints" / "step_0000004.pt").write_bytes(b"x")
    (tmp_path / "a" / "checkpoints" / "step_0000010.pt").write_bytes(b"x")
    assert ex.resolve(["finetune.init=@a", "data.index=@b/sub/index.npy"], tmp_path) == [
        f"finetune.init={tmp_path / 'a' / 'checkpoints' / 'step_0000010.pt'}",
        f"data.index={tmp_path / 'b' / 'sub' / 'index.npy'}"]
    (tmp_path / "a" / "checkpoints" / "best.pt").write_bytes(b"x")
    assert ex.resolve(["@a"], tmp_path) == [str(tmp_path / "a" / "checkpoints" / "best.pt")]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ex.resolve(["@missing"], tmp_path)


@pytest.mark.parametrize("name", ["../../x_{arm}", "sub/x_{arm}", ".hidden_{arm}"])
def test_run_names_that_leave_the_root_are_refused(tmp_path, name):
    bad = dict(GRID, stages=[{"name": name, "cli": ["train", "cfg.yaml"], "axes": {"arm": ["a"]}}])
    with pytest.raises(ConfigError, match="must be one plain folder name inside the root"):
        ex.expand(_grid(tmp_path, bad), tmp_path / "root")


def test_axis_values_cannot_smuggle_a_path_into_a_run_name(tmp_path):
    bad = dict(GRID, stages=[{"name": "x_{arm}", "cli": ["train", "cfg.yaml"], "axes": {"arm": ["/../../etc"]}}])
    with pytest.raises(ConfigError, match="plain folder name"):
        ex.expand(_grid(tmp_path, bad), tmp_path / "root")


def test_references_stay_inside_the_root(tmp_path):
    with pytest.raises(ConfigError, match="plain folder name"):
        ex.resolve(["@../outside"], tmp_path)
    with pytest.raises(ConfigError, match="no '..'"):
        ex.resolve(["@a/../../etc/passwd"], tmp_path)


def _eval_json(acc: float, tar: float, curve0: float) -> dict:
    point = {"t": 0.0, "accuracy": curve0}
    return {"meta": {}, "results": [
        {"name": "lfw", "accuracy": acc, "tar_at_far": {"0.001": tar}},
        {"name": "crops", "accuracy": 0.1},  # the plain set of the same name as the curve: not the curve
        {"name": "crops", "points": [point, {"t": 1.0, "accuracy": 0.9}]},
    ]}


def _fake_folders(root: Path, runs, skip=()):
    """done.json + eval.json for every eval run (accuracy from a formula of arm, shots and seed) but ``skip``."""
    values = {}
    for r in runs:
        if r.name in skip:
            continue
        folder = root / r.name
        folder.mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps({"spec": r.argv, "seconds": 30.0, "steps": 7 if r.budget else None}))
        if r.argv[0] == "eval":
            acc = 0.5 + 0.1 * (r.values["arm"] == "b") + 0.05 * (r.values["shots"] == "all") + 0.01 * r.seed
            values[r.name] = acc
            (folder / "eval.json").write_text(json.dumps(_eval_json(acc, acc / 2, acc / 4)))
    return values


def test_aggregate_fake_run_folders_by_hand(tmp_path):
    grid = _grid(tmp_path)
    root = tmp_path / "root"
    runs = ex.expand(grid, root)
    _fake_folders(root, runs, skip={"eval_b_all_s2"})
    result, md = ex.report(grid, runs, root, "lafs experiment toy --budget 2")

    acc = result["tables"][0]
    assert acc["rows"] == ["a", "b"] and acc["columns"] == ["1", "all"]
    cell = acc["cells"]["a"]["1"]
    assert cell["seeds"] == [0, 1, 2]
    assert cell["values"] == pytest.approx([50.0, 51.0, 52.0])
    assert cell["mean"] == pytest.approx(51.0) and cell["std"] == pytest.approx(1.0)  # sample std of 50, 51, 52
    missing = acc["cells"]["b"]["all"]  # seed 2 not done: two values
    assert missing["seeds"] == [0, 1] and missing["mean"] == pytest.approx(65.5)
    assert missing["std"] == pytest.approx(math.sqrt(0.5))

    curve = result["tables"][1]
    assert curve["columns"] == ["t=0", "tar"] and curve["rows"][:2] == ["a / 1", "a / every image"]
    assert curve["cells"]["b / 1"]["t=0"]["mean"] == pytest.approx(np.mean([0.6, 0.61, 0.62]) / 4)
    assert curve["cells"]["b / 1"]["tar"]["mean"] == pytest.approx(np.mean([0.6, 0.61, 0.62]) / 2)

    assert "| arm | shots 1 | shots all |" in md
    assert "| a | 51.00 ± 1.00 | 56.00 ± 1.00 |" in md
    assert "| b | 61.00 ± 1.00 | 65.50 ± 0.71 (n=2) |" in md
    assert "17 of 18 done" in md and "Ran on: not recorded (runs older than the record): 17 runs." in md
    assert f"Aggregated on: {ex.machine()}." in md
    saved = json.loads((root / "results_toy.json").read_text())
    assert saved["runs_done"] == 17 and saved["steps"]["train_a_s0"] == 7
    assert (root / "results_toy.md").read_text().strip() == md.strip()


def test_tables_show_the_steps_each_arm_trained(tmp_path):
    """Issue 18: every table gives the steps its arms trained (the training run behind each evaluated model): a
    steps column when a row's cells share a count, else a table of the steps per cell below it."""
    by_shots = {"title": "by shots", "runs": "eval_{arm}_{shots}_s{seed}", "rows": ["shots"], "columns": "arm",
                "metric": "lfw:accuracy", "scale": 100}
    grid = _grid(tmp_path, dict(GRID, tables=GRID["tables"] + [by_shots]))
    root = tmp_path / "root"
    runs = ex.expand(grid, root)
    _fake_folders(root, runs, skip={"eval_b_all_s2"})
    for r in runs:
        if r.argv[0] == "train":  # arm a timed 7 steps; arm b 9, seed 1 as a given train.steps (summary.json only)
            steps = {"a": 7, "b": 9}[r.values["arm"]]
            fixed = r.values["arm"] == "b" and r.seed == 1
            (root / r.name / "done.json").write_text(json.dumps({"spec": r.argv, "seconds": 30.0,
                                                                 "steps": None if fixed else steps}))
            if fixed:
                (root / r.name / "summary.json").write_text(json.dumps({"step": steps}))
    by_name = {r.name: r for r in runs}
    assert ex.model_run(by_name["eval_b_1_s1"], by_name).name == "train_b_s1"
    result, md = ex.report(grid, runs, root, "lafs experiment toy --budget 2")

    assert result["tables"][0]["cells"]["b"]["1"]["steps"] == [9, 9, 9]
    assert result["tables"][0]["cells"]["b"]["all"]["steps"] == [9, 9]  # seed 2 not evaluated
    assert "| arm | shots 1 | shots all | steps |" in md
    assert "| a | 51.00 ± 1.00 | 56.00 ± 1.00 | 7 |" in md
    assert "| b | 61.00 ± 1.00 | 65.50 ± 0.71 (n=2) | 9 |" in md
    assert "| arm / shots | t=0 | tar | steps |" in md
    assert "| b / every image | 0.2 ± 0.0 (n=2) | 0.3 ± 0.0 (n=2) | 9 |" in md
    # a row of the by-shots table reads arms of 7 and 9 steps: the steps per cell, below the table
    assert "| shots | arm a | arm b |\n|---|---|---|\n| 1 | 51.00 ± 1.00 | 61.00 ± 1.00 |" in md
    assert ("Steps trained:\n\n| shots | arm a | arm b |\n|---|---|---|\n| 1 | 7 | 9 |\n| all | 7 | 9 |"
            in md)


def test_update_section_keeps_the_hand_written_text(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nintro\n")
    ex.update_section(doc, "toy", "| a |\n")
    ex.update_section(doc, "other", "table 2")
    doc.write_text(doc.read_text() + "\nreading: LAFS wins\n")
    ex.update_section(doc, "toy", "| b |")
    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n")
    assert "<!-- experiment:toy -->\n| b |\n<!-- /experiment:toy -->" in text and "| a |" not in text
    assert "table 2" in text and text.rstrip().endswith("reading: LAFS wins")


def test_metric_value_errors(tmp_path):
    data = _eval_json(0.7, 0.3, 0.2)
    assert ex.metric_value(data, "crops:accuracy") == pytest.approx(0.1)
    assert ex.metric_value(data, "crops@1:accuracy") == pytest.approx(0.9)
    with pytest.raises(KeyError, match="cfp"):
        ex.metric_value(data, "cfp:accuracy")
    with pytest.raises(KeyError, match="0.5"):
        ex.metric_value(data, "crops@0.5:accuracy")


def test_done_run_made_by_another_command_is_refused(tmp_path):
    grid = _grid(tmp_path)
    runs = ex.expand(grid, tmp_path)
    (tmp_path / runs[0].name).mkdir()
    (tmp_path / runs[0].name / "done.json").write_text(json.dumps({"spec": ["train", "other.yaml"], "seconds": 1}))
    with pytest.raises(ConfigError, match="another command line"):
        ex.run_grid(runs, tmp_path, only=["nothing"])
    # the same command line under another path to the root (a moved folder) is the same run
    spec = [a.replace(str(tmp_path), "<root>") for a in runs[0].argv]
    (tmp_path / runs[0].name / "done.json").write_text(json.dumps({"spec": spec, "seconds": 1}))
    moved = tmp_path.parent / (tmp_path.name + "_link")
    moved.symlink_to(tmp_path)
    status = ex.run_grid(ex.expand(_grid(tmp_path), moved), moved, only=["nothing"])
    assert status["done"] == [runs[0].name]


@pytest.mark.slow
def test_run_grid_end_to_end_on_synthetic_records(tmp_path, monkeypatch):
    """Real runs through the CLI: data, a budgeted training per seed, an evaluation; seed 1 trains seed 0's step
    count, a second call runs nothing, and the table comes from the eval.json files."""
    from lafs.data.datasets import RecordDataset
    from lafs.data.pairs import bin_from_dataset, pairs_from_labels

    monkeypatch.chdir(tmp_path)
    assert main(["data", "synth", "--identities", "12", "--images-per-id", "4", "-o", "faces.rec"]) == 0
    ds = RecordDataset("faces.rec")
    pairs, issame = pairs_from_labels(ds.labels, range(8, 12), 40, seed=0)
    bin_from_dataset(ds, pairs, issame, "val.bin")
    grid = {
        "name": "e2e", "seeds": [0, 1], "budget": 0.02,
        "stages": [
            {"name": "train_{size}_s{seed}", "cli": [
                "train", "model.name=part_fvit", "model.size={size}", "data.source=records", "data.train=[faces.rec]",
                "data.val=[val.bin]", "data.workers=0", "train.batch_size=8", "train.budget_timed_steps=2",
                "augment.preset=none"], "axes": {"size": ["micro"]}},
            {"name": "eval_s{seed}", "cli": ["eval", "@train_micro_s{seed}", "--sets", "val.bin", "--out", "{out}"]},
        ],
        "tables": [{"title": "val", "runs": "eval_s{seed}", "rows": [], "metric": "val:accuracy", "columns": None}],
    }
    Path("e2e.yaml").write_text(yaml.safe_dump(grid))
    assert main(["experiment", "e2e.yaml", "--out", "root", "--results", "results.md"]) == 0
    done0 = json.loads(Path("root/train_micro_s0/done.json").read_text())
    done1 = json.loads(Path("root/train_micro_s1/done.json").read_text())
    assert any(a.startswith("train.budget_minutes=0.02") for a in done0["argv"])
    assert f"train.steps={done0['steps']}" in done1["argv"] and done1["steps"] is None  # no timing of its own
    import torch

    assert done0["threads"] == torch.get_num_threads()  # the run's environment, recorded with it
    assert done0["machine"] == ex.machine() and "avx512_bf16 " in done0["machine"] and f"torch {torch.__version__}" in done0["machine"]
    summary = json.loads(Path("root/train_micro_s1/summary.json").read_text())
    assert summary["step"] == done0["steps"] >= 3
    assert Path("root/eval_s1/eval.json").is_file()
    result = json.loads(Path("root/results_e2e.json").read_text())
    cell = result["tables"][0]["cells"][""]["val:accuracy"]
    accs = [json.loads(Path(f"root/eval_s{s}/eval.json").read_text())["results"][0]["accuracy"] for s in (0, 1)]
    assert cell["values"] == pytest.approx(accs)  # no scale: fractions
    assert "<!-- experiment:e2e -->" in Path("results.md").read_text()
    assert result["ran_on"] == {ex.machine(): 4} and f"Ran on: {ex.machine()}: 4 runs." in Path("results.md").read_text()
    mtime = Path("root/train_micro_s0/done.json").stat().st_mtime
    assert main(["experiment", "e2e.yaml", "--out", "root"]) == 0  # all done: nothing runs again
    assert Path("root/train_micro_s0/done.json").stat().st_mtime == mtime


def test_steps_shared_by_gives_arms_one_timing(tmp_path):
    grid = dict(GRID, stages=[
        {"name": "ft_{init}_{shots}_s{seed}", "cli": ["finetune", "c.yaml"], "steps_shared_by": ["init"],
         "axes": {"init": ["scratch", "lafs"], "shots": [1, 2]}}], tables=[])
    runs = {r.name: r for r in ex.expand(_grid(tmp_path, grid), tmp_path)}
    assert runs["ft_scratch_1_s0"].arm == runs["ft_lafs_1_s2"].arm  # any init, any seed
    assert runs["ft_scratch_1_s0"].arm != runs["ft_scratch_2_s0"].arm  # another data size: its own timing
    # the first done run of an arm fixes the steps of the others: train.steps replaces the budget
    steps = {runs["ft_scratch_1_s0"].arm: 123}
    argv = ex.command_line(runs["ft_lafs_1_s1"], tmp_path, steps)
    assert "train.steps=123" in argv and not any(a.startswith("train.budget_minutes") for a in argv)
    assert any(a.startswith("train.budget_minutes=") for a in ex.command_line(runs["ft_lafs_2_s0"], tmp_path, steps))
    bad = dict(grid, stages=[dict(grid["stages"][0], steps_shared_by=["seed"])])
    with pytest.raises(ConfigError, match="steps_shared_by names.*seed"):
        _grid(tmp_path, bad)
    # a run that was given train.steps (no timing of its own) counts by its summary
    (tmp_path / "given").mkdir()
    (tmp_path / "given" / "summary.json").write_text(json.dumps({"step": 55}))
    assert ex.budget_steps(tmp_path / "given") is None and ex.trained_steps(tmp_path / "given") == 55


def test_runners_side_by_side_share_the_work(tmp_path, monkeypatch):
    """A run claimed by another live runner is deferred, with the runs that need it and the later seeds of its arm
    (which take its step count); the free runs go first; the held run counts as done once the other runner
    finishes it, and is not trained twice. A claim left by a dead runner is taken over."""
    import os
    import subprocess
    import sys
    import threading

    runs = ex.expand(_grid(tmp_path), tmp_path)
    held = "train_a_s0"
    order = []

    def checkpoint(folder):
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        (folder / "checkpoints" / "best.pt").touch()

    def fake_run(run, root, i, total, steps_by_arm, status, log):
        order.append((run.name, ex.command_line(run, root, steps_by_arm)))
        checkpoint(root / run.name)
        (root / run.name / "done.json").write_text(json.dumps({"spec": ex._portable(run.argv, root), "budget": run.budget}))
        status["ran"].append(run.name)

    monkeypatch.setattr(ex, "_run_one", fake_run)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / held).mkdir()
        (tmp_path / held / ex.CLAIM).write_text(str(other.pid))
        assert ex.claim(tmp_path / held) == other.pid

        def finish():  # the other runner finishes its run (7 steps) and lets go of it
            run = next(r for r in runs if r.name == held)
            checkpoint(tmp_path / held)
            (tmp_path / held / "summary.json").write_text(json.dumps({"step": 7}))
            (tmp_path / held / "done.json").write_text(json.dumps({"spec": ex._portable(run.argv, tmp_path),
                                                                   "budget": run.budget}))
            (tmp_path / held / ex.CLAIM).unlink()

        timer = threading.Timer(0.3, finish)
        timer.start()
        logged = []
        status = ex.run_grid(runs, tmp_path, log=logged.append, only=["eval_a_1_s0", "train_b_s0", "train_a_s1"],
                             poll=0.05)
        timer.join()
    finally:
        other.kill()
        other.wait()
    names = [name for name, _ in order]
    assert names == ["train_b_s0", "eval_a_1_s0", "train_a_s1"]  # the free run first, then what waited
    assert held in status["done"] and held not in names and status["failed"] == {}
    assert "train.steps=7" in dict(order)["train_a_s1"]  # the arm's count from the other runner's timing
    assert sum(f"pid {other.pid}" in line for line in logged) == 1
    assert not any((tmp_path / r.name / ex.CLAIM).exists() for r in runs)
    # the other runner died holding a claim: it is stale, and this runner takes it
    (tmp_path / "train_b_s1").mkdir()
    (tmp_path / "train_b_s1" / ex.CLAIM).write_text(str(other.pid))
    assert ex.claim(tmp_path / "train_b_s1") is None
    assert (tmp_path / "train_b_s1" / ex.CLAIM).read_text() == str(os.getpid())


def test_fixed_steps_stage_trains_a_given_count(tmp_path):
    """A stage with ``steps`` (an equal-steps comparison) trains that count, with no budget and no timing, and a
    done run of another count is refused."""
    grid = dict(GRID, stages=[{"name": "ft_{init}_s{seed}", "cli": ["finetune", "c.yaml"], "steps": 40,
                               "axes": {"init": ["scratch", "lafs"]}}], tables=[])
    runs = ex.expand(_grid(tmp_path, grid), tmp_path)
    assert all(r.steps == 40 and r.budget is None for r in runs)
    argv = ex.command_line(runs[0], tmp_path, {runs[0].arm: 999})  # another run's timing does not count
    assert argv[-4:] == ["train.steps=40", "train.epochs=null", "--resume", "--quiet"]
    assert not any(a.startswith("train.budget_minutes") for a in argv)
    (tmp_path / runs[0].name).mkdir()
    done = {"spec": ex._portable(runs[0].argv, tmp_path), "budget": None, "fixed_steps": 30}
    (tmp_path / runs[0].name / "done.json").write_text(json.dumps(done))
    with pytest.raises(ConfigError, match="another command line"):
        ex.run_grid(runs, tmp_path, only=["nothing"])
    for bad in ({"steps": 40, "budget": 2}, {"steps": 0}, {"steps": "many"}):
        with pytest.raises(ConfigError, match="positive step count"):
            _grid(tmp_path, dict(grid, stages=[dict(grid["stages"][0], **bad)]))


def test_shipped_grids_expand_and_agree_on_shared_runs(tmp_path):
    """Every grid in experiments/ loads and expands (references checked), and a run name two grids share means the
    same run in both (command line, budget, step count), or one grid would refuse the other's finished run."""
    from lafs.presets import folder as preset_folder

    folder = preset_folder("experiments")
    grids = sorted(folder.glob("*.yaml"))
    assert {"fewshot", "lafs-ablation", "kprpe-robustness"} <= {g.stem for g in grids}
    seen, users = {}, {}
    for path in grids:
        grid = ex.load_grid(path)
        runs = ex.expand(grid, tmp_path)
        assert len({r.seed for r in runs}) == len(grid["seeds"])
        for run in runs:
            key = (ex._portable(run.argv, tmp_path), run.budget, run.steps)
            other = seen.setdefault(run.name, (path.stem, key))
            assert other[1] == key, f"{run.name}: {path.stem} and {other[0]} define it differently"
            users.setdefault(run.name, set()).add(path.stem)
    # the sharing the grids' comments promise
    assert {"fewshot", "lafs-ablation", "fewshot-equal-steps"} <= users["pretrain_lafs_part_fvit_s0"]
    assert {"lafs-ablation", "fewshot-equal-steps"} <= users["finetune678_part_fvit_lafs_2shot_s0"]
    assert {"fewshot", "dino-drift"} <= users["finetune_fvit_dino_2shot_s0"]
    # the CelebA-64 grid: every initialisation of a backbone finetunes the same fixed steps, and the floors are
    # scored by the scratch arm's evaluation alone
    runs = ex.expand(ex.load_grid(folder / "fewshot-celeba64.yaml"), tmp_path, seeds=[0])
    finetunes = [r for r in runs if r.argv[0] == "finetune"]
    assert len(finetunes) == 16 and {r.steps for r in finetunes} == {600}
    assert {r.values["init"] for r in finetunes} == {"scratch", "dino", "lafs"}
    evals = [r for r in runs if r.argv[0] == "eval"]
    assert {r.values["init"] for r in evals if "--floors" in r.argv} == {"scratch"}
    assert {"fewshot-celeba64", "lafs-ablation-celeba64"} <= users["c64_pretrain_lafs_part_fvit_s0"]
    assert {"fewshot-celeba64", "lafs-ablation-celeba64"} <= users["c64_eval_part_fvit_lafs_2shot_s0"]


def test_a_claim_appears_with_its_pid_and_an_unwritten_one_is_not_taken_over(tmp_path):
    import os

    folder = tmp_path / "run"
    assert ex.claim(folder) is None
    assert (folder / ex.CLAIM).read_text() == str(os.getpid())  # whole from the first moment (hard link)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    (folder / ex.CLAIM).write_text("")  # a claim whose pid is not yet written (the old two-step writer)
    assert ex.claim(folder) == -1  # held, not taken over
    old = os.stat(folder / ex.CLAIM).st_mtime - ex.CLAIM_GRACE_S - 1
    os.utime(folder / ex.CLAIM, (old, old))
    assert ex.claim(folder) is None  # past the grace period it is stale
    (folder / ex.CLAIM).write_text("999999999")  # a dead runner's claim
    assert ex.claim(folder) is None


def test_t975_matches_the_t_table():
    assert tables.t975(1) == pytest.approx(12.706) and tables.t975(4) == pytest.approx(2.776)
    assert tables.t975(30) == pytest.approx(2.042)
    assert tables.t975(40) == pytest.approx(2.0211, abs=2e-4) and tables.t975(120) == pytest.approx(1.9799, abs=2e-4)
    with pytest.raises(ValueError, match="at least 2 values"):
        tables.t975(0)


PAIRED_GRID = {
    "name": "paired",
    "seeds": [0, 1, 2, 3, 4],
    "stages": [
        {"name": "train_{init}_s{seed}", "cli": ["finetune", "cfg.yaml"], "axes": {"init": ["scratch", "dino", "lafs"]}},
        {"name": "eval_{init}_{shots}_s{seed}", "cli": ["eval", "@train_{init}_s{seed}", "--floors", "--out", "{out}"],
         "axes": {"init": ["scratch", "dino", "lafs"], "shots": [1, 2]}},
    ],
    "tables": [{"title": "few-shot", "runs": "eval_{init}_{shots}_s{seed}", "rows": ["init"], "columns": "shots",
                "metric": "lfw:accuracy", "scale": 100, "floors": True, "digits": 2,
                "paired": {"axis": "init", "pairs": [["lafs", "scratch"], ["lafs", "dino"]]}}],
}
# accuracy (%) per arm and seed 0..4 at 1 shot; at 2 shots lafs and dino +10, scratch 50..54 (under the PCA floor)
PAIRED_VALUES = {"lafs": [60, 62, 61, 65, 63], "dino": [59, 61, 60, 63, 62], "scratch": [58, 61, 60, 62, 60]}


def test_paired_differences_floors_and_flags_from_fake_run_folders(tmp_path):
    """Issue 21: a - b per seed, its mean, sample std and Student-t 95 % interval, by hand; the floors of the runs'
    eval.json as rows; arms under the PCA-whitened floor marked and their comparisons flagged."""
    grid = _grid(tmp_path, PAIRED_GRID)
    root = tmp_path / "root"
    runs = ex.expand(grid, root)
    for r in runs:
        folder = root / r.name
        folder.mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps({"spec": r.argv, "seconds": 1.0, "steps": 40}))
        if r.argv[0] == "eval":
            init, shots = r.values["init"], int(r.values["shots"])
            acc = PAIRED_VALUES[init][r.seed] + (10 if shots == 2 and init != "scratch" else 0)
            if shots == 2 and init == "scratch":
                acc = 50 + r.seed
            floors = {"raw_pixels": {"accuracy": 0.61}, "pca_whitened": {"accuracy": 0.59},
                      "untrained": {"accuracy": 0.55 + 0.01 * r.seed}}
            (folder / "eval.json").write_text(json.dumps({"meta": {}, "results": [{"name": "lfw", "accuracy": acc / 100}],
                                                          "floors": {"sets": {"lfw": floors}}}))
    result, md = ex.report(grid, runs, root, "lafs experiment paired")
    t = result["tables"][0]
    assert t["floor_rows"] == ["floor: raw pixels", "floor: PCA-whitened", "floor: untrained net"]
    assert t["cells"]["floor: PCA-whitened"]["1"]["mean"] == pytest.approx(59.0)
    untrained = t["cells"]["floor: untrained net"]["2"]
    assert untrained["values"] == pytest.approx([55, 56, 57, 58, 59]) and untrained["std"] == pytest.approx(1.5811, abs=1e-4)
    assert t["cells"]["scratch"]["2"]["below_floor"] and not t["cells"]["scratch"]["1"]["below_floor"]

    by = {(p["a"], p["b"], p["column"]): p for p in t["paired"]}
    p = by[("lafs", "scratch", "1")]  # differences 2, 1, 1, 3, 3: mean 2, sample std 1, half-width 2.776 / sqrt 5
    assert p["differences"] == pytest.approx([2, 1, 1, 3, 3]) and p["seeds"] == [0, 1, 2, 3, 4]
    assert p["mean"] == pytest.approx(2.0) and p["std"] == pytest.approx(1.0)
    assert p["ci"] == pytest.approx([2 - 2.776 / math.sqrt(5), 2 + 2.776 / math.sqrt(5)])
    assert p["below_floor"] == []
    q = by[("lafs", "dino", "1")]  # differences 1, 1, 1, 2, 1: mean 1.2, std sqrt(0.2)
    assert q["ci"] == pytest.approx([1.2 - 2.776 * math.sqrt(0.2 / 5), 1.2 + 2.776 * math.sqrt(0.2 / 5)])
    assert by[("lafs", "scratch", "2")]["below_floor"] == ["scratch"]
    assert by[("lafs", "scratch", "2")]["mean"] == pytest.approx(np.mean([70, 72, 71, 75, 73]) - 52)

    assert "| floor: PCA-whitened | 59.00 ± 0.00 | 59.00 ± 0.00 |" in md
    assert "| scratch | 60.20 ± 1.48 | 52.00 ± 1.58 † | 40 |" in md
    # at 2 shots: differences 20, 21, 19, 22, 19 (mean 20.2, std 1.3038, half-width 2.776 x 1.3038 / sqrt 5 = 1.619)
    assert "| lafs - scratch | +2.00 [+0.76, +3.24] (n=5) | +20.20 [+18.58, +21.82] (n=5) † |" in md
    assert "paired differences over seeds, mean [95 % CI]" in md and "below the PCA-whitened floor" in md


def test_paired_differences_use_the_seeds_both_arms_have(tmp_path):
    p = tables.paired_difference({0: 60.0, 1: 62.0, 2: 64.0}, {1: 61.0, 2: 60.0, 3: 50.0})
    assert p["seeds"] == [1, 2] and p["differences"] == [1.0, 4.0] and p["mean"] == pytest.approx(2.5)
    assert p["ci"] == pytest.approx([2.5 - 12.706 * math.sqrt(4.5) / math.sqrt(2), 2.5 + 12.706 * math.sqrt(4.5) / math.sqrt(2)])
    one = tables.paired_difference({0: 1.0}, {0: 0.5})
    assert one["mean"] == 0.5 and one["ci"] is None and one["std"] is None


def test_paired_spec_errors_name_the_table(tmp_path):
    table = dict(PAIRED_GRID["tables"][0], paired={"axis": "shots", "pairs": [["1", "2"]]})
    with pytest.raises(ConfigError, match=r"tables\[0\].paired needs 'axis' \(one of the table's rows"):
        _grid(tmp_path, dict(PAIRED_GRID, tables=[table]))
    table = dict(PAIRED_GRID["tables"][0], paired={"axis": "init", "pairs": [["lafs"]]})
    with pytest.raises(ConfigError, match="pairs"):
        _grid(tmp_path, dict(PAIRED_GRID, tables=[table]))


def test_floors_of_a_metrics_table_per_column_set(tmp_path):
    """A ``metrics`` table (the kprpe grid's): each column's floors come from its own set, read from whichever run
    of the seed holds them; a column whose set has none (a point of the affine curve) gets no floor row."""
    spec = {"name": "multi", "seeds": [0],
            "stages": [{"name": "eval_{arm}_s{seed}", "cli": ["eval", "m.pt", "--out", "{out}"],
                        "axes": {"arm": ["vit", "kprpe"]}}],
            "tables": [{"title": "robustness", "runs": "eval_{arm}_s{seed}", "rows": ["arm"], "scale": 100,
                        "floors": True, "metrics": {"LFW": "lfw:accuracy", "val": "val:accuracy",
                                                    "t=0.5": "lfw@0.5:accuracy"}}]}
    grid = _grid(tmp_path, spec)
    root = tmp_path / "root"
    runs = ex.expand(grid, root)
    accuracy = {"vit": {"lfw": 0.70, "val": 0.66}, "kprpe": {"lfw": 0.76, "val": 0.64}}
    for r in runs:
        folder = root / r.name
        folder.mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps({"spec": r.argv, "seconds": 1.0, "steps": 10}))
        acc = accuracy[r.values["arm"]]
        results = [{"name": s, "accuracy": a} for s, a in acc.items()]
        results.append({"name": "lfw", "t": [0.5], "points": [{"t": 0.5, "accuracy": acc["lfw"] - 0.05}]})
        data = {"meta": {}, "results": results}
        if r.values["arm"] == "vit":  # the floors once per seed, as the grid's plain-ViT eval computes them
            data["floors"] = {"sets": {"lfw": {"raw_pixels": {"accuracy": 0.65}, "pca_whitened": {"accuracy": 0.75}},
                                       "val": {"raw_pixels": {"accuracy": 0.61}, "pca_whitened": {"accuracy": 0.65}}}}
        (folder / "eval.json").write_text(json.dumps(data))
    result, md = ex.report(grid, runs, root, "lafs experiment multi")
    t = result["tables"][0]
    assert t["floor_rows"] == ["floor: raw pixels", "floor: PCA-whitened"]
    pca = t["cells"]["floor: PCA-whitened"]
    assert pca["LFW"]["mean"] == pytest.approx(75.0) and pca["val"]["mean"] == pytest.approx(65.0) and "t=0.5" not in pca
    # LFW: 70 under 75 (vit), 76 over it (kprpe); val: 66 over 65 (vit), 64 under it (kprpe); no floor at t=0.5
    assert [t["cells"][a]["LFW"]["below_floor"] for a in ("vit", "kprpe")] == [True, False]
    assert [t["cells"][a]["val"]["below_floor"] for a in ("vit", "kprpe")] == [False, True]
    assert not t["cells"]["vit"]["t=0.5"]["below_floor"]
    assert t["cells"]["kprpe"]["t=0.5"]["mean"] == pytest.approx(71.0)
    assert "| floor: PCA-whitened | 75.00 | – | 65.00 | – |" in md  # columns LFW, t=0.5, val, steps
    assert "| kprpe | 76.00 | 71.00 | 64.00 † | – |" in md


def test_a_difference_column_reads_each_runs_drop_and_inherits_its_operands_flags(tmp_path):
    """The kprpe grid's "drop" column: ``A - B`` per run (aligned minus misaligned accuracy), paired between arms by
    seed like any column; no floor of its own, flagged where a column of its operands is under the PCA floor."""
    spec = {"name": "drop", "seeds": [0, 1, 2],
            "stages": [{"name": "eval_{arm}_s{seed}", "cli": ["eval", "m.pt", "--out", "{out}"],
                        "axes": {"arm": ["vit", "kprpe"]}}],
            "tables": [{"title": "robustness", "runs": "eval_{arm}_s{seed}", "rows": ["arm"], "scale": 100,
                        "floors": True, "paired": {"axis": "arm", "pairs": [["kprpe", "vit"]]},
                        "metrics": {"LFW": "lfw:accuracy", "moved": "lfw_moved:accuracy",
                                    "drop": "lfw:accuracy - lfw_moved:accuracy"}}]}
    grid = _grid(tmp_path, spec)
    root = tmp_path / "root"
    runs = ex.expand(grid, root)
    # (aligned, misaligned) per arm and seed; drops vit 10, 12, 11 and kprpe 8, 9, 7 points
    accuracy = {"vit": [(0.80, 0.70), (0.82, 0.70), (0.81, 0.70)], "kprpe": [(0.70, 0.62), (0.71, 0.62), (0.69, 0.62)]}
    for r in runs:
        folder = root / r.name
        folder.mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps({"spec": r.argv, "seconds": 1.0, "steps": 10}))
        aligned, moved = accuracy[r.values["arm"]][r.seed]
        data = {"meta": {}, "results": [{"name": "lfw", "accuracy": aligned}, {"name": "lfw_moved", "accuracy": moved}]}
        if r.values["arm"] == "vit":
            data["floors"] = {"sets": {"lfw": {"pca_whitened": {"accuracy": 0.75}},
                                       "lfw_moved": {"pca_whitened": {"accuracy": 0.55}}}}
        (folder / "eval.json").write_text(json.dumps(data))
    result, md = ex.report(grid, runs, root, "lafs experiment drop")
    t = result["tables"][0]
    assert t["cells"]["vit"]["drop"]["values"] == pytest.approx([10, 12, 11])
    assert t["cells"]["kprpe"]["drop"]["values"] == pytest.approx([8, 9, 7])
    assert "drop" not in t["cells"]["floor: PCA-whitened"]  # a difference has no floor
    # kprpe's LFW (70 %) is under the 75 % floor, so its drop is flagged; vit's is not
    assert t["cells"]["kprpe"]["drop"]["below_floor"] and not t["cells"]["vit"]["drop"]["below_floor"]
    assert not t["cells"]["kprpe"]["moved"]["below_floor"]
    p = next(p for p in t["paired"] if p["column"] == "drop")
    # differences -2, -3, -4: mean -3, sample std 1, half-width 4.303 / sqrt 3
    assert p["differences"] == pytest.approx([-2, -3, -4]) and p["below_floor"] == ["kprpe"]
    assert p["ci"] == pytest.approx([-3 - 4.303 / math.sqrt(3), -3 + 4.303 / math.sqrt(3)])
    assert "| kprpe | 70.00 ± 1.00 † | 8.00 ± 1.00 † | 62.00 ± 0.00 | – |" in md  # columns LFW, drop, moved
    assert "| kprpe - vit | -11.00 [-13.48, -8.52] (n=3) † | -3.00 [-5.48, -0.52] (n=3) † | -8.00 [-8.00, -8.00] (n=3) |" in md
    with pytest.raises(KeyError, match="lfw_gone"):
        tables.metric_value({"results": [{"name": "lfw", "accuracy": 0.8}]}, "lfw:accuracy - lfw_gone:accuracy")


def test_archive_keeps_records_tables_and_done_state_across_roots(tmp_path):
    """A grid's seeds span sessions on machines that do not keep run folders: the archive holds each done run's
    records (not its checkpoints) under a root-free command line, tabulates as the run folders do, and restored
    under another root counts as done; a restored training run read by an unfinished run names the folder."""
    grid = _grid(tmp_path)
    root, dest, fresh = tmp_path / "root", tmp_path / "archive", tmp_path / "elsewhere"
    runs = ex.expand(grid, root)
    _fake_folders(root, runs, skip={"eval_b_all_s2"})
    for r in runs:
        if r.argv[0] == "train":
            (root / r.name / "checkpoints").mkdir()
            (root / r.name / "checkpoints" / "step_00000007.pt").write_bytes(b"weights")
            (root / r.name / "summary.json").write_text(json.dumps({"step": 7}))
            done = json.loads((root / r.name / "done.json").read_text())
            done["argv"] = ex.command_line(r, root, {})
            (root / r.name / "done.json").write_text(json.dumps(done))
    copied = ex.archive(runs, root, dest)
    assert len(copied) == 17 and "eval_b_all_s2" not in copied
    assert sorted(p.name for p in (dest / "train_a_s0").iterdir()) == ["done.json", "summary.json"]  # no weights
    done = json.loads((dest / "train_a_s0" / "done.json").read_text())
    assert done["archived"] is True and str(root) not in json.dumps(done)
    assert f"out_dir=<root>/train_a_s0" in done["spec"] and "train.seed=0" in done["spec"]

    # the archive tabulates as the run folders do (steps from summary.json)
    at_root, _ = ex.report(grid, runs, root, "x")
    archived, _ = ex.report(grid, ex.expand(grid, dest), dest, "x")
    assert archived["tables"] == at_root["tables"]
    assert archived["tables"][0]["cells"]["a"]["1"]["steps"] == [7, 7, 7]

    # restored elsewhere: done for the runner, nothing runs; the unfinished eval cannot read a checkpoint
    elsewhere = ex.expand(grid, fresh)
    (fresh / "train_b_s0").mkdir(parents=True)  # a folder already there, not done: gets the records
    assert ex.restore(elsewhere, dest, fresh) == copied
    status = ex.run_grid(elsewhere, fresh, only=["nothing"])
    assert sorted(status["done"]) == sorted(copied)
    assert ex.restore(elsewhere, dest, fresh) == []  # already done there: nothing overwritten
    with pytest.raises(FileNotFoundError, match="restored from an archive.*delete .*train_b_s2"):
        ex.resolve(["@train_b_s2"], fresh)
    with pytest.raises(ConfigError, match="--restore .*nowhere: no such folder"):
        ex.restore(elsewhere, tmp_path / "nowhere", fresh)


def test_restore_leaves_the_runs_whose_files_others_read_to_be_made_again(tmp_path):
    """An archive has records, not the files runs made: restoring a data run as done left the evaluation that reads
    its file with a missing path (kprpe-celeba64's misaligned LFW). Such runs stay to be made, and one restored as
    done by an earlier lafs is undone."""
    grid = _grid(tmp_path, {**GRID, "seeds": [0], "stages": [
        {"name": "mis_s{seed}", "cli": ["data", "misalign", "lfw.bin", "-o", "{out}/lfw_mis.bin", "--seed", "{seed}"]},
        GRID["stages"][0],
        {"name": "eval_{arm}_s{seed}", "cli": ["eval", "@train_{arm}_s{seed}", "--sets", "@mis_s{seed}/lfw_mis.bin",
                                              "--out", "{out}"], "axes": {"arm": ["a", "b"]}}], "tables": []})
    root, dest, fresh = tmp_path / "root", tmp_path / "archive", tmp_path / "fresh"
    runs = ex.expand(grid, root)
    assert ex.file_makers(runs) == {"mis_s0"}  # trainings are read as checkpoints (@run), not files
    for r in runs:
        (root / r.name).mkdir(parents=True)
        (root / r.name / "done.json").write_text(json.dumps({"spec": r.argv, "seconds": 1.0}))
    assert sorted(ex.archive(runs, root, dest)) == sorted(r.name for r in runs)  # the archive keeps every record

    elsewhere = ex.expand(grid, fresh)
    assert sorted(ex.restore(elsewhere, dest, fresh)) == ["eval_a_s0", "eval_b_s0", "train_a_s0", "train_b_s0"]
    assert not (fresh / "mis_s0" / "done.json").exists()
    assert "mis_s0" not in ex.run_grid(elsewhere, fresh, only=["nothing"])["done"]

    # a root where an earlier lafs restored the data run as done: the next restore undoes that, and only that
    archived = (dest / "mis_s0" / "done.json").read_bytes()
    (fresh / "mis_s0").mkdir()
    (fresh / "mis_s0" / "done.json").write_bytes(archived)
    assert ex.restore(elsewhere, dest, fresh) == []
    assert not (fresh / "mis_s0" / "done.json").exists() and (fresh / "eval_a_s0" / "done.json").is_file()
    made = fresh / "mis_s0" / "done.json"  # made here (not archived): kept
    made.write_text(json.dumps({"spec": ex._portable(elsewhere[0].argv, fresh), "seconds": 7.0}))
    assert ex.restore(elsewhere, dest, fresh) == [] and made.is_file()


def test_experiment_cli_archives_and_restores(tmp_path, monkeypatch, capsys):
    grid_file = tmp_path / "toy.yaml"
    grid_file.write_text(yaml.safe_dump(GRID))
    root, dest, fresh = tmp_path / "root", tmp_path / "archive", tmp_path / "fresh"
    _fake_folders(root, ex.expand(ex.load_grid(grid_file), root))
    assert main(["experiment", str(grid_file), "--out", str(root), "--aggregate", "--archive", str(dest)]) == 0
    assert "archived the records of 18 done runs" in capsys.readouterr().out
    # --list shows what --restore would put back, and writes nothing (it runs before the restore)
    assert main(["experiment", str(grid_file), "--out", str(fresh), "--restore", str(dest), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 18 and all(line.startswith("archived  ") for line in listed)
    assert not any(fresh.rglob("done.json"))
    assert main(["experiment", str(grid_file), "--out", str(fresh), "--list"]) == 0
    assert capsys.readouterr().out.startswith("todo      train_a_s0")
    assert main(["experiment", str(grid_file), "--out", str(fresh), "--restore", str(dest), "--only", "x"]) == 0
    out = capsys.readouterr().out
    assert "restored the records of 18 done runs" in out and "0 ran, 18 already done" in out
    assert "| a | 51.00 ± 1.00 | 56.00 ± 1.00 |" in out
