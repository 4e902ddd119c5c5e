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
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from .verification import embed_images, load_bin, pair_distances, ten_fold_accuracy


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def set_embeddings(embed_fn, bin_path: str | Path, model_hash: str, *, color: str = "rgb", batch_size: int = 256,
                   device="cpu", flip: bool = True, flip_mode: str = "sum", cache_dir: str | Path | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(embeddings N x D, issame, from_cache) of a ``.bin`` set; cached when ``cache_dir`` is given."""
    from ..embedder import file_hash

    bin_path = Path(bin_path)
    cache = None
    if cache_dir is not None:
        key = _digest(model_hash, file_hash(bin_path), color, str(flip), flip_mode)
        cache = Path(cache_dir) / f"{bin_path.stem}-{key}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                return z["embeddings"], z["issame"], True
    images, issame = load_bin(bin_path, color=color)
    emb = embed_images(embed_fn, images, batch_size=batch_size, device=device, flip=flip, flip_mode=flip_mode).numpy()
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
    """``eval.json`` (metrics + how they were made) and, with matplotlib, ``roc.png`` (TAR vs FAR, log FAR)."""
    out = Path(out_dir)
    written = [atomic_write_bytes(out / "eval.json", json.dumps(
        {"meta": meta, "results": _jsonable(results)}, indent=2).encode())]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in results:
        d, same = r["_dist"], r["_issame"]
        order = np.argsort(d, kind="stable")
        far = np.cumsum(~same[order]) / max(1, (~same).sum())
        tar = np.cumsum(same[order]) / max(1, same.sum())
        ax.plot(np.maximum(far, 1e-6), tar, label=f"{r['name']} ({100 * r['accuracy']:.2f} %)")
    ax.set_xscale("log")
    ax.set_xlabel("FAR")
    ax.set_ylabel("TAR")
    ax.set_title(str(meta.get("model", ""))[:60], fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    written.append(atomic_write_bytes(out / "roc.png", buf.getvalue()))
    return written
