"""Run logs: a JSONL metrics file (one record per line, machine-readable), TensorBoard scalars and progress.

Progress is a tqdm bar only when stderr is a terminal; written to a file or a pipe (CI, ``nohup``, a job log) it is
one plain line per logged training step instead, so a log holds what happened rather than thousands of redrawn bars.

Only rank 0 writes. On resume from step k, records after k are dropped from ``metrics.jsonl`` (rewritten
atomically) and TensorBoard purges them, so a resumed run's logs read like an uninterrupted one.
TensorBoard is optional: without the package the JSONL file is still written, and the run says so once.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from ..io import atomic_write_bytes


class TornLineWarning(UserWarning):
    """The last line of a metrics file was cut short (its writer was killed mid-line) and is dropped."""


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``. A last line cut short by a killed writer is dropped with a
    :class:`TornLineWarning` naming the file; an unreadable line before it is a ``ValueError`` naming file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n < len(lines) - 1:
                raise ValueError(f"{path}, line {i}: not a JSON record ({err.msg}); the metrics file is "
                                 "damaged") from None
            warnings.warn(f"{path}: its last line (line {i}) is cut short, the write of a killed run; dropped",
                          TornLineWarning, stacklevel=2)
    return records


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class RunLogger:
    def __init__(self, out_dir: str | Path, enabled: bool = True, total_steps: int = 0, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        self.total_steps = total_steps
        self.lines = progress and not _is_terminal()  # plain progress lines instead of a bar
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", -1) <= start_step] if start_step else []
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._fh = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                warnings.warn("tensorboard is not installed: logging to metrics.jsonl only", stacklevel=2)
        if progress and not self.lines:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._t0, self._images = time.perf_counter(), 0

    def log(self, step: int, record: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        # strict JSON has no NaN/Infinity: non-finite numbers are written as strings ("nan")
        clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps({"step": step, "kind": kind, **clean}) + "\n")
        self._fh.flush()
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)
        if self.lines and kind == "train" and "loss" in record:
            parts = [f"step {step}/{self.total_steps}", f"loss {record['loss']:.4f}"]
            if "lr" in record:
                parts.append(f"lr {record['lr']:.2e}")
            if record.get("images_per_s"):
                parts.append(f"{record['images_per_s']:.0f} img/s")
            print("  ".join(parts), flush=True)

    def progress(self, step: int, images: int, loss: float, lr: float) -> float:
        """Advance the bar by one step; returns the images/s since the previous call."""
        if not self.enabled:
            return 0.0
        now = time.perf_counter()
        rate = images / max(now - self._t0, 1e-9)
        self._t0 = now
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
            self.bar.update(1)
        return rate

    def set_total(self, total_steps: int) -> None:
        self.total_steps = total_steps
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
