"""Data-path throughput: JPEG decode + light augmentation from a ``.rec`` per core, and synthetic generation.

1. **Decode + light augmentation, per core**: one process, one thread (``cv2.setNumThreads(1)``,
   ``torch.set_num_threads(1)``), reading every image of a ``.rec`` through ``RecordDataset`` (random access
   via the ``.idx``, JPEG decode, BGR->RGB), then a random horizontal flip and a random 104-112 px crop
   resized back to 112 (cv2), returned as a uint8 CHW tensor. Goal: >= 1,500 images/s per core.
   The ``.rec`` is ``../shared/data/train/celeba200.rec`` when present (MXNet-written, real 112x112 faces),
   else a synthetic one written to a temporary folder.
2. **DataLoader**: the same dataset through ``torch.utils.data.DataLoader`` with ``--workers`` processes
   (fork-safe lazy file handles), batch 128: total images/s.
3. **Synthetic generation**: images/s of ``lafs.data.synthetic.SyntheticFaces.render`` (one process).

Everything printed is measured in this run. Run: ``python benchmarks/bench_data.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lafs.data.datasets import RecordDataset, encode_image
from lafs.data.recordio import write_face_records

SHARED_REC = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "celeba200.rec"


class LightAug(Dataset):
    """RecordDataset + random flip + random resized crop back to the input size (uint8 throughout)."""

    def __init__(self, base: RecordDataset, seed: int = 0) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        rng = np.random.default_rng((self.seed, i))
        img = item["image"].numpy().transpose(1, 2, 0)
        h, w = img.shape[:2]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        s = int(rng.integers(int(0.93 * h), h + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        img = cv2.resize(np.ascontiguousarray(img[y : y + s, x : x + s]), (w, h), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(img.transpose(2, 0, 1).copy()), item["label"]


def synthetic_rec(folder: Path, identities: int = 100, per_id: int = 20) -> Path:
    try:
        from lafs.data.synthetic import generate

        samples = [(label, encode_image(img)) for img, label, _ in generate(identities, per_id, seed=0)]
    except ImportError:  # before the synthetic generator exists: noise images
        rng = np.random.default_rng(0)
        samples = [(i // per_id, encode_image(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)))
                   for i in range(identities * per_id)]
    rec = folder / "synthetic.rec"
    write_face_records(rec, samples)
    return rec


def bench_single_core(rec: Path, repeats: int) -> dict:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    ds = LightAug(RecordDataset(rec))
    n = len(ds)
    for i in range(min(n, 200)):  # warm-up (page cache, lazy handle)
        ds[i]
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(n):
            ds[i]
        rates.append(n / (time.perf_counter() - t))
    return {"images": n, "images_per_s_per_core": float(np.median(rates)), "best": float(max(rates))}


def bench_loader(rec: Path, workers: int) -> dict:
    ds = LightAug(RecordDataset(rec))
    loader = DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers, persistent_workers=False)
    t = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return {"workers": workers, "images": count, "images_per_s": count / (time.perf_counter() - t)}


def bench_synthetic(count: int) -> dict | None:
    try:
        from lafs.data.synthetic import SyntheticFaces
    except ImportError:
        return None
    faces = SyntheticFaces(num_identities=1000, seed=0)
    faces.render(0, 0)
    t = time.perf_counter()
    for i in range(count):
        faces.render(i % 1000, i // 1000)
    return {"images": count, "images_per_s": count / (time.perf_counter() - t)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rec", type=Path, help="a .rec to read (default: shared celeba200.rec or a synthetic one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--synthetic", type=int, default=1000, help="synthetic images to time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        rec = args.rec or (SHARED_REC if SHARED_REC.is_file() else synthetic_rec(Path(tmp)))
        print(f"torch {torch.__version__}, cv2 {cv2.__version__}; .rec: {rec}")
        single = bench_single_core(rec, args.repeats)
        print(f"decode + light aug, 1 core : {single['images_per_s_per_core']:8.0f} images/s "
              f"(median of {args.repeats} passes over {single['images']} images; best {single['best']:.0f}); "
              f"goal >= 1,500: {'MET' if single['images_per_s_per_core'] >= 1500 else 'NOT met'}")
        loader = bench_loader(rec, args.workers)
        print(f"DataLoader, {loader['workers']} workers  : {loader['images_per_s']:8.0f} images/s (batch 128)")
    synth = bench_synthetic(args.synthetic)
    if synth is None:
        print("synthetic generation       : lafs.data.synthetic not available")
    else:
        print(f"synthetic generation, 1 proc: {synth['images_per_s']:7.0f} images/s ({synth['images']} images)")
    if args.json:
        args.json.write_text(json.dumps({"decode": single, "loader": loader, "synthetic": synth}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
