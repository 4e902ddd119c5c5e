"""Files on disk: writes that never lose data (a temporary name in the folder, renamed into place), content hashes,
and claim files (one live process holds a folder: an experiment runner its run, a training its run folder).

A content hash names a file by its bytes: the same weights or the same set give the same key, so caches (``lafs
eval``'s embeddings) are never served stale and exported models name the checkpoint they came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(binary file)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it.

    Readers see the old file or the new one, never a half-written one; on any error the temporary file
    is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the final file the permissions a plain open() would
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def claim_file(path: str | Path, grace_s: float = 30.0) -> int | None:
    """Create ``path`` holding this process's pid unless a live process holds it: ``None`` when this process holds it
    now, else the holder's pid (-1: unreadable and younger than ``grace_s`` seconds, perhaps being written).

    The claim appears with its pid already in it (written to a private file, then hard-linked into place, which fails
    while a claim exists), so no process ever reads a claim whose pid is not yet written and takes it over. A claim
    whose process has died, or unreadable for ``grace_s`` seconds, is stale and taken over. Pids are this host's."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        while True:
            with contextlib.suppress(FileExistsError):  # a claim exists: read its holder below
                os.link(tmp, path)
                return None
            try:
                text = path.read_text().strip()
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            try:
                pid = int(text)
            except ValueError:
                if age < grace_s:
                    return -1
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                return pid
            path.unlink(missing_ok=True)  # stale: its process is gone
    finally:
        Path(tmp).unlink(missing_ok=True)


def file_hash(path: str | Path, digits: int | None = 16, chunk: int = 1 << 20) -> str:
    """SHA-256 of the file's bytes as hex, its first ``digits`` digits (all 64 with None)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:digits]
