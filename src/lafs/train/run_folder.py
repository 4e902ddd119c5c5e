"""One run per folder: a lock while a process trains into it, no fresh run over another's checkpoints, no debris.

- :func:`lock_run_folder` takes ``<out>/train.lock`` for this process (:func:`lafs.io.claim_file`, as an experiment
  runner claims a run: the lock appears with its pid already in it, hard-linked into place, which fails while a lock
  exists). A second process training into the folder is refused with the holder's pid; a lock whose process has
  died is taken over. Pids are this host's: processes on other machines sharing the folder are not seen.
- :func:`check_fresh`: a run started without ``--resume`` refuses a folder that already holds checkpoints.
- :func:`clean_temporaries`: the temporary files a killed process left (``lafs.io.atomic_write``) are removed, once
  the lock makes sure no live writer owns them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..checkpoint import BEST, checkpoints_in
from ..io import claim_file

LOCK = "train.lock"
# the run's own files in its folder whose temporaries (``.<name>.<random>.tmp``) may be left by a killed process;
# other files there (an experiment runner's claim) belong to other processes
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


class RunFolderError(ValueError):
    """The run folder is in use by another process, or holds another run; the message says what to do."""


def lock_run_folder(out: Path) -> Path:
    """Take the run folder's lock for this process (module docstring); returns its path, for
    :func:`unlock_run_folder`. A :class:`RunFolderError` names the live holder."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    holder = claim_file(path)
    if holder == -1:
        raise RunFolderError(f"{out}: its lock {path} is being written by another process starting a run here; "
                             "wait for it to finish, or use another --out")
    if holder is not None:
        raise RunFolderError(f"{out}: another process (pid {holder}) is training into this folder ({path}); "
                             "wait for it to finish, or use another --out")
    return path


def unlock_run_folder(path: Path) -> None:
    """Release a lock this process holds (a lock taken over by another process is left alone)."""
    with contextlib.suppress(FileNotFoundError):  # already gone: nothing to release
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()


def check_fresh(out: Path, resume: str | None) -> None:
    """A run without ``--resume`` must not start over the checkpoints of another run in ``out``."""
    ckpts = out / "checkpoints"
    if resume or not ckpts.is_dir():
        return
    found = checkpoints_in(ckpts) + ([ckpts / BEST] if (ckpts / BEST).is_file() else [])
    if found:
        names = ", ".join(p.name for p in found[-3:])
        raise RunFolderError(f"{out} already holds the checkpoints of a run ({names} in {ckpts}); continue it with "
                             "--resume, or start this run in another --out")


def clean_temporaries(out: Path) -> list[Path]:
    """Remove the temporary files a killed run left in ``out`` and ``out/checkpoints``; returns them. Call it holding
    the lock (no live writer)."""
    found = [p for name in RUN_FILES for p in out.glob(f".{name}.*.tmp")]
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        found += [p for p in ckpts.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".link"))]
    for p in found:
        p.unlink(missing_ok=True)
    return found
