"""IJB-C-scale 1:1 scoring, end to end: ``lafs.eval.ijb.score_ijb`` against insightface's ``eval_ijbc.py`` logic, phase
by phase, in one run, with the TAR@FAR of both and the peak memory of each.

Sizes (IJB-C, insightface release): 469,375 images, 23,124 templates (3,531 gallery + 19,593 probe), about 227k
medias, 15,658,489 template pairs (gallery x probe, 19,557 genuine), 512-d float32 image features and their flipped
images' (mode N1D1F1, both sides' default). ``--scale s`` multiplies every count (``--scale 0.1``: 46,938 images,
2,312 templates, 1.57M pairs). The meta arrays are random with IJB-like shapes: images per template log-normal
(heavy tail, >= 1), medias per template in proportion, one subject per gallery template and a random gallery subject
per probe template; pairs drawn from the gallery x probe grid (with replacement, in random order), 0.125% of them
genuine (same subject). Image features: a subject direction (weight ``--subject``) plus Gaussian noise, so genuine
template scores sit above the impostors' as with a real model and TAR@FAR is not trivial.

Both sides start from the same arrays: ``img_feats`` N x 2D float32 (embedding | flipped embedding, the script's
layout; lafs gets the two halves as views), detector scores, template / media ids, pair ids and labels.

* insightface (``recognition/arcface_torch/eval_ijbc.py``, as written): prep = flip sum and detector-score
  weighting in float32 numpy; pooling = ``image2template_feature`` (per template: ``np.where`` scan of all images,
  per-media mean, sum, then ``normalize``); pairs = ``verification`` (``template2id`` table, 100k pairs at a time,
  ``np.sum(f1 * f2, -1)`` in float64); ROC = sklearn ``roc_curve`` (sklearn's own if installed, else a transcription),
  ``auc``, and per FAR the TPR at ``min(zip(abs(fpr - far), range))`` of the flipped curve.
* lafs: one call of ``score_ijb(..., identification=False)``, phase times from its ``stats``: pooling = weighted
  ``index_add_`` in float64 (flip sum folded in), prep = pair template rows (lookup table), pairs = float32 GEMM of
  gallery x probe and a gather, ROC = ``roc_1to1_pairs``: two float32 sorts, TAR / FPR / threshold of the float64
  scores (pairs within the float32 error bound of each target's window rescored in float64), AUC of the float32
  scores.

Then, outside the timed runs: lafs's float64 path (every pair scored in float64 by ``pair_scores``, ``roc_1to1``)
for the same TARs, and a per-pair Python loop on ``--loop-pairs`` sampled pairs (extrapolated, for ``bench_eval``).

Memory: the peak resident set size of each side above the RSS at its start (inputs already loaded). The kernel's
high-water mark (``VmHWM``) is reset before each measured block by writing ``5`` to ``/proc/self/clear_refs`` (Linux
>= 4.0); where that is refused, the ``ru_maxrss`` delta is printed instead (0 when a block stays below an earlier
peak) and marked. This counts torch's and numpy's allocations alike.

Threads: torch runs on ``--threads`` threads (default 1: per-core figures; numpy's BLAS is not used by either side).
Run: ``python benchmarks/bench_ijb.py [--scale 0.1] [--threads N] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from lafs.eval.ijb import (
    FARS,
    IJBMeta,
    image2template_feature,
    pair_scores,
    pair_scores_loop,
    roc_1to1,
    score_ijb,
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
            self.abs_peak_mib = hwm / 1024
        else:
            self.peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss0) / 1024
            self.abs_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return False


def make_meta(scale: float, rng: np.random.Generator) -> dict:
    n = max(10, round(IJBC["images"] * scale))
    t = max(4, min(n, round(IJBC["templates"] * scale)))
    n_gallery = max(1, min(t - 1, round(IJBC["gallery"] * scale)))
    n_pairs = max(10, round(IJBC["pairs"] * scale))
    # images per template: one each, the rest spread by log-normal weights (IJB templates: 1 to hundreds of images)
    weights = rng.lognormal(0.0, 1.2, t)
    counts = 1 + rng.multinomial(n - t, weights / weights.sum())
    ids = np.arange(t) * 3 + 1  # ids need not be 0..T-1
    templates = np.repeat(ids, counts)
    # medias per template in proportion (IJBC: ~0.48 medias per image), images assigned to them at random
    media_per_image = IJBC["medias"] / IJBC["images"]
    n_media = np.maximum(1, np.round(counts * media_per_image)).astype(np.int64)
    offsets = np.r_[0, np.cumsum(n_media)[:-1]]
    medias = np.repeat(offsets, counts) + (rng.random(n) * np.repeat(n_media, counts)).astype(np.int64)
    # subjects: one per gallery template, a random gallery subject per probe template
    subject = np.r_[np.arange(n_gallery), rng.integers(0, n_gallery, t - n_gallery)]
    # pairs: gallery x probe, a genuine share as IJB-C's (a probe with its subject's gallery template), the rest random
    n_gen = max(1, round(n_pairs * IJBC["genuine"] / IJBC["pairs"]))
    g = rng.integers(0, n_gallery, n_pairs)
    p = n_gallery + rng.integers(0, t - n_gallery, n_pairs)
    g[:n_gen] = subject[p[:n_gen]]  # gallery template k is subject k
    same = np.flatnonzero(subject[g[n_gen:]] == subject[p[n_gen:]]) + n_gen  # random draws of a mate: move them
    if n_gallery > 1:
        g[same] = (g[same] + rng.integers(1, n_gallery, len(same))) % n_gallery
    order = rng.permutation(n_pairs)
    g, p = g[order], p[order]
    labels = (subject[g] == subject[p]).astype(np.int8)
    return {"templates": templates, "medias": medias, "p1": ids[g], "p2": ids[p], "labels": labels,
            "gallery": n_gallery, "subject_of_image": np.repeat(subject, counts),
            "media_groups": int(len(np.unique(templates * (medias.max() + 1) + medias)))}


def make_features(meta: dict, dim: int, subject_weight: float, seed: int) -> np.ndarray:
    """N x 2D float32 (embedding | flipped embedding): the subject's direction x weight + N(0, 1) noise per half."""
    gen = torch.Generator().manual_seed(seed)
    subj = torch.from_numpy(meta["subject_of_image"])
    centers = torch.randn(int(subj.max()) + 1, dim, generator=gen) * subject_weight
    x = torch.empty(len(subj), 2 * dim)
    for s in range(0, len(subj), 65536):
        c = centers[subj[s : s + 65536]]
        x[s : s + 65536, :dim] = torch.randn(len(c), dim, generator=gen).add_(c)
        x[s : s + 65536, dim:] = torch.randn(len(c), dim, generator=gen).add_(c)
    return x.numpy()


# --- insightface eval_ijbc.py, as written -----------------------------------------------------------------------------


def _sklearn():
    """sklearn's roc_curve / auc / normalize if installed (insightface imports them), else transcriptions."""
    try:
        from sklearn.metrics import auc, roc_curve
        from sklearn.preprocessing import normalize

        return roc_curve, auc, normalize, "sklearn"
    except ImportError:
        pass

    def normalize(x):
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
        return x / norms[:, None]

    def roc_curve(y_true, y_score):
        desc = np.argsort(y_score, kind="mergesort")[::-1]
        y_score, y_true = y_score[desc], y_true[desc]
        thr_idx = np.r_[np.where(np.diff(y_score))[0], y_true.size - 1]
        tps = np.cumsum(y_true, dtype=np.float64)[thr_idx]
        fps = 1 + thr_idx - tps
        thr = y_score[thr_idx]
        if len(fps) > 2:
            keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
            fps, tps, thr = fps[keep], tps[keep], thr[keep]
        fps, tps, thr = np.r_[0.0, fps], np.r_[0.0, tps], np.r_[np.inf, thr]
        return fps / fps[-1], tps / tps[-1], thr

    def auc(x, y):
        return float(np.trapezoid(y, x)) if hasattr(np, "trapezoid") else float(np.trapz(y, x))

    return roc_curve, auc, normalize, "numpy transcription of sklearn"


def insightface_image2template_feature(img_feats, templates, medias, normalize):
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:  # image features from the same video will be aggregated into one feature
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        media_norm_feats = np.array(media_norm_feats)
        template_feats[count_template] = np.sum(media_norm_feats, axis=0)
    template_norm_feats = normalize(template_feats)
    return template_norm_feats, unique_templates


def insightface_verification(template_norm_feats, unique_templates, p1, p2):
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    score = np.zeros((len(p1),))  # save cosine distance between pairs
    total_pairs = np.array(range(len(p1)))
    batchsize = 100000  # small batchsize instead of all pairs in one batch due to the memory limiation
    sublists = [total_pairs[i : i + batchsize] for i in range(0, len(p1), batchsize)]
    for s in sublists:
        feat1 = template_norm_feats[template2id[p1[s]]]
        feat2 = template_norm_feats[template2id[p2[s]]]
        similarity_score = np.sum(feat1 * feat2, -1)
        score[s] = similarity_score.flatten()
    return score


def insightface_eval(img_feats, faceness_scores, templates, medias, p1, p2, label, fars):
    """eval_ijbc.py from its features to its TPR row, N1D1F1; every array lives to the end, as in the script."""
    roc_curve, auc, normalize, _ = _sklearn()
    times = {}
    t = time.perf_counter()
    img_input_feats = img_feats[:, 0 : img_feats.shape[1] // 2] + img_feats[:, img_feats.shape[1] // 2 :]
    # use_norm_score (N1): the script's "img_input_feats = img_input_feats"
    img_input_feats = img_input_feats * faceness_scores[:, np.newaxis]  # use_detector_score (D1)
    times["prep"] = time.perf_counter() - t
    t = time.perf_counter()
    template_norm_feats, unique_templates = insightface_image2template_feature(img_input_feats, templates, medias,
                                                                               normalize)
    times["pooling"] = time.perf_counter() - t
    t = time.perf_counter()
    score = insightface_verification(template_norm_feats, unique_templates, p1, p2)
    times["pairs"] = time.perf_counter() - t
    t = time.perf_counter()
    fpr, tpr, _ = roc_curve(label, score)
    roc_auc = auc(fpr, tpr)
    fpr = np.flipud(fpr)
    tpr = np.flipud(tpr)  # select largest tpr at same fpr
    tar = {}
    for far in fars:
        _, min_index = min(list(zip(abs(fpr - far), range(len(fpr)))))
        tar[far] = float(tpr[min_index])
    times["roc"] = time.perf_counter() - t
    return times, tar, float(roc_auc), template_norm_feats


# --- run ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every IJB-C count (default 1.0)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--subject", type=float, default=0.2, help="weight of the subject direction in image features")
    ap.add_argument("--loop-pairs", type=int, default=100_000, help="pairs timed in the per-pair loop")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: per-core figures; 0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    meta = make_meta(args.scale, rng)
    n, n_pairs, d = len(meta["templates"]), len(meta["p1"]), args.dim
    img_feats = make_features(meta, d, args.subject, args.seed)  # N x 2D float32, the script's img_feats
    faceness = rng.uniform(0.5, 1.0, n).astype(np.float32)
    n_templates = len(np.unique(meta["templates"]))
    fars = list(FARS)
    ijb = IJBMeta(name="ijbc", meta_dir=Path("."), image_dir=Path("."), image_names=np.zeros(n, "U1"),
                  landmarks=np.zeros((n, 5, 2), np.float32), detector_scores=faceness, templates=meta["templates"],
                  medias=meta["medias"], pairs=np.stack([meta["p1"], meta["p2"]], 1), labels=meta["labels"])
    print(f"IJB-C x {args.scale:g}: {n:,} images, {n_templates:,} templates ({meta['gallery']:,} gallery), "
          f"{meta['media_groups']:,} (template, media) groups, {n_pairs:,} pairs ({int(meta['labels'].sum()):,} "
          f"genuine), 2 x {d}-d float32 features ({img_feats.nbytes / 2**20:.0f} MiB); mode N1D1F1; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; insightface ROC by {_sklearn()[3]}")

    # --- the two pipelines, end to end ---------------------------------------------------------------------------------
    stats = {}
    with Phase("lafs") as p_lafs:
        res = score_ijb(img_feats[:, :d], ijb, flip_features=img_feats[:, d:], fars=fars, identification=False,
                        stats=stats)
    with Phase("insightface") as p_if:
        if_times, if_tar, if_auc, if_tf = insightface_eval(img_feats, faceness, meta["templates"], meta["medias"],
                                                           meta["p1"], meta["p2"], meta["labels"], fars)
    lafs_tar = {float(k): v for k, v in res["tar_at_far"].items()}
    lafs_times = {"prep": stats["prep_s"], "pooling": stats["pooling_s"], "pairs": stats["pairs_s"],
                  "roc": stats["roc_s"]}

    # --- checks outside the timed runs ----------------------------------------------------------------------------------
    tf, ids = image2template_feature(img_feats[:, :d], meta["templates"], meta["medias"], detector_scores=faceness,
                                     use_detector_score=True, flip_features=img_feats[:, d:])
    rows1, rows2 = template_rows(ids, meta["p1"]), template_rows(ids, meta["p2"])
    s64 = pair_scores(tf, rows1, rows2).numpy()
    ref64 = roc_1to1(s64, meta["labels"], fars)
    ref64_tar = {float(k): v for k, v in ref64["tar_at_far"].items()}
    k_p = min(args.loop_pairs, n_pairs)
    sample = rng.choice(n_pairs, k_p, replace=False)
    t = time.perf_counter()
    s_loop = pair_scores_loop(tf.numpy(), rows1[sample], rows2[sample])
    loop_s = (time.perf_counter() - t) * n_pairs / k_p
    loop_diff = float(np.abs(s_loop - s64[sample]).max())
    if_template_diff = float(np.abs(if_tf - tf.numpy()).max())
    del s64, tf, if_tf

    # --- report ---------------------------------------------------------------------------------------------------------
    notes = {
        "prep": ("flip sum + detector weighting, float32", "pair template rows, lookup table"),
        "pooling": ("per-template np.where loop", "weighted index_add_, flip sum folded in"),
        "pairs": ("100k-pair gathers, np.sum(f1*f2)", "float32 GEMM + gather"),
        "roc": ("sklearn roc_curve + auc + nearest", "float32 sorts + float64 rescoring"),
    }
    if_total, lafs_total = sum(if_times.values()), sum(lafs_times.values())
    print(f"\nend to end, one run ({p_lafs.method}; peak RSS above each side's start, inputs loaded)")
    hdr = f"{'phase':<9}{'insightface s':>14}{'lafs s':>9}{'ratio':>8}   insightface | lafs"
    print(hdr)
    print("-" * (len(hdr) + 50))
    for k in ("prep", "pooling", "pairs", "roc"):
        print(f"{k:<9}{if_times[k]:14.3f}{lafs_times[k]:9.3f}{if_times[k] / lafs_times[k]:8.1f}   "
              f"{notes[k][0]} | {notes[k][1]}")
    print(f"{'total':<9}{if_total:14.3f}{lafs_total:9.3f}{if_total / lafs_total:8.1f}   sum of the phases")
    print(f"{'wall':<9}{p_if.seconds:14.3f}{p_lafs.seconds:9.3f}{p_if.seconds / p_lafs.seconds:8.1f}   "
          "each side's whole call")
    print(f"{'peak MiB':<9}{p_if.peak_mib:14.0f}{p_lafs.peak_mib:9.0f}{p_if.peak_mib / p_lafs.peak_mib:8.1f}   "
          f"above start (absolute VmHWM: insightface {p_if.abs_peak_mib:.0f}, lafs {p_lafs.abs_peak_mib:.0f} MiB)")
    same = lafs_tar == if_tar
    print("\nTAR@FAR (%)  " + "".join(f"{f:>12g}" for f in fars) + f"{'AUC':>14}")
    print("insightface  " + "".join(f"{100 * if_tar[f]:12.6f}" for f in fars) + f"{100 * if_auc:14.8f}")
    print("lafs         " + "".join(f"{100 * lafs_tar[f]:12.6f}" for f in fars) + f"{100 * res['auc']:14.8f}")
    print("lafs float64 " + "".join(f"{100 * ref64_tar[f]:12.6f}" for f in fars) + f"{100 * ref64['auc']:14.8f}"
          "   (every pair scored in float64, roc_1to1; not timed)")
    thr_diff = max(abs(res["threshold_at_far"][k] - ref64["threshold_at_far"][k]) for k in ref64["threshold_at_far"])
    print(f"TAR identical to insightface: {same} (exact float equality); to lafs float64: {lafs_tar == ref64_tar}, "
          f"FPR too: {res['fpr_at_far'] == ref64['fpr_at_far']}, thresholds within {thr_diff:.1e} (row-wise vs GEMM "
          f"float64 sums)")
    print(f"lafs ROC: float32 score error bound {stats['error_bound']:.2e} (largest seen on a sample "
          f"{stats['sample_error']:.1e}), {stats['refined_pairs']:,} pairs rescored in float64, float64 fallback "
          f"{stats['float64_fallback']}; max |template feature difference| insightface vs lafs {if_template_diff:.1e}")
    print(f"per-pair Python loop (float64 dots) on {k_p:,} sampled pairs, extrapolated to all: {loop_s:.1f} s "
          f"({loop_s / lafs_times['pairs']:.0f}x lafs's pair scoring); max |loop - float64 GEMM score| {loop_diff:.1e}")

    res_json = {
        "scale": args.scale, "images": n, "templates": n_templates, "pairs": n_pairs, "dim": d,
        "memory_method": p_lafs.method,
        "insightface": {**{f"{k}_s": v for k, v in if_times.items()}, "total_s": if_total, "wall_s": p_if.seconds,
                        "peak_mib": p_if.peak_mib, "tar_at_far": if_tar, "auc": if_auc},
        "lafs": {**{f"{k}_s": v for k, v in lafs_times.items()}, "total_s": lafs_total, "wall_s": p_lafs.seconds,
                 "peak_mib": p_lafs.peak_mib, "tar_at_far": lafs_tar, "auc": res["auc"],
                 **{k: stats[k] for k in ("error_bound", "sample_error", "refined_pairs", "float64_fallback")}},
        "lafs_float64": {"tar_at_far": ref64_tar, "auc": ref64["auc"]},
        "tar_identical": same, "tar_identical_to_float64": lafs_tar == ref64_tar,
        # the keys bench_eval.py reads
        "vectorised": {"pooling_s": lafs_times["pooling"], "pairs_s": lafs_times["pairs"],
                       "roc_s": lafs_times["roc"], "pooling_peak_mib": p_lafs.peak_mib,
                       "pairs_peak_mib": p_lafs.peak_mib},
        "loop": {"pooling_s": if_times["pooling"], "pairs_s_extrapolated": loop_s, "pairs_sample": k_p,
                 "insightface_pairs_s": if_times["pairs"]},
        # pooling: insightface's template features vs lafs's; pairs_loop: the sampled per-pair loop vs float64 scores
        "max_abs_diff": {"pooling": if_template_diff, "pairs_loop": loop_diff},
        "ratios": {"pooling": if_times["pooling"] / lafs_times["pooling"], "pairs": loop_s / lafs_times["pairs"],
                   "pairs_vs_insightface": if_times["pairs"] / lafs_times["pairs"], "roc": if_times["roc"] /
                   lafs_times["roc"], "prep": if_times["prep"] / lafs_times["prep"], "total": if_total / lafs_total},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res_json, f, indent=2, default=str)
    return res_json


if __name__ == "__main__":
    main()
