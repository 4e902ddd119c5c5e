"""Rank-k identification (generic, TinyFace, MegaFace-style) against brute-force loops, hand cases and errors."""

import numpy as np
import pytest
import torch

from lafs.eval.identification import (
    identification_ranks,
    megaface_evaluation,
    rank_k,
    rank_k_loop,
    tinyface_identification,
)
from lafs.eval.metrics import verification_metrics


def _identities(n_ids=30, per_id=4, n_probe=60, n_distract=300, dim=16, noise=1.0, seed=0, dtype=np.float64):
    """Gallery of ``per_id`` images per identity, probes of random identities, distractors: noisy class centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    g_ids = np.repeat(np.arange(n_ids), per_id)
    gallery = centres[g_ids] + noise * rng.normal(size=(len(g_ids), dim))
    p_ids = rng.integers(0, n_ids, n_probe)
    probes = centres[p_ids] + noise * rng.normal(size=(n_probe, dim))
    distract = rng.normal(size=(n_distract, dim)) * np.sqrt(1 + noise**2)
    return probes.astype(dtype), p_ids, gallery.astype(dtype), g_ids, distract.astype(dtype)


def _loop_ranks(probes, p_ids, gallery, g_ids, distract):
    """Per probe and candidate: rank = 1 + non-matching candidates scoring >= the best match (plain loops)."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    probes, gallery = unit(probes), unit(gallery)
    distract = unit(distract) if distract is not None else np.zeros((0, probes.shape[1]))
    ranks = []
    for p, pid in zip(probes, p_ids):
        best = max(float(g @ p) for g, gid in zip(gallery, g_ids) if gid == pid)
        ahead = sum(float(g @ p) >= best for g, gid in zip(gallery, g_ids) if gid != pid)
        ahead += sum(float(d @ p) >= best for d in distract)
        ranks.append(1 + ahead)
    return np.array(ranks)


@pytest.mark.parametrize("with_distractors", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_rank_k_matches_brute_force(with_distractors, chunk_size):
    probes, p_ids, gallery, g_ids, distract = _identities()
    distract = distract if with_distractors else None
    ks = (1, 2, 5, 20)
    fast = rank_k(probes, p_ids, gallery, g_ids, ks, distract, chunk_size=chunk_size)
    assert fast == rank_k_loop(probes, p_ids, gallery, g_ids, ks, distract)
    ranks = identification_ranks(probes, p_ids, gallery, g_ids, distract, chunk_size=chunk_size)
    assert np.array_equal(ranks, _loop_ranks(probes, p_ids, gallery, g_ids, distract))
    assert fast == {k: float(np.mean(ranks <= k)) for k in ks}
    assert 0.2 < fast[1] < 0.9 and fast[1] <= fast[5] <= fast[20]  # overlapping classes: ranks vary


def test_rank_k_string_ids_tensors_and_float32():
    probes, p_ids, gallery, g_ids, distract = _identities(seed=1)
    names = np.array([f"person_{i:03d}" for i in range(30)])
    ref = rank_k(probes, p_ids, gallery, g_ids, (1, 5), distract)
    assert rank_k(torch.from_numpy(probes), names[p_ids], torch.from_numpy(gallery), list(names[g_ids]), (1, 5),
                  torch.from_numpy(distract)) == ref
    assert rank_k_loop(probes, names[p_ids], gallery, names[g_ids], (1, 5), distract) == ref
    # float32 features give the same ranks unless two scores are within float32 rounding (not on this data)
    r32 = rank_k(probes.astype(np.float32), p_ids, gallery.astype(np.float32), g_ids, (1, 5),
                 distract.astype(np.float32))
    assert r32 == ref
    # scale of the features does not matter (cosine)
    assert rank_k(3 * probes, p_ids, 0.1 * gallery, g_ids, (1, 5), 7 * distract) == ref


def test_rank_k_by_hand_and_ties():
    # 2-d unit features. Probe of id 0 at angle 0; gallery: id 0 at 60 deg, id 1 at 30 deg, id 2 at 90 deg;
    # distractor at 10 deg. Order: distractor (10), id 1 (30), id 0 (60): rank 3.
    def at(*deg):
        r = np.deg2rad(deg)
        return np.stack([np.cos(r), np.sin(r)], 1)

    gallery, g_ids = at(60, 30, 90), [0, 1, 2]
    assert identification_ranks(at(0), [0], gallery, g_ids, at(10)).tolist() == [3]
    assert rank_k(at(0), [0], gallery, g_ids, (1, 2, 3), at(10)) == {1: 0.0, 2: 0.0, 3: 1.0}
    # a second id-0 gallery image at 5 deg: rank 1; the best match counts, not the first
    assert identification_ranks(at(0), [0], at(60, 30, 5), [0, 1, 0], at(10)).tolist() == [1]
    # ties go against the probe: a distractor identical to the match (60 deg) ranks ahead of it, with id 1
    assert identification_ranks(at(0), [0], gallery, g_ids, at(60)).tolist() == [3]
    assert identification_ranks(at(0), [0], at(60), [0], at(60)).tolist() == [2]
    assert rank_k_loop(at(0), [0], at(60), [0], (1, 2), at(60)) == {1: 0.0, 2: 1.0}
    # collapsed (constant) features: every candidate ties, rank-1 is 0, not 100%
    ones = np.ones((4, 3))
    assert rank_k(ones, [0, 1, 2, 3], ones, [0, 1, 2, 3], (1, 4)) == {1: 0.0, 4: 1.0}
    assert rank_k_loop(ones, [0, 1, 2, 3], ones, [0, 1, 2, 3], (1, 4)) == {1: 0.0, 4: 1.0}


def test_rank_k_errors():
    probes, p_ids, gallery, g_ids, distract = _identities(n_ids=10, per_id=2, n_probe=20)
    keep = g_ids != 3
    with pytest.raises(ValueError, match=r"1 probe identities \(\d+ probes\) have no gallery image: 3"):
        rank_k(probes, p_ids, gallery[keep], g_ids[keep])
    with pytest.raises(ValueError, match="have no gallery image"):
        rank_k_loop(probes, p_ids, gallery[keep], g_ids[keep])
    with pytest.raises(ValueError, match="probe_ids: 19 ids for 20 feature rows"):
        rank_k(probes, p_ids[:19], gallery, g_ids)
    with pytest.raises(ValueError, match="distractor_feats are 8-d, probe_feats 16-d"):
        rank_k(probes, p_ids, gallery, g_ids, distractor_feats=distract[:, :8])
    bad = probes.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="probe_feats: 1 rows have non-finite values"):
        rank_k(bad, p_ids, gallery, g_ids)
    with pytest.raises(ValueError, match="ranks must be positive"):
        rank_k(probes, p_ids, gallery, g_ids, ks=(0, 1))
    with pytest.raises(ValueError, match=r"non-empty \(N, D\)"):
        rank_k(probes[:0], p_ids[:0], gallery, g_ids)
    with pytest.raises(ValueError, match="chunk_size"):
        rank_k(probes, p_ids, gallery, g_ids, chunk_size=0)
    with pytest.raises(ValueError, match="needs the distractor set"):
        tinyface_identification(probes, p_ids, gallery, g_ids, None)


def test_tinyface_wrapper():
    probes, p_ids, gallery, g_ids, distract = _identities(seed=2)
    r = tinyface_identification(probes, p_ids, gallery, g_ids, distract)
    assert r["rank"] == rank_k_loop(probes, p_ids, gallery, g_ids, (1, 5, 20), distract)
    assert (r["num_probes"], r["num_gallery"], r["num_distractors"]) == (60, 120, 300)


# --- MegaFace ---------------------------------------------------------------------------------------------------------


def _megaface_loops(probes, p_ids, distract, ks, far_targets):
    """The devkit protocol with explicit loops over identities, ordered pairs, distractors and thresholds."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    probes, distract = unit(probes), unit(distract)
    hits, n_pairs, genuine = {k: 0 for k in ks}, 0, []
    for ident in np.unique(p_ids):
        members = np.flatnonzero(p_ids == ident)
        for b in members:  # the one gallery image, added to the distractors
            for a in members:  # every other image of the identity is a probe
                if a == b:
                    continue
                s = float(probes[a] @ probes[b])
                rank = 1 + sum(float(probes[a] @ d) >= s for d in distract)
                for k in ks:
                    hits[k] += rank <= k
                n_pairs += 1
                if a < b:
                    genuine.append(s)
    genuine = np.array(genuine)
    impostor = (probes @ distract.T).ravel()
    tar = {}
    for target in far_targets:
        best = 0.0
        for t in list(np.unique(impostor)) + [-np.inf]:  # accept sim > t
            if np.sum(impostor > t) / len(impostor) <= target:
                best = max(best, np.mean(genuine > t))
        tar[target] = best
    return {k: hits[k] / n_pairs for k in ks}, n_pairs, genuine, impostor, tar


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_megaface_matches_loops(chunk_size):
    rng = np.random.default_rng(3)
    n_ids, dim = 12, 16
    centres = rng.normal(size=(n_ids, dim))
    p_ids = rng.integers(0, n_ids, 50)
    p_ids[0] = n_ids + 5  # a single-image identity: no pair
    probes = np.concatenate([centres, rng.normal(size=(6, dim))])[p_ids] + 1.1 * rng.normal(size=(50, dim))
    distract = rng.normal(size=(160, dim))
    ks, targets = (1, 3, 10), (1e-6, 1e-3, 1e-2, 0.1)
    r = megaface_evaluation(probes, p_ids, distract, ks=ks, far_targets=targets, chunk_size=chunk_size)
    rank, n_pairs, genuine, impostor, tar = _megaface_loops(probes, p_ids, distract, ks, targets)
    assert r["num_pairs"] == n_pairs and r["num_genuine"] == len(genuine) == n_pairs // 2
    assert r["num_impostor"] == 50 * 160 and r["num_distractors"] == 160
    for k in ks:
        assert abs(r["rank"][k] - rank[k]) <= 1e-12
    assert 0.2 < r["rank"][1] < 0.95
    for t in targets:
        assert abs(r["tar_at_far"][t] - tar[t]) <= 1e-12 and r["far"][t] <= t
    # the same convention as verification_metrics on the explicit genuine + impostor scores
    m = verification_metrics(np.concatenate([genuine, impostor]), np.r_[np.ones(len(genuine), bool),
                             np.zeros(len(impostor), bool)], kind="similarity", far_targets=targets)
    for t in targets:
        assert abs(m["tar_at_far"][t] - r["tar_at_far"][t]) <= 1e-12
        assert m["tar_threshold"][t] == pytest.approx(r["threshold"][t], abs=1e-12)
    # num_distractors = the first N rows; fewer distractors than k: every pair is within the top k
    sub = megaface_evaluation(probes, p_ids, distract, num_distractors=5, ks=(1, 6), chunk_size=chunk_size)
    assert sub["rank"] == megaface_evaluation(probes, p_ids, distract[:5], ks=(1, 6))["rank"]
    assert sub["rank"][6] == 1.0 and sub["num_distractors"] == 5


def test_megaface_errors():
    rng = np.random.default_rng(0)
    probes, distract = rng.normal(size=(4, 8)), rng.normal(size=(10, 8))
    with pytest.raises(ValueError, match="at least one identity with two or more"):
        megaface_evaluation(probes, [0, 1, 2, 3], distract)
    with pytest.raises(ValueError, match=r"num_distractors must be in \[1, 10\]"):
        megaface_evaluation(probes, [0, 0, 1, 1], distract, num_distractors=11)
    with pytest.raises(ValueError, match="distractor_feats are 4-d"):
        megaface_evaluation(probes, [0, 0, 1, 1], distract[:, :4])


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_rule_agrees_with_ijb_1n_for_single_template_subjects(seed):
    """identification.rank_k and ijb.identification_1n (insightface's rule) give the same CMC when each subject has
    one gallery template, ties included (features rounded to a coarse grid so exact ties occur)."""
    from lafs.eval.ijb import identification_1n

    rng = np.random.default_rng(seed)
    # entries +-0.25 in 16-d: unit norm exactly, so normalising is exact and scores are exact multiples of 1/8
    gallery = rng.choice([-0.25, 0.25], (60, 16))
    gallery_ids = rng.permutation(1000)[:60]
    rows = rng.integers(0, 60, 150)
    probe_ids = gallery_ids[rows]
    probes = gallery[rows] * np.where(rng.random((150, 16)) < 0.3, -1, 1)  # the mate with ~30 % signs flipped
    sims = probes @ gallery.T
    assert ((sims == sims[np.arange(150), rows][:, None]).sum(1) > 1).sum() > 10  # ties with the mate occur
    ks = (1, 5, 10)
    ours = rank_k(probes, probe_ids, gallery, gallery_ids, ks=ks)
    ijb = identification_1n(torch.from_numpy(probes), probe_ids, torch.from_numpy(gallery), gallery_ids, ranks=ks)
    assert ijb["mated"] == 150 and ours == ijb["rank"]
    assert 0 < ours[1] < 1
