"""Evaluation speed: vectorised 10-fold verification, rank-k identification and IJB-C-scale scoring vs loops.

1. **10-fold verification** on ``--pairs`` (6,000, LFW's size) pairs of random 512-d unit embeddings with a
   realistic separation: genuine cosine ~ N(0.5, 0.15), impostor cosine ~ N(0.05, 0.07), each pair built with
   exactly that cosine. ``lafs.eval.metrics.ten_fold_accuracy`` (reference grid ``arange(0, 4, 0.01)``; it
   also computes VAL@FAR on a 4,000-threshold grid, AUC, EER and TAR@FAR) against the insightface
   ``calculate_roc`` loop: per fold, per each of the 400 thresholds, the training-fold accuracy with numpy
   (tp/fp/tn/fn sums, as ``calculate_accuracy``), best threshold, test. The loop here omits insightface's
   per-threshold test-fold TPR/FPR, so it is *faster* than the real one and the ratio is a lower bound. Both
   must give the same fold accuracies and thresholds (checked). Timed side by side, alternating, median of
   ``--repeats``, twice: end to end from the 512-d embeddings (both sides normalise in float64 and compute the
   distances, which dominates the vectorised time) and protocol only (the same distances carried by 2-d unit
   pairs). The exact grid (``thresholds="exact"``) is timed too. Then the like-for-like comparison: all metrics on
   both sides, ``ten_fold_accuracy`` against insightface's whole ``evaluate`` written as loops (``evaluate_loop``:
   ``calculate_roc`` with its test-fold TPR/FPR per threshold, and ``calculate_val`` over 4,000 thresholds), with
   fold accuracies, thresholds and VAL@FAR=1e-3 checked equal.
2. **Rank-k identification**: ``--probes`` probes against ``--candidates`` gallery + distractors (one gallery image
   per identity for ``--identities`` identities, the rest distractors), 512-d float32, rank 1/5/20.
   ``lafs.eval.identification.rank_k`` (chunked torch matmul) on all probes vs ``rank_k_loop`` (per probe: scores,
   full sort, first match) on ``--loop-probes`` of them; the loop's time for all probes is extrapolated linearly
   (stated in the output) and its rates are compared with the vectorised ranks of the same probes.

3. **IJB-C-scale 1:1 scoring** (``bench_ijb.py``, also runnable alone): template pooling and 15.6M pair scores on
   random features against a per-template / per-pair Python loop and insightface's numpy scoring, with the peak
   memory of each phase (``--ijb-scale`` shrinks it, ``--skip-ijb`` leaves it out).

Everything printed is measured in this run; the closing summary repeats the headline ratios. Run:
``python benchmarks/bench_eval.py [--ijb-scale 0.1] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lafs.eval.identification import identification_ranks, rank_k_loop
from lafs.eval.metrics import pair_distances, ten_fold_accuracy


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pairs_with_cosines(cos: np.ndarray, dim: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Unit pairs (e1[k], e2[k]) with cosine exactly cos[k] (up to rounding): e2 = c e1 + sqrt(1 - c^2) u, u _|_ e1."""
    e1 = unit_rows(rng.normal(size=(len(cos), dim)))
    u = rng.normal(size=e1.shape)
    u = unit_rows(u - np.sum(u * e1, axis=1, keepdims=True) * e1)
    return e1, cos[:, None] * e1 + np.sqrt(1.0 - cos[:, None] ** 2) * u


def verification_data(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    issame = np.arange(n) % 2 == 0  # alternating like the LFW .bin lists, so every fold is balanced
    cos = np.where(issame, rng.normal(0.5, 0.15, n), rng.normal(0.05, 0.07, n)).clip(-0.99, 0.99)
    e1, e2 = pairs_with_cosines(cos, dim, rng)
    return e1.astype(np.float32), e2.astype(np.float32), issame


def calculate_roc_loop(embeddings1, embeddings2, actual_issame, nfolds: int = 10):
    """insightface ``calculate_roc`` accuracy part with explicit loops (unshuffled KFold, 400 thresholds)."""
    e1 = unit_rows(np.asarray(embeddings1, np.float64))
    e2 = unit_rows(np.asarray(embeddings2, np.float64))
    dist = np.sum(np.square(e1 - e2), 1)
    thresholds = np.arange(0, 4, 0.01)
    indices = np.arange(len(actual_issame))

    def accuracy(threshold, d, same):
        predict = np.less(d, threshold)
        tp = np.sum(np.logical_and(predict, same))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(same)))
        return float(tp + tn) / d.size

    accs, best = [], []
    for test_set in np.array_split(indices, nfolds):
        train_set = np.setdiff1d(indices, test_set)
        acc_train = np.zeros(len(thresholds))
        for i, threshold in enumerate(thresholds):
            acc_train[i] = accuracy(threshold, dist[train_set], actual_issame[train_set])
        b = int(np.argmax(acc_train))
        best.append(thresholds[b])
        accs.append(accuracy(thresholds[b], dist[test_set], actual_issame[test_set]))
    return accs, best


def evaluate_loop(embeddings1, embeddings2, actual_issame, nfolds: int = 10, far_target: float = 1e-3):
    """insightface ``evaluate`` as written, loop for loop: ``calculate_roc`` (per fold, per threshold: train accuracy,
    and the test fold's TPR / FPR / accuracy for the ROC) plus ``calculate_val`` (per fold, per threshold of
    ``arange(0, 4, 0.001)``: train FAR; then VAL / FAR on the test fold). The VAL threshold is picked by lafs's rule
    (largest threshold with train FAR <= target) instead of insightface's ``interp1d``, so the two can be compared
    exactly (see ``ten_fold_accuracy``). Returns fold accuracies, best thresholds, mean VAL."""
    e1 = unit_rows(np.asarray(embeddings1, np.float64))
    e2 = unit_rows(np.asarray(embeddings2, np.float64))
    dist = np.sum(np.square(e1 - e2), 1)
    thresholds = np.arange(0, 4, 0.01)
    indices = np.arange(len(actual_issame))

    def accuracy(threshold, d, same):  # insightface calculate_accuracy
        predict = np.less(d, threshold)
        tp = np.sum(np.logical_and(predict, same))
        fp = np.sum(np.logical_and(predict, np.logical_not(same)))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(same)))
        fn = np.sum(np.logical_and(np.logical_not(predict), same))
        tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
        fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
        return tpr, fpr, float(tp + tn) / d.size

    def val_far(threshold, d, same):  # insightface calculate_val_far
        predict = np.less(d, threshold)
        ta = np.sum(np.logical_and(predict, same))
        fa = np.sum(np.logical_and(predict, np.logical_not(same)))
        return float(ta) / np.sum(same), float(fa) / np.sum(np.logical_not(same))

    accs, best, vals = [], [], []
    tprs = np.zeros((nfolds, len(thresholds)))
    fprs = np.zeros((nfolds, len(thresholds)))
    val_thresholds = np.arange(0, 4, 0.001)
    for f, test_set in enumerate(np.array_split(indices, nfolds)):
        train_set = np.setdiff1d(indices, test_set)
        acc_train = np.zeros(len(thresholds))
        for i, threshold in enumerate(thresholds):
            _, _, acc_train[i] = accuracy(threshold, dist[train_set], actual_issame[train_set])
        b = int(np.argmax(acc_train))
        for i, threshold in enumerate(thresholds):
            tprs[f, i], fprs[f, i], _ = accuracy(threshold, dist[test_set], actual_issame[test_set])
        best.append(thresholds[b])
        accs.append(accuracy(thresholds[b], dist[test_set], actual_issame[test_set])[2])
        far_train = np.zeros(len(val_thresholds))
        for i, threshold in enumerate(val_thresholds):
            _, far_train[i] = val_far(threshold, dist[train_set], actual_issame[train_set])
        pick = max(int(np.sum(far_train <= far_target)) - 1, 0)
        vals.append(val_far(val_thresholds[pick], dist[test_set], actual_issame[test_set])[0])
    return accs, best, float(np.mean(vals))


def _time_side_by_side(e1, e2, issame, repeats):
    t_vec, t_exact, t_loop = [], [], []
    for _ in range(repeats):  # alternate, so both see the same machine load
        t0 = time.perf_counter()
        r = ten_fold_accuracy(e1, e2, issame)
        t_vec.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r_exact = ten_fold_accuracy(e1, e2, issame, thresholds="exact")
        t_exact.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        accs, best = calculate_roc_loop(e1, e2, issame)
        t_loop.append(time.perf_counter() - t0)
    same = r["fold_accuracies"] == accs and r["fold_thresholds"] == [float(b) for b in best]
    times = {"vectorised_s": float(np.median(t_vec)), "exact_grid_s": float(np.median(t_exact)),
             "loop_s": float(np.median(t_loop)), "ratio": float(np.median(t_loop) / np.median(t_vec)),
             "identical": bool(same)}
    return times, r, r_exact, accs


def _time_full_evaluate(e1, e2, issame, repeats):
    """All metrics on both sides: ten_fold_accuracy vs insightface's evaluate loops (accuracy + ROC + VAL@FAR)."""
    t_vec, t_loop = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = ten_fold_accuracy(e1, e2, issame)
        t_vec.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        accs, best, val = evaluate_loop(e1, e2, issame)
        t_loop.append(time.perf_counter() - t0)
    same = (r["fold_accuracies"] == accs and r["fold_thresholds"] == [float(b) for b in best]
            and r["val_at_far"] == val)
    return {"vectorised_s": float(np.median(t_vec)), "loop_s": float(np.median(t_loop)),
            "ratio": float(np.median(t_loop) / np.median(t_vec)), "identical": bool(same), "val_at_far_loop": val}


def bench_verification(n: int, dim: int, repeats: int) -> dict:
    e1, e2, issame = verification_data(n, dim)
    evaluate = _time_full_evaluate(e1, e2, issame, max(1, repeats // 2))
    full, r, r_exact, accs = _time_side_by_side(e1, e2, issame, repeats)
    # Protocol only: the same distances carried by 2-d unit pairs, so computing them costs nothing on either side.
    dist = pair_distances(e1, e2)
    c = 1.0 - dist / 2.0
    p1 = np.tile([1.0, 0.0], (n, 1))
    p2 = np.stack([c, np.sqrt(1.0 - c**2)], axis=1)
    protocol, _, _, _ = _time_side_by_side(p1, p2, issame, repeats)
    return {
        "pairs": n, "dim": dim, "repeats": repeats, "end_to_end": full, "protocol_only": protocol,
        "insightface_evaluate": evaluate,
        "accuracy": r["accuracy"], "accuracy_loop": float(np.mean(accs)),
        "accuracy_exact_grid": r_exact["accuracy"], "eer": r["eer"], "auc": r["auc"],
        "tar_at_far": {str(k): v for k, v in r["tar_at_far"].items()}, "val_at_far": r["val_at_far"],
    }


def identification_data(n_probes: int, n_candidates: int, n_ids: int, dim: int, seed: int = 0):
    """One gallery image per identity; gallery and (noisier) probes around identity centres, probe-gallery cosine
    ~0.21; random distractors (cosine ~N(0, 0.044) to everything). Rank-1 ~70%, TinyFace-like."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_ids, dim, generator=g), dim=1)
    gallery = centres + 1.2 * torch.randn(n_ids, dim, generator=g) / dim**0.5
    p_ids = torch.randint(0, n_ids, (n_probes,), generator=g)
    probes = centres[p_ids] + 2.8 * torch.randn(n_probes, dim, generator=g) / dim**0.5
    distract = torch.randn(n_candidates - n_ids, dim, generator=g)
    return probes, p_ids.numpy(), gallery, np.arange(n_ids), distract


def bench_identification(n_probes, n_candidates, n_ids, dim, loop_probes, ks=(1, 5, 20)) -> dict:
    probes, p_ids, gallery, g_ids, distract = identification_data(n_probes, n_candidates, n_ids, dim)
    t0 = time.perf_counter()
    ranks = identification_ranks(probes, p_ids, gallery, g_ids, distract)
    t_vec = time.perf_counter() - t0
    rates = {k: float(np.mean(ranks <= k)) for k in ks}
    sub = np.random.default_rng(1).choice(n_probes, loop_probes, replace=False)
    t0 = time.perf_counter()
    loop_rates = rank_k_loop(probes[sub], p_ids[sub], gallery, g_ids, ks, distract)
    t_loop = time.perf_counter() - t0
    vec_sub = {k: float(np.mean(ranks[sub] <= k)) for k in ks}
    return {
        "probes": n_probes, "candidates": n_candidates, "gallery": n_ids, "distractors": n_candidates - n_ids,
        "dim": dim, "rank": rates, "vectorised_s": t_vec, "loop_probes": loop_probes, "loop_s": t_loop,
        "loop_s_extrapolated": t_loop * n_probes / loop_probes,
        "ratio_extrapolated": t_loop * n_probes / loop_probes / t_vec,
        "subsample_rank_vectorised": vec_sub, "subsample_rank_loop": loop_rates,
        "subsample_agree": vec_sub == loop_rates,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--probes", type=int, default=10_000)
    ap.add_argument("--candidates", type=int, default=100_000, help="gallery + distractors")
    ap.add_argument("--identities", type=int, default=5_000, help="gallery size (one image per identity)")
    ap.add_argument("--loop-probes", type=int, default=100)
    ap.add_argument("--skip-identification", action="store_true")
    ap.add_argument("--ijb-scale", type=float, default=1.0, help="IJB-C counts x this (bench_ijb --scale)")
    ap.add_argument("--ijb-threads", type=int, default=1, help="torch threads for the IJB part (bench_ijb --threads)")
    ap.add_argument("--skip-ijb", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, numpy {np.__version__}, torch threads {torch.get_num_threads()}")

    v = bench_verification(args.pairs, args.dim, args.repeats)
    print(f"10-fold verification, {v['pairs']} pairs x {v['dim']}-d (median of {v['repeats']}, alternating):")
    for key, what in (("end_to_end", f"from {v['dim']}-d embeddings (float64 normalise + distance included)"),
                      ("protocol_only", "protocol only (distances given: 2-d pairs)")):
        t = v[key]
        print(f"  {what}:")
        print(f"    vectorised ten_fold_accuracy (all metrics) : {1e3 * t['vectorised_s']:9.2f} ms")
        print(f"    vectorised, exact threshold grid          : {1e3 * t['exact_grid_s']:9.2f} ms")
        print(f"    insightface-style loop (accuracy only)    : {1e3 * t['loop_s']:9.2f} ms")
        print(f"    loop / vectorised: {t['ratio']:.1f}x; same fold accuracies and thresholds: {t['identical']}")
    t = v["insightface_evaluate"]
    print(f"  all metrics on both sides, from {v['dim']}-d embeddings (median of {max(1, v['repeats'] // 2)}):")
    print(f"    vectorised ten_fold_accuracy (all metrics) : {1e3 * t['vectorised_s']:9.2f} ms")
    print(f"    insightface evaluate loops (ROC + VAL@FAR) : {1e3 * t['loop_s']:9.2f} ms")
    print(f"    loop / vectorised: {t['ratio']:.1f}x; same fold accuracies, thresholds and VAL@FAR=1e-3: "
          f"{t['identical']}")
    print(f"  accuracy {v['accuracy']:.4f} (loop {v['accuracy_loop']:.4f}, exact grid "
          f"{v['accuracy_exact_grid']:.4f}), EER {v['eer']:.4f}, AUC {v['auc']:.5f}, "
          f"TAR@FAR {v['tar_at_far']}, VAL@FAR=1e-3 {v['val_at_far']:.4f}")
    result = {"verification": v}
    if not args.skip_identification:
        i = bench_identification(args.probes, args.candidates, args.identities, args.dim, args.loop_probes)
        print(f"rank-k identification, {i['probes']} probes x {i['candidates']} candidates ({i['gallery']} gallery "
              f"+ {i['distractors']} distractors), {i['dim']}-d float32:")
        print(f"  vectorised rank_k (chunked matmul), all probes: {i['vectorised_s']:8.2f} s; rates {i['rank']}")
        print(f"  per-probe loop on {i['loop_probes']} probes: {i['loop_s']:.2f} s -> extrapolated to "
              f"{i['probes']} probes (linear): {i['loop_s_extrapolated']:.0f} s")
        print(f"  loop / vectorised (extrapolated): {i['ratio_extrapolated']:.0f}x; subsample rates vectorised "
              f"{i['subsample_rank_vectorised']} vs loop {i['subsample_rank_loop']}: agree {i['subsample_agree']}")
        result["identification"] = i
    if not args.skip_ijb:
        import bench_ijb  # the sibling script (benchmarks/ is on sys.path when this file runs)

        print()
        threads = torch.get_num_threads()
        result["ijb"] = bench_ijb.main(["--scale", str(args.ijb_scale), "--threads", str(args.ijb_threads)])
        torch.set_num_threads(threads)
    print("\nsummary (ratios measured side by side above):")
    ok = all(v[k]["identical"] for k in ("end_to_end", "protocol_only", "insightface_evaluate"))
    print(f"  10-fold verification, {v['pairs']} pairs, vs per-threshold loops: accuracy-only loop "
          f"{v['end_to_end']['ratio']:.1f}x end to end from embeddings, {v['protocol_only']['ratio']:.1f}x protocol "
          f"only; insightface evaluate (accuracy + ROC + VAL) {v['insightface_evaluate']['ratio']:.1f}x; "
          f"same results: {ok}")
    if "identification" in result:
        print(f"  rank-k identification: {result['identification']['ratio_extrapolated']:.0f}x vs the per-probe loop "
              "(extrapolated)")
    if "ijb" in result:
        j = result["ijb"]
        print(f"  IJB-C x {j['scale']:g} scoring ({j['pairs']:,} pairs, {j['templates']:,} templates): pooling "
              f"{j['ratios']['pooling']:.1f}x vs insightface's pooling, pair scores {j['ratios']['pairs']:.1f}x vs a "
              f"per-pair loop (extrapolated), {j['ratios']['pairs_vs_insightface']:.1f}x vs insightface numpy; vectorised "
              f"{j['vectorised']['pooling_s'] + j['vectorised']['pairs_s']:.2f} s, peak "
              f"{max(j['vectorised']['pooling_peak_mib'], j['vectorised']['pairs_peak_mib']):.0f} MiB above start")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(v[k]["identical"] for k in ("end_to_end", "protocol_only", "insightface_evaluate")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
