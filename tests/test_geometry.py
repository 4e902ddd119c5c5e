"""Face geometry: a set of crops brought to the training geometry by one similarity (lafs.geometry,
lafs.data.align.to_geometry)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lafs.config import load_config
from lafs.data.align import to_geometry, warp_images
from lafs.data.datasets import encode_image
from lafs.data.pairs import write_bin
from lafs.geometry import (
    GEOMETRIES,
    Geometry,
    estimate_similarity,
    get_geometry,
    set_geometry,
    template,
    transform_points,
)


def _dots(points: np.ndarray, size: int) -> np.ndarray:
    """A size x size RGB image, black with a bright 3 x 3 dot at each point (rounded)."""
    img = np.zeros((size, size, 3), np.uint8)
    for x, y in np.rint(points).astype(int):
        img[y - 1:y + 2, x - 1:x + 2] = 255
    return img


def _centroids(img: np.ndarray, near: np.ndarray, r: int = 4) -> np.ndarray:
    """The brightness centroid of the image around each expected point."""
    g = img.astype(np.float64).mean(2)
    out = []
    for x, y in np.rint(near).astype(int):
        ys, xs = np.mgrid[y - r:y + r + 1, x - r:x + r + 1]
        w = g[y - r:y + r + 1, x - r:x + r + 1]
        out.append([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    return np.array(out)


def test_arcface_crops_land_on_the_celeba64_points():
    src = template(112)
    images = torch.from_numpy(np.stack([_dots(src, 112)] * 2)).permute(0, 3, 1, 2).contiguous()
    out, kps, note = to_geometry(images, get_geometry("celeba64"), np.stack([src, src]), name="lfw")
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.uint8
    target = get_geometry("celeba64").array()
    m = estimate_similarity(src, target)
    # the dots land where the one fitted similarity sends them (the two shapes differ by up to 1.3 px at the mouth,
    # which no similarity removes), to resampling accuracy
    expected = transform_points(np.rint(src), m)
    found = _centroids(out[0].permute(1, 2, 0).numpy(), expected)
    assert np.abs(found - expected).max() < 0.35
    assert np.abs(expected - target).max() > 1.0  # so the check above tells the fit from the target
    # keypoints move with the pixels: exactly the fitted similarity
    np.testing.assert_allclose(kps[1], transform_points(src, m), atol=1e-4)
    assert "lfw" in note and "celeba64" in note and "scale 0.6" in note


def test_a_set_in_the_target_geometry_is_left_alone():
    target = get_geometry("celeba64")
    rng = np.random.default_rng(0)
    kps = target.array()[None] + rng.normal(0, 0.3, (20, 5, 2))  # the mean is within half a pixel
    images = torch.randint(0, 255, (20, 3, 64, 64), dtype=torch.uint8)
    out, moved, note = to_geometry(images, target, kps, name="val")
    assert out is images and moved is kps and "unchanged" in note


def test_without_keypoints_a_bin_is_taken_as_arcface_at_its_size():
    pts = template(112) * 96 / 112
    images = torch.from_numpy(_dots(pts, 96)[None]).permute(0, 3, 1, 2).contiguous()
    out, kps, note = to_geometry(images, get_geometry("arcface"), None)
    assert kps is None and out.shape[-1] == 112 and "assumed ArcFace" in note
    found = _centroids(out[0].permute(1, 2, 0).numpy(), template(112))
    assert np.abs(found - template(112)).max() < 0.75


def test_set_geometry_is_the_mean_of_the_finite_rows():
    kps = np.array([np.full((5, 2), 1.0), np.full((5, 2), 3.0), np.full((5, 2), np.nan)])
    g = set_geometry(kps, 64, "x")
    np.testing.assert_allclose(g.array(), 2.0)
    assert g.size == 64
    with pytest.raises(ValueError, match="x: no finite keypoints"):
        set_geometry(np.full((2, 5, 2), np.nan), 64, "x")
    with pytest.raises(ValueError, match=r"x: keypoints of shape \(2, 4, 2\)"):
        set_geometry(np.zeros((2, 4, 2)), 64, "x")
    with pytest.raises(KeyError, match="unknown face geometry 'nope'; known: arcface, celeba64"):
        get_geometry("nope")


def test_shrinking_area_averages_instead_of_aliasing():
    # a 1-px checkerboard shrunk 4x: bilinear sampling alone would hit single pixels (0 or 255), the area
    # pre-filter gives the mean grey everywhere away from the border
    board = ((np.indices((128, 128)).sum(0) % 2) * 255).astype(np.uint8)
    images = torch.from_numpy(np.repeat(board[None, None], 3, 1))
    m = np.array([[0.25, 0, -0.375], [0, 0.25, -0.375]])  # pixel-centre exact 4x shrink
    out = warp_images(images, m, 32)[0, 0].float()
    assert (out[2:-2, 2:-2] - 127.5).abs().max() <= 1.0


def test_config_geometry_choices_follow_the_registry():
    assert load_config(overrides=["data.geometry=celeba64"]).data.geometry == "celeba64"
    with pytest.raises(ValueError, match="data.geometry"):
        load_config(overrides=["data.geometry=celeba"])
    assert set(GEOMETRIES) == {"arcface", "celeba64"}
    assert isinstance(GEOMETRIES["arcface"], Geometry) and GEOMETRIES["arcface"].size == 112


def test_validation_sets_are_brought_to_the_training_geometry(tmp_path):
    from lafs.train.run import build_val_sets

    src = template(112)
    encoded = [encode_image(_dots(src, 112)) for _ in range(4)]
    path = write_bin(tmp_path / "faces.bin", encoded, [True, False])
    np.save(tmp_path / "faces_kps.npy", np.stack([src] * 4).astype(np.float32))
    notes = []
    cfg = load_config(overrides=[f"data.val=[{path}]", "data.geometry=celeba64", "model.name=iresnet"])
    images, issame, kps = build_val_sets(cfg, notes.append)["faces"]
    assert images.shape == (4, 3, 64, 64) and kps is None and list(issame) == [True, False]
    assert "celeba64 geometry at 64 px" in notes[0]
    cfg = load_config(overrides=[f"data.val=[{path}]", "model.name=iresnet"])
    assert build_val_sets(cfg, notes.append)["faces"][0].shape == (4, 3, 112, 112)  # no geometry: as stored


def test_a_model_trained_in_a_geometry_embeds_arcface_crops_in_it(tmp_path):
    from conftest import train_tiny

    from lafs.embedder import load_embedder
    from lafs.eval.embedding import embed_images
    from lafs.inference import embed_crops

    model = load_embedder(train_tiny(tmp_path, "data.geometry=celeba64"))
    assert model.geometry == "celeba64"
    crops = torch.randint(0, 255, (3, 3, 112, 112), dtype=torch.uint8)
    got = embed_crops(model, crops)
    warped, _, _ = to_geometry(crops, get_geometry("celeba64"), None)
    want = torch.nn.functional.normalize(embed_images(model, warped), dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = torch.nn.functional.normalize(embed_images(model, crops), dim=1).numpy()
    assert np.abs(got - plain).max() > 1e-3  # the warp changed what the model saw
