"""Closed-set identification (rank-k / CMC) with distractors: generic, TinyFace and MegaFace Challenge 1 style.

Scores are cosine similarities: every feature is L2-normalised here. Everything is vectorised in torch and chunked
over probes, so a probe x (gallery + distractors) score matrix is never held whole (``chunk_size`` probes at a time;
by default about 2**25 scores per chunk, 128 MiB in float32). Float64 input is computed in float64, anything else
in float32. Non-finite features are an error (a NaN similarity would compare false and look like a hit).

Ranks and ties: a probe's rank is 1 + the number of *non-matching* candidates (gallery items of other identities and
distractors) whose similarity is >= that of its best-matching gallery item. Ties between a match and a non-match
are thus resolved against the probe (pessimistic), so constant or collapsed features score 0, not 100%. Reference
code differs only on exact ties: CVLface's TinyFace evaluation takes ``np.argsort`` order (unspecified for ties),
FaceX-Zoo's MegaFace reimplementation counts a pair correct when ``score >= k-th distractor score`` (optimistic).
With continuous features exact ties do not occur; duplicates (the same image as probe and distractor) do, which is
why the cleaned MegaFace lists matter.

IJB 1:N (``ijb.identification_1n``) follows insightface instead: the mate is the subject's *first* gallery template
and the subject's other templates compete against it. Both count ties against the probe, so the two agree exactly
whenever every subject has one gallery item (the IJB-B/C galleries; a test checks it); with several, the rule here
(best item of the identity, the others never in the way) is the closed-set CMC of TinyFace and MegaFace.

``rank_k_loop`` is a brute-force, per-probe reference (sort every candidate) for tests and benchmarks.
"""

from __future__ import annotations

import numpy as np
import torch

from .metrics import far_count, tar_at_far

DEFAULT_CHUNK_ELEMENTS = 2**25


def _features(x, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(t.shape)}")
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    t = t.to(device=device, dtype=dtype)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: {int((~torch.isfinite(t)).any(1).sum())} rows have non-finite values")
    return torch.nn.functional.normalize(t, dim=1, eps=1e-12)


def _ids(ids, n: int, name: str) -> np.ndarray:
    ids = np.asarray(ids).ravel()
    if len(ids) != n:
        raise ValueError(f"{name}: {len(ids)} ids for {n} feature rows")
    return ids


def _device(device, *xs):
    if device is not None:
        return torch.device(device)
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _chunk(chunk_size: int | None, n_cols: int) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, n_cols))


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ranks must be positive integers, got {ks}")
    return ks


def _encode(probe_ids: np.ndarray, gallery_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of the identities; every probe identity must be in the gallery (closed set)."""
    missing = np.setdiff1d(probe_ids, gallery_ids)
    if len(missing):
        n_probes = int(np.isin(probe_ids, missing).sum())
        shown = ", ".join(repr(m.item() if hasattr(m, "item") else m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"closed-set identification: {len(missing)} probe identities ({n_probes} probes) have no "
                         f"gallery image: {shown}{more}")
    _, codes = np.unique(np.concatenate([gallery_ids, probe_ids]), return_inverse=True)
    return codes[len(gallery_ids):], codes[: len(gallery_ids)]


def identification_ranks(
    probe_feats,
    probe_ids,
    gallery_feats,
    gallery_ids,
    distractor_feats=None,
    *,
    chunk_size: int | None = None,
    device=None,
) -> np.ndarray:
    """1-based rank of each probe's first correct gallery item among gallery + distractors (see the module docstring).

    ``probe_ids`` / ``gallery_ids``: any comparable labels (ints, strings). Distractors have no identity and never
    match. Raises ``ValueError`` if a probe identity has no gallery image.
    """
    dev = _device(device, probe_feats, gallery_feats, distractor_feats)
    probes = _features(probe_feats, "probe_feats", dev)
    gallery = _features(gallery_feats, "gallery_feats", dev)
    distract = None if distractor_feats is None else _features(distractor_feats, "distractor_feats", dev)
    for name, f in (("gallery_feats", gallery), ("distractor_feats", distract)):
        if f is not None and f.shape[1] != probes.shape[1]:
            raise ValueError(f"{name} are {f.shape[1]}-d, probe_feats {probes.shape[1]}-d")
    feats = [f for f in (probes, gallery, distract) if f is not None]
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in feats) else torch.float32
    probes, gallery = probes.to(dtype), gallery.to(dtype)
    distract = None if distract is None else distract.to(dtype)
    p_ids = _ids(probe_ids, len(probes), "probe_ids")
    p_codes, g_codes = _encode(p_ids, _ids(gallery_ids, len(gallery), "gallery_ids"))
    p_codes = torch.as_tensor(p_codes, device=dev)
    g_codes = torch.as_tensor(g_codes, device=dev)

    n_cols = len(gallery) + (0 if distract is None else len(distract))
    step = _chunk(chunk_size, n_cols)
    ranks = []
    for s in range(0, len(probes), step):
        p = probes[s : s + step]
        sim = p @ gallery.T
        match = p_codes[s : s + step, None] == g_codes[None, :]
        best = sim.masked_fill(~match, -torch.inf).amax(dim=1, keepdim=True)  # every probe has a match
        ahead = ((sim >= best) & ~match).sum(dim=1)
        if distract is not None:
            ahead += (p @ distract.T >= best).sum(dim=1)
        ranks.append(ahead + 1)
    return torch.cat(ranks).cpu().numpy()


def rank_k(
    probe_feats,
    probe_ids,
    gallery_feats,
    gallery_ids,
    ks=(1, 5, 20),
    distractor_feats=None,
    *,
    chunk_size: int | None = None,
    device=None,
) -> dict[int, float]:
    """Closed-set rank-k identification rate {k: fraction of probes}, cosine similarity (features L2-normalised).

    A probe is correct at rank k when a gallery item of its identity is within the top k of gallery + distractors
    (ties against the probe, module docstring). Every probe identity must be in the gallery (``ValueError``
    otherwise; CVLface's TinyFace code silently drops such probes instead). Vectorised, chunked over probes.
    """
    ks = _check_ks(ks)
    ranks = identification_ranks(probe_feats, probe_ids, gallery_feats, gallery_ids, distractor_feats,
                                 chunk_size=chunk_size, device=device)
    return {k: float(np.mean(ranks <= k)) for k in ks}


def rank_k_loop(probe_feats, probe_ids, gallery_feats, gallery_ids, ks=(1, 5, 20), distractor_feats=None):
    """Brute-force reference of ``rank_k``: per probe, sort every candidate (numpy, float64) and find the first match.

    Candidates are sorted by similarity, descending; on equal similarity non-matches come first (the pessimistic
    tie rule). Slow (O(P (G + D) log(G + D)) in Python): for tests and benchmarks only.
    """
    ks = _check_ks(ks)

    def norm(x):
        x = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    probes, gallery = norm(probe_feats), norm(gallery_feats)
    candidates = gallery if distractor_feats is None else np.concatenate([gallery, norm(distractor_feats)])
    probe_ids = np.asarray(probe_ids).ravel()
    gallery_ids = np.asarray(gallery_ids).ravel()
    _encode(probe_ids, gallery_ids)  # the same closed-set check and error
    hits = {k: 0 for k in ks}
    for p, pid in zip(probes, probe_ids):
        sims = candidates @ p
        is_match = np.zeros(len(candidates), bool)
        is_match[: len(gallery)] = gallery_ids == pid
        order = np.lexsort((is_match, -sims))  # primary: similarity descending; ties: non-matches first
        rank = int(np.flatnonzero(is_match[order])[0]) + 1
        for k in ks:
            hits[k] += rank <= k
    return {k: hits[k] / len(probes) for k in ks}


def tinyface_identification(
    probe_feats,
    probe_ids,
    gallery_feats,
    gallery_ids,
    distractor_feats,
    ks=(1, 5, 20),
    *,
    chunk_size: int | None = None,
    device=None,
) -> dict:
    """TinyFace closed-set 1:N identification (the KP-RPE paper's; its official code, CVLface ``evaluations/tinyface``).

    Each probe is compared by cosine to gallery = the "match" images plus the distractor set (distractors never
    match; CVLface labels them -100). Rank-k is a hit when a same-identity gallery image is in the top k. CVLface
    computes ranks 1, 5, 20 (the KP-RPE paper reports 1 and 5) as fractions here, x100 there. The probe / gallery /
    distractor lists come from the TinyFace toolkit (``metadata.pt`` in CVLface); they are not built here.

    Returns ``rank`` ({k: rate}), ``num_probes``, ``num_gallery``, ``num_distractors``.
    """
    if distractor_feats is None:
        raise ValueError("TinyFace needs the distractor set (distractor_feats)")
    rates = rank_k(probe_feats, probe_ids, gallery_feats, gallery_ids, ks, distractor_feats,
                   chunk_size=chunk_size, device=device)
    return {"rank": rates, "num_probes": len(probe_feats), "num_gallery": len(gallery_feats),
            "num_distractors": len(distractor_feats)}


def megaface_evaluation(
    probe_feats,
    probe_ids,
    distractor_feats,
    *,
    num_distractors: int | None = None,
    ks=(1,),
    far_targets=(1e-6,),
    chunk_size: int | None = None,
    device=None,
) -> dict:
    """MegaFace Challenge 1 style identification and verification (the LAFS paper's Table 5; its protocol is not in
    the official code, so this is the standard Challenge 1 one).

    Probes are FaceScrub-like images with identities; ``distractor_feats`` the MegaFace distractors (pass the cleaned
    lists: remove the insightface noise list beforehand). ``num_distractors`` uses the first N rows (the devkit's
    10 ... 1,000,000 distractor sets; pass the rows of the set you want in that order).

    Identification (as the MegaFace devkit and FaceX-Zoo's reimplementation of it): for every identity with >= 2
    images and every ordered pair (a, b) of its images, b is the single gallery item among the N distractors and a
    the probe; the pair is correct at rank k when fewer than k distractors score >= sim(a, b) (ties against the
    probe, module docstring; FaceX-Zoo's ``>=`` counts ties for it). The rate is over all such pairs; other
    FaceScrub images are not candidates. Identities with one image contribute no pair.

    Verification: genuine pairs = every unordered same-identity probe pair, impostor pairs = every probe x
    distractor; TAR@FAR by the one rule, ``metrics.tar_at_far`` (accept ``sim > t``, t the most
    permissive threshold whose FAR <= target, from the exact top impostor scores kept while streaming; with fewer
    than 1 / target impostor pairs that is TAR at zero false accepts).

    Returns ``rank`` ({k: rate}), ``num_pairs`` (ordered probe/gallery pairs), ``num_distractors``, ``tar_at_far``,
    ``far`` (FAR reached), ``threshold`` (dicts keyed by ``far_targets``), ``num_genuine``, ``num_impostor``.
    """
    ks = _check_ks(ks)
    dev = _device(device, probe_feats, distractor_feats)
    probes = _features(probe_feats, "probe_feats", dev)
    distract = torch.as_tensor(distractor_feats)
    if num_distractors is not None:
        if not 1 <= num_distractors <= len(distract):
            raise ValueError(f"num_distractors must be in [1, {len(distract)}], got {num_distractors}")
        distract = distract[:num_distractors]
    distract = _features(distract, "distractor_feats", dev)
    if distract.shape[1] != probes.shape[1]:
        raise ValueError(f"distractor_feats are {distract.shape[1]}-d, probe_feats {probes.shape[1]}-d")
    dtype = torch.float64 if torch.float64 in (probes.dtype, distract.dtype) else torch.float32
    probes, distract = probes.to(dtype), distract.to(dtype)
    ids = _ids(probe_ids, len(probes), "probe_ids")
    _, codes = np.unique(ids, return_inverse=True)
    counts = np.bincount(codes)
    n_pairs = int(np.sum(counts * (counts - 1)))
    if n_pairs == 0:
        raise ValueError("MegaFace needs at least one identity with two or more probe images")
    codes = torch.as_tensor(codes, device=dev)
    n_p, n_d = len(probes), len(distract)
    n_imp = n_p * n_d
    kmax = max(ks)
    allowed = {t: far_count(float(t), n_imp) for t in far_targets}
    keep = min(max(allowed.values()) + 1, n_imp) if far_targets else 0  # exact top impostor scores needed

    correct = {k: 0 for k in ks}
    genuine = []
    top_imp = torch.empty(0, dtype=dtype, device=dev)
    step = _chunk(chunk_size, n_d + n_p)
    cols = torch.arange(n_p, device=dev)
    for s in range(0, n_p, step):
        p = probes[s : s + step]
        rows = cols[s : s + step]
        imp = p @ distract.T  # (c, N)
        kth = imp.topk(min(kmax, n_d), dim=1).values  # descending: kth[:, k-1] = k-th best distractor
        if keep:
            flat = imp.flatten()
            top_imp = torch.cat([top_imp, flat.topk(min(keep, len(flat))).values]).topk(
                min(keep, len(top_imp) + len(flat))).values
        sim = p @ probes.T  # (c, P)
        same = (codes[s : s + step, None] == codes[None, :]) & (rows[:, None] != cols[None, :])
        for k in ks:
            if k > n_d:  # fewer than k distractors: every pair is within the top k
                correct[k] += int(same.sum())
            else:
                correct[k] += int((same & (sim > kth[:, k - 1 : k])).sum())
        genuine.append(sim[same & (cols[None, :] > rows[:, None])])  # unordered pairs a < b
    genuine = torch.cat(genuine)

    # the top impostor scores hold every one a target's threshold can be: the one TAR rule reads them
    tar, far, thr = tar_at_far(genuine.cpu().numpy(), top_imp.cpu().numpy(), far_targets, kind="similarity",
                               n_impostor=n_imp)
    return {
        "rank": {k: correct[k] / n_pairs for k in ks},
        "num_pairs": n_pairs,
        "num_distractors": n_d,
        "tar_at_far": tar,
        "far": far,
        "threshold": {target: float(t) for target, t in thr.items()},
        "num_genuine": len(genuine),
        "num_impostor": n_imp,
    }
