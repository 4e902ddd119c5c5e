"""IJB-B / IJB-C 1:1 verification and 1:N identification, insightface's protocol (the evaluation of LAFS, Sun et
al. CVPR 2024, and of KP-RPE, Kim et al. CVPR 2024; the official LAFS code runs insightface's script).

The protocol files and loose crops are read by :mod:`lafs.data.ijb`; this module embeds them and scores.

Pipeline (insightface ``recognition/arcface_torch/eval_ijbc.py``):

1. Each loose crop is aligned with its 5 points to the 112x112 ArcFace template (``lafs.data.align``) and embedded;
   pixels go to the model as ``x / 127.5 - 1``, the arcface_torch script's ``(x / 255 - 0.5) / 0.5`` (the official
   LAFS code's copy feeds ``x / 255 - 0.5``, a mismatch with its own training scaling; not reproduced).
2. Test modes, rendered ``N?D?F?`` by :func:`mode_string`:
   F1 = flip test, the feature is emb(image) + emb(flipped image) (older insightface notebooks call this sum "F2",
   their F1 being a concatenation, not implemented); N1 = the feature norm is kept, N0 = each image feature is
   L2-normalised first; D1 = the feature is multiplied by the detector (faceness) score. Defaults: N1D1F1, the
   arcface_torch script's. (``evaluation/IJB/IJB_evals.py`` inverts its ``use_norm_score`` flag: its "N0" is our N1.)
3. Template feature: the image features of each (template, media) are averaged, the media features summed, and the
   sum L2-normalised (``image2template_feature``, :mod:`lafs.eval.ijb_templates`).
4. 1:1: cosine of the two template features of each pair; ROC as sklearn ``roc_curve``; TAR read at the ROC point
   whose FPR is nearest each target FAR (``FAR_RULES``); AUC as ``metrics.roc_auc``
   (``roc_1to1``: one sort of the scores for both; :mod:`lafs.eval.ijb_roc`). ``score_ijb`` scores the pairs in
   float32 and rescores in float64 only those near each target's threshold (``roc_1to1_pairs``,
   :mod:`lafs.eval.ijb_refine`): the TAR, FPR and threshold of float64 scores in about a third of the time and half
   the memory of scoring every pair in float64 (IJB-C scale).
5. 1:N (``evaluation/IJB/IJB_evals.py``, ``evaluation_1N``): probe_mixed templates against each gallery separately;
   rank-1/5/10 (CMC) and TPIR at FPIR 0.01 / 0.1; see :func:`identification_1n`.

The 1:N CSVs list original protocol file names, which do not match the loose-crop names, so 1:N template features
are the 1:1 template features of the same TEMPLATE_ID (images from tid_mid), as in the reference script.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.ijb import IJBMeta, TemplateSet, iter_aligned_batches, load_aligned_image, load_ijb_meta, template_rows
from ..geometry import estimate_similarity_batch, template, transform_points_batch
from .embedding import embed_images
from .ijb_refine import roc_1to1_pairs
from .ijb_roc import FAR_RULES, FARS, far_key, roc_1to1, roc_curve, tar_at_far
from .ijb_templates import (
    image2template_feature,
    image2template_feature_loop,
    pair_scores,
    pair_scores_loop,
    template_groups,
)

# the protocol's whole API, wherever each piece lives (data reading in lafs.data.ijb, the 1:1 steps in ijb_*)
__all__ = [
    "FARS",
    "FAR_RULES",
    "FPIRS",
    "IJBMeta",
    "TemplateSet",
    "embed_ijb",
    "evaluate_ijb",
    "format_ijb_result",
    "identification_1n",
    "identification_1n_loop",
    "image2template_feature",
    "image2template_feature_loop",
    "iter_aligned_batches",
    "load_aligned_image",
    "load_ijb_meta",
    "mode_string",
    "pair_scores",
    "pair_scores_loop",
    "roc_1to1",
    "roc_1to1_pairs",
    "roc_curve",
    "score_ijb",
    "tar_at_far",
    "template_groups",
    "template_rows",
]

FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)


def mode_string(use_norm_score: bool = True, use_detector_score: bool = True, use_flip_test: bool = True) -> str:
    """Test mode as the insightface scripts print it, e.g. ``"N1D1F1"`` (module docstring, step 2)."""
    return f"N{int(bool(use_norm_score))}D{int(bool(use_detector_score))}F{int(bool(use_flip_test))}"


# --- embeddings -------------------------------------------------------------------------------------------------------


def embed_ijb(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    meta: IJBMeta,
    batch_size: int = 128,
    device="cpu",
    workers: int | None = None,
    flip: bool = True,
) -> torch.Tensor:
    """float32 CPU N x D image features in 5pts order: ``embed_images`` per aligned batch (``x / 127.5 - 1``;
    ``flip`` sums the flipped image's embedding, the F1 mode). Call ``model.eval()`` first. A keypoint-aware
    ``embed_fn`` (``uses_keypoints``, KP-RPE) gets each crop's 5 points as the alignment put them."""
    kps = None
    if getattr(embed_fn, "uses_keypoints", False):
        kps = transform_points_batch(meta.landmarks, estimate_similarity_batch(meta.landmarks, template(112)))
    out = None
    for start, images in iter_aligned_batches(meta, batch_size, workers):
        k = None if kps is None else kps[start : start + len(images)]
        emb = embed_images(embed_fn, images, batch_size=len(images), device=device, flip=flip, keypoints=k)
        if out is None:
            out = torch.empty(len(meta), emb.shape[1], dtype=torch.float32)
        out[start : start + len(emb)] = emb
    if out is None:
        raise ValueError("no images to embed")
    return out



# --- 1:N identification -----------------------------------------------------------------------------------------------


def _threshold_at_fpir(nonmated_top: np.ndarray, fpir: float) -> float:
    # insightface ``evaluation_1N``: the ceil(n * fpir)-th highest non-mated top score (same float expression).
    ranked = np.sort(nonmated_top)[::-1]
    return float(ranked[int(np.ceil(len(ranked) * fpir)) - 1])


def _identification_summary(mated, ranks_of_mate, mate_score, correct, nonmated_top, n_gallery, n_multi, ranks, fpirs):
    n_probes, n_mated = len(mated), int(mated.sum())
    out = {
        "probes": n_probes, "mated": n_mated, "nonmated": n_probes - n_mated, "gallery_templates": n_gallery,
        "subjects_with_multiple_templates": n_multi,
        "rank_hits": {int(k): int((ranks_of_mate[mated] <= k).sum()) for k in ranks},
    }
    out["rank"] = {k: (h / n_mated if n_mated else float("nan")) for k, h in out["rank_hits"].items()}
    tpir, thresholds, achieved = {}, {}, {}
    for fpir in fpirs:
        fpir = float(fpir)
        if n_mated == 0 or len(nonmated_top) == 0 or fpir <= 0:
            tpir[fpir] = thresholds[fpir] = achieved[fpir] = float("nan")
            continue
        thr = _threshold_at_fpir(nonmated_top, fpir)
        thresholds[fpir] = thr
        achieved[fpir] = float((nonmated_top > thr).mean())
        tpir[fpir] = float((correct[mated] & (mate_score[mated] > thr)).sum() / n_mated)
    out.update(tpir_at_fpir=tpir, fpir_thresholds=thresholds, fpir_achieved=achieved)
    return out


def identification_1n(
    probe_features: torch.Tensor,
    probe_subjects,
    gallery_features: torch.Tensor,
    gallery_subjects,
    *,
    ranks=RANKS,
    fpirs=FPIRS,
    chunk_size: int = 4096,
) -> dict:
    """Closed-set CMC and open-set TPIR@FPIR of probe templates against one gallery (unit-norm features).

    As insightface ``evaluation_1N``: a probe is mated when its subject has a gallery template; its mate is the
    *first* gallery template of that subject (gallery order), and other templates of the same subject are treated as
    separate gallery entries (they compete in the ranking; ``subjects_with_multiple_templates`` counts such subjects:
    0 in the IJB-B/C galleries). rank = 1 + number of other gallery templates scoring >= the mate (exact ties count
    against the mate); rank-k = share of mated probes with rank <= k. Open set: threshold = the ceil(n * FPIR)-th
    highest top score of the n non-mated probes; TPIR = share of mated probes whose mate beats every other subject's
    template (strictly) and the threshold (strictly). ``fpir_achieved`` is the share of non-mated tops above it.
    """
    g = gallery_features
    p = probe_features.to(device=g.device, dtype=g.dtype)
    ps = np.asarray(probe_subjects, np.int64).ravel()
    gs = np.asarray(gallery_subjects, np.int64).ravel()
    if len(ps) != len(p) or len(gs) != len(g):
        raise ValueError(f"{len(p)} probes / {len(ps)} probe subjects, {len(g)} gallery / {len(gs)} gallery subjects")
    subj, first_col, counts = np.unique(gs, return_index=True, return_counts=True)
    pos = np.minimum(np.searchsorted(subj, ps), len(subj) - 1)
    mated = subj[pos] == ps
    mate_col = torch.from_numpy(first_col[pos]).to(g.device)
    gs_t, ps_t = torch.from_numpy(gs).to(g.device), torch.from_numpy(ps).to(g.device)
    rank, mate_score, correct, top = (np.empty(len(ps), t) for t in (np.int64, np.float64, bool, np.float64))
    for s in range(0, len(ps), chunk_size):
        e = min(len(ps), s + chunk_size)
        sim = p[s:e] @ g.T
        sm = sim.gather(1, mate_col[s:e, None])
        rank[s:e] = (sim >= sm).sum(1).cpu().numpy()
        others = sim.masked_fill(gs_t[None, :] == ps_t[s:e, None], -torch.inf).amax(1)
        correct[s:e] = (sm[:, 0] > others).cpu().numpy()
        mate_score[s:e] = sm[:, 0].double().cpu().numpy()
        top[s:e] = sim.amax(1).double().cpu().numpy()
    return _identification_summary(mated, rank, mate_score, correct, top[~mated], len(gs), int((counts > 1).sum()),
                                   ranks, fpirs)


def identification_1n_loop(probe_features, probe_subjects, gallery_features, gallery_subjects, *, ranks=RANKS,
                           fpirs=FPIRS) -> dict:
    """Reference for :func:`identification_1n`: one probe at a time in numpy (float64)."""
    p = np.asarray(probe_features, np.float64)
    g = np.asarray(gallery_features, np.float64)
    ps, gs = list(np.asarray(probe_subjects)), np.asarray(gallery_subjects)
    n = len(ps)
    mated, rank, mate_score, correct = np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n), np.zeros(n, bool)
    nonmated_top = []
    for i, subject in enumerate(ps):
        sim = g @ p[i]
        if subject in set(gs.tolist()):
            m = int(np.flatnonzero(gs == subject)[0])
            mated[i] = True
            rank[i] = 1 + sum(1 for j in range(len(gs)) if j != m and sim[j] >= sim[m])
            mate_score[i] = sim[m]
            others = sim[gs != subject]
            correct[i] = bool(sim[m] > others.max()) if len(others) else True
        else:
            nonmated_top.append(sim.max())
    _, counts = np.unique(gs, return_counts=True)
    return _identification_summary(mated, rank, mate_score, correct, np.array(nonmated_top), len(gs),
                                   int((counts > 1).sum()), ranks, fpirs)



# --- end to end -------------------------------------------------------------------------------------------------------


def score_ijb(
    image_features,
    meta: IJBMeta,
    *,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
    use_flip_test: bool = True,
    flip_features=None,
    fars=FARS,
    fpirs=FPIRS,
    far_rule: str = "nearest",
    identification: bool = True,
    device=None,
    dtype: torch.dtype = torch.float64,
    stats: dict | None = None,
) -> dict:
    """Metrics from precomputed image features (N x D, 5pts order).

    F1: if ``flip_features`` (embeddings of the flipped images) is given it is added here; if not, ``image_features``
    are taken to already hold the flip sum (``embed_ijb(flip=True)``). F0 ignores ``flip_features``. The mode is
    recorded in the result, so state it truthfully. Pooling and scoring run on ``device`` in ``dtype``; in float64
    (the default) the 1:1 pairs are scored by :func:`roc_1to1_pairs`: float32 products, with TAR, FPR and threshold
    exactly those of float64 scores (AUC from the float32 scores). ``stats``: a dict that receives the seconds of
    each 1:1 phase (``pooling_s``, ``prep_s`` (pair template rows), ``pairs_s``, ``roc_s``) and
    :func:`roc_1to1_pairs`' other ``stats``.

    Returns ``name``, ``mode``, counts, ``far_rule``, ``tar_at_far`` / ``fpr_at_far`` / ``threshold_at_far`` keyed
    by ``f"{far:g}"``, ``auc`` and, when the 1:N files are present, ``identification``: one entry per gallery
    (``identification_1n``; rank and TPIR keys as strings) and ``mean``: rank-k = all galleries' hits / probes and
    TPIR = mean over galleries (insightface's averaging).
    """
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    feats = torch.as_tensor(image_features)
    if feats.ndim != 2 or len(feats) != len(meta):
        raise ValueError(f"expected {len(meta)} x D image features for {meta.name}, got {tuple(feats.shape)}")
    flip = torch.as_tensor(flip_features) if use_flip_test and flip_features is not None else None
    device = torch.device(device) if device is not None else feats.device
    template_feats, unique_templates = image2template_feature(  # adds the flip features chunk by chunk
        feats, meta.templates, meta.medias, detector_scores=meta.detector_scores, use_norm_score=use_norm_score,
        use_detector_score=use_detector_score, dtype=dtype, device=device, flip_features=flip,
    )
    t1 = time.perf_counter()
    rows1 = template_rows(unique_templates, meta.pairs[:, 0], "pair template 1", np.int32)
    rows2 = template_rows(unique_templates, meta.pairs[:, 1], "pair template 2", np.int32)
    t2 = time.perf_counter()
    stats.update(pooling_s=t1 - t0, prep_s=t2 - t1)
    if template_feats.dtype == torch.float64:
        roc = roc_1to1_pairs(template_feats, rows1, rows2, meta.labels, fars, far_rule, stats=stats)
    else:
        scores = pair_scores(template_feats, rows1, rows2).cpu().numpy()
        t3 = time.perf_counter()
        roc = roc_1to1(scores, meta.labels, fars, far_rule)
        stats.update(pairs_s=t3 - t2, roc_s=time.perf_counter() - t3)
    n_pairs = len(rows1)
    result = {
        "name": meta.name, "mode": mode_string(use_norm_score, use_detector_score, use_flip_test),
        "images": len(meta), "templates": len(unique_templates), "pairs": n_pairs,
        "genuine": int(meta.labels.sum()), "impostor": int(n_pairs - meta.labels.sum()), "far_rule": far_rule,
        **roc,
    }
    if identification and meta.galleries is not None and meta.probes is not None:
        probe = template_feats[torch.from_numpy(template_rows(unique_templates, meta.probes.templates)).to(device)]
        per = {}
        for key, gallery in meta.galleries.items():
            gal = template_feats[torch.from_numpy(template_rows(unique_templates, gallery.templates)).to(device)]
            r = identification_1n(probe, meta.probes.subjects, gal, gallery.subjects, fpirs=fpirs)
            r["rank"] = {str(k): v for k, v in r["rank"].items()}
            r["rank_hits"] = {str(k): v for k, v in r["rank_hits"].items()}
            for field in ("tpir_at_fpir", "fpir_thresholds", "fpir_achieved"):
                r[field] = {far_key(k): v for k, v in r[field].items()}
            per[key] = r
        n_probes = len(meta.probes.templates)
        per["mean"] = {
            "rank": {k: sum(r["rank_hits"][k] for r in per.values()) / n_probes for k in map(str, RANKS)},
            "tpir_at_fpir": {far_key(f): float(np.mean([r["tpir_at_fpir"][far_key(f)] for r in per.values()]))
                             for f in fpirs},
        }
        result["identification"] = per
    return result


def evaluate_ijb(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    root: str | Path,
    name: str,
    batch_size: int = 128,
    device="cpu",
    workers: int | None = None,
    *,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
    use_flip_test: bool = True,
    fars=FARS,
    fpirs=FPIRS,
    far_rule: str = "nearest",
    identification: bool = True,
) -> dict:
    """``load_ijb_meta`` + ``embed_ijb`` (flip summed for F1) + ``score_ijb`` on ``device``; see those."""
    meta = load_ijb_meta(root, name)
    feats = embed_ijb(embed_fn, meta, batch_size=batch_size, device=device, workers=workers, flip=use_flip_test)
    return score_ijb(
        feats, meta, use_norm_score=use_norm_score, use_detector_score=use_detector_score,
        use_flip_test=use_flip_test, fars=fars, fpirs=fpirs, far_rule=far_rule, identification=identification,
        device=device,
    )


def format_ijb_result(result: dict) -> str:
    """A plain-text table of a ``score_ijb`` result, always with its mode (e.g. ``IJBC N1D1F1``)."""
    head = f"{result['name'].upper()} {result['mode']}"
    fars = list(result["tar_at_far"])
    lines = [
        f"{head}: {result['images']} images, {result['templates']} templates, {result['pairs']} pairs "
        f"({result['genuine']} genuine), TAR@FAR rule '{result['far_rule']}'",
        "  TAR@FAR " + " ".join(f"{f:>8}" for f in fars) + "      AUC",
        "          " + " ".join(f"{100 * result['tar_at_far'][f]:8.2f}" for f in fars)
        + f" {100 * result['auc']:8.4f}",
    ]
    ident = result.get("identification")
    if ident:
        for key, r in ident.items():
            ranks = " ".join(f"rank-{k} {100 * v:.2f}" for k, v in r["rank"].items())
            tpirs = " ".join(f"TPIR@FPIR={f} {100 * v:.2f}" for f, v in r["tpir_at_fpir"].items())
            lines.append(f"  1:N {key:<4} {ranks}  {tpirs}")
    return "\n".join(lines)
