"""``lafs experiment NAME``: declarative grids of ordinary CLI runs, and their tables (the papers' orderings).

A grid is a YAML file (``experiments/NAME.yaml``, packaged in ``lafs/presets``) of **stages**. A stage is a run-name template, a ``lafs`` command
line template and **axes**; it expands over its axes x the seeds into runs, each in its own folder
``<root>/<run name>/``. Templates use ``{seed}``, ``{out}`` (the run's folder) and the axis names; an axis given as a
mapping adds its value's arguments to the command line. ``@run`` in an argument is that run's checkpoint
(``checkpoints/best.pt``, else the latest ``step_*.pt``) and ``@run/file`` a file of its folder; the runs it names
must come earlier in the grid. Training commands (``train``, ``pretrain``, ``finetune``) get ``out_dir``,
``train.seed`` and ``train.budget_minutes`` (the grid's ``--budget`` times the stage's ``budget`` factor), plus
``--resume``, so an interrupted run continues where it stopped.

Fairness: every arm of a stage gets the same training minutes. The first seed of each arm times its steps
(``train.budget_minutes``); the other seeds of that arm train the same number of steps (``train.steps``), so the
seeds differ by their randomness only. Axes listed in a stage's ``steps_shared_by`` (a finetune's initialisation:
the same model, data and cost per step) share one timing too, so those arms train exactly the same steps and a
timing's noise cannot favour one of them.

Runs go seed by seed (all of seed 0 first), each once: a finished run leaves ``done.json`` and is skipped
afterwards, so a grid is picked up where it stopped. A failed run is reported and skipped with the runs that need it.
Several runners may work on one root at once (lanes): each claims the run it trains and defers the runs another
live runner holds (:func:`run_grid`).
A run is known by its name and command line, so grids sharing a root (the default, ``runs/experiments/budget-<B>min``)
share their identical runs: the ablation's "paper" pretrainings are the few-shot grid's LAFS runs, trained once.

**Tables** read each run's ``eval.json`` (``lafs eval --out``): rows and columns are axes (or named metrics), cells
the mean ± sample std over the seeds present. A table's ``floors: true`` adds the floors its runs' ``eval.json`` hold
(``lafs eval --floors``) as rows (``floors_by: AXIS``: one untrained-network row per value) and marks cells under the
PCA-whitened floor; ``paired: {axis, pairs: [[a, b], ...]}`` adds the differences a - b matched by seed, with
their mean and Student-t 95 % interval over the seeds, flagged where an arm is under that floor.
``results_NAME.json`` and ``results_NAME.md`` go to the root, and
``--results docs/results.md`` replaces the grid's marked section of that file, so the tables there are always
generated from the raw run folders. ``--archive DIR`` keeps the done runs' records (no checkpoints) where a later
session on another machine finds them (``--restore DIR``), so a grid's seeds can span sessions.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError
from ..io import atomic_write_bytes, claim_file
from .experiment_tables import (PCA_FLOOR_ROW, _floor_rows, _paired, _summarise, flag_differences, format_tables,
                                metric_value, table_metrics)

TRAINING = ("train", "pretrain", "finetune")
REF = re.compile(r"@([A-Za-z0-9_.\-]+)(/[A-Za-z0-9_.\-/]+)?")


@dataclass
class Run:
    name: str
    stage: str  # the stage's name template: runs of one stage share it
    argv: list[str]  # the command line, references unresolved, budget not applied
    seed: int
    values: dict  # axis name -> value (str), seed excluded
    needs: list[str] = field(default_factory=list)
    budget: float | None = None  # training minutes (training commands only)
    steps: int | None = None  # a fixed step count instead (the stage's ``steps``: an equal-steps comparison)
    steps_shared_by: tuple = ()  # axes whose values cost the same per step (the stage's ``steps_shared_by``)

    @property
    def arm(self) -> tuple:
        """The runs that train the same number of steps: same stage and axis values, any seed and any value of the
        ``steps_shared_by`` axes (e.g. the initialisation of a finetune, which does not change its cost per step)."""
        return (self.stage, tuple(sorted((k, v) for k, v in self.values.items() if k not in self.steps_shared_by)))


# ------------------------------------------------------------------------------------------------ grid files
def find_grid(name: str) -> Path:
    """``NAME`` -> ``experiments/NAME.yaml`` of the working folder (a local grid), else the packaged grid of that
    name (``lafs.presets``); a path to a YAML file that exists is used as it is. Unknown: a ConfigError naming the
    closest grids."""
    from ..presets import resolve

    path = Path(name)
    if path.suffix not in (".yaml", ".yml") and (Path("experiments") / f"{name}.yaml").is_file():
        return Path("experiments") / f"{name}.yaml"
    return resolve(name, "experiments")


def load_grid(path: str | Path) -> dict:
    path = Path(path)
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("stages"), list) or not grid["stages"]:
        raise ConfigError(f"{path}: a grid needs a non-empty 'stages' list")
    grid.setdefault("name", path.stem)
    grid.setdefault("seeds", [0, 1, 2])
    grid.setdefault("budget", 1.0)
    grid.setdefault("tables", [])
    for i, stage in enumerate(grid["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not stage.get("cli"):
            raise ConfigError(f"{where} needs 'name' (a run-name template) and 'cli' (the lafs command line)")
        unknown = set(stage) - {"name", "cli", "axes", "budget", "steps", "steps_shared_by"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: name, cli, axes, budget, steps, "
                              "steps_shared_by)")
        if "steps" in stage and ("budget" in stage or "steps_shared_by" in stage
                                 or not isinstance(stage["steps"], int) or stage["steps"] < 1):
            raise ConfigError(f"{where}: 'steps' is a positive step count for every run of the stage, instead of "
                              "a budget (so neither 'budget' nor 'steps_shared_by' goes with it)")
        stray = set(stage.get("steps_shared_by") or []) - set(stage.get("axes") or {})
        if stray:
            raise ConfigError(f"{where}: steps_shared_by names {sorted(stray)}, which are not axes of the stage")
    for i, table in enumerate(grid["tables"]):
        if not {"title", "runs", "rows"} <= set(table) or ("metric" in table) == ("metrics" in table):
            raise ConfigError(f"{path}: tables[{i}] needs title, runs, rows and one of metric (+ columns) / metrics")
        paired = table.get("paired")
        if paired is not None:
            pairs = paired.get("pairs") if isinstance(paired, dict) else None
            if (not isinstance(paired, dict) or paired.get("axis") not in table["rows"] or not pairs
                    or not all(isinstance(p, list) and len(p) == 2 for p in pairs)):
                raise ConfigError(f"{path}: tables[{i}].paired needs 'axis' (one of the table's rows "
                                  f"{table['rows']}) and 'pairs', a list of [a, b] values of it (a - b is shown)")
        if table.get("floors_by") is not None and table["floors_by"] not in table["rows"]:
            raise ConfigError(f"{path}: tables[{i}].floors_by must be one of the table's rows {table['rows']}, "
                              f"got {table['floors_by']!r}")
    return grid


def _axes(stage: dict) -> list[tuple[str, dict]]:
    """``[(axis, {value: extra args})]``; a list axis has no extra args."""
    out = []
    for axis, values in (stage.get("axes") or {}).items():
        if isinstance(values, dict):
            out.append((axis, {str(k): list(v or []) for k, v in values.items()}))
        else:
            out.append((axis, {str(v): [] for v in values}))
    return out


def _format(text: str, values: dict, where: str) -> str:
    try:
        return str(text).format_map(values)
    except KeyError as err:
        raise ConfigError(f"{where}: template {text!r} uses {{{err.args[0]}}}, which is not an axis here") from None


def _confined(name: str, where: str) -> str:
    """A run name is one folder inside the grid's root: no separators, no ``..``, nothing absolute or hidden, so a
    name built from axis values can never write (or, through ``@name``, read) outside the root."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise ConfigError(f"{where}: run name {name!r} must be one plain folder name inside the root (no '/', no "
                          "'..', no leading '.')")
    return name


def expand(grid: dict, root: str | Path, seeds=None, budget: float | None = None) -> list[Run]:
    """All runs of the grid in execution order (seed by seed, stages in order), dependencies checked."""
    root = Path(root)
    seeds = list(grid["seeds"] if seeds is None else seeds)
    budget = float(grid["budget"] if budget is None else budget)
    runs: list[Run] = []
    for seed in seeds:
        for stage in grid["stages"]:
            axes = _axes(stage)
            for combo in itertools.product(*[list(v.items()) for _, v in axes]):
                values = {axis: value for (axis, _), (value, _) in zip(axes, combo)}
                fmt = {**values, "seed": seed}
                name = _confined(_format(stage["name"], fmt, stage["name"]), stage["name"])
                fmt["out"] = str(root / name)
                argv = [_format(a, fmt, name) for a in stage["cli"]]
                argv += [_format(a, fmt, name) for _, (_, extra) in zip(axes, combo) for a in extra]
                run = Run(name, stage["name"], argv, seed, values, steps_shared_by=tuple(stage.get("steps_shared_by") or ()))
                if argv[0] in TRAINING:
                    if "steps" in stage:
                        run.steps = stage["steps"]
                    else:
                        run.budget = budget * float(stage.get("budget", 1.0))
                    argv += [f"out_dir={fmt['out']}", f"train.seed={seed}"]
                run.needs = list(dict.fromkeys(m.group(1) for a in argv for m in REF.finditer(a)))
                runs.append(run)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"grid {grid['name']}: run names repeat ({dup[:3]}); put every axis and {{seed}} in the name")
    seen: set[str] = set()
    for r in runs:
        missing = [n for n in r.needs if n not in seen]
        if missing:
            raise ConfigError(f"grid {grid['name']}: run {r.name} refers to {missing}, which no earlier run makes")
        seen.add(r.name)
    return runs


# ------------------------------------------------------------------------------------------------ running
def checkpoint_of(run_dir: Path) -> Path:
    from ..checkpoint import best_or_latest

    try:
        return best_or_latest(run_dir / "checkpoints")
    except FileNotFoundError as err:
        done = run_dir / "done.json"
        if done.is_file() and json.loads(done.read_text()).get("archived"):
            raise FileNotFoundError(f"{run_dir}: a run restored from an archive keeps its records, not its "
                                    f"checkpoints; delete {run_dir} to train it again") from None
        raise FileNotFoundError(f"{run_dir}: {err}") from None


def resolve(argv: list[str], root: Path) -> list[str]:
    def sub(m: re.Match) -> str:
        run = _confined(m.group(1), m.group(0))
        if not m.group(2):
            return str(checkpoint_of(root / run))
        rel = m.group(2).lstrip("/")
        if ".." in rel.split("/"):
            raise ConfigError(f"{m.group(0)}: a reference stays inside its run folder (no '..')")
        return str(root / run / rel)

    return [REF.sub(sub, a) for a in argv]


def budget_steps(run_dir: Path) -> int | None:
    """The step count a budgeted run fixed (its ``kind: budget`` metrics line)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if '"budget"' in line:
            record = json.loads(line)
            if record.get("kind") == "budget":
                return int(record["steps"])
    return None


def trained_steps(run_dir: Path) -> int | None:
    """The steps a finished training run made: its budget timing's count, else its ``summary.json`` (a run that
    was given ``train.steps``, e.g. by another grid sharing the root)."""
    steps = budget_steps(run_dir)
    if steps is None and (run_dir / "summary.json").is_file():
        steps = json.loads((run_dir / "summary.json").read_text()).get("step")
    return steps


def _portable(argv: list[str], root: Path) -> list[str]:
    """The command line with the root folder as ``<root>``: a root can move (or be reached by another path)."""
    where = re.compile(r"(?:(?<=^)|(?<=[=\[, ]))" + re.escape(str(root)) + r"(?=/|$)")
    return [where.sub("<root>", a) for a in argv]


def _done(root: Path, run: Run) -> dict | None:
    path = root / run.name / "done.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    spec = _portable(done.get("spec") or [], root)
    if (spec != _portable(run.argv, root) or done.get("budget", run.budget) != run.budget
            or done.get("fixed_steps") != run.steps):
        raise ConfigError(f"{path}: this run was made by another command line ({done.get('spec')}); the grid or "
                          f"its root changed. Use another --out, or delete {path.parent} to run it again")
    return done


def command_line(run: Run, root: Path, steps_by_arm: dict) -> list[str]:
    argv = resolve(run.argv, root)
    if run.budget is not None or run.steps is not None:
        steps = run.steps or steps_by_arm.get(run.arm)
        argv += [f"train.steps={steps}", "train.epochs=null"] if steps else [f"train.budget_minutes={run.budget:.4g}"]
        argv += ["--resume", "--quiet"]
    return argv


CLAIM = "running.pid"
CLAIM_GRACE_S = 30.0  # an unreadable claim younger than this may be a writer of the old format mid-write


def claim(folder: Path) -> int | None:
    """Claim a run folder for this runner: ``None`` when claimed, else the pid of the live runner holding it.

    Runners started side by side on one machine (grids sharing a root, or one grid's seeds in two lanes) must not
    train the same run twice at once; a claim whose runner has died is taken over. The claim appears with its pid
    already in it (written to a private file, then hard-linked into place, which fails if a claim exists), so no
    runner ever reads a claim whose pid is not yet written and takes it over; an unreadable claim counts as held
    (pid -1) for ``CLAIM_GRACE_S`` seconds, then as stale (:func:`lafs.io.claim_file`)."""
    folder.mkdir(parents=True, exist_ok=True)
    return claim_file(folder / CLAIM, CLAIM_GRACE_S)


def run_grid(runs: list[Run], root: str | Path, log=print, only=None, poll: float = 30.0) -> dict:
    """Run what is not done yet, in order; returns ``{"done": [...], "ran": [...], "failed": {...}, "skipped": [...]}``.

    Runners may work side by side on one root (two lanes of one grid, or grids sharing runs): a run another live
    runner holds (see :func:`claim`) is deferred, with the runs that need it and the later seeds of an arm it is
    timing, and this runner goes on with the next free run; deferred runs are taken up again (every ``poll``
    seconds while nothing else is left) and count as done once the other runner finishes them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wanted = _with_needs(runs, only)
    status = {"done": [], "ran": [], "failed": {}, "skipped": []}
    steps_by_arm: dict = {}
    pending, told = list(enumerate(runs)), set()
    while pending:
        deferred: list = []
        progressed = False
        for i, run in pending:
            later = {r.name for _, r in deferred}
            timing = {r.arm for _, r in deferred if r.budget is not None and steps_by_arm.get(r.arm) is None}
            done = _done(root, run)
            if done is None and run.name in wanted:
                if later & set(run.needs) or (run.budget is not None and run.arm in timing
                                              and steps_by_arm.get(run.arm) is None):
                    deferred.append((i, run))
                    continue
                holder = claim(root / run.name)
                if holder is not None:
                    if run.name not in told:
                        log(f"[{i + 1}/{len(runs)}] {run.name}: another runner (pid {holder}) has it; later")
                        told.add(run.name)
                    deferred.append((i, run))
                    continue
                done = _done(root, run)  # the other runner may have finished it just before the claim
                if done is not None:
                    (root / run.name / CLAIM).unlink(missing_ok=True)
            progressed = True
            if done is not None:
                status["done"].append(run.name)
                if run.budget is not None and steps_by_arm.get(run.arm) is None:
                    steps_by_arm[run.arm] = done.get("steps") or trained_steps(root / run.name)
                continue
            if run.name not in wanted:
                continue
            try:
                _run_one(run, root, i, len(runs), steps_by_arm, status, log)
            finally:
                (root / run.name / CLAIM).unlink(missing_ok=True)
        if deferred and not progressed:
            time.sleep(poll)
        pending = deferred
    return status


def _run_one(run: Run, root: Path, i: int, total: int, steps_by_arm: dict, status: dict, log) -> None:
    """One claimed run through the CLI, and its ``done.json`` when it succeeds."""
    blocked = [n for n in run.needs if n in status["failed"] or n in status["skipped"]
               or n not in status["done"] + status["ran"]]
    if blocked:
        status["skipped"].append(run.name)
        log(f"[{i + 1}/{total}] {run.name}: skipped, needs {blocked}")
        return
    folder = root / run.name
    argv = command_line(run, root, steps_by_arm)
    log(f"[{i + 1}/{total}] {run.name}: lafs {' '.join(argv)}")
    start = time.perf_counter()
    with open(folder / "log.txt", "a") as out:
        rc = subprocess.call([sys.executable, "-m", "lafs", *argv], stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if rc != 0:
        status["failed"][run.name] = rc
        log(f"    failed (exit {rc}) after {seconds:.0f} s; see {folder / 'log.txt'}")
        return
    if run.budget is not None and steps_by_arm.get(run.arm) is None:
        steps_by_arm[run.arm] = trained_steps(folder)
    record = {"spec": _portable(run.argv, root), "budget": run.budget, "fixed_steps": run.steps, "argv": argv,
              "seconds": seconds, "threads": _threads(), "machine": machine(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "steps": budget_steps(folder) if run.budget is not None else None}
    atomic_write_bytes(folder / "done.json", json.dumps(record, indent=2).encode())
    status["ran"].append(run.name)
    log(f"    done in {seconds:.0f} s")


def _threads() -> int:
    """The torch threads a run started from this runner gets (its environment's OMP_NUM_THREADS, else torch's)."""
    import torch

    return torch.get_num_threads()


def _with_needs(runs: list[Run], only) -> set[str]:
    """Names matching the ``only`` glob patterns, with everything they need."""
    from fnmatch import fnmatch

    if not only:
        return {r.name for r in runs}
    by_name = {r.name: r for r in runs}
    wanted = {r.name for r in runs if any(fnmatch(r.name, p) for p in only)}
    stack = list(wanted)
    while stack:
        for need in by_name[stack.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                stack.append(need)
    return wanted


# ------------------------------------------------------------------------------------------------ archives
RECORDS = ("done.json", "eval.json", "summary.json", "config.yaml")  # what the tables read, and the run's config


def archive(runs: list[Run], root: str | Path, dest: str | Path) -> list[str]:
    """Copy the records of every done run (``RECORDS``: no checkpoint, a few KB a run) to ``dest/<run name>/``;
    returns the names copied.

    Run folders live on one machine, and a grid of several seeds outlasts a session (and its machine): its finished
    runs are archived in the repository, and :func:`restore` puts them under a new root, where the runner counts
    them done and the tables read them. ``lafs experiment NAME --aggregate --out DEST`` tabulates an archive as it
    is. The command lines in ``done.json`` name the root ``<root>``, so the records do not depend on where it was."""
    root, dest = Path(root), Path(dest)
    copied = []
    for run in runs:
        folder = root / run.name
        if not (folder / "done.json").is_file():
            continue
        done = json.loads((folder / "done.json").read_text())
        done.update(spec=_portable(done.get("spec") or run.argv, root), argv=_portable(done.get("argv") or [], root),
                    archived=True)
        _copy_records(folder, dest / run.name, json.dumps(done, indent=2).encode())
        copied.append(run.name)
    return copied


def _copy_records(source: Path, dest: Path, done: bytes | None = None) -> None:
    """``RECORDS`` of one run folder to another (``done``: the done.json to write instead of the source's), done.json
    last: a folder counts as done only once its other records are in, so an interrupted copy is not a done run."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORDS[1:]:
        if (source / name).is_file():
            atomic_write_bytes(dest / name, (source / name).read_bytes())
    atomic_write_bytes(dest / RECORDS[0], done if done is not None else (source / RECORDS[0]).read_bytes())


def file_makers(runs: list[Run]) -> set[str]:
    """The runs whose files other runs read (``@run/file``, e.g. a ``lafs data misalign`` set an evaluation tests on)."""
    return {m.group(1) for r in runs for a in r.argv for m in REF.finditer(a) if m.group(2)}


def restore(runs: list[Run], source: str | Path, root: str | Path) -> list[str]:
    """Put an archive's records (:func:`archive`) of the runs not done under ``root`` into their folders; returns
    the names restored. A restored training run has no checkpoint: the runs that read it must be done too (they
    are, when they were archived with it), else they stop with a message naming the folder to delete. The runs in
    :func:`file_makers` are not restored: the archive has their records, not the files they made, so the runner
    makes them again when a run that reads them is to run (restored as done, they left that run a missing file)."""
    source, root = Path(source), Path(root)
    if not source.is_dir():
        raise ConfigError(f"--restore {source}: no such folder")
    restored, makers = [], file_makers(runs)
    for run in runs:
        done = root / run.name / "done.json"
        if run.name in makers:
            if done.is_file() and json.loads(done.read_text()).get("archived"):
                done.unlink()  # restored as done by an earlier lafs: its files are not there, so it is made again
            continue
        if done.is_file() or not (source / run.name / "done.json").is_file():
            continue
        _copy_records(source / run.name, root / run.name)
        restored.append(run.name)
    return restored


# ------------------------------------------------------------------------------------------------ tables
def model_run(run: Run, by_name: dict) -> Run | None:
    """The training run whose model ``run`` reads: itself when it trains, else the nearest training run that its
    checkpoint references (``@run``, not ``@run/file``) lead to."""
    frontier, seen = [run], {run.name}
    while frontier:
        trained = [r for r in frontier if r.argv[0] in TRAINING]
        if trained:
            return trained[0]
        refs = [m.group(1) for r in frontier for a in r.argv for m in REF.finditer(a) if not m.group(2)]
        frontier = [by_name[n] for n in dict.fromkeys(refs) if n in by_name and n not in seen]
        seen.update(r.name for r in frontier)
    return None


def aggregate(grid: dict, runs: list[Run], root: str | Path) -> dict:
    """The grid's tables from the run folders: per cell the values, seeds, mean and sample std (ddof 1), and the
    steps trained by the model behind each value (:func:`model_run`)."""
    root = Path(root)
    tables, loaded, by_name, steps_of = [], {}, {r.name: r for r in runs}, {}

    def steps(run: Run) -> int | None:
        """The steps a done run's model trained (its training run's ``done.json``, metrics or summary)."""
        trained = model_run(run, by_name)
        if trained is None or not (root / trained.name / "done.json").is_file():
            return None
        if trained.name not in steps_of:
            done = json.loads((root / trained.name / "done.json").read_text())
            steps_of[trained.name] = done.get("steps") or trained_steps(root / trained.name)
        return steps_of[trained.name]

    def load(run: Run, name: str) -> dict | None:
        """A done run's metrics file, read once for every table that uses it."""
        path = root / run.name / name
        if path not in loaded:
            done = (root / run.name / "done.json").is_file() and path.is_file()
            loaded[path] = json.loads(path.read_text()) if done else None
        return loaded[path]

    for spec in grid["tables"]:
        members = [r for r in runs if r.stage == spec["runs"]]
        if not members:
            raise ConfigError(f"grid {grid['name']}: table {spec['title']!r} reads runs {spec['runs']!r}, no stage")
        metrics = table_metrics(spec)
        column_axis = spec.get("columns")
        rows, columns, cells = [], [], {}
        labels = {str(k): str(v) for k, v in (spec.get("labels") or {}).items()}
        for run in members:
            row = " / ".join(labels.get(run.values[a], run.values[a]) for a in spec["rows"])
            rows.append(row)
            data = load(run, spec.get("file", "eval.json"))
            for label, metric in metrics.items():
                column = labels.get(run.values[column_axis], run.values[column_axis]) if column_axis else label
                columns.append(column)
                cell = cells.setdefault(row, {}).setdefault(column, {"values": [], "seeds": [], "steps": []})
                if data is not None:
                    cell["values"].append(float(spec.get("scale", 1.0)) * metric_value(data, metric))
                    cell["seeds"].append(run.seed)
                    cell["steps"].append(steps(run))
        for row in cells.values():
            for cell in row.values():
                _summarise(cell)
        floor_rows = _floor_rows(spec, members, load, labels) if spec.get("floors") else {}
        pca = floor_rows.get(PCA_FLOOR_ROW, {})
        for row in cells.values():
            for column, cell in row.items():
                floor = pca.get(column, {}).get("mean")
                cell["below_floor"] = bool(cell["mean"] is not None and floor is not None and cell["mean"] < floor)
        if not column_axis:
            flag_differences(cells, metrics)
        table = {"title": spec["title"], "rows": list(dict.fromkeys(rows)), "columns": list(dict.fromkeys(columns)),
                 "cells": cells, "row_label": " / ".join(spec["rows"]), "column_label": column_axis or "",
                 "digits": int(spec.get("digits", 2)), "note": spec.get("note", ""), "floor_rows": list(floor_rows)}
        cells.update(floor_rows)
        if spec.get("paired"):
            table["paired"] = _paired(spec, members, cells, labels)
        tables.append(table)
    return {"grid": grid["name"], "tables": tables}


def machine() -> str:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.is_file() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    import torch

    from ..models.precision import cpu_flags

    # the flags that set CPU speed (bf16 autocast pays only with avx512_bf16 / AMX); no thread count: that is each
    # run's own (done.json "threads"), not this aggregating process's
    flags = ", ".join(f"{f} {'yes' if f in cpu_flags() else 'no'}" for f in ("avx512f", "avx512_bf16", "amx_bf16"))
    return f"{cpu}, {os.cpu_count()} cores ({flags}), torch {torch.__version__}, Python {platform.python_version()}"


def report(grid: dict, runs: list[Run], root: str | Path, command: str) -> tuple[dict, str]:
    """``results_NAME.json`` + ``results_NAME.md`` in the root; returns the data and the Markdown section."""
    root = Path(root)
    result = aggregate(grid, runs, root)
    done = [json.loads((root / r.name / "done.json").read_text()) | {"name": r.name}
            for r in runs if (root / r.name / "done.json").is_file()]
    steps = {d["name"]: d.get("steps") or trained_steps(root / d["name"]) for d in done}
    seeds = sorted({r.seed for r in runs})
    minutes = sum(d["seconds"] for d in done) / 60
    # where the runs ran (their done.json), which need not be where they are aggregated
    ran_on = dict(Counter(d.get("machine") or "not recorded (runs older than the record)" for d in done))
    result.update({"command": command, "machine": machine(), "runs_done": len(done), "runs_total": len(runs),
                   "run_minutes": minutes, "seeds": seeds, "ran_on": ran_on,
                   "steps": {name: n for name, n in steps.items() if n}})
    md = "\n".join([
        format_tables(result, len(seeds)),
        f"Command: `{command}`. Seeds {', '.join(map(str, seeds))}; cells are mean ± sample std over the seeds "
        "(n = seeds present when fewer).",
        f"Runs: {len(done)} of {len(runs)} done, {minutes:.0f} min of run time in all (sum of the runs' wall "
        f"times, evaluation included). Ran on: {'; '.join(f'{m}: {n} runs' for m, n in ran_on.items()) or '-'}. "
        f"Aggregated on: {result['machine']}.",
    ])
    atomic_write_bytes(root / f"results_{grid['name']}.json", json.dumps(result, indent=2).encode())
    atomic_write_bytes(root / f"results_{grid['name']}.md", (md + "\n").encode())
    return result, md


def update_section(path: str | Path, name: str, markdown: str) -> Path:
    """Replace the text between ``<!-- experiment:NAME -->`` and ``<!-- /experiment:NAME -->`` (appended when the
    markers are absent); the rest of the file, the hand-written reading, is kept."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    start, end = f"<!-- experiment:{name} -->", f"<!-- /experiment:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    return atomic_write_bytes(path, text.encode())
