"""Fault injection: a training run killed again and again ends exactly where an uninterrupted one does.

A small synthetic-data run (``lafs train micro/supervised_synthetic`` with few steps, a checkpoint every step) is
SIGKILLed ``--kills`` times at random moments, alternately during a step and during a checkpoint write (the moment a
checkpoint's temporary file appears), and resumed with ``--resume`` each time. After each kill every checkpoint of
the run must still read (``lafs.checkpoint.read_training_checkpoint``: a training checkpoint with finite weights),
and every loss the killed process logged must equal the uninterrupted run's at that step. At the end the losses of
all steps and the final weights and optimizer state must be bit-identical to the uninterrupted run's (same thread
count: ``OMP_NUM_THREADS=1`` for every process).

Then a tiny full disk where the platform allows it (a tmpfs in a private mount namespace: ``unshare``, as root or
with user namespaces; skipped with a message otherwise): the run must stop with ``lafs: error: the disk is full``
naming the checkpoint, its earlier checkpoints intact; copied to a disk with room it resumes to the same end.

Prints a summary (kills survived, checkpoints intact, resumes exact) and exits 1 if anything did not hold. Takes a
few minutes on two cores (every resume starts a process). Run: ``python benchmarks/fault_injection.py [--kills 10]
[--steps 24] [--seed 0] [--keep DIR] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lafs.checkpoint import checkpoints_in, read_training_checkpoint
from lafs.train.logging import read_metrics

PRESET = "micro/supervised_synthetic"


def overrides(steps: int) -> list[str]:
    # the preset, smaller: 16 identities x 8 images, batches of 32 (4 per epoch: kills land mid-epoch), no validation
    return ["data.num_identities=16", "data.images_per_identity=8", "data.val_pairs=0", "train.batch_size=32",
            f"train.steps={steps}", "train.ckpt_every=1", "train.keep_last=3", "train.log_every=1",
            "train.val_every=0", "optim.warmup_steps=4"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}


def command(out: Path, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "lafs.cli", "train", PRESET, *overrides(steps), "--out", str(out), "--quiet",
            *(["--resume"] if resume else [])]


def train_losses(out: Path) -> dict[int, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line, counted apart
        return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}


def torn(out: Path) -> bool:
    path = out / "metrics.jsonl"
    return path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")


def temporaries(out: Path) -> list[Path]:
    ckpts = out / "checkpoints"
    return [p for p in ckpts.iterdir() if p.name.endswith(".tmp")] if ckpts.is_dir() else []


def final_state(out: Path, steps: int) -> dict:
    return read_training_checkpoint(out / "checkpoints" / f"step_{steps:07d}.pt")


def same_state(a: dict, b: dict) -> bool:
    """Model and optimizer state bit for bit."""
    if a["model"].keys() != b["model"].keys() or not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]):
        return False
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    return sa.keys() == sb.keys() and all(
        sa[i].keys() == sb[i].keys() and all(torch.equal(sa[i][k], sb[i][k]) if torch.is_tensor(sa[i][k])
                                             else sa[i][k] == sb[i][k] for k in sa[i]) for i in sa)


def kill_loop(out: Path, steps: int, kills: int, rng: random.Random, ref: dict[int, float], log) -> dict:
    """Start, SIGKILL, resume ``kills`` times; then run to the end. Returns the tallies."""
    t = {"kills": 0, "during_write": 0, "during_step": 0, "checkpoints_read": 0, "checkpoints_damaged": 0,
         "segments_exact": 0, "segments": 0, "temporaries_left": 0, "torn_lines": 0, "stale_locks": 0,
         "resumed_at": []}
    for k in range(kills):
        before = train_losses(out) if (out / "metrics.jsonl").is_file() else {}
        start = max((s for s in before), default=0)
        if (out / "train.lock").is_file():
            t["stale_locks"] += 1
        proc = subprocess.Popen(command(out, steps, resume=True), env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        mode = "write" if k % 2 else "step"
        ckpts = out / "checkpoints"
        deadline, caught = time.time() + 300, False
        # wait for this process's first new step (its resume done), then for the moment of the chosen fault
        while proc.poll() is None and time.time() < deadline:
            done = train_losses(out) if (out / "metrics.jsonl").is_file() else {}
            if any(s > start for s in done):
                break
            time.sleep(0.01)
        if mode == "step":
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            while proc.poll() is None and time.time() < deadline and not caught:
                caught = ckpts.is_dir() and any(n.endswith(".tmp") for n in os.listdir(ckpts))
        if proc.poll() is not None:
            log(f"  kill {k + 1}: the run finished first ({proc.returncode}); stopping the kills")
            proc.communicate()
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        t["kills"] += 1
        left = temporaries(out)
        mid_write = bool(left)
        t["during_write" if mid_write else "during_step"] += 1
        t["temporaries_left"] += len(left)
        t["torn_lines"] += torn(out)
        # every checkpoint on disk must read: a training checkpoint with finite weights
        for path in checkpoints_in(ckpts):
            try:
                read_training_checkpoint(path)
                t["checkpoints_read"] += 1
            except ValueError as err:
                t["checkpoints_damaged"] += 1
                log(f"  DAMAGED after kill {k + 1}: {err}")
        # every loss this process logged equals the uninterrupted run's at that step
        got = train_losses(out)
        new = {s: v for s, v in got.items() if s > start}
        exact = all(ref.get(s) == v for s, v in got.items())
        t["segments"] += 1
        t["segments_exact"] += exact
        last = checkpoints_in(ckpts)[-1].name if ckpts.is_dir() and checkpoints_in(ckpts) else "none"
        log(f"  kill {k + 1} ({'during a checkpoint write' if mid_write else 'during a step'}): "
            f"{len(new)} new steps logged, latest checkpoint {last}, losses {'exact' if exact else 'DIFFER'}")
    if (out / "train.lock").is_file():
        t["stale_locks"] += 1
    proc = subprocess.run(command(out, steps, resume=True), env=env(), capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("resumed from"):
            t["resumed_at"].append(line)
    t["final_rc"] = proc.returncode
    if proc.returncode:
        log(proc.stdout[-2000:] + proc.stderr[-2000:])
    return t


def mount_namespace() -> list[str] | None:
    """The ``unshare`` prefix that gives a private mount namespace where a tmpfs can be mounted, None if none does."""
    if shutil.which("unshare") is None:
        return None
    probe = tempfile.mkdtemp(prefix="lafs_tmpfs_probe_")
    try:
        for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
            done = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe],
                                  capture_output=True, text=True, check=False)
            if done.returncode == 0:
                return prefix
    finally:
        os.rmdir(probe)
    return None


def full_disk(work: Path, steps: int, ref_dir: Path, log) -> dict:
    """Train into a tmpfs with room for the config, logs and two and a half checkpoints."""
    prefix = mount_namespace()
    if prefix is None:
        return {"skipped": "no private mount namespace here (unshare needs root or user namespaces): full disk "
                           "not simulated"}
    ckpt_bytes = (ref_dir / "checkpoints" / f"step_{steps:07d}.pt").stat().st_size
    size_kib = int(2.5 * ckpt_bytes / 1024) + 256
    disk, kept = work / "tmpfs", work / "full_disk_run"
    disk.mkdir()
    out = disk / "run"
    run = " ".join(f"'{a}'" for a in command(out, steps, resume=False))
    # inside the namespace: mount, train until the disk is full, copy what is left out
    script = f"mount -t tmpfs -o size={size_kib}k tmpfs '{disk}' && {run}; rc=$?; cp -a '{out}' '{kept}'; exit $rc"
    proc = subprocess.run([*prefix, "sh", "-c", script], env=env(), capture_output=True, text=True, check=False)
    message = next((line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
                    if line.startswith("lafs: error")), "")
    found = checkpoints_in(kept / "checkpoints") if (kept / "checkpoints").is_dir() else []
    intact = 0
    for path in found:
        try:
            read_training_checkpoint(path)
            intact += 1
        except ValueError as err:
            log(f"  DAMAGED on the full disk: {err}")
    result = {"tmpfs_kib": size_kib, "rc": proc.returncode, "message": message, "checkpoints": len(found),
              "intact": intact, "temporaries_left": len(temporaries(kept)),
              "names_file": "the disk is full: writing checkpoint" in message and ".pt" in message}
    # on a disk with room, the run resumes to the uninterrupted run's end
    again = subprocess.run(command(kept, steps, resume=True), env=env(), capture_output=True, text=True, check=False)
    result["resumed_rc"] = again.returncode
    result["resumed_exact"] = (again.returncode == 0 and train_losses(kept) == train_losses(ref_dir)
                               and same_state(final_state(kept, steps), final_state(ref_dir, steps)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--keep", help="keep the run folders in this folder (default: a temporary one, removed)")
    parser.add_argument("--no-full-disk", action="store_true")
    parser.add_argument("--json", help="write the tallies here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.keep or tempfile.mkdtemp(prefix="lafs_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)
    try:
        t0 = time.perf_counter()
        log(f"fault injection: lafs train {PRESET}, {args.steps} steps, a checkpoint every step, OMP_NUM_THREADS=1, "
            f"{args.kills} kills (seed {args.seed}); work folder {work}")
        ref_dir = work / "uninterrupted"
        proc = subprocess.run(command(ref_dir, args.steps, resume=False), env=env(), capture_output=True, text=True,
                              check=False)
        if proc.returncode:
            log(proc.stdout + proc.stderr)
            return 1
        ref = train_losses(ref_dir)
        log(f"uninterrupted run: {len(ref)} steps in {time.perf_counter() - t0:.0f} s")
        killed = work / "killed"
        t = kill_loop(killed, args.steps, args.kills, rng, ref, log)
        final_exact = (t["final_rc"] == 0 and train_losses(killed) == ref
                       and same_state(final_state(killed, args.steps), final_state(ref_dir, args.steps)))
        disk = {"skipped": "--no-full-disk"} if args.no_full_disk else full_disk(work, args.steps, ref_dir, log)
        ok = (t["kills"] == args.kills and t["checkpoints_damaged"] == 0 and t["segments_exact"] == t["segments"]
              and final_exact and ("skipped" in disk or (disk["rc"] == 1 and disk["names_file"]
                                                         and disk["intact"] == disk["checkpoints"] > 0
                                                         and disk["temporaries_left"] == 0 and disk["resumed_exact"])))
        writes, steps_k = t["during_write"], t["during_step"]
        lines = ["summary:"]
        lines.append(f"  kills survived: {t['kills']}/{args.kills} ({writes} during a checkpoint write, {steps_k} "
                     f"during a step); {t['stale_locks']} stale run locks taken over, {t['temporaries_left']} stale "
                     f"temporaries cleaned, {t['torn_lines']} torn metrics lines dropped")
        lines.append(f"  checkpoints intact: {t['checkpoints_read']}/{t['checkpoints_read'] + t['checkpoints_damaged']}"
                     " read after the kills (training checkpoints, finite weights)")
        lines.append(f"  resumes exact: {t['segments_exact']}/{t['segments']} (every loss logged before each kill "
                     f"equals the uninterrupted run's); final run: losses of steps 1-{args.steps}, weights and "
                     f"optimizer state {'bit-identical' if final_exact else 'DIFFER'}")
        if "skipped" in disk:
            lines.append(f"  full disk: skipped ({disk['skipped']})")
        else:
            lines.append(f"  full disk ({disk['tmpfs_kib']} KiB tmpfs): exit {disk['rc']}, \"{disk['message'][:160]}"
                         f"...\"; {disk['intact']}/{disk['checkpoints']} checkpoints intact, "
                         f"{disk['temporaries_left']} temporaries left; resumed on a disk with room: "
                         f"{'bit-identical' if disk['resumed_exact'] else 'DIFFERS'}")
        lines.append(f"  {'ALL HELD' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
        log("\n".join(lines))
        if args.json:
            Path(args.json).write_text(json.dumps({"tallies": t, "final_exact": final_exact, "full_disk": disk,
                                                   "ok": ok}, indent=2, default=str))
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
