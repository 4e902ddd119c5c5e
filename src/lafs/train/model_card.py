"""A model card written next to the checkpoints of every run (``checkpoints/MODEL_CARD.md``).

What a user needs before trusting a model file: what it is (backbone, size, parameters, embedding size, input),
what it saw (training data, labels, steps, augmentation, loss), how it scored (the latest validation, with the
threshold ``lafs verify`` uses) and how to make it again (the command and the config next to it). Rewritten at
every checkpoint, so it always describes the newest one; ``best.pt`` is named when it exists.
"""

from __future__ import annotations

import platform
import shlex
import sys
import time

import torch

from ..config import SELECT_LAST


FLOOR_LABELS = (("raw_pixels", "raw pixels"), ("pca_whitened", "PCA-whitened pixels"),
                ("untrained", "untrained network"), ("start", "at the start of finetuning"))


def _input(cfg) -> str:
    """What the model expects to be given, in the geometry it was trained in (``data.geometry``)."""
    size = f"resized to the model's {cfg.model.img_size} px" if cfg.model.img_size else "resized to the model size"
    if cfg.data.geometry is None:
        return f"RGB aligned faces, {size}, pixels x / 127.5 - 1."
    from ..geometry import get_geometry

    g = get_geometry(cfg.data.geometry)
    pts = ", ".join(f"({x:g}, {y:g})" for x, y in g.points)
    return (f"RGB faces in the `{g.name}` geometry: the five points at {pts} of a {g.size} x {g.size} crop, {size}, "
            "pixels x / 127.5 - 1. `lafs eval` brings each verification set to it (one similarity per set).")


def _skipped(skipped: dict) -> str:
    """What the run left out: bad training records (``data.max_bad_records``) and steps the step guard undid."""
    steps, records = skipped.get("steps") or [], skipped.get("records") or []
    text = (f"{len(records)} bad training record(s) (data.max_bad_records={skipped.get('max_bad_records')})"
            + (": " + "; ".join(f"`{r}`" for r in records[:3]) + (f" (+{len(records) - 3} more, in summary.json)"
                                                                   if len(records) > 3 else "") if records else ""))
    text += (f"; {len(steps)} step(s) skipped and undone for a non-finite loss or update"
             + (f" (steps {steps[:10]}{' ...' if len(steps) > 10 else ''})" if steps else "") + ".")
    return text


def model_card(cfg, *, step: int, total_steps: int, params: int, embedding_size: int | None, val: dict,
               best: float | None, checkpoint: str, has_best: bool, monitors: dict | None = None,
               floors: dict | None = None, skipped: dict | None = None) -> str:
    m, d = cfg.model, cfg.data
    data = (f"synthetic faces ({d.num_identities} identities x {d.images_per_identity})" if d.source == "synthetic"
            else ", ".join(str(p) for p in d.train))
    if d.index:
        data += f", subset {d.index}"
    task = (f"self-supervised {cfg.ssl.method} pretraining (labels unused)" if cfg.ssl.method != "none"
            else f"supervised, {cfg.head.name} head" + (", finetuned from " + str(cfg.finetune.init)
                                                         if cfg.finetune.init else ""))
    from .. import __version__

    lines = [
        f"# Model card: {m.name}-{m.size}",
        "",
        f"- **Checkpoint**: `{checkpoint}` (step {step} of {total_steps})"
        + ("; `best.pt` is the best validation so far" if has_best else ""),
        f"- **Model**: `{m.name}` size `{m.size}`, {params:,} parameters"
        + (f", {embedding_size}-d embedding" if embedding_size else "")
        + f". Input: {_input(cfg)}",
        f"- **Training**: {task}; data: {data}; augmentation `{cfg.augment.preset}`; optimiser `{cfg.optim.name}` "
        f"lr {cfg.optim.lr}, batch {cfg.train.batch_size} x accumulation {cfg.train.accumulation}.",
    ]
    sets = (val or {}).get("sets") or {}
    if sets:
        lines.append(f"- **Validation** (step {val.get('step')}, 10-fold, flip test):")
        for name, r in sets.items():
            thr = f"; cosine threshold {r['cosine_threshold']:.4f}" if "cosine_threshold" in r else ""
            f = (floors or {}).get(name)
            low = ("; floors: " + ", ".join(f"{label} {100 * f[k]:.2f} %" for k, label in FLOOR_LABELS if k in f)
                   if f else "")
            lines.append(f"  - {name}: accuracy {100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} %, "
                         f"AUC {r['auc']:.4f}{thr}{low}")
            if r.get("coarse_grid"):  # the reference threshold grid understates these embeddings (lafs.eval.metrics)
                lines.append(f"    - **the threshold grid is too coarse for these distances**: the exact threshold is "
                             f"right on {100 * r['exact_best_accuracy']:.2f} % of the pairs; score the checkpoint "
                             "with `lafs eval --thresholds exact`")
        if best is not None:
            chosen = cfg.train.select_on or next(iter(sets))
            if chosen == SELECT_LAST:
                lines.append("  - `best.pt` is the last validated step (`train.select_on: last`: no model selection)")
            else:
                lines.append(f"  - best {chosen} accuracy so far (chooses `best.pt`): {100 * best:.2f} %")
    else:
        lines.append("- **Validation**: none yet (set `data.val` or synthetic `data.val_pairs`).")
    drift = {k[: -len("_drift")]: v for k, v in (monitors or {}).items() if k.endswith("_drift")}
    if drift:
        lines.append(f"- **Drift from initialisation** (step {monitors.get('step')}, ||theta - theta_0|| / "
                     "||theta_0||): " + ", ".join(f"{k} {v:.4f}" for k, v in drift.items()))
    if skipped is not None:
        lines.append(f"- **Skipped**: {_skipped(skipped)}")
    lines += [
        f"- **Reproduce**: `{shlex.join(sys.argv)}` with `config.yaml` of the run folder.",
        f"- **Software**: lafs {__version__}, torch {torch.__version__}, Python {platform.python_version()}; "
        f"written {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "- **Use**: `lafs eval`, `lafs embed`, `lafs verify`, `lafs export` take the checkpoint file directly.",
        "",
    ]
    return "\n".join(lines)
