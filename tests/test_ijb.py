"""IJB-B/C protocol: meta parsing and its errors, vectorised pooling / pair scores / ROC / 1:N against loop references,
and an end-to-end run on a small generated IJB-format folder."""

import csv
import math

import cv2
import numpy as np
import pytest
import torch

import lafs.eval.ijb_refine as refine_module
from lafs.data.align import align_face
from lafs.eval.ijb import (
    FARS,
    evaluate_ijb,
    format_ijb_result,
    identification_1n,
    identification_1n_loop,
    image2template_feature,
    image2template_feature_loop,
    iter_aligned_batches,
    load_ijb_meta,
    mode_string,
    pair_scores,
    pair_scores_loop,
    roc_1to1,
    roc_1to1_pairs,
    roc_curve,
    score_ijb,
    tar_at_far,
    template_groups,
    template_rows,
)
from lafs.geometry import ARCFACE_TEMPLATE

# --- fixture ----------------------------------------------------------------------------------------------------------

# template id -> subject id, images; galleries G1 = {11, 12}, G2 = {13, 14}; probes 21..26 (26: subject in no gallery)
TEMPLATES = {11: (101, 6), 12: (102, 3), 13: (103, 5), 14: (104, 2), 21: (101, 4), 22: (102, 5), 23: (103, 3),
             24: (104, 4), 25: (101, 5), 26: (105, 3)}
G1, G2, PROBES = (11, 12), (13, 14), (21, 22, 23, 24, 25, 26)


def write_ijb(root, name="ijbc", seed=0):
    """A 40-image IJB folder: loose_crop JPEGs, landmarks near the ArcFace template, tid_mid / 5pts / pairs / 1:N."""
    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True)
    meta = root / "meta"
    meta.mkdir()
    names, tids, mids, lmks, scores = [], [], [], [], []
    for t, (_, count) in TEMPLATES.items():
        media = rng.integers(0, 3, count) + 1000 * (t % 10)  # uneven media groups; templates 11 and 21 share ids
        for m in media:
            i = len(names) + 1
            h, w = rng.integers(90, 150, 2)
            img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
            cv2.imwrite(str(root / "loose_crop" / f"{i}.jpg"), img)
            names.append(f"{i}.jpg")
            tids.append(t)
            mids.append(int(m))
            lmks.append(ARCFACE_TEMPLATE * np.array([w / 112, h / 112]) + rng.uniform(-2, 2, (5, 2)))
            scores.append(rng.uniform(0.3, 1.0))
    (meta / f"{name}_face_tid_mid.txt").write_text("".join(f"{n} {t} {m}\n" for n, t, m in zip(names, tids, mids)))
    (meta / f"{name}_name_5pts_score.txt").write_text("".join(
        f"{n} " + " ".join(f"{v:.3f}" for v in lm.ravel()) + f" {s:.3f}\n" for n, lm, s in zip(names, lmks, scores)))
    pairs = [(g, p, int(TEMPLATES[g][0] == TEMPLATES[p][0])) for g in G1 + G2 for p in PROBES]
    (meta / f"{name}_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    for fname, group in ((f"{name}_1N_gallery_G1.csv", G1), (f"{name}_1N_gallery_G2.csv", G2),
                         (f"{name}_1N_probe_mixed.csv", PROBES)):
        with open(meta / fname, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME", "SIGHTING_ID"])
            for n, t in zip(names, tids):
                if t in group:
                    w.writerow([t, TEMPLATES[t][0], f"img/{n}", 0])
    return dict(names=names, templates=np.array(tids), medias=np.array(mids), pairs=np.array(pairs),
                landmarks=np.array(lmks, np.float32), scores=np.array(scores, np.float32))


@pytest.fixture
def ijb(tmp_path):
    return tmp_path, write_ijb(tmp_path)


def _edit(path, lineno, new):
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = new
    path.write_text("".join(lines))


# --- meta ------------------------------------------------------------------------------------------------------------


def test_load_meta_round_trip(ijb):
    root, want = ijb
    meta = load_ijb_meta(root, "IJBC")
    assert meta.name == "ijbc" and len(meta) == 40 and meta.image_dir == root / "loose_crop"
    assert list(meta.image_names) == want["names"]
    np.testing.assert_array_equal(meta.templates, want["templates"])
    np.testing.assert_array_equal(meta.medias, want["medias"])
    np.testing.assert_allclose(meta.landmarks, want["landmarks"], atol=6e-4)
    np.testing.assert_allclose(meta.detector_scores, want["scores"], atol=6e-4)
    np.testing.assert_array_equal(meta.pairs, want["pairs"][:, :2])
    np.testing.assert_array_equal(meta.labels, want["pairs"][:, 2])
    assert list(meta.galleries) == ["G1", "G2"]
    np.testing.assert_array_equal(meta.galleries["G2"].templates, G2)
    np.testing.assert_array_equal(meta.galleries["G2"].subjects, [103, 104])
    np.testing.assert_array_equal(meta.probes.templates, PROBES)
    np.testing.assert_array_equal(meta.probes.subjects, [TEMPLATES[t][0] for t in PROBES])
    assert meta.probes.images == sum(TEMPLATES[t][1] for t in PROBES)


def test_meta_without_1n_files_and_ijbb_gallery_names(ijb):
    root, _ = ijb
    for f in (root / "meta").glob("*.csv"):
        f.unlink()
    assert load_ijb_meta(root, "ijbc").galleries is None
    with pytest.raises(ValueError, match="name must be one of"):
        load_ijb_meta(root, "ijbs")
    root2 = root / "b"
    write_ijb(root2, name="ijbb")
    for k in "12":
        (root2 / "meta" / f"ijbb_1N_gallery_G{k}.csv").rename(root2 / "meta" / f"ijbb_1N_gallery_S{k}.csv")
    assert list(load_ijb_meta(root2, "ijbb").galleries) == ["S1", "S2"]


@pytest.mark.parametrize(
    "file, line, new, match",
    [
        ("face_tid_mid.txt", 3, "3.jpg 11\n", r"ijbc_face_tid_mid.txt, line 3: expected 3 fields"),
        ("face_tid_mid.txt", 4, "4.jpg 11 x\n", r"ijbc_face_tid_mid.txt, line 4: template and media ids must be int"),
        ("name_5pts_score.txt", 5, "5.jpg 1 2 3 4 5 6 7 8 9 abc 0.9\n", r"5pts_score.txt, line 5: landmarks and score"),
        ("name_5pts_score.txt", 6, "6.jpg 1 2 3 4 5 6 7 8 9 0.9\n", r"5pts_score.txt, line 6: expected 12 fields"),
        ("name_5pts_score.txt", 2, "99.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n",
         r"tid_mid.txt, line 2 names image '2.jpg' but .*5pts_score.txt, line 2 names '99.jpg'"),
        ("template_pair_label.txt", 7, "11 2x 1\n", r"template_pair_label.txt, line 7: fields must be integers"),
        ("template_pair_label.txt", 8, "11 21\n", r"template_pair_label.txt, line 8: expected 3 fields"),
        ("template_pair_label.txt", 4, "11 999 0\n", r"template_pair_label.txt, line 4: template 999 has no image"),
        ("template_pair_label.txt", 9, "11 21 2\n", r"template_pair_label.txt, line 9: label must be 0 or 1"),
        ("1N_gallery_G1.csv", 1, "TEMPLATE_ID,FILENAME\n", r"1N_gallery_G1.csv, line 1: header has no SUBJECT_ID"),
        ("1N_gallery_G2.csv", 3, "13,777,img/x.jpg,0\n", r"1N_gallery_G2.csv, line 3: template 13 has SUBJECT_ID 777"),
        ("1N_probe_mixed.csv", 2, "555,101,img/x.jpg,0\n", r"1N_probe_mixed.csv, line 2: template 555 has no image"),
        ("1N_probe_mixed.csv", 4, "21,abc,img/x.jpg,0\n", r"1N_probe_mixed.csv, line 4: TEMPLATE_ID and SUBJECT_ID"),
    ],
)
def test_meta_errors_name_file_and_line(ijb, file, line, new, match):
    root, _ = ijb
    _edit(root / "meta" / f"ijbc_{file}", line, new)
    with pytest.raises(ValueError, match=match):
        load_ijb_meta(root, "ijbc")


def test_meta_errors_lengths_blank_lines_and_missing_files(ijb):
    root, _ = ijb
    pairs = root / "meta" / "ijbc_template_pair_label.txt"
    text = pairs.read_text().splitlines(keepends=True)
    pairs.write_text("".join(text[:2] + ["\n"] + text[2:4] + ["12 998 0\n"] + text[5:]))  # blank line 3
    with pytest.raises(ValueError, match=r"line 6: template 998"):  # a real line number, not a row index
        load_ijb_meta(root, "ijbc")
    pairs.write_text("".join(text))
    pts = root / "meta" / "ijbc_name_5pts_score.txt"
    full = pts.read_text()
    pts.write_text("".join(full.splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match=r"tid_mid.txt lists 40 images but .*5pts_score.txt lists 39"):
        load_ijb_meta(root, "ijbc")
    pts.write_text(full)
    (root / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    with pytest.raises(FileNotFoundError, match="1N_gallery_G2.csv"):
        load_ijb_meta(root, "ijbc")
    pts.unlink()
    with pytest.raises(FileNotFoundError, match="5pts_score.txt not found"):
        load_ijb_meta(root, "ijbc")


def test_mode_string():
    assert mode_string() == "N1D1F1"
    assert mode_string(False, True, False) == "N0D1F0"
    assert mode_string(use_norm_score=True, use_detector_score=False, use_flip_test=True) == "N1D0F1"


# --- template pooling ------------------------------------------------------------------------------------------------


def _random_groups(rng, n_templates=37, max_images=25):
    templates, medias = [], []
    for t in rng.permutation(np.arange(n_templates) * 7 + 3):
        k = int(rng.integers(1, max_images))
        templates += [t] * k
        medias += list(rng.integers(0, max(1, k // 3) + 1, k) + 50 * (t % 4))  # ids shared across templates
    order = rng.permutation(len(templates))  # images of a template are not contiguous in IJB either
    return np.array(templates)[order], np.array(medias)[order]


def test_template_groups_counts_media_within_template():
    templates = np.array([5, 5, 5, 9, 9, 5])
    medias = np.array([1, 1, 2, 1, 1, 1])  # media 1 appears in both templates: separate groups
    uniq, rows, size = template_groups(templates, medias)
    np.testing.assert_array_equal(uniq, [5, 9])
    np.testing.assert_array_equal(rows, [0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(size, [3, 3, 1, 2, 2, 3])


@pytest.mark.parametrize("use_norm_score", [True, False])
@pytest.mark.parametrize("use_detector_score", [True, False])
def test_pooling_matches_loop_in_every_mode(use_norm_score, use_detector_score):
    rng = np.random.default_rng(1)
    templates, medias = _random_groups(rng)
    n = len(templates)
    feats = rng.normal(size=(n, 24)).astype(np.float32) * rng.uniform(0.2, 5, (n, 1)).astype(np.float32)
    flip = rng.normal(size=(n, 24)).astype(np.float32)
    det = rng.uniform(0.1, 1, n).astype(np.float32)
    # The reference preprocessing, written as the insightface script does it (flip sum, N, D), then its pooling loop.
    x = (feats + flip).astype(np.float64)
    if not use_norm_score:
        x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
    if use_detector_score:
        x = x * det[:, None].astype(np.float64)
    want, want_ids = image2template_feature_loop(x, templates, medias)
    got, ids = image2template_feature(torch.from_numpy(feats + flip), templates, medias, detector_scores=det,
                                      use_norm_score=use_norm_score, use_detector_score=use_detector_score,
                                      chunk_size=97)
    np.testing.assert_array_equal(ids, want_ids)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-12, atol=1e-13)
    got32, _ = image2template_feature(feats + flip, templates, medias, detector_scores=det, dtype=torch.float32,
                                      use_norm_score=use_norm_score, use_detector_score=use_detector_score)
    torch.testing.assert_close(got32, torch.from_numpy(want).float(), rtol=1e-5, atol=1e-6)


def test_pooling_by_hand_and_zero_feature():
    # template 1: media 7 = {[2,0], [0,0]} -> mean [1,0]; media 8 = {[0,3]} -> sum [1,3] -> /sqrt(10)
    # template 2: a zero feature stays zero (N0 would divide by zero in the reference).
    feats = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    got, ids = image2template_feature(feats, [1, 1, 1, 2], [7, 7, 8, 7])
    torch.testing.assert_close(got, torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=torch.float64) / torch.tensor(
        [[math.sqrt(10)], [1.0]], dtype=torch.float64))
    got0, _ = image2template_feature(feats, [1, 1, 1, 2], [7, 7, 8, 7], use_norm_score=False)
    assert torch.isfinite(got0).all() and got0[1].abs().sum() == 0
    with pytest.raises(ValueError, match="detector_scores"):
        image2template_feature(feats, [1, 1, 1, 2], [7, 7, 8, 7], use_detector_score=True)
    with pytest.raises(ValueError, match="4 image features for 3 images"):
        image2template_feature(feats, [1, 1, 1], [7, 7, 8])


# --- pair scores -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "gemm", "gather"])
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("block_elements", [1 << 23, 100])
def test_pair_scores_match_loop(method, dense, block_elements):
    rng = np.random.default_rng(2)
    n = 60 if dense else 4000  # 4000 x 4000 templates for 3000 pairs: too sparse for a product, the gather path
    f = torch.nn.functional.normalize(torch.randn(n, 16, dtype=torch.float64), dim=1)
    if dense:  # gallery x probe structure, like IJB
        r1, r2 = rng.integers(0, 8, 3000), rng.integers(8, 60, 3000)
    else:
        r1, r2 = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    got = pair_scores(f, r1, r2, chunk_size=700, method=method, block_elements=block_elements)
    np.testing.assert_allclose(got.numpy(), pair_scores_loop(f.numpy(), r1, r2), rtol=0, atol=1e-13)
    got32 = pair_scores(f.float(), r1, r2, chunk_size=700, method=method, block_elements=block_elements)
    np.testing.assert_allclose(got32.numpy(), pair_scores_loop(f.numpy(), r1, r2), rtol=0, atol=1e-6)


def test_pair_scores_rejects_bad_rows():
    f = torch.eye(3)
    with pytest.raises(IndexError):
        pair_scores(f, [0, 3], [1, 1])
    assert len(pair_scores(f, [], [])) == 0


# --- ROC and TAR@FAR -------------------------------------------------------------------------------------------------


def _sklearn_roc_py(scores, labels):
    """sklearn ``roc_curve`` (drop_intermediate=True) in plain Python."""
    pts = sorted(zip(scores, labels), key=lambda p: -p[0])
    fps, tps, thr, tp, fp = [], [], [], 0, 0
    for i, (s, y) in enumerate(pts):
        tp, fp = tp + y, fp + (1 - y)
        if i == len(pts) - 1 or pts[i + 1][0] != s:
            fps.append(fp), tps.append(tp), thr.append(s)
    if len(fps) > 2:
        keep = [0] + [i for i in range(1, len(fps) - 1)
                      if fps[i + 1] - 2 * fps[i] + fps[i - 1] or tps[i + 1] - 2 * tps[i] + tps[i - 1]] + [len(fps) - 1]
        fps, tps, thr = [fps[i] for i in keep], [tps[i] for i in keep], [thr[i] for i in keep]
    fps, tps, thr = [0] + fps, [0] + tps, [math.inf] + thr
    return [f / fps[-1] for f in fps], [t / tps[-1] for t in tps], thr


def _insightface_tar_py(scores, labels, far):
    """insightface: roc_curve, flip both arrays, TPR at the first minimum of |FPR - FAR|."""
    fpr, tpr, _ = _sklearn_roc_py(scores, labels)
    fpr, tpr = fpr[::-1], tpr[::-1]
    _, i = min((abs(f - far), i) for i, f in enumerate(fpr))
    return tpr[i]


def _floor_tar_py(scores, labels, far):
    n_pos, n_neg = sum(labels), len(labels) - sum(labels)
    best = 0.0
    for t in set(scores):
        fp = sum(1 for s, y in zip(scores, labels) if s >= t and not y)
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        if fp / n_neg <= far:
            best = max(best, tp / n_pos)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_matches_python_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(400) < 0.3).astype(int)
    scores = np.round(rng.normal(size=400) + 1.5 * labels, 1)  # heavy ties
    n_neg = int((labels == 0).sum())
    fars = (1e-3, 0.01, 0.05, 0.1, 0.3, 3 / n_neg, 10 / n_neg, 0.5)  # some targets sit exactly on ROC points
    fpr, tpr, thr = roc_curve(scores, labels)
    rf, rt, rthr = _sklearn_roc_py(scores.tolist(), labels.tolist())
    assert fpr.tolist() == rf and tpr.tolist() == rt and thr.tolist() == rthr
    got = tar_at_far(scores, labels, fars)
    assert got == {f: _insightface_tar_py(scores.tolist(), labels.tolist(), f) for f in fars}
    floor = tar_at_far(scores, labels, fars, rule="floor")
    assert floor == {f: _floor_tar_py(scores.tolist(), labels.tolist(), f) for f in fars}


@pytest.mark.parametrize("seed", [0, 1])
def test_floor_rule_is_the_one_tar_rule(seed):
    """IJB's floor rule, verification's TAR@FAR and MegaFace's (a streamed top-k of impostors) are one rule,
    ``metrics.tar_at_far``: the same TAR and FAR reached at every target, ties and exact ROC points included."""
    from lafs.eval.metrics import tar_at_far as one_rule
    from lafs.eval.metrics import verification_metrics

    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.normal(size=500) + 1.5 * labels, 1)  # heavy ties
    n_neg = int((~labels).sum())
    fars = (0.0, 1e-3, 0.01, 3 / n_neg, 0.1, 0.5, 1.0)
    tar, far, thr = one_rule(scores[labels], scores[~labels], fars, kind="similarity")
    ijb = roc_1to1(scores, labels.astype(int), fars, rule="floor")
    assert {f: ijb["tar_at_far"][f"{f:g}"] for f in fars} == tar
    assert {f: ijb["fpr_at_far"][f"{f:g}"] for f in fars} == far
    ver = verification_metrics(scores, labels, kind="similarity", far_targets=fars)
    assert ver["tar_at_far"] == tar and ver["tar_far"] == far and ver["tar_threshold"] == thr
    keep = np.sort(scores[~labels])[::-1][: int(0.5 * n_neg) + 1]  # the best impostors a streamed pass keeps
    assert one_rule(scores[labels], keep, fars[:-1], kind="similarity", n_impostor=n_neg) == (
        {f: tar[f] for f in fars[:-1]}, {f: far[f] for f in fars[:-1]}, {f: thr[f] for f in fars[:-1]})


def test_tar_at_far_by_hand_drop_intermediate_matters():
    # 10 impostors, 2 genuine. ROC points (fp, tp): (1,0) (2,0) (3,0) (4,0) (4,1) (5,1) (5,2) ... (10,2).
    # sklearn drops (2,0) and (3,0) (no slope change), so at FAR 0.3 the nearest points are FPR 0.4 (distance 0.1),
    # where the larger TPR, 0.5, wins. The floor rule reads FPR <= 0.3: TPR 0.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01, 0.0]
    labels = [0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0]
    assert tar_at_far(scores, labels, [0.3]) == {0.3: 0.5}
    assert tar_at_far(scores, labels, [0.3], rule="floor") == {0.3: 0.0}
    assert tar_at_far(scores, labels, [0.0, 1.0]) == {0.0: 0.0, 1.0: 1.0}
    with pytest.raises(ValueError, match="genuine and impostor"):
        tar_at_far([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="rule must be"):
        tar_at_far(scores, labels, rule="interp")


# --- 1:1 from template features: float32 scores, float64 TAR -------------------------------------------------------


def _float64_reference(f, r1, r2, labels, fars, rule):
    """roc_1to1 of every pair scored in float64 by the row-wise dot roc_1to1_pairs rescores with."""
    s = refine_module._dot_rows_(f[torch.from_numpy(np.asarray(r1))], f[torch.from_numpy(np.asarray(r2))]).numpy()
    np.testing.assert_allclose(s, pair_scores_loop(f.numpy(), r1, r2), rtol=0, atol=1e-14)
    return roc_1to1(s, labels, fars, rule), s


def _pairs_case(seed, kind, n_templates=300, n_gallery=40, dim=32, n_pairs=20_000):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "integer":  # every score a multiple of 1/16, exact in float32 and float64: ties everywhere
        f = torch.from_numpy(rng.integers(-2, 3, (n_templates, dim)).astype(np.float64) / 4)
    else:
        f = torch.nn.functional.normalize(torch.randn(n_templates, dim, dtype=torch.float64, generator=g), dim=1)
    if kind == "duplicates":  # probe templates equal to gallery ones: equal float64 scores that float32 may split
        f[n_gallery : 2 * n_gallery] = f[:n_gallery]
    r1 = rng.integers(0, n_gallery, n_pairs)  # drawn with replacement: repeated pairs too
    r2 = rng.integers(n_gallery, n_templates, n_pairs)
    s = (f[torch.from_numpy(r1)] * f[torch.from_numpy(r2)]).sum(1).numpy()
    if kind == "separated":  # genuine pairs mostly in the high tail, as with a trained model
        labels = ((s > np.quantile(s, 0.97)) & (rng.random(n_pairs) < 0.7)).astype(np.int8)
    else:
        labels = (rng.random(n_pairs) < 0.01).astype(np.int8)
    labels[:2] = (1, 0)
    n_neg = int((labels == 0).sum())
    fars = [*FARS, 0.0, 1.0, 0.3, 1 / n_neg, 3 / n_neg, 50 / n_neg, float(rng.random())]
    return f, r1, r2, labels, fars


@pytest.mark.parametrize("kind", ["random", "separated", "integer", "duplicates"])
@pytest.mark.parametrize("rule", ["nearest", "floor"])
def test_roc_1to1_pairs_equals_float64_scores(kind, rule):
    for seed in range(2):
        f, r1, r2, labels, fars = _pairs_case(seed, kind)
        want = _float64_reference(f, r1, r2, labels, fars, rule)[0]
        stats = {}
        got = roc_1to1_pairs(f, r1, r2, labels, fars, rule, max_refine=len(labels), stats=stats)
        for key in ("tar_at_far", "fpr_at_far", "threshold_at_far"):  # exactly, not approximately
            assert got[key] == want[key], (seed, key)
        if kind != "duplicates":  # the float64 GEMM path: the same points (its thresholds can differ in the last bit)
            gemm = roc_1to1(pair_scores(f, r1, r2).numpy(), labels, fars, rule)
            assert got["tar_at_far"] == gemm["tar_at_far"] and got["fpr_at_far"] == gemm["fpr_at_far"]
        assert not stats["float64_fallback"] and 0 < stats["refined_pairs"] < len(labels)
        assert stats["sample_error"] <= stats["error_bound"] / 2
        # AUC: that of the float32 scores, exactly (roc_1to1 of them), hence close to the float64 one
        s32 = pair_scores(f, r1, r2, dtype=torch.float32).numpy()
        assert got["auc"] == roc_1to1(s32, labels)["auc"]
        if kind in ("random", "separated", "integer"):
            assert abs(got["auc"] - want["auc"]) < 1e-6


def test_roc_1to1_pairs_matches_insightface_reference():
    f, r1, r2, labels, fars = _pairs_case(5, "separated", n_pairs=3000)
    s64 = _float64_reference(f, r1, r2, labels, fars, "nearest")[1]
    got = roc_1to1_pairs(f, r1, r2, labels, fars, max_refine=3000)["tar_at_far"]
    assert list(got.values()) == [_insightface_tar_py(s64.tolist(), labels.tolist(), far) for far in fars]


def test_roc_1to1_pairs_falls_back_to_float64(monkeypatch):
    f, r1, r2, labels, fars = _pairs_case(1, "random", n_pairs=5000)
    want = _float64_reference(f, r1, r2, labels, fars, "nearest")[0]
    for key in ("tar_at_far", "fpr_at_far"):
        stats = {}
        got = roc_1to1_pairs(f, r1, r2, labels, fars, max_refine=0, stats=stats)  # over budget at once
        assert stats["float64_fallback"] and got[key] == want[key]
    # A float32 product outside the bound (as TF32 or bf16 matmul would be): every pair in float64.
    monkeypatch.setattr(refine_module, "_f32_score_error_bound", lambda features: 1e-12)
    stats = {}
    got = roc_1to1_pairs(f, r1, r2, labels, fars, stats=stats)
    assert stats["float64_fallback"] and stats["refined_pairs"] == 0 and got["tar_at_far"] == want["tar_at_far"]
    with pytest.raises(ValueError, match="genuine and impostor"):
        roc_1to1_pairs(f, r1, r2, np.zeros(len(r1)))
    with pytest.raises(ValueError, match="rule must be"):
        roc_1to1_pairs(f, r1, r2, labels, rule="interp")


def test_float32_error_bound_holds():
    # The bound covers the worst case; on unit rows the float32 error is 2-3 orders of magnitude below it.
    f, r1, r2, _, _ = _pairs_case(2, "random", dim=512, n_pairs=20_000)
    s32 = pair_scores(f, r1, r2, dtype=torch.float32).double().numpy()
    s64 = pair_scores_loop(f.numpy(), r1, r2)
    bound = refine_module._f32_score_error_bound(f)
    assert 5e-5 < bound < 7e-5 and np.abs(s32 - s64).max() < bound / 100


def test_template_rows_lookup_and_search_agree():
    uniq = np.array([3, 7, 8, 120])
    ids = np.array([8, 3, 120, 120, 7])
    np.testing.assert_array_equal(template_rows(uniq, ids), [2, 0, 3, 3, 1])
    far = uniq * 10**9  # too spread out for a table: binary search
    np.testing.assert_array_equal(template_rows(far, ids * 10**9), [2, 0, 3, 3, 1])
    for bad in ([8, 5, 3], [8, -1], [8, 121]):
        with pytest.raises(ValueError, match=f"template {bad[1]} \\(entry 1\\)"):
            template_rows(uniq, bad)


def test_pooling_adds_flip_features_like_the_sum():
    rng = np.random.default_rng(4)
    templates, medias = _random_groups(rng)
    feats = torch.from_numpy(rng.normal(size=(len(templates), 16)).astype(np.float32))
    flip = torch.from_numpy(rng.normal(size=(len(templates), 16)).astype(np.float32))
    det = rng.uniform(0.1, 1, len(templates)).astype(np.float32)
    for norm in (True, False):
        want = image2template_feature(feats + flip, templates, medias, detector_scores=det, use_detector_score=True,
                                      use_norm_score=norm, chunk_size=37)[0]
        got = image2template_feature(feats, templates, medias, detector_scores=det, use_detector_score=True,
                                     use_norm_score=norm, chunk_size=37, flip_features=flip)[0]
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="flip features"):
        image2template_feature(feats, templates, medias, flip_features=flip[:-1])


def test_score_ijb_float64_scores_and_stats(ijb):
    root, _ = ijb
    meta = load_ijb_meta(root, "ijbc")
    feats = torch.from_numpy(np.random.default_rng(6).normal(size=(40, 12)).astype(np.float32))
    stats = {}
    got = score_ijb(feats, meta, fars=(0.05, 0.2, 0.5), far_rule="floor", stats=stats)
    assert {"pooling_s", "prep_s", "pairs_s", "roc_s", "refined_pairs", "float64_fallback"} <= set(stats)
    tf, ids = image2template_feature(feats, meta.templates, meta.medias, detector_scores=meta.detector_scores,
                                     use_detector_score=True)
    s64 = pair_scores(tf, template_rows(ids, meta.pairs[:, 0]), template_rows(ids, meta.pairs[:, 1])).numpy()
    want = roc_1to1(s64, meta.labels, (0.05, 0.2, 0.5), "floor")
    assert got["tar_at_far"] == want["tar_at_far"] and got["fpr_at_far"] == want["fpr_at_far"]
    got32 = score_ijb(feats, meta, fars=(0.05, 0.2, 0.5), far_rule="floor", dtype=torch.float32)  # as before
    assert got32["tar_at_far"] == got["tar_at_far"]


# --- 1:N -------------------------------------------------------------------------------------------------------------


def test_identification_by_hand():
    gallery = torch.eye(3, dtype=torch.float64)  # similarity = the probe vector itself
    probes = torch.tensor([[0.9, 0.1, 0.2], [0.6, 0.5, 0.1], [0.2, 0.1, 0.4], [0.3, 0.2, 0.1], [0.1, 0.7, 0.0]],
                          dtype=torch.float64)
    r = identification_1n(probes, [1, 2, 3, 7, 8], gallery, [1, 2, 3], ranks=(1, 2), fpirs=(0.5, 1.0))
    assert (r["mated"], r["nonmated"], r["subjects_with_multiple_templates"]) == (3, 2, 0)
    assert r["rank_hits"] == {1: 2, 2: 3}
    # non-mated tops 0.7, 0.3: FPIR 0.5 -> threshold 0.7 (only 0.9 beats it); FPIR 1 -> 0.3 (0.9 and 0.4 do).
    assert r["fpir_thresholds"] == {0.5: 0.7, 1.0: 0.3}
    assert r["tpir_at_fpir"] == pytest.approx({0.5: 1 / 3, 1.0: 2 / 3})
    assert r["fpir_achieved"] == {0.5: 0.0, 1.0: 0.5}


@pytest.mark.parametrize("seed", [0, 1])
def test_identification_matches_loop(seed):
    rng = np.random.default_rng(seed)
    gallery_subjects = np.array([5, 3, 9, 3, 12, 7, 8, 1, 5, 4])  # 3 and 5 have two templates each
    probe_subjects = rng.choice([1, 3, 4, 5, 7, 8, 9, 12, 20, 21, 22], 300)
    kw = dict(ranks=(1, 2, 5), fpirs=(0.01, 0.1, 0.3))
    # Small integer features: every score is an exact integer, so ties (mate vs others, at the threshold) are exact
    # in the matrix product and in the per-probe dot alike, and the two results must agree to the bit.
    g = torch.from_numpy(rng.integers(-2, 3, (10, 6)).astype(np.float64))
    p = torch.from_numpy(rng.integers(-2, 3, (300, 6)).astype(np.float64))
    p[:5] = g[[0, 1, 1, 2, 3]]
    got = identification_1n(p, probe_subjects, g, gallery_subjects, chunk_size=64, **kw)
    assert got == identification_1n_loop(p.numpy(), probe_subjects, g.numpy(), gallery_subjects, **kw)
    assert got["subjects_with_multiple_templates"] == 2 and got["mated"] + got["nonmated"] == 300
    # Continuous unit features: equal counts, scores equal to rounding.
    g = torch.nn.functional.normalize(torch.randn(10, 8, dtype=torch.float64), dim=1)
    p = torch.nn.functional.normalize(torch.randn(300, 8, dtype=torch.float64), dim=1)
    got = identification_1n(p.float(), probe_subjects, g.float(), gallery_subjects, chunk_size=64, **kw)
    want = identification_1n_loop(p.numpy(), probe_subjects, g.numpy(), gallery_subjects, **kw)
    for key in ("rank_hits", "rank", "tpir_at_fpir", "fpir_achieved"):
        assert got[key] == want[key]
    assert got["fpir_thresholds"] == pytest.approx(want["fpir_thresholds"], abs=1e-6)


# --- images and end to end -------------------------------------------------------------------------------------------


def _tiny_embed(x):
    """Mean and std per channel plus a constant: 8-d, finite, not unit norm."""
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), torch.ones(len(x), 2)], 1)


def test_aligned_batches_match_align_face(ijb):
    root, want = ijb
    meta = load_ijb_meta(root, "ijbc")
    got = list(iter_aligned_batches(meta, batch_size=7, workers=3))
    assert [s for s, _ in got] == list(range(0, 40, 7)) and got[-1][1].shape == (5, 3, 112, 112)
    images = torch.cat([b for _, b in got])
    for i in (0, 17, 39):
        rgb = cv2.cvtColor(cv2.imread(str(root / "loose_crop" / want["names"][i])), cv2.COLOR_BGR2RGB)
        ref = align_face(rgb, meta.landmarks[i])[0]
        np.testing.assert_array_equal(images[i].numpy().transpose(1, 2, 0), ref)
    (root / "loose_crop" / "9.jpg").unlink()
    with pytest.raises(OSError, match="image 8 of the 5pts file"):
        list(iter_aligned_batches(meta, batch_size=4, workers=2))


def test_evaluate_ijb_end_to_end(ijb):
    root, _ = ijb
    r = evaluate_ijb(_tiny_embed, root, "ijbc", batch_size=16, workers=2)
    assert r["mode"] == "N1D1F1" and (r["images"], r["templates"], r["pairs"]) == (40, 10, 24)
    assert r["genuine"] == 5 and r["impostor"] == 19
    values = list(r["tar_at_far"].values()) + [r["auc"]]
    for key in ("G1", "G2", "mean"):
        ident = r["identification"][key]
        values += list(ident["rank"].values()) + list(ident["tpir_at_fpir"].values())
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in values), r
    assert list(r["tar_at_far"]) == ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
    # G1 = subjects 101, 102: probes 21, 22, 25 mated; probes 23, 24, 26 not.
    assert (r["identification"]["G1"]["mated"], r["identification"]["G1"]["nonmated"]) == (3, 3)
    text = format_ijb_result(r)
    assert text.startswith("IJBC N1D1F1") and "1:N G2" in text


def test_score_ijb_modes_and_flip_features(ijb):
    root, _ = ijb
    meta = load_ijb_meta(root, "ijbc")
    rng = np.random.default_rng(3)
    feats = torch.from_numpy(rng.normal(size=(40, 12)).astype(np.float32))
    flip = torch.from_numpy(rng.normal(size=(40, 12)).astype(np.float32))
    a = score_ijb(feats, meta, flip_features=flip, use_norm_score=False)
    b = score_ijb(feats + flip, meta, use_norm_score=False)
    assert a == b and a["mode"] == "N0D1F1"
    c = score_ijb(feats, meta, flip_features=flip, use_flip_test=False, use_detector_score=False)
    assert c == score_ijb(feats, meta, use_flip_test=False, use_detector_score=False) and c["mode"] == "N1D0F0"
    # The 1:1 scores are the cosine of loop-pooled templates with the detector-score weighting (N1D1).
    x = (feats + flip).double().numpy() * meta.detector_scores[:, None]
    tf, ids = image2template_feature_loop(x, meta.templates, meta.medias)
    rows = {t: i for i, t in enumerate(ids)}
    scores = pair_scores_loop(tf, [rows[t] for t in meta.pairs[:, 0]], [rows[t] for t in meta.pairs[:, 1]])
    want = tar_at_far(scores, meta.labels)
    got = score_ijb(feats, meta, flip_features=flip)
    assert list(got["tar_at_far"].values()) == list(want.values())
    with pytest.raises(ValueError, match="expected 40 x D"):
        score_ijb(feats[:39], meta)


def test_embed_ijb_gives_keypoint_models_the_aligned_points(ijb):
    from lafs.eval.ijb import embed_ijb
    from lafs.geometry import estimate_similarity, flip_keypoints, transform_points

    root, info = ijb
    meta = load_ijb_meta(root, "ijbc")

    def kp_embed(x, keypoints):
        return keypoints.flatten(1)

    kp_embed.uses_keypoints = True
    got = embed_ijb(kp_embed, meta, batch_size=16, workers=2).numpy().reshape(-1, 5, 2)
    for i in (0, 17, 39):
        m = estimate_similarity(meta.landmarks[i], ARCFACE_TEMPLATE)
        aligned = transform_points(meta.landmarks[i].astype(np.float64), m)
        np.testing.assert_allclose(got[i], aligned + flip_keypoints(aligned, 112), atol=1e-3)
