"""How many DataLoader worker processes a training process gets: ``data.workers`` ("auto" or an integer).

``auto`` sizes them from the cores this process may use (its CPU affinity, shared among the ``LOCAL_WORLD_SIZE``
processes ``torchrun`` starts on the node): ``c`` cores -> ``0`` when ``c <= 2``, else ``min(8, c - 1)``.

Why (``benchmarks/bench_data.py``, AMD EPYC, 1 thread): the loader's whole per-image work (record read, JPEG
decode, RGB CHW tensor, collate) costs about 70 us for a 64 px face and 130 us for a 112 px one, i.e. 7,500 to
15,000 images/s per core; the augmentations run batched on the training device, not in the workers. So

- with 2 cores or fewer the machine trains on its CPU, where one optimizer step of the smallest model
  (part_fvit micro, 56 px, batch 64, one thread) costs about 7 ms per image: the data is 1-2 % of the step, while
  a worker process would take one of the two cores from the step (and add a fork, memory, IPC). Inline (0) wins.
- otherwise one core stays with the training process and the rest, up to 8, decode: 8 workers deliver about
  8 x 7,500 images/s at 112 px, above what one accelerator trains on. More would only cost memory.
"""

from __future__ import annotations

import os

MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one; else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_workers(cores: int) -> int:
    """The ``auto`` rule for ``cores`` cores per training process (see the module docstring)."""
    return 0 if cores <= 2 else min(MAX_AUTO_WORKERS, cores - 1)


def resolve_workers(value, cores: int | None = None) -> int:
    """``data.workers`` -> a worker count. ``"auto"``: :func:`auto_workers` of ``cores`` (default: the available
    cores divided among the node's ``LOCAL_WORLD_SIZE`` processes). An integer >= 0 (or its digits as a string)
    is used as is. Anything else is a ``ValueError`` that says what is accepted."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        if cores is None:
            try:
                local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            except ValueError:
                local = 1
            cores = max(1, available_cores() // local)
        return auto_workers(cores)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"data.workers must be 'auto' or an integer >= 0 (DataLoader worker processes; 0 = load in "
                     f"the training process), got {value!r}")
