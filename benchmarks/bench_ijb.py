"""IJB-C-scale 1:1 scoring on random features: ``lafs.eval.ijb`` (vectorised) against loop references, in one run.

Sizes (IJB-C, insightface release): 469,375 images, 23,124 templates (3,531 gallery + 19,593 probe), about 227k
medias, 15,658,489 template pairs (gallery x probe, 19,557 genuine), 512-d float32 image features. ``--scale s``
multiplies every count (``--scale 0.1``: 46,938 images, 2,312 templates, 1.57M pairs). The meta arrays are random
with IJB-like shapes: images per template log-normal (heavy tail, >= 1), medias per template in proportion, pairs
drawn uniformly (with replacement) from the gallery x probe grid, in random order.

Phases, all measured in this run (scoring mode N1D1, float64 pooling and scores, the library defaults):

1. Vectorised: ``image2template_feature`` (weighted ``index_add_``), ``pair_scores`` (auto: dense blocks as matrix
   products; also timed with the row-wise gather path forced), ``tar_at_far`` + ``roc_auc``.
2. Loops: ``image2template_feature_loop`` (one scan of all images per template, like insightface's script) on a random
   sample of templates, and ``pair_scores_loop`` (one Python dot per pair) on a random sample of pairs; both times
   are **extrapolated linearly** to all templates / pairs (each template costs one full scan, each pair one dot), and
   the output says so. Also insightface's own numpy scoring (gather 100k pairs at a time, ``sum(f1 * f2)``) on up to
   ``--insightface-pairs`` pairs, extrapolated the same way if capped. The sampled loop outputs are compared with the
   vectorised ones (max abs difference).

Memory: for each phase, the peak resident set size above the RSS at its start. The kernel's high-water mark
(``VmHWM``; ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` reads the same counter) is reset before each phase by
writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so later, smaller phases are measured too. This counts
torch's and numpy's CPU allocations alike (tracemalloc sees neither torch's nor all of numpy's). Where the reset is
refused, the ``ru_maxrss`` delta is printed instead (0 when a phase stays below an earlier peak), and marked.

Threads: torch runs on ``--threads`` threads (default 1, so vectorised and loop figures are per core; on a busy
machine extra OpenMP threads mostly wait for each other). Run: ``python benchmarks/bench_ijb.py [--scale 0.1]
[--threads N] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from lafs.eval.ijb import (
    image2template_feature,
    image2template_feature_loop,
    pair_scores,
    pair_scores_loop,
    roc_1to1,
    template_rows,
)

IJBC = {"images": 469_375, "templates": 23_124, "gallery": 3_531, "medias": 227_000, "pairs": 15_658_489,
        "genuine": 19_557}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Phase:
    """Wall time and peak RSS increase of a ``with`` block (module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss delta"
        self.rss0 = _status_kib("VmRSS")
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        hwm = _status_kib("VmHWM")
        if self.method == "VmHWM" and hwm is not None and self.rss0 is not None:
            self.peak_mib = (hwm - self.rss0) / 1024
        else:
            self.peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss0) / 1024
        return False


def make_meta(scale: float, rng: np.random.Generator) -> dict:
    n = max(10, round(IJBC["images"] * scale))
    t = max(4, min(n, round(IJBC["templates"] * scale)))
    n_gallery = max(1, min(t - 1, round(IJBC["gallery"] * scale)))
    n_pairs = max(10, round(IJBC["pairs"] * scale))
    # images per template: one each, the rest spread by log-normal weights (IJB templates: 1 to hundreds of images)
    weights = rng.lognormal(0.0, 1.2, t)
    counts = 1 + rng.multinomial(n - t, weights / weights.sum())
    templates = np.repeat(np.arange(t) * 3 + 1, counts)  # ids need not be 0..T-1
    # medias per template in proportion (IJBC: ~0.48 medias per image), images assigned to them at random
    media_per_image = IJBC["medias"] / IJBC["images"]
    n_media = np.maximum(1, np.round(counts * media_per_image)).astype(np.int64)
    offsets = np.r_[0, np.cumsum(n_media)[:-1]]
    medias = np.repeat(offsets, counts) + (rng.random(n) * np.repeat(n_media, counts)).astype(np.int64)
    ids = np.arange(t) * 3 + 1
    p1 = ids[rng.integers(0, n_gallery, n_pairs)]
    p2 = ids[n_gallery + rng.integers(0, t - n_gallery, n_pairs)]
    labels = (rng.random(n_pairs) < IJBC["genuine"] / IJBC["pairs"]).astype(np.int8)
    labels[:2] = (1, 0)  # both classes present at any scale
    return {"templates": templates, "medias": medias, "p1": p1, "p2": p2, "labels": labels, "gallery": n_gallery,
            "media_groups": int(len(np.unique(templates * (medias.max() + 1) + medias)))}


def insightface_scores(template_feats: np.ndarray, rows1, rows2, batch: int = 100_000) -> np.ndarray:
    """insightface ``verification``: gather 100k pairs at a time, ``np.sum(f1 * f2, -1)``."""
    out = np.empty(len(rows1))
    for s in range(0, len(rows1), batch):
        out[s : s + batch] = np.sum(template_feats[rows1[s : s + batch]] * template_feats[rows2[s : s + batch]], -1)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every IJB-C count (default 1.0)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--loop-templates", type=int, default=400, help="templates timed in the pooling loop")
    ap.add_argument("--loop-pairs", type=int, default=100_000, help="pairs timed in the per-pair loop")
    ap.add_argument("--insightface-pairs", type=int, default=2_000_000, help="cap on pairs for insightface scoring")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: per-core figures, like the loops; 0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    meta = make_meta(args.scale, rng)
    n, n_pairs = len(meta["templates"]), len(meta["p1"])
    feats = torch.randn(n, args.dim)  # float32, like embeddings
    det = rng.uniform(0.5, 1.0, n).astype(np.float32)
    n_templates = len(np.unique(meta["templates"]))
    print(f"IJB-C x {args.scale:g}: {n:,} images, {n_templates:,} templates ({meta['gallery']:,} gallery), "
          f"{meta['media_groups']:,} (template, media) groups, {n_pairs:,} pairs ({int(meta['labels'].sum()):,} "
          f"genuine), {args.dim}-d float32 features ({feats.numel() * 4 / 2**20:.0f} MiB); mode N1D1; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    grid = meta["gallery"] * (n_templates - meta["gallery"])
    if n_pairs > grid:
        print(f"note: {n_pairs:,} pairs > {grid:,} gallery x probe cells at this scale: pairs repeat")

    # --- vectorised -----------------------------------------------------------------------------------------------
    with Phase("pooling") as p_pool:
        tf, ids = image2template_feature(feats, meta["templates"], meta["medias"], detector_scores=det,
                                         use_norm_score=True, use_detector_score=True)
    rows1 = template_rows(ids, meta["p1"])
    rows2 = template_rows(ids, meta["p2"])
    with Phase("pairs") as p_pairs:
        scores = pair_scores(tf, rows1, rows2)
    with Phase("pairs-gather") as p_gather:
        scores_g = pair_scores(tf, rows1, rows2, method="gather")
    with Phase("roc") as p_roc:
        scores_np = scores.numpy()
        roc = roc_1to1(scores_np, meta["labels"])  # what score_ijb computes: TAR@FAR at 6 FARs + AUC, one sort
        tar, auc = {float(k): v for k, v in roc["tar_at_far"].items()}, roc["auc"]
    gather_diff = float((scores - scores_g).abs().max())

    # --- loops (sampled, extrapolated) ------------------------------------------------------------------------------
    x64 = feats.numpy().astype(np.float64) * det[:, None]  # N1D1 preprocessing, vectorised as in insightface
    k_t = min(args.loop_templates, n_templates)
    sample_t = rng.choice(ids, k_t, replace=False)
    with Phase("pooling-loop") as p_pool_loop:
        tf_loop, _ = image2template_feature_loop(x64, meta["templates"], meta["medias"], only=sample_t)
    pool_diff = float(np.abs(tf_loop - tf[template_rows(ids, sample_t)].numpy()).max())
    pool_loop_total = p_pool_loop.seconds * n_templates / k_t

    tf_np = tf.numpy()
    k_p = min(args.loop_pairs, n_pairs)
    sample_p = rng.choice(n_pairs, k_p, replace=False)
    with Phase("pairs-loop") as p_pairs_loop:
        s_loop = pair_scores_loop(tf_np, rows1[sample_p], rows2[sample_p])
    pair_diff = float(np.abs(s_loop - scores_np[sample_p]).max())
    pairs_loop_total = p_pairs_loop.seconds * n_pairs / k_p

    k_i = min(args.insightface_pairs, n_pairs)
    with Phase("pairs-insightface") as p_if:
        s_if = insightface_scores(tf_np, rows1[:k_i], rows2[:k_i])
    if_diff = float(np.abs(s_if - scores_np[:k_i]).max())
    if_total = p_if.seconds * n_pairs / k_i

    vec_total = p_pool.seconds + p_pairs.seconds
    loop_total = pool_loop_total + pairs_loop_total
    mem = p_pool.method
    print(f"\nmemory: peak RSS above each phase's start ({mem}{', reset per phase' if mem == 'VmHWM' else ''})")
    hdr = (f"{'phase':<34}{'vectorised s':>13}{'loop s':>12}{'loop/vec':>10}{'vec MiB':>10}{'loop MiB':>10}"
           "  how the loop was timed")
    print(hdr)
    print("-" * len(hdr))

    def row(name, vec, loop, loop_s, note):
        ratio = loop_s / vec.seconds if vec.seconds > 0 else float("inf")
        lm = f"{loop.peak_mib:10.0f}" if loop is not None else f"{'':>10}"
        print(f"{name:<34}{vec.seconds:13.3f}{loop_s:12.2f}{ratio:10.1f}{vec.peak_mib:10.0f}{lm}  {note}")

    row("template pooling", p_pool, p_pool_loop, pool_loop_total,
        f"loop on {k_t:,} of {n_templates:,} templates ({p_pool_loop.seconds:.2f} s) x {n_templates / k_t:.1f}")
    row("pair scores (auto)", p_pairs, p_pairs_loop, pairs_loop_total,
        f"per-pair loop on {k_p:,} of {n_pairs:,} pairs ({p_pairs_loop.seconds:.2f} s) x {n_pairs / k_p:.1f}")
    row("pair scores (auto) vs insightface", p_pairs, p_if, if_total,
        f"insightface numpy 100k-chunk gather on {k_i:,} pairs ({p_if.seconds:.2f} s)"
        + (f" x {n_pairs / k_i:.1f}" if k_i < n_pairs else ", all pairs, not extrapolated"))
    row("pair scores (gather forced)", p_gather, p_pairs_loop, pairs_loop_total, "same per-pair loop")
    print(f"{'pooling + pair scores':<34}{vec_total:13.3f}{loop_total:12.2f}{loop_total / vec_total:10.1f}"
          f"{'':>20}  extrapolated loops, summed")
    print(f"{'ROC: TAR@FAR (6 FARs) + AUC':<34}{p_roc.seconds:13.3f}{'':>22}{p_roc.peak_mib:10.0f}")
    print(f"\nmax |difference|: pooling loop vs vectorised {pool_diff:.2e}, per-pair loop {pair_diff:.2e}, "
          f"insightface scoring {if_diff:.2e}, gather vs auto {gather_diff:.2e}")
    print("TAR@FAR (random features, a sanity value only): "
          + ", ".join(f"{f:g}: {100 * v:.2f}" for f, v in tar.items()) + f"; AUC {100 * auc:.2f}")

    res = {
        "scale": args.scale, "images": n, "templates": n_templates, "pairs": n_pairs, "dim": args.dim,
        "memory_method": mem,
        "vectorised": {"pooling_s": p_pool.seconds, "pairs_s": p_pairs.seconds, "pairs_gather_s": p_gather.seconds,
                       "roc_s": p_roc.seconds, "pooling_peak_mib": p_pool.peak_mib,
                       "pairs_peak_mib": p_pairs.peak_mib, "pairs_gather_peak_mib": p_gather.peak_mib,
                       "roc_peak_mib": p_roc.peak_mib},
        "loop": {"pooling_s_extrapolated": pool_loop_total, "pooling_sample_templates": k_t,
                 "pooling_sample_s": p_pool_loop.seconds, "pooling_sample_peak_mib": p_pool_loop.peak_mib,
                 "pairs_s_extrapolated": pairs_loop_total, "pairs_sample": k_p, "pairs_sample_s": p_pairs_loop.seconds,
                 "pairs_sample_peak_mib": p_pairs_loop.peak_mib, "insightface_pairs_s": if_total,
                 "insightface_pairs_timed": k_i, "insightface_peak_mib": p_if.peak_mib},
        "ratios": {"pooling": pool_loop_total / p_pool.seconds, "pairs": pairs_loop_total / p_pairs.seconds,
                   "pairs_vs_insightface": if_total / p_pairs.seconds, "total": loop_total / vec_total},
        "max_abs_diff": {"pooling": pool_diff, "pairs_loop": pair_diff, "insightface": if_diff,
                         "gather_vs_auto": gather_diff},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
