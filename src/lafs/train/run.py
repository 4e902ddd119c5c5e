"""``lafs train`` / ``finetune`` / ``pretrain``: config -> data, task, trainer; the process set-up around the loop."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import checkpoints_in
from ..config import ConfigError
from ..io import atomic_write_bytes
from ..models import build_backbone
from .distributed import DistEnv, barrier, broadcast_object, setup, teardown
from .loop import Trainer, TrainResult
from .pretrained import load_pretrained, require_match, require_same_rescale
from .run_folder import RunFolderError, check_fresh, clean_temporaries, lock_run_folder, unlock_run_folder
from .supervised import SupervisedTask, build_augment, build_classifier


def model_uses_keypoints(cfg) -> bool:
    """Whether the configured backbone takes keypoints (KP-RPE), from its resolved options, without building it."""
    from ..models.registry import get_backbone

    kw = get_backbone(cfg.model.name).kwargs(cfg.model.size, **cfg.model.overrides())
    return kw.get("rpe") == "kprpe" and kw.get("keypoint_source", "data") == "data"


def synthetic_faces(d):
    """The ``data`` section's synthetic population: training identities then held-out ones, at its nuisance strength
    (``data.nuisance``, ``data.synthetic``)."""
    from ..data.synthetic import SyntheticConfig, SyntheticFaces

    return SyntheticFaces(d.num_identities + d.val_identities, seed=d.seed,
                          config=SyntheticConfig.scaled(d.nuisance, **dict(d.synthetic)))


def build_train_set(cfg):
    """The ``data`` section -> a face dataset (items: uint8 image, label, and keypoints when the model uses them:
    records then need their ``<stem>_kps.npy`` sidecar)."""
    from ..data.datasets import ArrayFaceDataset, ConcatFaceDataset, ImageFolderDataset, RecordDataset

    d = cfg.data
    needs_kps = model_uses_keypoints(cfg)
    positions = None
    if d.index:
        from ..data.fewshot import load_index

        positions, _ = load_index(d.index)
    if d.source == "synthetic":
        faces = synthetic_faces(d)
        ids = np.repeat(np.arange(d.num_identities), d.images_per_identity)
        idx = np.tile(np.arange(d.images_per_identity), d.num_identities)
        if positions is not None:
            # render only the indexed images (a few-shot subset of 128 out of 8,192): an image is a function of
            # (seed, identity, image index) alone, so they are the full set's images at those positions
            _check_positions(positions, len(ids), d.index)
            ids, idx = ids[positions], idx[positions]
        images, kps = faces.batch(ids.tolist(), idx.tolist())
        dataset = ArrayFaceDataset(images, ids, kps, name=f"synthetic({d.num_identities}x{d.images_per_identity})")
        if positions is not None:
            return _indexed(dataset, np.arange(len(ids)), d.num_identities)
    else:
        if not d.train:
            raise ConfigError(f"data.source={d.source} needs data.train (a list of {'.rec files' if d.source == 'records' else 'image folders'})")
        parts = []
        for path in d.train:
            if not Path(path).exists():
                raise ConfigError(f"data.train: {path} not found")
            if d.source == "records":
                kps: str | bool = False
                if needs_kps:
                    kps = str(Path(path).with_name(Path(path).stem + "_kps.npy"))
                    if not Path(kps).is_file():
                        raise ConfigError(f"model {cfg.model.name} uses keypoints (KP-RPE) but {path} has no "
                                          f"keypoint sidecar {kps} ((images, 5, 2) pixels, row i = image i)")
                parts.append(RecordDataset(path, color=d.color, keypoints=kps, max_bad_records=d.max_bad_records))
            else:
                if needs_kps:
                    raise ConfigError(f"model {cfg.model.name} uses keypoints (KP-RPE): image folders carry none; "
                                      "pack them with `lafs data pack --keypoints` first")
                parts.append(ImageFolderDataset(path, max_bad_records=d.max_bad_records))
        dataset = parts[0] if len(parts) == 1 else ConcatFaceDataset(parts)
    if positions is not None:
        _check_positions(positions, len(dataset), d.index)
        return _indexed(dataset, positions, dataset.num_identities)
    return dataset


def _check_positions(positions: np.ndarray, size: int, index: str) -> None:
    if len(positions) and (positions.max() >= size or positions.min() < 0):
        raise ConfigError(f"data.index {index}: positions outside the dataset's 0..{size - 1}")


def _indexed(dataset, positions: np.ndarray, num_classes: int):
    """The images of ``dataset`` at ``positions``, labels unchanged: the head keeps a class for each of the full set's
    ``num_classes`` identities, and ``present_identities`` says how many of them the index holds (for the run log: a
    few-shot subset of 64 identities out of 128 is not "128 identities")."""
    from torch.utils.data import Subset

    present = int(np.unique(dataset.labels[positions]).size)
    subset = Subset(dataset, positions.tolist())
    subset.num_identities, subset.present_identities = num_classes, present
    return subset


def build_val_sets(cfg, log=print) -> dict:
    """name -> (uint8 images N x 3 x H x W, issame, keypoints or None): the ``.bin`` files (keypoints from their
    ``<stem>_kps.npy`` sidecar when the model uses them), or held-out synthetic identities. With ``data.geometry``
    each set is first brought to the training geometry (``lafs.data.align.to_geometry``)."""
    from ..data.pairs import load_bin, load_set_keypoints, sidecar_keypoints

    d = cfg.data
    sets = {}
    needs_kps = model_uses_keypoints(cfg)
    for path in d.val:
        if not Path(path).is_file():
            raise ConfigError(f"data.val: {path} not found")
        images, issame = load_bin(path, color=d.val_color)
        has_kps = needs_kps or (d.geometry is not None and sidecar_keypoints(path).is_file())
        kps = load_set_keypoints(path, None, len(images)) if has_kps else None
        if d.geometry is not None:
            from ..data.align import to_geometry
            from ..geometry import get_geometry

            images, kps, note = to_geometry(images, get_geometry(d.geometry), kps, name=Path(path).stem)
            log(note)
        sets[Path(path).stem] = (images, issame, kps if needs_kps else None)
    if d.source == "synthetic" and not d.val and d.val_pairs > 0 and d.val_identities >= 2:
        from ..data.synthetic import synthetic_pairs

        faces = synthetic_faces(d)
        held_out = range(d.num_identities, d.num_identities + d.val_identities)
        images, issame, kps = synthetic_pairs(faces, d.val_pairs, seed=d.seed, identities=held_out)
        sets["synthetic_val"] = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), issame, kps)
    return sets


def build_task(cfg, num_classes: int, env: DistEnv, log=print) -> SupervisedTask:
    backbone = build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides())
    ft = cfg.finetune
    arch = f"{cfg.model.name}-{cfg.model.size}"
    if ft.init:
        if hasattr(backbone, "landmark_cnn"):
            require_same_rescale(ft.init, cfg.model.landmark_rescale, "finetune.init")
        log(require_match(load_pretrained(backbone, ft.init), arch, "finetune.init").summary())
    if ft.landmark_init:
        if not hasattr(backbone, "landmark_cnn"):
            raise ConfigError("finetune.landmark_init needs model.name=part_fvit")
        require_same_rescale(ft.landmark_init, cfg.model.landmark_rescale, "finetune.landmark_init")
        report = load_pretrained(backbone, ft.landmark_init, only_prefix="landmark_cnn.")
        log(require_match(report, arch, "finetune.landmark_init").summary())
    head = build_classifier(cfg, backbone.embedding_size, num_classes, env.rank, env.world_size)
    augment, mixup = build_augment(cfg)
    if mixup is not None and not head.supports_mixup:
        raise ConfigError(f"mixup with {type(head).__name__} (head.partial_fc) is not supported: set "
                          "augment.mixup_prob=0 or head.partial_fc=false")
    # the landmark options are finetuning options (LAFS, Sun et al., CVPR 2024, §3.5); from scratch, the stage-1
    # recipe (Part fViT, Sun & Tzimiropoulos, BMVC 2022, §3), the CNN learns from the identity loss alone
    finetuning = bool(ft.init or ft.landmark_init)
    option = ft.landmark if finetuning and hasattr(backbone, "landmark_cnn") else "b"
    task = SupervisedTask(backbone, head, augment, mixup, option, (list(ft.beta_schedule), list(ft.beta_epochs)),
                          beta_fractions=ft.beta_fractions)
    task.freeze_reference()
    return task


def _take_folder(out: Path, resume: str | None, is_main: bool) -> Path | None:
    """The main process locks the run folder, refuses a fresh run over another's checkpoints and removes a killed
    run's temporary files (``run_folder.py``); every rank learns the outcome, so all stop together. Returns the lock."""
    lock, refused = None, None
    if is_main:
        try:
            lock = lock_run_folder(out)
            check_fresh(out, resume)
            for p in clean_temporaries(out):
                print(f"removed {p}: the temporary file of an interrupted write")
        except RunFolderError as err:
            refused = str(err)
    refused = broadcast_object(refused)
    if refused is not None:
        if lock is not None:
            unlock_run_folder(lock)
        raise RunFolderError(refused)
    return lock


def train(cfg, resume: str | None = None, progress: bool = True, resume_anyway: bool = False) -> TrainResult:
    """Run (or resume) the run described by ``cfg``: supervised training / finetuning, or self-supervised
    pretraining (DINO / LAFS, labels unused) when ``ssl.method`` is set. ``resume``: a checkpoint or ``auto`` (the run
    folder's latest); ``resume_anyway``: resume although the checkpoint's run was configured otherwise (implies
    ``auto`` when ``resume`` is not given)."""
    if not cfg.train.dist_timeout_minutes > 0:
        raise ConfigError(f"train.dist_timeout_minutes must be > 0, got {cfg.train.dist_timeout_minutes}")
    if resume_anyway and not resume:
        resume = "auto"
    env = setup(cfg.train.device, cfg.train.dist_timeout_minutes)
    lock = trainer = task = None
    try:
        lock = _take_folder(Path(cfg.out_dir), resume, env.is_main)
        # identical initial weights on every rank (DDP also broadcasts them); then per-rank random streams
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        train_set = build_train_set(cfg)
        num_classes = int(train_set.num_identities)
        log = print if env.is_main else (lambda *_: None)
        pretraining = cfg.ssl.method != "none"
        if pretraining:
            from .pretrain import build_pretrain_task

            task = build_pretrain_task(cfg, log)
        else:
            task = build_task(cfg, num_classes, env, log)
            # a fresh run only: a resumed one reads its centres from the checkpoint (a fresh run refuses a folder
            # holding checkpoints, so with --resume auto an empty folder is the only fresh case)
            fresh = not resume or (resume == "auto" and not checkpoints_in(Path(cfg.out_dir) / "checkpoints"))
            if cfg.finetune.head_init == "imprint" and fresh:
                from .imprint import imprint_head

                n = imprint_head(task.to(env.device), train_set, cfg.train.batch_size, env.device)
                log(f"finetune.head_init=imprint: {n} of {num_classes} class centres set to their mean embedding")
        val_sets = build_val_sets(cfg, log) if env.is_main else {}
        torch.manual_seed(cfg.train.seed + env.rank)
        trainer = Trainer(cfg, task, train_set, env, val_sets, progress=progress and env.is_main)
        what = f"{cfg.ssl.method} pretraining" if pretraining else "training"
        present = getattr(train_set, "present_identities", num_classes)
        data = (f"{len(train_set)} images (labels unused)" if pretraining else f"{len(train_set)} images of {present} "
                "identities" + (f" (the head has the full set's {num_classes} classes)" if present != num_classes else ""))
        steps = (f"steps for {cfg.train.budget_minutes:g} min" if cfg.train.budget_minutes is not None
                 else f"{trainer.total_steps} steps")
        log(f"{what} {cfg.model.name}-{cfg.model.size} on {data}; "
            f"{steps} of {cfg.train.batch_size} x {env.world_size} x {cfg.train.accumulation} images "
            f"({trainer.steps_per_epoch} steps/epoch) on {env.device}, precision "
            f"{'fp32' if trainer.amp == 'none' else trainer.amp}{' (train.amp=auto)' if cfg.train.amp == 'auto' else ''}"
            f"{', compiled' if cfg.train.compile else ''}")
        result = trainer.run(resume, anyway=resume_anyway)
        if env.is_main:
            summary = {"step": result.step, "final_loss": result.losses[-1] if result.losses else None,
                       "val": result.val, "floors": trainer.floors, "best": result.best, "nonfinite_steps": result.nonfinite_steps,
                       "skipped_steps": len(result.nonfinite_steps), "skipped_records": len(result.bad_records),
                       "max_bad_records": cfg.data.max_bad_records, "bad_records": result.bad_records,
                       "resumed_from": result.resumed_from, "precision": trainer.amp, "compiled": cfg.train.compile}
            atomic_write_bytes(Path(cfg.out_dir) / "summary.json", json.dumps(summary, indent=2).encode())
        barrier()  # no rank leaves (and tears its process group down) while another still talks to it
        return result
    finally:
        if lock is not None:
            unlock_run_folder(lock)
        # DistributedDataParallel holds the process group: drop it before destroy_process_group, so gloo's threads
        # are joined here and not during interpreter shutdown (a rare SIGABRT, "terminate called without an
        # active exception", seen in CI)
        del trainer, task
        gc.collect()
        teardown()
