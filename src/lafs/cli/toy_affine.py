"""The KP-RPE paper's toy experiment (Kim et al., CVPR 2024, Fig. 1 and §3.2): digits -> affine-transformed digits.

The paper trains a shallow ViT on MNIST and tests it on affNIST (unseen affine transforms of MNIST digits): a learned
absolute position embedding drops from 98.1 % to 77.27 %, and KP-RPE, whose attention bias depends on the offsets
between tokens and "five keypoints from the four corners and the center of the minimum cover box of a foreground
image" (§3.2), generalises best (Fig. 1). This module is the same experiment at laptop scale, with
scikit-learn's shipped 8 x 8 digits (:func:`sklearn.datasets.load_digits`, 1,797 images) instead of MNIST, so it
needs no download. Everything the paper leaves unspecified (its supplementary holds the toy's settings) is our
choice, stated here:

Data
    - Canvas: each 8 x 8 digit (values 0..16, scaled to [0, 1]) is upsampled 3x with bilinear interpolation
      (``cv2.resize``, ``INTER_LINEAR``) to 24 x 24 and pasted into the centre (rows/cols 8..31) of a 40 x 40 black
      canvas, as affNIST's 40 x 40 (``CANVAS``, ``DIGIT_SIZE``). Model input: ``2 * canvas - 1`` in [-1, 1], 1 channel.
    - Keypoints (§3.2's five, not Fig. 1's four): the box covering the foreground pixels, the pixels whose value
      exceeds ``FOREGROUND = 0.25`` (of the maximum 1.0) in the upsampled canvas. Coordinates are (x, y) pixels
      with integer values at pixel centres (the convention of ``cv2.warpAffine`` and of the project's keypoints), so
      the box corners are the centres of the extreme foreground pixels. Order: top-left, top-right, centre,
      bottom-left, bottom-right (the layout of the ArcFace 5-point face template: eyes, nose, mouth corners).
    - Split: a fixed, seeded, per-class stratified split, ``TEST_FRACTION = 0.3`` of each class held out
      (1,258 train / 539 test digits). The split depends on ``seed`` only.
    - Train: the untransformed training digits, with one augmentation only: a random integer translation of up to
      +-``JITTER = 3`` px in x and y per sample and step (the keypoints move with it; ``jitter`` / ``--jitter``,
      0..7). Without it the training boxes barely move (load_digits' digits are size-normalised: every box is
      23 px tall and vertically centred), the keypoints carry almost no information and KP-RPE has nothing to
      learn from; MNIST digits, centred by their centre of mass, also have boxes that move a little.
    - Test, clean: the held-out digits, centred, untransformed.
    - Test, affine: ``AFFINE_COPIES = 3`` random affine transforms of every held-out digit (1,617 images, one fixed
      seeded draw): rotation uniform in +-20 deg, x and y scale each uniform in [0.8, 1.2], horizontal shear
      x += s y with s uniform in +-0.25, about the box centre, then a uniform random translation among those that
      keep the transformed box (one pixel wider on each side, for the bilinear fringe) inside the canvas.
      The ranges are in the spirit of affNIST (rotations of up to about 20 deg, scales near 0.8-1.2, translation
      anywhere the digit fits); the KP-RPE paper gives no generator parameters. The image is warped with
      ``cv2.warpAffine`` (bilinear, black border) and the five keypoints are mapped by the same 2 x 3 matrix (the
      centre stays the centre of the transformed box; the corners become a parallelogram); they are not
      recomputed from the warped image.

Models (``lafs.models.fvit.FViT``, identical except for the position encoding)
    - 40 x 40 x 1 input, ``PATCH = 5`` (an 8 x 8 grid, 64 tokens), dim 64, depth 2, 4 heads of 16, MLP 128, GELU,
      head-dim attention scale, PyTorch's default Linear init, position embedding truncated normal (std 0.02), no
      dropout / DropPath, a CLS token that is not used:
      ``pool="mean"`` over the grid tokens (the KP-RPE paper's ViT has no CLS token), then LayerNorm and a linear
      10-class classifier on ``embedding``. The learned absolute position embedding is in every arm.
    - Arms: ``abs`` (``rpe="none"``), ``rpe`` (iRPE bias mode on k: one learned scalar per relative-position
      bucket), ``irpe`` (contextual iRPE on q, k, v, heads shared) and ``kprpe`` (KP-RPE, multi-head relative
      f(P), 5 keypoints; ``forward(..., keypoints=)``). All use the iRPE product buckets, ratio 1.9 (49 buckets).
    - Same initialisation for the shared parameters: every arm seeds ``torch.manual_seed(seed)`` before building
      the backbone; the iRPE tables and KP-RPE's W_L are zero-initialised and W_L is created last, so they draw no
      random numbers before the shared ones. The classifier is drawn from ``seed + 1``. Every arm sees the same
      batches and jitters (one ``torch.Generator`` from ``seed`` per arm).
    - Training: cross-entropy, AdamW (lr 2e-3, weight decay 0.05, betas 0.9/0.999), linear warm-up for the first
      5 % of the steps then cosine decay to 0, batch 32, ``DEFAULT_STEPS = 1000`` steps (~25 epochs), fp32, one
      torch thread (``threads``; see :func:`run_toy_affine`). ``quick=True`` (tests): 40 steps, batch 32, depth 1,
      128 held-out digits, 1 affine copy; it checks the plumbing, its accuracies are near chance.

Not reproduced: the paper's Keypoints* and Abs-PE* bars (keypoints drawn onto the image) and its numbers; only
the ranking and the clean/affine gap are comparable. Accuracy is measured once per arm and seed (no repeats): with
539 and 1,617 test images one image is 0.19 % and 0.06 %, but another ``--seed`` (split, affine draws, init,
batches) moves an arm's affine accuracy by a few points: compare arms over several seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.fvit import FViT

CANVAS = 40
DIGIT_SIZE = 24
FOREGROUND = 0.25
TEST_FRACTION = 0.3
JITTER = 3
AFFINE_COPIES = 3
ROTATION_DEG = 20.0
SCALE_RANGE = (0.8, 1.2)
SHEAR = 0.25
PATCH = 5
DEFAULT_STEPS = 1000
DEFAULT_BATCH = 32
DEFAULT_THREADS = 1
KEYPOINT_NAMES = ("top_left", "top_right", "centre", "bottom_left", "bottom_right")

ARMS: dict[str, dict[str, Any]] = {
    "abs": dict(rpe="none"),
    "rpe": dict(rpe="irpe", rpe_mode="bias", rpe_on="k"),
    "irpe": dict(rpe="irpe", rpe_mode="ctx", rpe_on="qkv"),
    "kprpe": dict(rpe="kprpe", kprpe_variant="multihead", num_keypoints=5),
}
ARM_LABELS = {"abs": "Abs-PE", "rpe": "Abs-PE + RPE (bias)", "irpe": "Abs-PE + iRPE (ctx)", "kprpe": "Abs-PE + KP-RPE"}
MODEL_OPTIONS: dict[str, Any] = dict(
    dim=64, depth=2, heads=4, dim_head=16, mlp_dim=128, dropout=0.0, emb_dropout=0.0, drop_path=0.0,
    attn_scale="head_dim", pool="mean", token_init="trunc_normal", weight_init="torch", mlp_act="gelu",
    rpe_ratio=1.9,
)
OPTIM = dict(lr=2e-3, weight_decay=0.05, betas=(0.9, 0.999), warmup_fraction=0.05)


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # optional extra
        raise ImportError('the toy affine experiment needs scikit-learn: pip install "lafs-face[toy]"') from e
    return load_digits()


# ----------------------------------------------------------------------------------------------------------- data
def digit_canvas(digit: np.ndarray, canvas: int = CANVAS, digit_size: int = DIGIT_SIZE) -> np.ndarray:
    """One 8 x 8 digit (0..16) -> ``canvas`` x ``canvas`` float32 in [0, 1], bilinear upsampled to ``digit_size``,
    centred."""
    d = np.asarray(digit, np.float32).reshape(8, 8) / 16.0
    up = cv2.resize(d, (digit_size, digit_size), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((canvas, canvas), np.float32)
    o = (canvas - digit_size) // 2
    out[o:o + digit_size, o:o + digit_size] = np.clip(up, 0.0, 1.0)
    return out


def box_keypoints(image: np.ndarray, threshold: float = FOREGROUND) -> np.ndarray:
    """The 5 keypoints (5 x 2, (x, y) pixels, float32) of the box covering the pixels > ``threshold``, in the order
    top-left, top-right, centre, bottom-left, bottom-right; the corners are the centres of the extreme pixels."""
    ys, xs = np.nonzero(np.asarray(image) > threshold)
    if len(xs) == 0:
        raise ValueError(f"no pixel above the foreground threshold {threshold}")
    x0, x1, y0, y1 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([[x0, y0], [x1, y0], [cx, cy], [x0, y1], [x1, y1]], np.float32)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2 x 3 affine ``matrix`` (cv2 convention, ``dst = M @ [x, y, 1]``) to (..., 2) points."""
    m = np.asarray(matrix, np.float64)
    p = np.asarray(points, np.float64)
    return (p @ m[:, :2].T + m[:, 2]).astype(np.float32)


def random_affine(rng: np.random.Generator, keypoints: np.ndarray, canvas: int = CANVAS,
                  rotation_deg: float = ROTATION_DEG, scale_range: tuple[float, float] = SCALE_RANGE,
                  shear: float = SHEAR, margin: float = 1.0) -> np.ndarray:
    """A random 2 x 3 affine about the box centre (rotation . shear . scale), translated uniformly among the shifts
    that keep the box (``keypoints``, widened by ``margin`` px) inside the canvas."""
    x0, y0 = keypoints[0] - margin
    x1, y1 = keypoints[4] + margin
    c = keypoints[2].astype(np.float64)
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], np.float64) - c
    for _ in range(100):
        a = math.radians(rng.uniform(-rotation_deg, rotation_deg))
        sx, sy = rng.uniform(*scale_range, size=2)
        sh = rng.uniform(-shear, shear)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        lin = rot @ np.array([[1.0, sh], [0.0, 1.0]]) @ np.diag([sx, sy])
        moved = corners @ lin.T + c
        lo = -moved.min(0)  # shifts t with moved + t inside [0, canvas - 1]
        hi = (canvas - 1) - moved.max(0)
        if np.all(lo <= hi):
            t = rng.uniform(lo, hi)
            return np.concatenate([lin, (c - lin @ c + t)[:, None]], axis=1).astype(np.float32)
    raise ValueError("could not fit the transformed digit inside the canvas")


def warp(image: np.ndarray, matrix: np.ndarray, canvas: int = CANVAS) -> np.ndarray:
    """``cv2.warpAffine`` of a canvas: bilinear, black border."""
    return cv2.warpAffine(np.asarray(image, np.float32), np.asarray(matrix, np.float32), (canvas, canvas),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Stratified, seeded split: ``round(test_fraction * n_c)`` images of every class c held out. Sorted indices."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[: int(round(test_fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


@lru_cache(maxsize=1)
def _digit_canvases() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    digits = _sklearn_digits()
    images = np.stack([digit_canvas(d) for d in digits.images])
    keypoints = np.stack([box_keypoints(im) for im in images])
    return images, digits.target.astype(np.int64), keypoints


def load_digit_canvases() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1,797 digits: canvases (N x 40 x 40 float32 in [0, 1]), labels (N,), keypoints (N x 5 x 2); copies of
    a per-process cache."""
    return tuple(a.copy() for a in _digit_canvases())


def make_toy_data(seed: int = 0, affine_copies: int = AFFINE_COPIES, max_test: int | None = None) -> dict[str, Any]:
    """Train (centred), test clean (centred) and test affine (``affine_copies`` transforms per test digit) arrays.

    ``max_test`` keeps the first that many held-out digits (quick runs)."""
    images, labels, keypoints = load_digit_canvases()
    train_idx, test_idx = split_indices(labels, TEST_FRACTION, seed)
    if max_test is not None:
        test_idx = test_idx[:max_test]
    rng = np.random.default_rng([seed, 1])
    aff_img, aff_kp, aff_lab, mats = [], [], [], []
    for _ in range(affine_copies):
        for i in test_idx:
            m = random_affine(rng, keypoints[i])
            aff_img.append(warp(images[i], m))
            aff_kp.append(transform_points(keypoints[i], m))
            aff_lab.append(labels[i])
            mats.append(m)
    return {
        "train": (images[train_idx], labels[train_idx], keypoints[train_idx]),
        "test": (images[test_idx], labels[test_idx], keypoints[test_idx]),
        "affine": (np.stack(aff_img), np.asarray(aff_lab), np.stack(aff_kp)),
        "affine_matrices": np.stack(mats),
        "train_idx": train_idx,
        "test_idx": test_idx,
    }


def jitter_batch(images: Tensor, keypoints: Tensor, max_shift: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Shift every image by a random integer (dx, dy) in [-max_shift, max_shift] (zero fill); keypoints follow."""
    if max_shift <= 0:
        return images, keypoints
    b, h, w = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator)
    padded = F.pad(images, (max_shift,) * 4)
    m = max_shift
    out = torch.stack([padded[i, m - dy:m - dy + h, m - dx:m - dx + w] for i, (dx, dy) in enumerate(shifts.tolist())])
    return out, keypoints + shifts[:, None, :].to(keypoints.dtype)


# --------------------------------------------------------------------------------------------------------- models
class ToyClassifier(nn.Module):
    """FViT backbone + linear 10-way classifier on its ``embedding``."""

    def __init__(self, arm: str, seed: int, patch_size: int = PATCH, **options: Any) -> None:
        super().__init__()
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
        torch.manual_seed(seed)
        self.backbone = FViT(img_size=CANVAS, patch_size=patch_size, in_chans=1, **{**MODEL_OPTIONS, **options},
                             **ARMS[arm])
        torch.manual_seed(seed + 1)
        self.classifier = nn.Linear(self.backbone.embedding_size, 10)

    def forward(self, images: Tensor, keypoints: Tensor) -> Tensor:
        x = images[:, None] * 2.0 - 1.0
        kp = keypoints if self.backbone.uses_keypoints else None
        return self.classifier(self.backbone(x, keypoints=kp)["embedding"])


def _lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    warm = max(1, int(round(warmup_fraction * steps)))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@torch.no_grad()
def accuracy(model: ToyClassifier, images: np.ndarray, labels: np.ndarray, keypoints: np.ndarray,
             device: str = "cpu", batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(images[s:s + batch_size]).to(device)
        k = torch.from_numpy(keypoints[s:s + batch_size]).to(device)
        pred = model(x, k).argmax(1).cpu().numpy()
        correct += int((pred == labels[s:s + batch_size]).sum())
    return correct / max(1, len(images))


def train_arm(arm: str, data: dict[str, Any], steps: int, batch_size: int, seed: int, device: str = "cpu",
              model_options: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
              jitter: int = JITTER) -> dict[str, Any]:
    """Train one arm from scratch and measure it; returns accuracies, params, loss and seconds."""
    model = ToyClassifier(arm, seed, **(model_options or {})).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"],
                            betas=OPTIM["betas"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, OPTIM["warmup_fraction"]))
    images, labels, keypoints = (torch.from_numpy(a) for a in data["train"])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 2)  # dropout / DropPath, when enabled
    n = len(images)
    perm, pos = torch.randperm(n, generator=gen), 0
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x, k = jitter_batch(images[idx], keypoints[idx], jitter, gen)
        loss = F.cross_entropy(model(x.to(device), k.to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None and (step + 1) % max(1, steps // 4) == 0:
            progress(f"[{arm}] step {step + 1}/{steps} loss {np.mean(losses[-max(1, steps // 4):]):.4f}")
    train_s = time.perf_counter() - t0
    clean = accuracy(model, *data["test"], device=device)
    affine = accuracy(model, *data["affine"], device=device)
    train_acc = accuracy(model, *data["train"], device=device)
    params = sum(p.numel() for p in model.parameters())
    if progress is not None:
        progress(f"[{arm}] clean {100 * clean:.2f}%  affine {100 * affine:.2f}%  ({train_s:.1f} s)")
    return {
        "label": ARM_LABELS[arm],
        "options": ARMS[arm],
        "clean_acc": clean,
        "affine_acc": affine,
        "train_acc": train_acc,
        "final_loss": float(np.mean(losses[-max(1, steps // 10):])) if losses else float("nan"),
        "params": int(params),
        "params_backbone": int(sum(p.numel() for p in model.backbone.parameters())),
        "train_seconds": train_s,
    }


QUICK = dict(steps=40, batch_size=32, depth=1, max_test=128, affine_copies=1)


@contextmanager
def _torch_threads(n: int | None):
    """Run with ``n`` intra-op threads (None: leave as is), restoring the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_toy_affine(steps: int | None = None, batch_size: int | None = None, seed: int = 0,
                   arms: Sequence[str] = tuple(ARMS), quick: bool = False, device: str = "cpu",
                   progress: Callable[[str], None] | None = None, threads: int | None = DEFAULT_THREADS,
                   jitter: int = JITTER) -> dict[str, Any]:
    """Train every arm on the untransformed digits; accuracy on clean and on affine-transformed held-out digits.

    Returns ``{"settings": {...}, "arms": {arm: {"clean_acc", "affine_acc", "params", "train_seconds", ...}}}``
    (accuracies are fractions in [0, 1]). ``quick``: seconds-long smoke run (``QUICK``: 40 steps, depth 1, 128 test
    digits, one affine copy). ``threads``: torch intra-op threads during the run (default 1: these models are too
    small to gain from more, and on a busy 2-core machine 2 threads measured 10-20x slower per step; None keeps
    the process setting). ``jitter``: the training translation jitter, +- px."""
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ValueError(f"unknown or no arm(s) {', '.join(bad)}; arms: {', '.join(ARMS)}")
    if not 0 <= jitter <= (CANVAS - DIGIT_SIZE) // 2 - 1:
        raise ValueError(f"jitter must be in 0..{(CANVAS - DIGIT_SIZE) // 2 - 1} px (the digit must stay inside)")
    steps = steps if steps is not None else (QUICK["steps"] if quick else DEFAULT_STEPS)
    batch_size = batch_size if batch_size is not None else (QUICK["batch_size"] if quick else DEFAULT_BATCH)
    model_options = {"depth": QUICK["depth"]} if quick else {}
    copies = QUICK["affine_copies"] if quick else AFFINE_COPIES
    with _torch_threads(threads):
        t0 = time.perf_counter()
        data = make_toy_data(seed, affine_copies=copies, max_test=QUICK["max_test"] if quick else None)
        data_s = time.perf_counter() - t0
        results = {arm: train_arm(arm, data, steps, batch_size, seed, device, model_options, progress, jitter)
                   for arm in arms}
        used_threads = torch.get_num_threads()
    settings = {
        "steps": steps, "batch_size": batch_size, "seed": seed, "quick": quick, "device": device,
        "torch_threads": used_threads,
        "dataset": "sklearn.datasets.load_digits (8x8, 1797 images)",
        "canvas": CANVAS, "digit_size": DIGIT_SIZE, "foreground_threshold": FOREGROUND,
        "keypoints": list(KEYPOINT_NAMES), "test_fraction": TEST_FRACTION,
        "n_train": len(data["train"][1]), "n_test": len(data["test"][1]), "n_affine": len(data["affine"][1]),
        "train_jitter_px": jitter, "affine_copies": copies,
        "affine": {"rotation_deg": ROTATION_DEG, "scale": list(SCALE_RANGE), "shear": SHEAR,
                   "translation": "uniform, transformed box inside the canvas (1 px margin)"},
        "model": {"backbone": "lafs.models.fvit.FViT", "img_size": CANVAS, "patch_size": PATCH, "in_chans": 1,
                  **MODEL_OPTIONS, **model_options, "classifier": "Linear(embedding, 10)"},
        "optimizer": {"name": "AdamW", **{k: list(v) if isinstance(v, tuple) else v for k, v in OPTIM.items()},
                      "schedule": "linear warm-up then cosine to 0"},
        "data_seconds": data_s,
    }
    return {"settings": settings, "arms": results}


# ------------------------------------------------------------------------------------------------------- reporting
def format_table(result: dict[str, Any]) -> str:
    """Markdown table: arm, params, clean acc %, affine acc %, seconds."""
    s = result["settings"]
    lines = [f"Digits -> affine digits (KP-RPE Fig. 1 toy): {s['n_train']} train, {s['n_test']} clean test, "
             f"{s['n_affine']} affine test images; {s['steps']} steps x batch {s['batch_size']}, seed {s['seed']}",
             "",
             "| arm | position encoding | params | clean acc % | affine acc % | train s |",
             "|---|---|---:|---:|---:|---:|"]
    for arm, r in result["arms"].items():
        lines.append(f"| {arm} | {r['label']} | {r['params']:,} | {100 * r['clean_acc']:.2f} | "
                     f"{100 * r['affine_acc']:.2f} | {r['train_seconds']:.1f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """Grouped bar chart (clean vs affine accuracy per arm) as a PNG; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arms = list(result["arms"])
    clean = [100 * result["arms"][a]["clean_acc"] for a in arms]
    affine = [100 * result["arms"][a]["affine_acc"] for a in arms]
    x = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(6, 4))
    for off, vals, name in ((-0.2, clean, "clean test digits"), (0.2, affine, "affine-transformed test digits")):
        bars = ax.bar(x + off, vals, 0.4, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [result["arms"][a]["label"] for a in arms], fontsize=7)
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 118)
    s = result["settings"]
    ax.set_title(f"digits -> affine digits, {s['steps']} steps, seed {s['seed']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


TOY_DESCRIPTION = ("KP-RPE Fig. 1 toy: train a shallow ViT on digits, test on affine-transformed held-out digits "
                   "(Abs-PE, RPE, iRPE, KP-RPE)")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``lafs toy-affine`` (shared by :func:`main` and the CLI)."""
    p.add_argument("--steps", type=int, default=None, help=f"training steps per arm (default {DEFAULT_STEPS})")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default {DEFAULT_BATCH})")
    p.add_argument("--seed", type=int, default=0, help="split, affine draws, init and batches (default 0)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", help="folder for toy_affine.json and toy_affine.png")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    p.add_argument("--jitter", type=int, default=JITTER,
                   help=f"training translation jitter, +- px (default {JITTER}; the box must stay inside: <= 7)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch intra-op threads (default {DEFAULT_THREADS}; 0: leave torch's setting)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from ..io import atomic_write_bytes

    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_toy_affine(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                            arms=tuple(a for a in args.arms.split(",") if a), quick=args.quick, device=args.device,
                            progress=progress, threads=args.threads or None,
                            jitter=args.jitter)
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        atomic_write_bytes(out / "toy_affine.json", (json.dumps(result, indent=2) + "\n").encode())
        png = plot(result, out / "toy_affine.png")
        print(f"wrote {out / 'toy_affine.json'}" + (f" and {png}" if png else " (no matplotlib: no plot)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lafs toy-affine", description=TOY_DESCRIPTION)
    return run_from_args(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
