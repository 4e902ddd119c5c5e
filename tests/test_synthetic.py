"""Synthetic faces (lafs.data.synthetic): shapes, determinism, exact keypoints, pairs, hardness."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from lafs.data import synthetic as syn
from lafs.data.synthetic import (
    ARCFACE_TEMPLATE,
    SyntheticConfig,
    SyntheticFaces,
    generate,
    raw_pixel_pair_scores,
    synthetic_pair_indices,
    synthetic_pairs,
)
from lafs.eval.metrics import roc_auc


# --- shapes and config ----------------------------------------------------------------------------------


def test_render_shapes_and_dtypes():
    faces = SyntheticFaces(10, seed=0)
    img, kp = faces.render(3, 5)
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    assert kp.shape == (5, 2) and kp.dtype == np.float32
    assert img.std() > 10  # not blank
    images, kps = faces.batch([0, 1, 2], [0, 0, 7])
    assert images.shape == (3, 112, 112, 3) and images.dtype == np.uint8
    assert kps.shape == (3, 5, 2) and kps.dtype == np.float32
    np.testing.assert_array_equal(images[2], faces.render(2, 7)[0])


def test_other_image_size_scales_keypoints():
    big = SyntheticFaces(4, seed=1, config=SyntheticConfig.no_nuisance())
    small = SyntheticFaces(4, seed=1, config=SyntheticConfig.no_nuisance(img_size=56))
    img, kp = small.render(2, 0)
    assert img.shape == (56, 56, 3)
    kp112 = big.render(2, 0)[1]
    np.testing.assert_allclose(kp, (kp112 + 0.5) * 0.5 - 0.5, atol=1e-4)  # pixel centres at integers


def test_config_validation():
    with pytest.raises(ValueError):
        SyntheticConfig(blur_prob=1.5)
    with pytest.raises(ValueError):
        SyntheticConfig(max_scale=0.9)
    with pytest.raises(ValueError):
        SyntheticFaces(0)
    faces = SyntheticFaces(3)
    with pytest.raises(IndexError):
        faces.render(3, 0)


# --- determinism ----------------------------------------------------------------------------------------


def test_same_seed_identical_bytes_different_seed_differs():
    a = SyntheticFaces(20, seed=7).batch([0, 5, 19], [0, 3, 999])
    b = SyntheticFaces(20, seed=7).batch([0, 5, 19], [0, 3, 999])
    c = SyntheticFaces(20, seed=8).batch([0, 5, 19], [0, 3, 999])
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert all((a[0][k] != c[0][k]).mean() > 0.3 for k in range(3))


def test_images_differ_across_index_and_identity():
    faces = SyntheticFaces(5, seed=0)
    x00, x01, x10 = faces.render(0, 0)[0], faces.render(0, 1)[0], faces.render(1, 0)[0]
    assert (x00 != x01).mean() > 0.3 and (x00 != x10).mean() > 0.3


def test_render_independent_of_order_and_cache():
    target = SyntheticFaces(50, seed=3).render(17, 42)
    other = SyntheticFaces(50, seed=3, cache_size=2)
    for i, j in [(1, 1), (17, 0), (40, 42), (2, 9), (17, 41)]:
        other.render(i, j)
    again = other.render(17, 42)
    assert target[0].tobytes() == again[0].tobytes()
    np.testing.assert_array_equal(target[1], again[1])
    assert len(other._cache) <= 2  # bounded


def test_identity_params_deterministic_and_identity_specific():
    a, b = SyntheticFaces(10, seed=0), SyntheticFaces(10, seed=0)
    np.testing.assert_array_equal(a.identity(4).keypoints, b.identity(4).keypoints)
    np.testing.assert_array_equal(a.identity(4).outline, b.identity(4).outline)
    kps = np.stack([a.identity(i).keypoints for i in range(10)])
    assert np.abs(kps - ARCFACE_TEMPLATE).max() < 10  # near the template ...
    assert kps.std(axis=0).mean() > 0.8  # ... but identity-specific
    skins = np.stack([a.identity(i).skin for i in range(10)])
    assert skins.std(axis=0).mean() > 10


def test_nuisance_strength_does_not_redraw_other_nuisances():
    """Fewer background shapes change the background only: pose, lighting and the noise on the face stay."""
    cfg = dataclasses.replace(SyntheticConfig(), noise_prob=1.0, blur_prob=0.0, lowres_prob=0.0, occluder_prob=0.0)
    a = SyntheticFaces(5, seed=2, config=dataclasses.replace(cfg, max_clutter=8))
    b = SyntheticFaces(5, seed=2, config=dataclasses.replace(cfg, max_clutter=0))
    differs = 0
    for j in range(6):
        (xa, ka), (xb, kb) = a.render(1, j), b.render(1, j)
        np.testing.assert_array_equal(ka, kb)
        x, y = np.rint(ka[2]).astype(int)  # nose tip: always face, never background
        np.testing.assert_array_equal(xa[y - 8 : y + 8, x - 8 : x + 8], xb[y - 8 : y + 8, x - 8 : x + 8])
        differs += (xa != xb).any()
    assert differs > 0  # the backgrounds did change


def test_scaled_nuisances():
    """``SyntheticConfig.scaled(s)``: 1 is the default config, 0 switches every nuisance off (no_nuisance), 0.5 halves
    ranges and probabilities and takes the square root of the log-uniform scale range; the faces keep their identity
    (the nose tip's neighbourhood of a pose-free render is the same at every strength without photometrics)."""
    assert SyntheticConfig.scaled(1.0) == SyntheticConfig()
    # no_nuisance keeps the blur and noise strengths but never applies them (probability 0)
    assert SyntheticConfig.scaled(0.0) == dataclasses.replace(SyntheticConfig.no_nuisance(), max_blur_sigma=0.0,
                                                              max_noise_std=0.0)
    half = SyntheticConfig.scaled(0.5)
    assert half.max_rotation_deg == 9.0 and half.occluder_prob == 0.125 and half.max_clutter == 2
    assert half.max_scale == pytest.approx(1.15 ** 0.5) and half.img_size == 112
    assert SyntheticConfig.scaled(0.5, img_size=64).img_size == 64
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="nuisance must be in"):
            SyntheticConfig.scaled(bad)
    # weaker nuisances: images of one identity closer to each other (mean pixel distance over pairs of images)
    def spread(s):
        faces = SyntheticFaces(1, seed=3, config=SyntheticConfig.scaled(s))
        imgs = np.stack([faces.render(0, j)[0].astype(np.float64) for j in range(8)])
        return np.abs(imgs[:, None] - imgs[None]).mean()
    assert spread(0.0) < spread(0.5) < spread(1.0)


def test_data_nuisance_config_key():
    from lafs.config import ConfigError, load_config
    from lafs.train.run import build_train_set

    cfg = load_config(None, ["data.num_identities=2", "data.images_per_identity=2", "data.nuisance=0"])
    ds = build_train_set(cfg)
    faces = SyntheticFaces(2 + cfg.data.val_identities, seed=0, config=SyntheticConfig.no_nuisance())
    np.testing.assert_array_equal(ds[1]["image"].permute(1, 2, 0).numpy(), faces.render(0, 1)[0])
    with pytest.raises(ConfigError, match="data.nuisance must be in"):
        load_config(None, ["data.nuisance=2"])
    # data.synthetic: SyntheticConfig fields set after the scaling; a wrong name or value names the key
    cfg = load_config(None, ["data.num_identities=2", "data.images_per_identity=2", "data.nuisance=0",
                             "data.synthetic={max_rotation_deg: 30.0}"])
    posed = SyntheticFaces(2 + cfg.data.val_identities, seed=0,
                           config=SyntheticConfig.scaled(0.0, max_rotation_deg=30.0))
    np.testing.assert_array_equal(build_train_set(cfg)[1]["image"].permute(1, 2, 0).numpy(), posed.render(0, 1)[0])
    assert not np.array_equal(posed.render(0, 1)[0], faces.render(0, 1)[0])
    with pytest.raises(ConfigError, match="data.synthetic .*occluder"):
        load_config(None, ["data.synthetic={occluder: 0}"])
    with pytest.raises(ConfigError, match="data.synthetic .*blur_prob must be in"):
        load_config(None, ["data.synthetic={blur_prob: 3}"])


# --- keypoints are exactly where the features are drawn ----------------------------------------------------


POSE_ONLY = SyntheticConfig.no_nuisance(
    max_rotation_deg=25.0, max_scale=1.2, max_shift_px=8.0, max_aspect=0.08, max_shear=0.06, max_yaw_px=3.0,
    max_pitch_px=2.0, expression_strength=1.0,
)


def _feature_masks(faces: SyntheticFaces, i: int, j: int):
    """Render (i, j) twice with pupil / nose tip / lips recoloured; channel differences are their masks."""
    p = faces.identity(i)
    red = dataclasses.replace(p, pupil=np.array([250.0, 0, 0]), nose_tip_color=np.array([0, 250.0, 0]),
                              lip=np.array([0, 0, 250.0]))
    black = dataclasses.replace(p, pupil=np.zeros(3), nose_tip_color=np.zeros(3), lip=np.zeros(3))
    faces._cache[i] = red
    a, kp = faces.render(i, j)
    faces._cache[i] = black
    b, kp_b = faces.render(i, j)
    faces._cache[i] = p
    np.testing.assert_array_equal(kp, kp_b)
    return (a.astype(np.float64) - b.astype(np.float64)).clip(0, None) / 250.0, kp


def _centroid(weight: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[: weight.shape[0], : weight.shape[1]]
    w = weight * ((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius**2)
    assert w.sum() > 1.0, "feature not found near its keypoint"
    return np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()


@pytest.mark.parametrize("config", [SyntheticConfig.no_nuisance(), POSE_ONLY], ids=["canonical", "posed"])
def test_keypoints_land_on_drawn_features(config):
    faces = SyntheticFaces(12, seed=5, config=config)
    errors = []
    for i in range(12):
        for j in range(2):
            mask, kp = _feature_masks(faces, i, j)
            # pupils: discs centred on the eye keypoints (the other eye is > 25 px away); nose tip: the
            # highlight ellipse centred on the keypoint. Anti-aliasing of a ~2 px disc is good to ~0.3 px.
            for e, channel, radius in ((0, 0, 4.0), (1, 0, 4.0), (2, 1, 6.0)):
                errors.append(_centroid(mask[..., channel], kp[e], radius) - kp[e])
            # mouth corners: the lip polygon ends at the corners, along the mouth axis
            lips = mask[..., 2] > 0.1
            ys, xs = np.nonzero(lips)
            pts = np.stack([xs, ys], axis=1).astype(np.float64)
            u = (kp[4] - kp[3]) / np.linalg.norm(kp[4] - kp[3])
            proj = pts @ u
            assert abs(proj.min() - kp[3] @ u) < 1.2 and abs(proj.max() - kp[4] @ u) < 1.2
            for c in (3, 4):
                assert np.linalg.norm(pts - kp[c], axis=1).min() < 1.5
    errors = np.array(errors)
    assert np.abs(errors).max() < 0.4
    assert np.abs(errors.mean(axis=0)).max() < 0.06  # no systematic offset (e.g. a half-pixel convention slip)


def test_keypoint_pixel_colours_canonical():
    """With no nuisance the pixel at each eye keypoint is (nearly) the pupil colour, at the nose tip the tip's."""
    faces = SyntheticFaces(20, seed=11, config=SyntheticConfig.no_nuisance())
    for i in range(20):
        img, kp = faces.render(i, 0)
        p = faces.identity(i)
        # the nearest pixel (pupil radius >= 0.95 px: that pixel is mostly pupil, blended with the iris)
        for e in (0, 1):
            x, y = np.rint(kp[e]).astype(int)
            assert np.abs(img[y, x].astype(float) - p.pupil).max() < 90
            assert img[y, x].astype(float).mean() < np.mean(p.sclera) - 60  # darker than the white of the eye
        x, y = np.rint(kp[2]).astype(int)
        assert np.abs(img[y, x].astype(float) - p.nose_tip_color).max() <= 2


def test_keypoints_inside_image_default_config():
    faces = SyntheticFaces(100, seed=0)
    _, kps = faces.batch(list(range(100)) * 3, [0] * 100 + [1] * 100 + [2] * 100)
    inside = ((kps >= 0) & (kps <= 111)).all(axis=2)
    assert inside.mean() > 0.995
    # and the pose varies: keypoints spread around the template
    assert 1.5 < np.abs(kps - ARCFACE_TEMPLATE).mean() < 12


# --- generate() and pairs ------------------------------------------------------------------------------


def test_generate_identity_major():
    items = list(generate(3, 4, seed=9))
    assert [label for _, label, _ in items] == [0] * 4 + [1] * 4 + [2] * 4
    faces = SyntheticFaces(3, seed=9)
    for n, (img, label, kp) in enumerate(items):
        ref_img, ref_kp = faces.render(label, n % 4)
        assert img.tobytes() == ref_img.tobytes()
        np.testing.assert_array_equal(kp, ref_kp)


def test_pair_indices_balance_and_separation():
    faces = SyntheticFaces(30, seed=0)
    ids, idx, issame = synthetic_pair_indices(faces, 101, seed=4, first_index=500)
    assert ids.shape == idx.shape == (202,) and issame.shape == (101,) and issame.dtype == bool
    assert issame.sum() == 50
    assert 0 < issame[:50].sum() < 50  # shuffled, not blocked
    assert (idx >= 500).all()
    a, b = ids[0::2], ids[1::2]
    assert (a[issame] == b[issame]).all() and (a[~issame] != b[~issame]).all()
    assert (idx[0::2][issame] != idx[1::2][issame]).all()
    again = synthetic_pair_indices(faces, 101, seed=4, first_index=500)
    assert all((x == y).all() for x, y in zip((ids, idx, issame), again))
    other = synthetic_pair_indices(faces, 101, seed=5, first_index=500)
    assert not (other[0] == ids).all()
    held = synthetic_pair_indices(faces, 40, seed=4, identities=range(20, 30))[0]
    assert held.min() >= 20


def test_synthetic_pairs_render_the_indexed_images():
    faces = SyntheticFaces(10, seed=1)
    images, issame, kps = synthetic_pairs(faces, 6, seed=2, first_index=1000)
    ids, idx, same = synthetic_pair_indices(faces, 6, seed=2, first_index=1000)
    assert images.shape == (12, 112, 112, 3) and kps.shape == (12, 5, 2)
    np.testing.assert_array_equal(issame, same)
    for k in (0, 7, 11):
        assert images[k].tobytes() == faces.render(int(ids[k]), int(idx[k]))[0].tobytes()


# --- hardness and speed ----------------------------------------------------------------------------------


def test_raw_pixels_are_a_weak_identity_signal():
    """Mean-subtracted grayscale cosine: near chance with the default nuisances, informative without them."""
    hard = SyntheticFaces(200, seed=0)
    images, issame, _ = synthetic_pairs(hard, 200, seed=1)
    auc_hard = roc_auc(raw_pixel_pair_scores(images), issame)
    assert 0.45 < auc_hard < 0.75
    easy = SyntheticFaces(200, seed=0, config=SyntheticConfig.no_nuisance())
    images, issame, _ = synthetic_pairs(easy, 200, seed=1)
    assert roc_auc(raw_pixel_pair_scores(images), issame) > auc_hard + 0.1


def test_untrained_network_is_near_chance():
    """Cosine of an untrained Part fViT-micro's embeddings (56 x 56 input) on 300 pairs: AUC < 0.7."""
    import cv2
    import torch

    from lafs.models import build_backbone

    model = build_backbone("part_fvit", "micro").eval()  # conftest seeds torch
    images, issame, _ = synthetic_pairs(SyntheticFaces(300, seed=0), 300, seed=3)
    small = np.stack([cv2.resize(im, (56, 56), interpolation=cv2.INTER_AREA) for im in images])
    x = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model(x)["embedding"], dim=1)
    scores = (emb[0::2] * emb[1::2]).sum(dim=1).numpy()
    assert roc_auc(scores, issame) < 0.7


def test_render_speed_floor():
    """Loose floor (the target is >= 500 images/s on one core; this guards against 10x regressions)."""
    faces = SyntheticFaces(1000, seed=0)
    faces.render(0, 0)
    t0 = time.perf_counter()
    for k in range(100):
        faces.render(k, k)
    assert 100 / (time.perf_counter() - t0) > 100


def test_module_uses_no_global_rng():
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    SyntheticFaces(5, seed=0).batch([0, 1], [0, 1])
    assert (np.random.get_state()[1] == state).all()


def _render_bytes(seed: int, i: int, j: int) -> bytes:
    return syn.SyntheticFaces(i + 1, seed=seed).render(i, j)[0].tobytes()


def test_same_bytes_in_a_forked_worker():
    """A DataLoader-style forked worker renders exactly what the parent renders (no inherited RNG state)."""
    import multiprocessing as mp

    parent = SyntheticFaces(9, seed=4)
    parent.render(8, 1)  # warm the parent's cache and state before forking
    with mp.get_context("fork").Pool(1) as pool:
        child = pool.starmap(_render_bytes, [(4, 8, 2), (4, 3, 0)])
    assert child == [parent.render(8, 2)[0].tobytes(), parent.render(3, 0)[0].tobytes()]
