"""Data-path throughput per core: what one training step pays per image for decode + augmentation.

Where the work runs in ``lafs train`` (measured here as it runs there):

- **DataLoader workers** (or the training process itself with ``data.workers=0``) read each record, decode its JPEG
  and return an RGB C x H x W uint8 tensor (``FaceDataset.__getitem__``); ``collate`` stacks the batch. No
  augmentation happens per item.
- **The training device** then runs, batched, inside ``SupervisedTask.forward``: ``to_model_input`` (uint8 ->
  float [-1, 1], resized to the model's ``img_size``), ``SupervisedAugment`` of the ``augment.preset`` and Mixup.
  On a GPU that costs the CPU nothing; on a CPU device it is part of the step, so it is measured on one thread.

Printed, one process and one thread (``cv2.setNumThreads(1)``, ``torch.set_num_threads(1)``), for
``celeba64_train.rec`` (64 px) and ``celeba200.rec`` (112 px) from ``../shared/data/train`` (a synthetic 112 px
``.rec`` when the shared data is absent, or ``--rec``):

1. **loader, per item**: read + decode + RGB CHW tensor + collate, over ``--images`` records in shuffled order,
   side by side with the data path before issue 18 (``cv2.cvtColor`` then a CHW copy: two passes, now one).
2. **step input on a CPU device**: ``to_model_input`` + the preset's augmentation + Mixup on a batch of 128
   decoded faces, per preset (``--presets``) and model input size (``--img-sizes``: ``native`` = the faces' own).
3. **decode + augment per core** = 1 / (loader + step input per image), against the goal of 1,500 images/s.
4. **DataLoader** with ``--workers`` (default: ``data.workers=auto`` resolved on this machine), total images/s.
5. **Synthetic generation**: images/s of ``lafs.data.synthetic.SyntheticFaces.render`` (one process).

Arms that are compared run interleaved, median of ``--repeats``. Everything printed is measured in this run.
Run: ``python benchmarks/bench_data.py [--images 4000] [--repeats 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from lafs.augment.supervised import MIXUP_PRESETS, Mixup, SupervisedAugment
from lafs.data.datasets import FaceDataset, RecordDataset, encode_image, to_model_input
from lafs.data.recordio import write_face_records
from lafs.data.workers import available_cores, resolve_workers

SHARED_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"
SHARED_RECS = ("celeba64_train.rec", "celeba200.rec")
GOAL = 1500.0
BATCH = 128
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def collate(items: list[dict]) -> dict:
    """``lafs.data.sampler.collate`` (images and labels; keypoints stacked when every item has them)."""
    try:
        from lafs.data.sampler import collate as train_collate
    except ImportError:  # the trainer is not importable: the same stacks
        batch = {"image": torch.stack([it["image"] for it in items]),
                 "label": torch.tensor([it["label"] for it in items], dtype=torch.long)}
        if all("keypoints" in it for it in items):
            batch["keypoints"] = torch.stack([it["keypoints"] for it in items])
        return batch
    return train_collate(items)


class PreviousPath(RecordDataset):
    """The item path before issue 18: ``decode_image`` (imdecode + cv2.cvtColor BGR->RGB), then a CHW copy."""

    _load_chw = FaceDataset._load_chw


def cpu_info() -> dict:
    model, flags = "", set()
    try:  # Linux; elsewhere the flags read as absent
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}, "cores_available": available_cores(),
            "cpu_count": os.cpu_count()}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cv2": cv2.__version__,
           "numpy": np.__version__}
    try:
        import kornia

        out["kornia"] = kornia.__version__
    except ImportError:
        pass
    return out


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


def loader_pass(ds, positions: np.ndarray) -> float:
    """Seconds per image: every position through ``__getitem__``, collated in batches of 128."""
    t = time.perf_counter()
    for start in range(0, len(positions), BATCH):
        collate([ds[int(i)] for i in positions[start : start + BATCH]])
    return (time.perf_counter() - t) / len(positions)


def summary(seconds_per_image: list[float]) -> dict:
    """Best (the per-core capacity: on a shared machine the slower passes measure the neighbours) and median."""
    best, median = min(seconds_per_image), float(np.median(seconds_per_image))
    return {"us_per_image": best * 1e6, "images_per_s_per_core": 1 / best, "median_us_per_image": median * 1e6,
            "median_images_per_s_per_core": 1 / median}


def bench_loader(rec: Path, images: int, repeats: int) -> dict:
    arms = {"current": RecordDataset(rec), "before": PreviousPath(rec)}
    n = len(arms["current"])
    positions = np.random.default_rng(0).permutation(n)[: min(images, n)]
    for ds in arms.values():  # warm-up: page cache of every timed record, file handles, first calls
        loader_pass(ds, positions)
    same = all(torch.equal(arms["current"][int(i)]["image"], arms["before"][int(i)]["image"])
               for i in positions[:200])
    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(repeats):  # interleaved, alternating order (ABBA), so that both arms see the same machine load
        for name in list(arms)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(loader_pass(arms[name], positions))
    now, before = summary(times["current"]), summary(times["before"])
    return {"rec": str(rec), "images_in_rec": n, "images_timed": len(positions),
            "size": list(arms["current"][0]["image"].shape[1:]), **now, "before": before,
            "speedup": before["us_per_image"] / now["us_per_image"], "identical_to_before": bool(same)}


def load_augment_module(rev: str):
    """``lafs.augment.supervised`` as of git revision ``rev`` (for a side-by-side "before" arm)."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/lafs/augment/supervised.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "supervised_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lafs.augment._supervised_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # relative imports resolve inside lafs.augment
    return module


def bench_step_input(rec: Path, presets: list[str], sizes: list[int], repeats: int, before=None) -> list[dict]:
    """Per image: to_model_input + the preset's batched augmentation + Mixup, batch 128, one CPU thread.
    With ``before`` (a module like ``lafs.augment.supervised``), its pipeline runs interleaved as a second arm."""
    ds = RecordDataset(rec)
    batch = collate([ds[i % len(ds)] for i in range(BATCH)])["image"]
    labels = torch.arange(BATCH)
    impls = {"current": SupervisedAugment, **({"before": before.SupervisedAugment} if before else {})}
    cases = []
    for size in sizes:
        for preset in presets:
            alpha, prob = MIXUP_PRESETS[preset]
            mixup = Mixup(alpha, prob) if prob > 0 else None
            augs = {k: None if preset == "none" else cls.preset(preset) for k, cls in impls.items()}
            cases.append({"img_size": size, "preset": preset, "augs": augs, "mixup": mixup,
                          "times": {k: [] for k in impls}})

    def run(case, impl):
        x = to_model_input(batch, case["img_size"])
        if case["augs"][impl] is not None:
            x = case["augs"][impl](x)
        if case["mixup"] is not None:
            x = case["mixup"](x, labels)[0]
        return x

    for case in cases:  # warm-up, and the outputs of both arms from the same random draws
        outs = []
        for impl in impls:
            torch.manual_seed(0)
            outs.append(run(case, impl))
        case["identical_to_before"] = bool(torch.equal(outs[0], outs[-1])) if before else None
    for r in range(repeats):
        for case in cases:
            for impl in list(impls)[:: 1 if r % 2 == 0 else -1]:
                torch.manual_seed(r)
                t = time.perf_counter()
                run(case, impl)
                case["times"][impl].append((time.perf_counter() - t) / BATCH)
    out = []
    for case in cases:
        row = {"img_size": case["img_size"], "preset": case["preset"], **summary(case["times"]["current"])}
        if before:
            row["before"] = summary(case["times"]["before"])
            row["speedup"] = row["before"]["us_per_image"] / row["us_per_image"]
            row["identical_to_before"] = case["identical_to_before"]
        out.append(row)
    return out


def bench_dataloader(rec: Path, workers: int, images: int) -> dict:
    ds = RecordDataset(rec)
    subset = Subset(ds, np.random.default_rng(1).permutation(len(ds))[: min(images, len(ds))].tolist())
    loader = DataLoader(subset, batch_size=BATCH, shuffle=True, num_workers=workers, collate_fn=collate)
    t = time.perf_counter()
    count = sum(len(b["label"]) for b in loader)
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


def met(rate: float) -> str:
    return "MET" if rate >= GOAL else "NOT met"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rec", type=Path, action="append",
                    help="a .rec to read (repeatable; default: the shared celeba64_train and celeba200, else synthetic)")
    ap.add_argument("--images", type=int, default=4000, help="records timed per .rec (shuffled order)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", default="none,flip,webface4m,ms1mv3", help="augment.preset values to time")
    ap.add_argument("--img-sizes", default="native,112", help="model input sizes; native = the faces' own size")
    ap.add_argument("--workers", default="auto", help="DataLoader workers for part 4 (data.workers syntax)")
    ap.add_argument("--augment-before", metavar="GIT_REV",
                    help="also time lafs.augment.supervised as of this git revision, interleaved (e.g. HEAD)")
    ap.add_argument("--synthetic", type=int, default=1000, help="synthetic images to time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    workers = resolve_workers(args.workers)
    before = load_augment_module(args.augment_before) if args.augment_before else None

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    cpu, vers = cpu_info(), versions()
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items())
    print(f"versions: {', '.join(f'{k} {v}' for k, v in vers.items())}")
    print(f"CPU: {cpu['model']}; flags: {flags}; {cpu['cores_available']} cores available "
          f"(os.cpu_count {cpu['cpu_count']}) -> data.workers auto = {resolve_workers('auto')}")
    print(f"per core = one process, one thread (cv2 {cv2.getNumThreads()}, torch {torch.get_num_threads()}); "
          f"best of {args.repeats} interleaved passes (median in brackets: other processes on a shared machine slow "
          f"some passes); goal >= {GOAL:,.0f} images/s per core\n")

    results: dict = {"versions": vers, "cpu": cpu, "goal_images_per_s_per_core": GOAL, "recs": []}
    with tempfile.TemporaryDirectory() as tmp:
        recs = args.rec or [SHARED_TRAIN / r for r in SHARED_RECS if (SHARED_TRAIN / r).is_file()]
        if not recs:
            print(f"(shared data not found under {SHARED_TRAIN}: a synthetic 112 px .rec)")
            recs = [synthetic_rec(Path(tmp))]
        for rec in recs:
            load = bench_loader(rec, args.images, args.repeats)
            native = load["size"][0]
            sizes = sorted({native if s.strip() == "native" else int(s) for s in args.img_sizes.split(",")})
            steps = bench_step_input(rec, presets, sizes, args.repeats, before)
            h, w = load["size"]
            b = load["before"]
            print(f"{Path(rec).name}: {h} x {w} px, {load['images_timed']:,} of {load['images_in_rec']:,} images")
            print(f"  loader per item (read + decode + RGB CHW + collate): {load['images_per_s_per_core']:7,.0f} "
                  f"images/s per core ({load['us_per_image']:6.1f} us) [median {load['median_images_per_s_per_core']:,.0f}]"
                  f"; goal: {met(load['images_per_s_per_core'])}")
            print(f"    before (cvtColor + CHW copy):                      {b['images_per_s_per_core']:7,.0f} "
                  f"images/s per core ({b['us_per_image']:6.1f} us) [median {b['median_images_per_s_per_core']:,.0f}]"
                  f"; now {load['speedup']:.2f}x, items identical: {load['identical_to_before']}")
            print("  step input on a CPU device (to_model_input + augmentation + Mixup, batch 128); "
                  "decode + augment = loader + step input, per core:")
            for st in steps:
                total = 1e6 / (load["us_per_image"] + st["us_per_image"])
                st["decode_plus_augment_images_per_s_per_core"] = total
                st["goal_met"] = total >= GOAL
                line = (f"    {st['img_size']:>3} px {st['preset']:<10} {st['us_per_image']:7.1f} us/image "
                        f"[median {st['median_us_per_image']:7.1f}] -> decode + augment {total:6,.0f} images/s "
                        f"per core: {met(total)}")
                if "before" in st:
                    line += (f"  | {args.augment_before}: {st['before']['us_per_image']:7.1f} us/image, now "
                             f"{st['speedup']:.2f}x, identical: {st['identical_to_before']}")
                print(line)
            print()
            results["recs"].append({"loader": load, "step_input": steps})
        loader = bench_dataloader(recs[-1], workers, args.images)
        print(f"DataLoader over {Path(recs[-1]).name}, {workers} workers (batch 128): "
              f"{loader['images_per_s']:8,.0f} images/s in total")
        results["dataloader"] = loader
    synth = bench_synthetic(args.synthetic)
    if synth is None:
        print("synthetic generation: lafs.data.synthetic not available")
    else:
        print(f"synthetic generation, 1 process: {synth['images_per_s']:7,.0f} images/s ({synth['images']} images)")
    results["synthetic"] = synth
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
