"""Few-shot training subsets as seeded, reproducible index files (LAFS paper, Sun et al. CVPR 2024, §4.1, Table 3).

The few-shot protocol trains on x% of the identities with k images each (e.g. 1% / 10% / 100% of the
identities at k = 1, 5, 10 or all); the unsupervised LAFS pretraining uses one image per identity with the
labels dropped. A subset is stored as a sorted int64 array of dataset positions (``.npy``) plus a JSON
sidecar describing it, so that every run on "10%, 5-shot, seed 0" trains on exactly the same images.

Identities are drawn uniformly at random from the seed. Taking the first x% of the identities in record
order, as the reference code does, is biased: record order usually follows the source (name, crawl order,
image count), so the first x% are not a random sample of the dataset.

Sampling, both from ``np.random.default_rng`` streams spawned from ``SeedSequence(seed)``:

- identities: a random permutation of all identities, cut to the first ``round(fraction * K)`` -- so for a
  fixed seed a smaller fraction's identities are a subset of a larger fraction's;
- images: one uniform random key per dataset image, and each identity keeps its ``k`` smallest keys (a
  uniform sample without replacement) -- so an identity's images do not depend on which other identities
  or which fraction were chosen, and for a fixed seed the k-shot images are a subset of the (k+1)-shot ones.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..io import atomic_write, atomic_write_bytes

__all__ = ["SubsetReport", "fewshot_index", "holdout_identities", "load_index", "save_index", "unlabelled_index"]


@dataclass
class SubsetReport:
    """What a subset contains; ``shots=None`` means all images of each selected identity."""

    fraction: float
    shots: Optional[int]
    seed: int
    identities_total: int
    identities_selected: int
    images: int
    shots_histogram: dict[int, int]  # images taken -> number of identities with that many
    short_identities: int  # selected identities with fewer than ``shots`` images (only with allow_fewer)

    def summary(self) -> str:
        k = "all" if self.shots is None else str(self.shots)
        hist = ", ".join(f"{s}:{n}" for s, n in sorted(self.shots_histogram.items()))
        short = f", {self.short_identities} identities short of {k}" if self.short_identities else ""
        return (
            f"{self.fraction:.4g} of identities ({self.identities_selected}/{self.identities_total}), "
            f"k={k}, seed={self.seed}: {self.images} images; images per identity {{{hist}}}{short}"
        )


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of identity labels, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels is empty: no images to choose from")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (identity ids), got dtype {labels.dtype}")
    return labels


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    fraction = float(fraction)
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1] (a fraction of identities, not a percentage), got {fraction}")
    return fraction


def _check_shots(shots) -> Optional[int]:
    if shots is None:
        return None
    if isinstance(shots, bool) or not isinstance(shots, numbers.Integral) or shots < 1:
        raise ValueError(f"shots must be a positive integer or None (all images), got {shots!r}")
    return int(shots)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def holdout_identities(labels, count: int, seed: int = 0) -> np.ndarray:
    """``count`` identities drawn at random (seeded, independent of :func:`fewshot_index`'s streams): a
    validation split of the training identities, for choosing hyper-parameters off the test set."""
    ids = np.unique(_check_labels(labels))
    if not 0 < count < ids.size:
        raise ValueError(f"holdout: need 0 < count < {ids.size} identities, got {count}")
    rng = np.random.default_rng(np.random.SeedSequence(_check_seed(seed), spawn_key=(1,)))
    return np.sort(rng.choice(ids, count, replace=False))


def fewshot_index(
    labels, fraction: float, shots: Optional[int], seed: int = 0, allow_fewer: bool = False, exclude=None
) -> tuple[np.ndarray, SubsetReport]:
    """Positions of a few-shot subset: ``fraction`` of the identities, ``shots`` random images each.

    ``labels[i]`` is the identity of dataset position ``i``. ``exclude``: identities never selected (a
    :func:`holdout_identities` split); the rest are the K identities. Selects ``max(1, round(fraction * K))`` of the
    K identities (Python's ``round``: halves go to the even integer) and ``shots`` images of each, or all
    of them for ``shots=None``. An identity with fewer than ``shots`` images is a ValueError naming it,
    unless ``allow_fewer``, where all its images are taken and it is counted in ``short_identities``.

    Returns the sorted int64 positions and a :class:`SubsetReport`. Same inputs and seed, same output.
    """
    labels = _check_labels(labels)
    fraction = _check_fraction(fraction)
    shots = _check_shots(shots)
    seed = _check_seed(seed)

    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)  # numpy 2.0.x returned it in the input's shape; keep it flat either way
    allowed = np.ones(ids.size, bool) if exclude is None else ~np.isin(ids, np.asarray(exclude))
    n_ids = int(allowed.sum())
    if n_ids == 0:
        raise ValueError(f"every one of the {ids.size} identities is excluded")
    n_sel = min(n_ids, max(1, round(fraction * n_ids)))

    # Two independent streams, so that the image choice does not shift when the identity choice changes.
    id_rng, img_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    selected = np.zeros(ids.size, dtype=bool)
    selected[np.flatnonzero(allowed)[id_rng.permutation(n_ids)[:n_sel]]] = True

    if shots is not None:
        short = selected & (counts < shots)
        if short.any() and not allow_fewer:
            first = int(np.flatnonzero(short)[0])
            raise ValueError(
                f"identity {ids[first].item()} has {counts[first]} images, fewer than shots={shots}"
                f" ({int(short.sum())} of the {n_sel} selected identities are short of {shots});"
                " pass --allow-fewer (lafs data subset; allow_fewer=True from Python) to take all images of such"
                " identities"
            )
        n_short = int(short.sum())
    else:
        n_short = 0

    keep = selected[inverse]
    if shots is not None:
        keys = img_rng.random(labels.size)
        order = np.lexsort((keys, inverse))  # by identity, then by random key
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty(labels.size, dtype=np.int64)
        rank[order] = np.arange(labels.size) - starts[inverse[order]]
        keep &= rank < shots
    positions = np.flatnonzero(keep).astype(np.int64)

    taken = counts[selected] if shots is None else np.minimum(counts[selected], shots)
    values, freq = np.unique(taken, return_counts=True)
    report = SubsetReport(
        fraction=fraction,
        shots=shots,
        seed=seed,
        identities_total=int(n_ids),
        identities_selected=int(n_sel),
        images=int(positions.size),
        shots_histogram={int(v): int(f) for v, f in zip(values, freq)},
        short_identities=n_short,
    )
    return positions, report


def unlabelled_index(labels, seed: int = 0, fraction: float = 1.0, exclude=None) -> tuple[np.ndarray, SubsetReport]:
    """The "unlabelled" LAFS pretraining set: one random image of each of ``fraction`` of the identities.

    The labels are still needed here, to pick one image per identity; the consumer must drop them (train
    with a self-supervised loss only), otherwise this is just a 1-shot labelled subset. Equivalent to
    ``fewshot_index(labels, fraction, shots=1, seed=seed)``; every identity has at least one image.
    """
    return fewshot_index(labels, fraction, shots=1, seed=seed, exclude=exclude)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_index(path, positions, report: Optional[SubsetReport] = None) -> Path:
    """Write ``positions`` to ``path`` (``.npy``, int64) and ``report`` to ``path.with_suffix('.json')``.

    Both files are written atomically. With ``report=None`` a stale sidecar from an earlier save is removed,
    so a loaded index never comes with another subset's report. Returns ``path``.
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"index path must end in .npy, got {path}")
    pos = np.asarray(positions)
    if pos.ndim != 1 or pos.dtype == np.bool_ or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"positions must be a 1-D integer array, got {pos.dtype} {pos.shape}")
    if pos.size and pos.min() < 0:
        raise ValueError(f"positions must be non-negative dataset positions, got minimum {pos.min()}")
    pos = pos.astype(np.int64)
    if report is not None:
        if not isinstance(report, SubsetReport):
            raise ValueError(f"report must be a SubsetReport or None, got {type(report).__name__}")
        if report.images != pos.size:
            raise ValueError(f"report says {report.images} images but positions has {pos.size}: mismatched pair")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, pos, allow_pickle=False))
    side = _sidecar(path)
    if report is not None:
        text = json.dumps(asdict(report), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(side, text.encode())
    elif side.exists():
        side.unlink()
    return path


def load_index(path) -> tuple[np.ndarray, Optional[dict[str, Any]]]:
    """Read an index written by :func:`save_index`: ``(int64 positions, report dict or None)``.

    The report dict is ``asdict(SubsetReport)`` again (histogram keys back to ints). A file that is not a
    1-D array of non-negative integers, or a sidecar that is unreadable or disagrees with it, is a
    ValueError naming the file.
    """
    path = Path(path)
    try:
        pos = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy index ({e})") from None
    if not isinstance(pos, np.ndarray):
        raise ValueError(f"{path}: expected a single .npy array, got {type(pos).__name__}")
    if pos.ndim != 1 or pos.dtype == np.bool_ or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D integer array of positions, got {pos.dtype} {pos.shape}")
    if pos.size and pos.min() < 0:
        raise ValueError(f"{path}: negative position {pos.min()}")
    pos = pos.astype(np.int64)

    side = _sidecar(path)
    if not side.exists():
        return pos, None
    try:
        report = json.loads(side.read_text())
        report["shots_histogram"] = {int(k): int(v) for k, v in report["shots_histogram"].items()}
        images = int(report["images"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{side}: not a valid subset report ({type(e).__name__}: {e})") from None
    if images != pos.size:
        raise ValueError(f"{side}: report says {images} images but {path} holds {pos.size}")
    return pos, report
