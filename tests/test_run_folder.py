"""Run folders (issue 24): one process trains into a folder at a time, a fresh run does not start over another run's
checkpoints, a damaged latest checkpoint (unreadable or non-finite) falls back to the one before, a killed run's
temporary files and torn metrics line are dropped, and a full disk names the checkpoint it could not write."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_RUN, lafs_cli, step_losses

from lafs.checkpoint import DiskFullError, checkpoints_in, read_training_checkpoint, write_checkpoint
from lafs.train.logging import TornLineWarning, read_metrics
from lafs.train.run_folder import LOCK

REPO = Path(__file__).resolve().parents[1]
RUN = FAST_RUN


def test_a_second_process_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    # the thread count of this process: the resume below, in this process, checks the count the run recorded
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO / "src")}
    first = subprocess.Popen([sys.executable, "-m", "lafs.cli", "train", *RUN, "train.steps=500", "--out", str(out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600  # a loaded machine starts a process slowly
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        while not checkpoints_in(out / "checkpoints") and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None and checkpoints_in(out / "checkpoints"), "the first run wrote no checkpoint"
        assert (out / LOCK).read_text() == str(first.pid)
        for resume in ([], ["--resume"]):
            code, _, err = lafs_cli(capsys, "train", "train.steps=2", "--out", str(out), *resume)
            assert code == 2
            assert f"another process (pid {first.pid}) is training into this folder" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # its lock outlived it: taken over by the next run, which resumes and releases it
    assert (out / LOCK).is_file()
    last = read_training_checkpoint(checkpoints_in(out / "checkpoints")[-1])["step"]
    code, stdout, _ = lafs_cli(capsys, "train", f"train.steps={last + 1}", "--out", str(out), "--resume")
    assert code == 0 and "resumed from" in stdout and not (out / LOCK).exists()


def test_a_fresh_run_refuses_a_folder_holding_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert lafs_cli(capsys, "train", "train.steps=2", "--out", str(out))[0] == 0
    ckpt = checkpoints_in(out / "checkpoints")[-1]
    before = ckpt.read_bytes(), (out / "metrics.jsonl").read_text()
    code, _, err = lafs_cli(capsys, "train", "train.steps=2", "--out", str(out))
    assert code == 2
    assert f"lafs: error: {out} already holds the checkpoints of a run (step_0000001.pt, step_0000002.pt" in err
    assert "--resume" in err and "another --out" in err
    assert (ckpt.read_bytes(), (out / "metrics.jsonl").read_text()) == before


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    out = tmp_path / "run"
    assert lafs_cli(capsys, "train", "train.steps=4", "--out", str(out))[0] == 0
    want = step_losses(out)
    ckpts = out / "checkpoints"
    latest = ckpts / "step_0000004.pt"
    latest.write_bytes(latest.read_bytes()[:5000])  # torn: a copy or a disk that lost its tail
    # debris of a killed run: temporaries of a checkpoint and of the metrics, and a torn metrics line
    (ckpts / ".step_0000005.pt.x1y2.tmp").write_bytes(b"half")
    (out / ".metrics.jsonl.a1b2.tmp").write_text("{}")
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "kind": "tr')
    with pytest.warns(TornLineWarning, match=f"{out / 'metrics.jsonl'}: its last line .* is cut short"):
        code, stdout, _ = lafs_cli(capsys, "train", "train.steps=4", "--out", str(out), "--resume")
    assert code == 0
    assert "skipped step_0000004.pt: " in stdout and "set aside as step_0000004.pt.damaged" in stdout
    assert f"resumed from {ckpts / 'step_0000003.pt'} at step 3" in stdout
    assert "removed" in stdout and not list(ckpts.glob(".*.tmp")) and not list(out.glob(".*.tmp"))
    assert (ckpts / "step_0000004.pt.damaged").is_file()
    assert step_losses(out) == want  # step 4 trained again, bit for bit
    assert read_training_checkpoint(latest)["step"] == 4


def test_only_damaged_checkpoints_is_an_error_not_a_fresh_start(tmp_path, capsys):
    out = tmp_path / "run"
    assert lafs_cli(capsys, "train", "train.steps=1", "--out", str(out))[0] == 0
    only = checkpoints_in(out / "checkpoints")[0]
    only.write_bytes(b"not a checkpoint")
    code, _, err = lafs_cli(capsys, "train", "train.steps=2", "--out", str(out), "--resume")
    assert code == 2 and f"no checkpoint in {out / 'checkpoints'} reads (skipped step_0000001.pt)" in err


def test_a_damaged_metrics_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    with pytest.warns(TornLineWarning, match="line 3"):
        assert read_metrics(path) == [{"step": 1}, {"step": 2}]


def test_a_full_disk_during_a_checkpoint_write_names_the_file(tmp_path, monkeypatch):
    """torch.save reports a failed write as a bare RuntimeError; the disk-full cause behind it is found and named."""
    path = tmp_path / "step_0000002.pt"
    write_checkpoint({"model": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 200:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    with pytest.raises(DiskFullError, match=f"the disk is full: writing checkpoint {path} failed .*the previous "
                       "checkpoint is intact") as info:
        write_checkpoint({"model": {"w": torch.zeros(1000)}}, path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_full_disk_stops_the_cli_with_a_message(tmp_path, capsys, monkeypatch):
    def full(state, fh):
        fh.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code, _, err = lafs_cli(capsys, "train", "train.steps=2", "--out", str(tmp_path / "run"))
    assert code == 1
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001.pt"
    assert f"lafs: error: the disk is full: writing checkpoint {ckpt} failed" in err


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    assert lafs_cli(capsys, "train", "train.steps=2", "--out", str(out))[0] == 0
    path = checkpoints_in(out / "checkpoints")[-1]
    state = torch.load(path, weights_only=True)
    state["model"]["head.weight"][0, 0] = float("nan")  # written by an older lafs, which saved NaN updates
    torch.save(state, path)
    code, stdout, _ = lafs_cli(capsys, "train", "train.steps=2", "--out", str(out), "--resume")
    assert code == 0
    assert "skipped step_0000002.pt: " in stdout and "holds non-finite weights (1 tensors: head.weight)" in stdout
    assert "at step 1" in stdout
