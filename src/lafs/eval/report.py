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

from ..io import atomic_write_bytes
from .verification import embed_images, load_bin, pair_distances, ten_fold_accuracy


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def set_embeddings(embed_fn, bin_path: str | Path, model_hash: str, *, color: str = "rgb", batch_size: int = 256,
                   device="cpu", flip: bool = True, flip_mode: str = "sum", cache_dir: str | Path | None = None,
                   keypoints_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(embeddings N x D, issame, from_cache) of a ``.bin`` set; cached when ``cache_dir`` is given. A keypoint model
    (``uses_keypoints``) gets the set's keypoints (``keypoints_path`` or the ``<stem>_kps.npy`` sidecar)."""
    from ..embedder import file_hash

    bin_path = Path(bin_path)
    cache = None
    if cache_dir is not None:
        parts = [model_hash, file_hash(bin_path), color, str(flip), flip_mode]
        if getattr(embed_fn, "precision", "fp32") != "fp32":  # bf16 embeddings are other numbers
            parts.append(embed_fn.precision)
        if getattr(embed_fn, "uses_keypoints", False):
            kp = Path(keypoints_path) if keypoints_path else sidecar_keypoints(bin_path)
            parts.append(file_hash(kp) if kp.is_file() else "no keypoints")
        key = _digest(*parts)
        cache = Path(cache_dir) / f"{bin_path.stem}-{key}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                return z["embeddings"], z["issame"], True
    images, issame = load_bin(bin_path, color=color)
    kps = load_set_keypoints(bin_path, keypoints_path, len(images)) if getattr(embed_fn, "uses_keypoints", False) \
        else None
    emb = embed_images(embed_fn, images, batch_size=batch_size, device=device, flip=flip, flip_mode=flip_mode,
                       keypoints=kps).numpy()
    if cache is not None:
        buf = io.BytesIO()
        np.savez(buf, embeddings=emb, issame=issame)
        atomic_write_bytes(cache, buf.getvalue())
    return emb, issame, False


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


def format_table(results: list[dict]) -> str:
    header = ("set", "pairs", "accuracy %", "+-", "AUC", "EER %", "TAR@FAR=1e-3 %", "threshold")
    rows = []
    for r in results:
        tar = r.get("tar_at_far", {}).get(1e-3)
        rows.append((r["name"], str(r["pairs"]), f"{100 * r['accuracy']:.2f}", f"{100 * r['accuracy_std']:.2f}",
                     f"{r['auc']:.4f}", f"{100 * r['eer']:.2f}" if "eer" in r else "-",
                     f"{100 * tar:.2f}" if tar is not None else "-", f"{r['threshold']:.3f}"))
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


def write_report(results: list[dict], out_dir: str | Path, meta: dict) -> list[Path]:
    """``eval.json`` (metrics + how they were made) and, with matplotlib, ``roc.png`` (TAR vs FAR, log FAR) and, for
    affine-sensitivity results (``points``), ``sensitivity.png``."""
    out = Path(out_dir)
    written = [atomic_write_bytes(out / "eval.json", json.dumps(
        {"meta": meta, "results": _jsonable(results)}, indent=2).encode())]
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


def sidecar_keypoints(bin_path: str | Path) -> Path:
    """The keypoints file that goes with a set: ``<stem>_kps.npy`` beside it (``../shared/data`` naming)."""
    p = Path(bin_path)
    return p.with_name(p.stem + "_kps.npy")


def load_set_keypoints(bin_path: str | Path, keypoints_path: str | Path | None, count: int) -> np.ndarray:
    path = Path(keypoints_path) if keypoints_path else sidecar_keypoints(bin_path)
    if not path.is_file():
        raise FileNotFoundError(f"{bin_path}: no keypoints ({path} not found; pass --keypoints KPS.npy, "
                                f"(images, 5, 2) pixels, one row per image of the .bin)")
    from ..data.datasets import load_keypoints

    kps = load_keypoints(path, count)  # checks one row per image of the set
    if kps.shape[1] != 5:
        raise ValueError(f"{path}: {kps.shape[1]} keypoints per image, expected the 5 ArcFace points for {bin_path}")
    return kps


def sensitivity_report(embed_fn, bin_path: str | Path, keypoints_path=None, *, steps=6, interpolation="similarity",
                       border: str = "constant", color: str = "rgb", batch_size: int = 256, device="cpu", flip: bool = True,
                       flip_mode: str = "sum", thresholds=None) -> dict:
    """``robustness.affine_sensitivity`` on a ``.bin`` of detector crops and its keypoints; named for the report."""
    from .robustness import affine_sensitivity

    images, issame = load_bin(bin_path, color=color)
    kps = load_set_keypoints(bin_path, keypoints_path, len(images))
    r = affine_sensitivity(embed_fn, images, issame, kps, steps, interpolation=interpolation, border=border,
                           batch_size=batch_size,
                           device=device, flip=flip, flip_mode=flip_mode, thresholds=thresholds)
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
    from ..embedder import file_hash
    from .ijb import embed_ijb, load_ijb_meta, score_ijb

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
        feats = np.load(cache)
    else:
        feats = embed_ijb(embed_fn, meta, batch_size=batch_size, device=device, workers=workers,
                          flip=use_flip).numpy()
        if cache is not None:
            buf = io.BytesIO()
            np.save(buf, feats)
            atomic_write_bytes(cache, buf.getvalue())
    return score_ijb(feats, meta, use_norm_score=use_norm, use_detector_score=use_det, use_flip_test=use_flip)
