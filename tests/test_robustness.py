"""Robustness evaluation: the affine path from detector crop to aligned face, keypoints moving with the pixels,
keypoint flips, and the sensitivity curve on faces whose identity is readable only where the keypoints are."""

import json
import math

import cv2
import numpy as np
import pytest
import torch

from lafs.data.align import align_face
from lafs.eval.embedding import embed_images
from lafs.eval.robustness import (
    affine_sensitivity,
    alignment_affines,
    format_sensitivity,
    interpolate_affines,
    warp_crops,
)
from lafs.geometry import ARCFACE_TEMPLATE, FLIP_ORDER, flip_keypoints, transform_points


def similarity(scale, angle_deg, tx, ty, centre=55.5):
    """Rotation + scale about ``centre`` followed by a shift: a 2x3 similarity."""
    a = math.radians(angle_deg)
    r = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.array([centre, centre])
    return np.concatenate([r, (c - r @ c + [tx, ty])[:, None]], axis=1)


# --- affine maths ----------------------------------------------------------------------------------------------------


def test_interpolation_ends_and_midpoint_by_hand():
    m = np.stack([similarity(1.44, 40, 6, -4), similarity(0.81, -20, 0, 0)])
    for mode in ("similarity", "linear"):
        np.testing.assert_allclose(interpolate_affines(m, 0.0, 112, mode), np.broadcast_to(np.eye(2, 3), m.shape),
                                   atol=1e-12)
        np.testing.assert_array_equal(interpolate_affines(m, 1.0, 112, mode), m)
    half = interpolate_affines(m, 0.5, 112)
    # similarity: scale sqrt(1.44) = 1.2 and half the angle, 20 degrees; the centre goes half way to M(centre)
    np.testing.assert_allclose(half[0, :, :2], similarity(1.2, 20, 0, 0)[:, :2], atol=1e-12)
    np.testing.assert_allclose(half[1, :, :2], similarity(0.9, -10, 0, 0)[:, :2], atol=1e-12)
    c = np.array([55.5, 55.5])
    np.testing.assert_allclose(half[0, :, :2] @ c + half[0, :, 2], (c + m[0, :, :2] @ c + m[0, :, 2]) / 2)
    # linear: entry-wise average with the identity
    np.testing.assert_allclose(interpolate_affines(m, 0.5, 112, "linear"), (m + np.eye(2, 3)) / 2)


def test_pure_translation_interpolates_the_same_both_ways():
    m = np.stack([similarity(1.0, 0, 7, -3)])
    for t in (0.25, 0.6):
        np.testing.assert_allclose(interpolate_affines(m, t, 112), interpolate_affines(m, t, 112, "linear"),
                                   atol=1e-12)


def test_interpolation_errors():
    shear = np.array([[[1.0, 0.3, 0.0], [0.0, 1.0, 0.0]]])
    with pytest.raises(ValueError, match="affine 0 is not a similarity"):
        interpolate_affines(shear, 0.5)
    np.testing.assert_allclose(interpolate_affines(shear, 0.5, interpolation="linear")[0, 0, 1], 0.15)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        interpolate_affines(shear, 0.5, interpolation="cubic")
    with pytest.raises(ValueError, match=r"expected \(N, 5, 2\)"):
        alignment_affines(np.zeros((3, 4, 2)))
    bad = np.tile(ARCFACE_TEMPLATE, (2, 1, 1))
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="keypoints of crop 1 are not finite"):
        alignment_affines(bad)


def test_alignment_affines_undo_a_known_similarity():
    d = similarity(1.1, 25, 5, -6)
    crop_kps = transform_points(ARCFACE_TEMPLATE.astype(np.float64), d)[None]
    m = alignment_affines(crop_kps)[0]
    np.testing.assert_allclose(transform_points(crop_kps[0], m), ARCFACE_TEMPLATE, atol=1e-9)


# --- warps and keypoints -------------------------------------------------------------------------------------------


def test_warp_at_t1_is_align_face_and_moves_keypoints():
    rng = np.random.default_rng(0)
    crops = cv2.GaussianBlur(rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8).reshape(-1, 112, 3), (5, 5), 0)
    crops = crops.reshape(3, 112, 112, 3)
    kps = np.stack([transform_points(ARCFACE_TEMPLATE, similarity(s, a, 3, 2))
                    for s, a in ((0.9, 10), (1.1, -30), (1.0, 0))]) + rng.normal(0, 1, (3, 5, 2)).astype(np.float32)
    m = alignment_affines(kps)
    out, moved = warp_crops(torch.from_numpy(crops).permute(0, 3, 1, 2), kps, m)
    for i in range(3):
        ref, m_ref = align_face(crops[i], kps[i])
        np.testing.assert_allclose(m[i], m_ref, atol=1e-9)
        np.testing.assert_array_equal(out[i].permute(1, 2, 0).numpy(), ref)
        np.testing.assert_allclose(moved[i], transform_points(kps[i].astype(np.float64), m[i]), atol=1e-4)
    # identity: a copy, not a resample
    same, kp0 = warp_crops(torch.from_numpy(crops).permute(0, 3, 1, 2), kps, interpolate_affines(m, 0.0))
    assert torch.equal(same, torch.from_numpy(crops).permute(0, 3, 1, 2)) and np.allclose(kp0, kps)
    with pytest.raises(ValueError, match="3 crops, 2 keypoint rows and 3 affines"):
        warp_crops(torch.from_numpy(crops).permute(0, 3, 1, 2), kps[:2], m)


def test_flip_keypoints_by_hand_and_against_a_flipped_image():
    kps = np.array([[[10.0, 20.0], [30.0, 21.0], [20.0, 30.0], [12.0, 40.0], [28.0, 41.0]]], np.float32)
    f = flip_keypoints(kps, 50)
    np.testing.assert_array_equal(f[0, 0], [49 - 30, 21])  # the old right eye is now the image-left eye
    np.testing.assert_array_equal(f[0, 3], [49 - 28, 41])
    np.testing.assert_array_equal(flip_keypoints(f, 50), kps)
    assert FLIP_ORDER == (1, 0, 2, 4, 3)
    t = flip_keypoints(torch.from_numpy(kps), 50)
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(f)) and kps[0, 0, 0] == 10  # no in-place
    img = torch.zeros(1, 3, 60, 50)
    img[0, :, 20, 10] = 1.0  # a dot at keypoint 0
    flipped = img.flip(3)
    ys, xs = torch.nonzero(flipped[0, 0], as_tuple=True)
    assert (int(xs[0]), int(ys[0])) == tuple(f[0, 1].astype(int))  # lands on the flipped keypoint with label 1


def test_embed_images_passes_flipped_keypoints():
    calls = []

    def embed(x, keypoints):
        calls.append(keypoints.clone())
        return keypoints.flatten(1)

    images = torch.zeros(3, 3, 20, 20, dtype=torch.uint8)
    kps = np.random.default_rng(0).uniform(0, 19, (3, 5, 2)).astype(np.float32)
    emb = embed_images(embed, images, batch_size=2, keypoints=kps)
    assert len(calls) == 4  # two batches, each with its flip
    expected = torch.from_numpy(kps + flip_keypoints(kps, 20)).flatten(1)
    torch.testing.assert_close(emb, expected)
    with pytest.raises(ValueError, match=r"expected \(3, 5, 2\)"):
        embed_images(embed, images, keypoints=kps[:2])


# --- the sensitivity curve -----------------------------------------------------------------------------------------


def painted_pairs(num_pairs=200, seed=0):
    """Aligned faces whose identity is 5 coloured disks at its 5 keypoints (on blurred noise), then moved by a random
    similarity (rotation up to 30 degrees, shift up to 12 px, scale 0.85-1.15): 'detector crops' + their keypoints."""
    rng = np.random.default_rng(seed)
    n_ids = num_pairs
    colours = rng.integers(0, 256, (n_ids, 5, 3))
    issame = np.arange(num_pairs) % 2 == 0
    ids = np.empty(2 * num_pairs, int)
    ids[0::2] = rng.permutation(n_ids)[:num_pairs]
    other = (ids[0::2] + 1 + rng.integers(0, n_ids - 1, num_pairs)) % n_ids
    ids[1::2] = np.where(issame, ids[0::2], other)
    crops, kps = [], []
    for i in ids:
        face = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (9, 9), 0)
        pts = ARCFACE_TEMPLATE + rng.normal(0, 0.7, (5, 2))
        for p, c in zip(pts, colours[i]):
            cv2.circle(face, (int(round(p[0])), int(round(p[1]))), 5, tuple(int(v) for v in c), -1)
        d = similarity(rng.uniform(0.85, 1.15), rng.uniform(-30, 30), *rng.uniform(-12, 12, 2))
        crops.append(cv2.warpAffine(face, d, (112, 112), flags=cv2.INTER_LINEAR))
        kps.append(transform_points(pts.astype(np.float64), d))
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return images, issame, np.stack(kps).astype(np.float32)


def read_colours(x, points):
    """Colour at each point (bilinear), flattened: the identity code of ``painted_pairs``."""
    w = x.shape[-1]
    grid = (points.to(x.dtype) * (2.0 / (w - 1)) - 1.0)[:, :, None, :]  # pixel centres, align_corners=True
    return torch.nn.functional.grid_sample(x, grid, align_corners=True).flatten(1)


def test_sensitivity_curve_rises_to_alignment_for_a_fixed_position_reader():
    images, issame, kps = painted_pairs()
    template = torch.from_numpy(ARCFACE_TEMPLATE.copy())

    def fixed(x):  # reads the identity where the aligned template says the disks are: alignment-sensitive
        return read_colours(x, template.expand(len(x), 5, 2))

    r = affine_sensitivity(fixed, images, issame, kps, steps=5)
    acc = [p["accuracy"] for p in r["points"]]
    err = [p["keypoint_error"] for p in r["points"]]
    assert r["t"] == [0.0, 0.25, 0.5, 0.75, 1.0] and r["pairs"] == 200
    assert acc[-1] >= 0.95 and acc[0] <= acc[-1] - 0.15, acc
    assert all(b < a for a, b in zip(err, err[1:])) and err[-1] < 1.5, err
    text = format_sensitivity(r)
    assert "t = 0 detector crop" in text and f"{100 * acc[-1]:.2f}" in text


def test_keypoint_reader_is_insensitive_because_keypoints_move_with_pixels():
    images, issame, kps = painted_pairs(seed=1)

    def at_keypoints(x, keypoints):  # a keypoint-aware model: reads where it is told the keypoints are
        return read_colours(x, keypoints)

    at_keypoints.uses_keypoints = True
    for mode in ("similarity", "linear"):
        r = affine_sensitivity(at_keypoints, images, issame, kps, steps=[0.0, 0.5, 1.0], interpolation=mode)
        assert all(p["accuracy"] >= 0.95 for p in r["points"]), (mode, [p["accuracy"] for p in r["points"]])


def test_sensitivity_input_errors():
    images, issame, kps = painted_pairs(num_pairs=4)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        affine_sensitivity(lambda x: x.flatten(1), images, issame, kps, steps=1)
    with pytest.raises(ValueError, match="8 crops for 3 pairs"):
        affine_sensitivity(lambda x: x.flatten(1), images, issame[:3], kps)


def test_curve_of_a_model_in_another_geometry_ends_aligned_in_that_geometry(tmp_path):
    """A model trained on CelebA-64 crops (``geometry = "celeba64"``) is tested along the curve in its own geometry:
    the crops are brought to it as its sets are (t = 0 is the set's own evaluation, at 64 px) and t = 1 aligns onto
    the celeba64 template. Aligned onto ArcFace's 112 px template instead, a reader of the celeba64 positions reads
    the wrong pixels (what the curve did before)."""
    from lafs.data.pairs import write_bin
    from lafs.eval.report import sensitivity_report
    from lafs.geometry import get_geometry

    images, issame, kps = painted_pairs(num_pairs=100, seed=3)
    encoded = [cv2.imencode(".png", im.permute(1, 2, 0).numpy()[:, :, ::-1])[1].tobytes() for im in images]
    bin_path = write_bin(tmp_path / "crops.bin", encoded, issame)
    np.save(tmp_path / "crops_kps.npy", kps)
    celeba = torch.from_numpy(get_geometry("celeba64").array())
    seen = []

    def fixed(x):  # reads where the celeba64 template puts the 5 points, at 64 px
        seen.append(x.shape[-1])
        return read_colours(x, celeba.to(x.dtype).expand(len(x), 5, 2))

    fixed.geometry = "celeba64"
    r = sensitivity_report(fixed, bin_path, steps=[0.0, 1.0], flip=False)
    acc = [p["accuracy"] for p in r["points"]]
    assert set(seen) == {64} and acc[-1] >= 0.85 and acc[0] <= acc[-1] - 0.15, acc
    assert r["points"][-1]["keypoint_error"] < 1.0  # px at 64, to the celeba64 template
    # t = 0 is the set's own evaluation (lafs eval --sets on the same .bin), to the last pair
    from lafs.eval.metrics import ten_fold_accuracy
    from lafs.eval.report import set_embeddings

    emb, same, _ = set_embeddings(fixed, bin_path, "h", flip=False)
    assert ten_fold_accuracy(emb[0::2], emb[1::2], same)["accuracy"] == pytest.approx(acc[0], abs=1e-9)
    # without the geometry (an ArcFace model) the same reader fails at t = 1: the curve ends on ArcFace's template
    del fixed.geometry
    r = sensitivity_report(fixed, bin_path, steps=[1.0], flip=False)
    assert r["points"][0]["accuracy"] <= acc[-1] - 0.15, (r["points"][0]["accuracy"], acc)


# --- CLI -------------------------------------------------------------------------------------------------------------


def test_cli_affine_curve_writes_json_and_plot(tmp_path, capsys):
    from lafs.cli import main
    from lafs.data.pairs import write_bin

    images, issame, kps = painted_pairs(num_pairs=40, seed=2)
    encoded = [cv2.imencode(".png", im.permute(1, 2, 0).numpy()[:, :, ::-1])[1].tobytes() for im in images]
    bin_path = write_bin(tmp_path / "crops.bin", encoded, issame)
    model = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten()))
    torch.jit.save(model, str(tmp_path / "pool.pt"))
    args = ["eval", str(tmp_path / "pool.pt"), "--affine-curve", str(bin_path), "--steps", "3",
            "--out", str(tmp_path / "out")]
    assert main(args) != 0
    assert "crops_kps.npy not found; pass --keypoints" in capsys.readouterr().err
    np.save(tmp_path / "crops_kps.npy", kps)  # the sidecar name is found without --keypoints
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "affine sensitivity (similarity interpolation, constant border, 40 pairs)" in out
    result = json.loads((tmp_path / "out" / "eval.json").read_text())["results"][0]
    assert result["name"] == "crops" and [p["t"] for p in result["points"]] == [0.0, 0.5, 1.0]
    assert all(0 <= p["accuracy"] <= 1 for p in result["points"])
    assert (tmp_path / "out" / "sensitivity.png").stat().st_size > 1000


@pytest.mark.shared_data
def test_real_unaligned_lfw_aligns_onto_lfw_bin(shared_data):
    """On the first LFW fold (600 pairs), warping the detector crops of lfw_unaligned.bin with their keypoints lands
    the keypoints exactly where lfw.bin's alignment put them, and the warped crops look like lfw.bin's images."""
    from lafs.data.pairs import load_bin

    lfw = shared_data / "lfw"
    crops, issame_u = load_bin(lfw / "lfw_unaligned.bin")
    aligned, issame_a = load_bin(lfw / "lfw.bin")
    assert np.array_equal(issame_u, issame_a)
    n = 1200
    kps = np.load(lfw / "lfw_unaligned_kps.npy")[:n]
    m = alignment_affines(kps)
    warped, moved = warp_crops(crops[:n], kps, m)
    # the same 5 points, aligned from the crop, land where lfw.bin's own alignment put them (its lfw_kps.npy)
    np.testing.assert_allclose(moved, np.load(lfw / "lfw_kps.npy")[:n], atol=1e-3)
    err = np.linalg.norm(moved - ARCFACE_TEMPLATE, axis=-1).mean()  # the similarity fit's residual, ~2.6 px
    raw_err = np.linalg.norm(kps - ARCFACE_TEMPLATE, axis=-1).mean()
    assert err < 3.5 < 8.0 < raw_err, (err, raw_err)
    # the central face region (outside it the crops have black borders where the box ended)
    centre = (slice(None), slice(None), slice(30, 100), slice(25, 87))
    diff_aligned = (warped[centre].float() - aligned[:n][centre].float()).abs().mean()
    diff_raw = (crops[:n][centre].float() - aligned[:n][centre].float()).abs().mean()
    assert diff_aligned < 0.5 * diff_raw, (float(diff_aligned), float(diff_raw))


def test_random_similarities_are_seeded_similarities_within_their_ranges():
    from lafs.eval.robustness import random_similarities

    m, draws = random_similarities(500, 64, rotate=30, scale=(0.7, 1.3), shift=0.15, seed=3)
    assert m.shape == (500, 2, 3)
    a, b = m[:, 0, 0], m[:, 1, 0]
    assert np.allclose(m[:, 1, 1], a) and np.allclose(m[:, 0, 1], -b)  # a similarity, no shear or mirror
    assert np.allclose(np.hypot(a, b), draws["scale"]) and np.allclose(np.degrees(np.arctan2(b, a)), draws["angle"])
    assert np.all(np.abs(draws["angle"]) <= 30) and np.abs(draws["angle"]).max() > 25  # the range is used
    assert np.all((draws["scale"] >= 0.7) & (draws["scale"] <= 1.3)) and np.all(np.abs(draws["shift"]) <= 0.15 * 64)
    c = np.full(2, 31.5)  # the crop centre goes to centre + shift
    assert np.allclose(np.einsum("nij,j->ni", m[:, :, :2], c) + m[:, :, 2], c + draws["shift"])
    again, _ = random_similarities(500, 64, rotate=30, scale=(0.7, 1.3), shift=0.15, seed=3)
    assert np.array_equal(m, again) and not np.allclose(m, random_similarities(500, 64, seed=4)[0])
    ident, _ = random_similarities(3, 64, rotate=0, scale=(1, 1), shift=0)
    assert np.allclose(ident, np.eye(2, 3))
    with pytest.raises(ValueError, match="0 < low <= high"):
        random_similarities(3, 64, scale=(1.3, 0.7))
    with pytest.raises(ValueError, match="must be >= 0"):
        random_similarities(3, 64, rotate=-1)


def test_data_misalign_moves_pixels_and_keypoints_together(tmp_path, capsys):
    """A white dot at each image's first keypoint ends up at the moved first keypoint; the pairs are kept; the same
    seed writes the same set; bad input is named."""
    from lafs.cli import main
    from lafs.data.datasets import encode_image
    from lafs.data.pairs import load_bin, write_bin

    rng = np.random.default_rng(0)
    n, size = 8, 64
    kps = rng.uniform(20, 44, (n, 5, 2)).astype(np.float32)
    images = []
    for k in kps:
        img = np.zeros((size, size, 3), np.uint8)
        x, y = np.round(k[0]).astype(int)
        img[y - 1:y + 2, x - 1:x + 2] = 255
        images.append(img)
        k[0] = (x, y)  # the dot's centre pixel
    write_bin(tmp_path / "s.bin", [encode_image(i, quality=100) for i in images], [True, False, True, False])
    np.save(tmp_path / "s_kps.npy", kps)
    args = ["data", "misalign", str(tmp_path / "s.bin"), "-o", str(tmp_path / "m.bin"), "--rotate", "30",
            "--scale", "0.9", "1.1", "--shift", "0.05", "--seed", "1"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    out, issame = load_bin(tmp_path / "m.bin")
    moved = np.load(tmp_path / "m_kps.npy")
    affines = np.load(tmp_path / "m_affines.npy")
    assert out.shape == (n, 3, size, size) and issame.tolist() == [True, False, True, False]
    assert moved.shape == (n, 5, 2) and affines.shape == (n, 2, 3)
    for img, k, m in zip(out.numpy(), moved, affines):
        y, x = np.unravel_index(img[0].argmax(), img[0].shape)
        assert abs(x - k[0, 0]) <= 1.5 and abs(y - k[0, 1]) <= 1.5  # the dot's brightest pixel sits on the keypoint
    first = (tmp_path / "m.bin").read_bytes()
    assert main(args[:4] + [str(tmp_path / "m2.bin")] + args[5:]) == 0
    assert (tmp_path / "m2.bin").read_bytes() == first
    assert main(["data", "misalign", str(tmp_path / "s.bin"), "-o", str(tmp_path / "x.bin"), "--scale", "1.2", "0.8"]) == 2
    assert "0 < low <= high" in capsys.readouterr().err
    (tmp_path / "s_kps.npy").unlink()
    assert main(["data", "misalign", str(tmp_path / "s.bin"), "-o", str(tmp_path / "x.bin")]) == 2
    assert "s_kps.npy not found" in capsys.readouterr().err
    assert main(["data", "misalign", str(tmp_path / "s.bin"), "-o", str(tmp_path / "s.bin"),
                 "--keypoints", str(tmp_path / "m_kps.npy")]) == 2
    assert "overwrite its input" in capsys.readouterr().err
