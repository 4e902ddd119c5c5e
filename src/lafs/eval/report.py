"""``lafs eval``: verification sets -> embeddings (cached) -> metrics -> table, JSON and ROC plot.

Works from an embedding function (any model, see ``lafs.embedder``) or from precomputed embeddings (one row per
image of a ``.bin``, in its order), so models of other frameworks are scored by the same code. Embeddings are
cached under a key made of the model file's content hash, the set file's hash and the test options, so
re-scoring (another threshold grid, another metric) is instant and a changed model or set is never served stale.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..data.pairs import load_bin, load_set_keypoints, sidecar_keypoints
from ..io import atomic_write_bytes, file_hash
from ..io_safe import load_array
from .embedding import embed_images
from .metrics import pair_distances, ten_fold_accuracy


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def set_embeddings(embed_fn, bin_path: str | Path, model_hash: str, *, color: str = "rgb", batch_size: int = 256,
                   device="cpu", flip: bool = True, flip_mode: str = "sum", cache_dir: str | Path | None = None,
                   keypoints_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(embeddings N x D, issame, from_cache) of a ``.bin`` set; cached when ``cache_dir`` is given. A keypoint model
    (``uses_keypoints``) gets the set's keypoints (``keypoints_path`` or the ``<stem>_kps.npy`` sidecar)."""
    bin_path = Path(bin_path)
    cache = None
    if cache_dir is not None:
        parts = [model_hash, file_hash(bin_path), color, str(flip), flip_mode]
        if getattr(embed_fn, "precision", "fp32") != "fp32":  # bf16 embeddings are other numbers
            parts.append(embed_fn.precision)
        if getattr(embed_fn, "geometry", None) is not None:  # the set is warped first: other pixels
            parts.append(f"geometry={embed_fn.geometry}")
        if getattr(embed_fn, "uses_keypoints", False):
            kp = Path(keypoints_path) if keypoints_path else sidecar_keypoints(bin_path)
            parts.append(file_hash(kp) if kp.is_file() else "no keypoints")
        key = _digest(*parts)
        cache = Path(cache_dir) / f"{bin_path.stem}-{key}.npz"
        if cache.is_file():
            z = load_array(cache, "an embedding cache (.npz of embeddings, issame)")
            return z["embeddings"], z["issame"], True
    images, issame = load_bin(bin_path, color=color)
    kps = load_set_keypoints(bin_path, keypoints_path, len(images)) if getattr(embed_fn, "uses_keypoints", False) \
        else None
    images, kps = set_in_geometry(images, kps, bin_path, getattr(embed_fn, "geometry", None), keypoints_path)
    emb = embed_images(embed_fn, images, batch_size=batch_size, device=device, flip=flip, flip_mode=flip_mode,
                       keypoints=kps).numpy()
    if cache is not None:
        buf = io.BytesIO()
        np.savez(buf, embeddings=emb, issame=issame)
        atomic_write_bytes(cache, buf.getvalue())
    return emb, issame, False


def set_in_geometry(images: torch.Tensor, kps, bin_path: str | Path, geometry: str | None,
                    keypoints_path: str | Path | None = None, log=print):
    """A verification set brought to a model's training geometry (``lafs.data.align.to_geometry``): one
    similarity from the set's mean keypoints (``keypoints_path`` or the sidecar; else the ArcFace template)."""
    if geometry is None:
        return images, kps
    from ..data.align import to_geometry
    from ..geometry import get_geometry

    if kps is None and (keypoints_path or sidecar_keypoints(bin_path).is_file()):
        moved_kps = load_set_keypoints(bin_path, keypoints_path, len(images))
        images, _, note = to_geometry(images, get_geometry(geometry), moved_kps, name=Path(bin_path).stem)
    else:
        images, kps, note = to_geometry(images, get_geometry(geometry), kps, name=Path(bin_path).stem)
    log(note)
    return images, kps


def score_pairs(embeddings: np.ndarray, issame, name: str, thresholds=None) -> dict:
    """Pair k = rows 2k, 2k+1: the 10-fold protocol plus threshold-free metrics, with the distances for plotting."""
    issame = np.asarray(issame, bool).ravel()
    if len(embeddings) != 2 * len(issame):
        raise ValueError(f"{name}: {len(embeddings)} embeddings for {len(issame)} pairs (expected {2 * len(issame)}, "
                         "one row per image of the .bin, in its order)")
    r = ten_fold_accuracy(embeddings[0::2], embeddings[1::2], issame, thresholds=thresholds)
    r["name"], r["pairs"] = name, len(issame)
    r["_dist"] = pair_distances(embeddings[0::2], embeddings[1::2])
    r["_issame"] = issame
    return r


FLOOR_LABELS = {"raw_pixels": "raw pixels", "pca_whitened": "PCA-whitened", "untrained": "untrained net"}


def format_table(results: list[dict], floors: dict[str, dict] | None = None) -> str:
    """One row per set; with ``floors`` (``{set name: floor_accuracies(...)}``) its floors as indented rows below it,
    so no accuracy is read without them."""
    header = ("set", "pairs", "accuracy %", "+-", "AUC", "EER %", "TAR@FAR=1e-3 %", "threshold")
    rows = []

    def row(name: str, pairs, r: dict) -> tuple:
        tar = r.get("tar_at_far", {}).get(1e-3)
        return (name, str(pairs), f"{100 * r['accuracy']:.2f}", f"{100 * r['accuracy_std']:.2f}",
                f"{r['auc']:.4f}", f"{100 * r['eer']:.2f}" if "eer" in r else "-",
                f"{100 * tar:.2f}" if tar is not None else "-", f"{r['threshold']:.3f}")

    for r in results:
        rows.append(row(r["name"], r["pairs"], r))
        for key, label in FLOOR_LABELS.items():
            if key in (floors or {}).get(r["name"], {}):
                rows.append(row(f"  floor: {label}", r["pairs"], floors[r["name"]][key]))
    widths = [max(len(x[i]) for x in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


def write_report(results: list[dict], out_dir: str | Path, meta: dict, floors: dict | None = None) -> list[Path]:
    """``eval.json`` (metrics + how they were made, + the ``floors`` block of ``floors_report`` when given) and, with
    matplotlib, ``roc.png`` (TAR vs FAR, log FAR) and, for affine-sensitivity results (``points``),
    ``sensitivity.png``."""
    out = Path(out_dir)
    doc = {"meta": meta, "results": _jsonable(results)}
    if floors is not None:
        doc["floors"] = floors_json(floors)
    written = [atomic_write_bytes(out / "eval.json", json.dumps(doc, indent=2).encode())]
    from ..viz import roc_png, sensitivity_png

    curves = [(f"{r['name']} ({100 * r['accuracy']:.2f} %)", r["_dist"], r["_issame"]) for r in results if "_dist" in r]
    png = roc_png(curves, str(meta.get("model", ""))) if curves else None
    if png is not None:
        written.append(atomic_write_bytes(out / "roc.png", png))
    sens = [(r["name"], r) for r in results if "points" in r]
    png = sensitivity_png(sens, str(meta.get("model", ""))) if sens else None
    if png is not None:
        written.append(atomic_write_bytes(out / "sensitivity.png", png))
    return written


def sensitivity_report(embed_fn, bin_path: str | Path, keypoints_path=None, *, steps=6, interpolation="similarity",
                       border: str = "constant", color: str = "rgb", batch_size: int = 256, device="cpu", flip: bool = True,
                       flip_mode: str = "sum", thresholds=None) -> dict:
    """``robustness.affine_sensitivity`` on a ``.bin`` of detector crops and its keypoints; named for the report.

    A model trained in another face geometry than ArcFace's (``embed_fn.geometry``, e.g. celeba64) sees the curve in
    its own: the crops are first brought to it as the sets are (:func:`set_in_geometry`: one similarity from their
    mean keypoints, per-image misalignment kept), so t = 0 is the set's own evaluation, and t = 1 aligns every face
    onto that geometry's template, not ArcFace's, which the model never saw."""
    from ..geometry import get_geometry
    from .robustness import affine_sensitivity

    images, issame = load_bin(bin_path, color=color)
    kps = load_set_keypoints(bin_path, keypoints_path, len(images))
    geometry, points = getattr(embed_fn, "geometry", None), None
    if geometry is not None:
        images, kps = set_in_geometry(images, kps, bin_path, geometry, keypoints_path)
        points = get_geometry(geometry).at_size(int(images.shape[-1])).array()
    r = affine_sensitivity(embed_fn, images, issame, kps, steps, interpolation=interpolation, border=border,
                           batch_size=batch_size, device=device, flip=flip, flip_mode=flip_mode,
                           thresholds=thresholds, template_points=points)
    r["name"] = Path(bin_path).stem
    return r


def _folder_images(root: Path, what: str, labelled: bool) -> tuple[torch.Tensor, np.ndarray]:
    from ..data.datasets import IMAGE_EXTENSIONS, decode_image

    if labelled:
        files = sorted(p for d in sorted(root.iterdir()) if d.is_dir() for p in d.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{root}: no images ({what}: " + ("root/identity/image.jpg)" if labelled else "images)"))
    out = None
    for i, f in enumerate(files):
        img = decode_image(f.read_bytes(), "rgb", source=str(f))
        if out is None:
            out = np.empty((len(files), 3, img.shape[0], img.shape[1]), np.uint8)
        if img.shape[:2] != out.shape[2:]:
            raise ValueError(f"{f}: {img.shape[1]}x{img.shape[0]}, but {files[0]} is {out.shape[3]}x{out.shape[2]}: "
                             f"the {what} images must share one size (aligned crops)")
        out[i] = img.transpose(2, 0, 1)
    return torch.from_numpy(out), np.array([f.parent.name for f in files])


def identification_report(embed_fn, root: str | Path, *, ks=(1, 5, 20), batch_size: int = 256, device="cpu",
                          flip: bool = True, flip_mode: str = "sum") -> dict:
    """Rank-k identification from an image folder: ``root/probe/<identity>/*``, ``root/gallery/<identity>/*`` and an
    optional ``root/distractors/`` (any images, no identity): the TinyFace layout, identities matched by folder name."""
    from .identification import identification_ranks

    root = Path(root)
    for sub in ("probe", "gallery"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub} not found (expected {root}/probe/<identity>/*.jpg, "
                                    f"{root}/gallery/<identity>/*.jpg and optionally {root}/distractors/)")
    embed = {}
    for sub, labelled in (("probe", True), ("gallery", True), ("distractors", False)):
        if (root / sub).is_dir():
            images, ids = _folder_images(root / sub, sub, labelled)
            emb = embed_images(embed_fn, images, batch_size=batch_size, device=device, flip=flip, flip_mode=flip_mode)
            embed[sub] = (emb, ids)
    ranks = identification_ranks(embed["probe"][0], embed["probe"][1], embed["gallery"][0], embed["gallery"][1],
                                 embed["distractors"][0] if "distractors" in embed else None)
    return {"name": root.name, "rank": {int(k): float(np.mean(ranks <= k)) for k in ks},
            "probes": len(ranks), "gallery": len(embed["gallery"][1]),
            "distractors": len(embed["distractors"][1]) if "distractors" in embed else 0}


def ijb_report(embed_fn, root: str | Path, name: str | None = None, *, mode: str = "N1D1F1", model_hash: str = "",
               cache_dir: str | Path | None = None, batch_size: int = 128, device="cpu", workers=None) -> dict:
    """IJB-B/C 1:1 and 1:N (``ijb.py``) with the image features cached by model hash, meta files and flip."""
    from ..data.ijb import load_ijb_meta
    from .ijb import embed_ijb, score_ijb

    if not re.fullmatch(r"N[01]D[01]F[01]", mode):
        raise ValueError(f"IJB mode must look like N1D1F1 (norm score, detector score, flip test), got {mode!r}")
    use_norm, use_det, use_flip = (mode[i] == "1" for i in (1, 3, 5))
    root = Path(root)
    meta = load_ijb_meta(root, name or root.name)
    cache = None
    if cache_dir is not None and model_hash:
        key = _digest(model_hash, meta.name, file_hash(meta.meta_dir / f"{meta.name}_name_5pts_score.txt"),
                      str(use_flip))
        cache = Path(cache_dir) / f"{meta.name}-{key}.npy"
    if cache is not None and cache.is_file():
        feats = load_array(cache, "an IJB feature cache")
    else:
        feats = embed_ijb(embed_fn, meta, batch_size=batch_size, device=device, workers=workers,
                          flip=use_flip).numpy()
        if cache is not None:
            buf = io.BytesIO()
            np.save(buf, feats)
            atomic_write_bytes(cache, buf.getvalue())
    return score_ijb(feats, meta, use_norm_score=use_norm, use_detector_score=use_det, use_flip_test=use_flip)


# ---- floors (``lafs eval --floors``, lafs.eval.floors) ----

FLOOR_SUMMARY_KEYS = ("accuracy", "std", "auc", "eer", "threshold")


def checkpoint_config(model_path: str | Path):
    """(the run config stored in a lafs checkpoint, "") or (None, why there is none): floors need it to rebuild the
    untrained architecture and to find the run's training images."""
    import warnings

    from ..checkpoint import config_text
    from ..config import load_config
    from ..io_safe import CONFIG_FILE, UnsafeFileError, safetensors_folder

    path = Path(model_path)
    if path.suffix == ".onnx":
        return None, f"{path.name} is an ONNX model, without the run config its architecture is built from"
    folder = safetensors_folder(path)
    if folder is not None:  # lafs export --safetensors: the run config sits beside the weights
        return load_config(text=config_text(path), source=str(folder / CONFIG_FILE)), ""
    try:
        with warnings.catch_warnings():  # torch.load warns before handing a TorchScript archive to torch.jit.load
            warnings.simplefilter("ignore")
            text = config_text(path)
    except UnsafeFileError:
        raise
    except (ValueError, OSError) as err:
        return None, f"{path.name} is not a lafs checkpoint ({type(err).__name__})"
    if text is None:
        return None, f"{path.name} is not a lafs checkpoint with its run config (TorchScript?)"
    return load_config(text=text, source=f"the config stored in {path}"), ""


def untrained_embedder(cfg, model_hash: str = "", device="cpu"):
    """The checkpoint's architecture at random initialisation, as an ``Embedder``: built from ``cfg.model`` after
    ``torch.manual_seed(cfg.train.seed)`` (the caller's RNG state is restored), eval mode, resized to the model's
    input size and given keypoints exactly like the trained model (``lafs.embedder``). Not bit-identical to the
    run's own initial weights (training draws other random numbers first), but the same distribution."""
    from .. import __version__
    from ..embedder import Embedder
    from ..models import build_backbone

    seed = int(cfg.train.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides())
    backbone.eval().to(device)
    uses_kps = bool(getattr(backbone, "uses_keypoints", False))
    if uses_kps:
        def fn(x, k):
            return backbone(x, keypoints=k)["embedding"]
    else:
        def fn(x):
            return backbone(x)["embedding"]
    # cache key: the checkpoint (its config) + seed + code versions (a changed initialiser is another network)
    key = _digest(model_hash, "untrained", str(seed), __version__, torch.__version__)
    desc = f"{cfg.model.name}-{cfg.model.size} untrained (torch.manual_seed({seed}))"
    untrained = Embedder(fn, backbone.img_size, desc, key, uses_kps)
    # the trained model's face geometry (data.geometry): set_embeddings warps each set to it for both networks
    untrained.geometry = getattr(cfg.data, "geometry", None)
    return untrained


def load_fit_images(paths, *, size: int = 32, max_images: int = 20000, seed: int = 0,
                    color: str = "rgb") -> tuple[torch.Tensor, str]:
    """Unlabelled images to fit the PCA floor on -> (uint8 n x 3 x size x size, a description).

    ``paths``: ``.rec`` files (``RecordDataset``), image folders, ``.bin`` pair files or ``.npy`` of uint8
    N x 3 x H x W, concatenated. At most ``max_images`` are read (``floors.subsample_indices``, the subsample
    ``PCAWhitening.fit`` would draw), each area-downsampled to ``size`` as it is decoded (20000 full 112 px images
    would take 750 MB) and rounded to uint8.
    """
    from ..data.datasets import ImageFolderDataset, RecordDataset
    from .floors import area_downsample, subsample_indices

    sources = []  # (count, image i -> uint8 3 x H x W, path)
    for p in [Path(p) for p in paths]:
        if not p.exists():
            raise FileNotFoundError(f"PCA fit images: {p} not found")
        if p.is_dir():
            ds = ImageFolderDataset(p)
            sources.append((len(ds), ds._load_chw, p))
        elif p.suffix == ".rec":
            ds = RecordDataset(p, color=color, keypoints=False)
            sources.append((len(ds), ds._load_chw, p))
        elif p.suffix == ".bin":
            images, _ = load_bin(p, color=color)
            sources.append((len(images), images.numpy().__getitem__, p))
        elif p.suffix == ".npy":
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != 3:
                raise ValueError(f"{p}: PCA fit images must be uint8 N x 3 x H x W, got {arr.dtype} {arr.shape}")
            sources.append((len(arr), arr.__getitem__, p))
        else:
            raise ValueError(f"{p}: PCA fit images must be a .rec, an image folder, a .bin or a .npy "
                             "(uint8 N x 3 x H x W)")
    starts = np.cumsum([0] + [c for c, _, _ in sources])
    if starts[-1] == 0:
        raise ValueError(f"PCA fit images: {', '.join(str(s) for _, _, s in sources)} hold no images")
    idx = subsample_indices(int(starts[-1]), max_images, seed)
    out = torch.empty(len(idx), 3, size, size, dtype=torch.uint8)
    for j, i in enumerate(idx):
        k = int(np.searchsorted(starts, i, side="right") - 1)
        img = torch.from_numpy(np.array(sources[k][1](int(i - starts[k]))))  # a copy: .npy rows are read-only maps
        out[j] = area_downsample(img[None].to(torch.float32), size)[0].round_().clamp_(0, 255).to(torch.uint8)
    names = ", ".join(str(s) for _, _, s in sources)
    return out, f"{len(idx)} of {int(starts[-1])} images of {names} (seed {seed}), area-downsampled to {size} px"


def floor_context(model_path: str | Path | None, model_hash: str = "", fit_path: str | Path | None = None, *,
                  color: str = "rgb", size: int = 32, components: int = 256, max_images: int = 20000,
                  device="cpu") -> dict:
    """What the floors of every set share, prepared once before any set is embedded (a bad ``--floor-fit`` fails
    fast): the fitted PCA (``--floor-fit``, else the ``data.train`` files of the checkpoint's run when they are on
    this machine), the untrained network, and a note for each floor that cannot be computed, saying why.

    The PCA subsample seed is fixed (0), not the run's, so models trained on the same data share one PCA floor.
    """
    from .floors import PCAWhitening

    notes, cfg, why = [], None, "no model file (--embeddings)"
    if model_path is not None:
        cfg, why = checkpoint_config(model_path)
    untrained = untrained_embedder(cfg, model_hash, device) if cfg is not None else None
    if untrained is None:
        notes.append(f"floors: no untrained-network floor: {why}")
    paths, fit_color, source = None, color, ""
    if fit_path is not None:
        paths, source = [fit_path], f"--floor-fit {fit_path}"
    elif cfg is not None and cfg.data.source != "synthetic" and cfg.data.train:
        missing = [p for p in cfg.data.train if not Path(p).exists()]
        if missing:
            notes.append(f"floors: no PCA-whitened floor: the run's data.train file {missing[0]} is not on this "
                         "machine (pass --floor-fit TRAIN.rec)")
        else:
            paths, fit_color, source = list(cfg.data.train), cfg.data.color, "the run's data.train"
    elif cfg is not None:
        notes.append(f"floors: no PCA-whitened floor: the run trained on data.source={cfg.data.source} without "
                     "training files on disk (pass --floor-fit TRAIN.rec / .bin / .npy)")
    else:
        notes.append(f"floors: no PCA-whitened floor: no training images known ({why}; pass --floor-fit "
                     "TRAIN.rec / .bin / .npy)")
    pca, fit = None, None
    if paths is not None:
        images, fit = load_fit_images(paths, size=size, max_images=max_images, seed=0, color=fit_color)
        try:
            pca = PCAWhitening().fit(images, components=components, size=size, max_images=max_images)
        except ValueError as err:
            raise ValueError(f"PCA floor fitted on {source}: {err}") from None
        fit = f"{source}: {fit}"
    return {"pca": pca, "fit": fit, "untrained": untrained, "notes": notes,
            "geometry": getattr(cfg.data, "geometry", None) if cfg is not None else None,
            "settings": {"size": size, "components": components, "max_images": max_images}}


def floors_report(ctx: dict, set_paths, *, color: str = "rgb", flip: bool = True, flip_mode: str = "sum",
                  thresholds=None, batch_size: int = 256, device="cpu", cache_dir: str | Path | None = None,
                  keypoints_path: str | Path | None = None) -> dict:
    """``floor_accuracies`` of each ``.bin`` with the context of ``floor_context`` and the model's test options, so
    floors and model are scored alike; the untrained network's embeddings are cached like the model's. The pixels
    are those the model sees: each set is first brought to the checkpoint's training geometry, if it has one
    (``set_in_geometry``, as ``set_embeddings`` does for the model; its note was printed there)."""
    from .floors import floor_accuracies

    sets = {}
    for path in set_paths:
        images, issame = load_bin(path, color=color)
        images, _ = set_in_geometry(images, None, path, ctx.get("geometry"), keypoints_path, log=lambda note: None)
        emb = None
        if ctx["untrained"] is not None:
            emb, _, _ = set_embeddings(ctx["untrained"], path, ctx["untrained"].file_hash, color=color,
                                       batch_size=batch_size, device=device, flip=flip, flip_mode=flip_mode,
                                       cache_dir=cache_dir, keypoints_path=keypoints_path)
        sets[Path(path).stem] = floor_accuracies(images, issame, ctx["pca"], untrained_embeddings=emb, flip=flip,
                                                 flip_mode=flip_mode, thresholds=thresholds, batch_size=batch_size,
                                                 size=ctx["settings"]["size"],
                                                 components=ctx["settings"]["components"])
    first = next(iter(sets.values()), {}).get("settings", {})
    return {"sets": sets,
            "settings": {**first, "max_images": ctx["settings"]["max_images"], "geometry": ctx.get("geometry")},
            "fit": ctx["fit"], "untrained": ctx["untrained"].description if ctx["untrained"] is not None else None,
            "notes": list(ctx["notes"])}


def floors_json(floors: dict) -> dict:
    """The ``floors`` block of eval.json: per set and floor, accuracy, std, AUC, EER and the mean threshold."""
    sets = {name: {k: {m: _jsonable(r[m]) for m in FLOOR_SUMMARY_KEYS if m in r}
                   for k, r in f.items() if k in FLOOR_LABELS}
            for name, f in floors["sets"].items()}
    return {"sets": sets, **{k: _jsonable(v) for k, v in floors.items() if k != "sets"}}
