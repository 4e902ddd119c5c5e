"""Tests of lafs.augment.multicrop: DINO / LAFS multi-crop views (the official code's)."""

from __future__ import annotations

import time

import pytest
import torch

from lafs.augment.multicrop import (
    DINO_GLOBAL_1,
    DINO_GLOBAL_2,
    DINO_LOCAL,
    LAFSViews,
    MultiCropViews,
    Photometric,
    crop_resize,
    random_resized_crop,
)
from lafs.augment.ops import sample_boxes

OFF = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


def _images(b: int = 4, size: int = 112, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def test_dino_views_shapes_and_range():
    torch.manual_seed(0)
    views = MultiCropViews()(_images(3))
    assert len(views) == 10
    assert [tuple(v.shape) for v in views] == [(3, 3, 112, 112)] * 2 + [(3, 3, 48, 48)] * 8
    assert all(v.min() >= -1 and v.max() <= 1 for v in views)
    assert len(MultiCropViews(num_local=0, global_size=64)(_images(2))) == 2


def test_lafs_views_shapes_and_range():
    torch.manual_seed(0)
    clean, aug = LAFSViews()(_images(3, size=120))
    assert len(clean) == len(aug) == 10
    assert all(tuple(v.shape) == (3, 3, 112, 112) for v in clean + aug)
    assert all(v.min() >= -1 and v.max() <= 1 for v in clean + aug)
    assert LAFSViews().global_1 is DINO_GLOBAL_1 and LAFSViews().global_2 is DINO_GLOBAL_2
    assert LAFSViews().local is DINO_LOCAL


def test_lafs_pairs_share_geometry_exactly_without_photometric():
    torch.manual_seed(1)
    off = Photometric(**OFF)
    clean, aug = LAFSViews(num_views=4, global_1=off, global_2=off, local=off)(_images(5))
    for c, a in zip(clean, aug):
        assert torch.equal(c, a)
    assert not torch.equal(clean[0], clean[1])  # distinct crops per view


def test_lafs_pairs_share_geometry_bright_dot():
    """A dot on a black image lands on the same pixel (+-1 for the blur) in the clean and augmented view of a pair."""
    b = 32
    images = -torch.ones(b, 3, 112, 112)
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.randint(30, 82, (b,), generator=g), torch.randint(30, 82, (b,), generator=g)
    images[torch.arange(b), :, ys, xs] = 0.0  # mid-grey dot: brightness/contrast jitter cannot saturate it
    # brightness/contrast jitter is monotone and blur keeps the peak; solarize/grayscale/hue off
    pm = Photometric(jitter=(0.4, 0.4, 0.0, 0.0), jitter_prob=1.0, grayscale_prob=0.0, blur_sigma=(0.1, 1.0))
    torch.manual_seed(2)
    clean, aug = LAFSViews(num_views=3, global_1=pm, global_2=pm, local=pm)(images)
    checked = 0
    for c, a in zip(clean, aug):
        assert not torch.equal(c, a)
        for i in range(b):
            cs, as_ = c[i].sum(0), a[i].sum(0)
            if cs.max() < -2.5:  # the dot fell outside this crop
                continue
            checked += 1
            pc = torch.tensor(divmod(cs.argmax().item(), 112))
            pa = torch.tensor(divmod(as_.argmax().item(), 112))
            assert (pc - pa).abs().max() <= 1
    assert checked > 40


def test_flip_mirrors_geometry():
    """With a full-image crop (scale 1, ratio 1) the clean views are the image or its exact mirror."""
    torch.manual_seed(3)
    images = _images(32, size=16)
    clean, _ = LAFSViews(size=16, num_views=1, scale=(1.0, 1.0), local=Photometric(**OFF))(images)
    out = clean[0]
    # crop_resize of the full box is an identity up to bicubic rounding
    same = (out - images).abs().amax((1, 2, 3)) < 1e-4
    mirrored = (out - images.flip(-1)).abs().amax((1, 2, 3)) < 1e-4
    assert torch.all(same | mirrored)
    assert 5 < same.sum() < 27 and 5 < mirrored.sum() < 27


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_sample_boxes_respect_scale_and_image(scale):
    torch.manual_seed(4)
    h, w = 112, 96
    boxes = sample_boxes(4000, h, w, scale, (3 / 4, 4 / 3))
    left, top, cw, ch = boxes.unbind(1)
    assert torch.all(left >= 0) and torch.all(top >= 0) and torch.all(left + cw <= w) and torch.all(top + ch <= h)
    assert torch.equal(boxes, boxes.round())
    frac = cw * ch / (h * w)
    # rounding the box sides to whole pixels moves the area a little around the drawn fraction
    tol = 2 * (h + w) / (h * w) * 1.0 + 0.01
    assert frac.min() >= scale[0] - tol and frac.max() <= scale[1] + tol
    r = cw / ch
    assert r.min() >= 3 / 4 - 0.1 and r.max() <= 4 / 3 + 0.1
    # the drawn fractions cover the range (large boxes of a non-square shape may not fit, and are redrawn)
    assert frac.min() < scale[0] + 0.02 and frac.max() > scale[1] - 0.1


def test_random_resized_crop_boxes_and_content():
    torch.manual_seed(5)
    images = _images(8, size=64)
    out, boxes = random_resized_crop(images, 32, scale=(0.4, 1.0), return_boxes=True)
    assert out.shape == (8, 3, 32, 32) and boxes.shape == (8, 4)
    assert torch.equal(out, crop_resize(images, boxes, 32).clamp(-1, 1))
    # a box that maps output pixels one-to-one onto input pixels reads the input exactly
    box = torch.tensor([[10.0, 20.0, 32.0, 32.0]])
    exact = crop_resize(images[:1], box, 32)
    assert torch.allclose(exact, images[:1, :, 20:52, 10:42], atol=1e-5)


def test_fallback_box_when_nothing_fits():
    torch.manual_seed(6)
    boxes = sample_boxes(10, 10, 100, (0.9, 1.0), (3 / 4, 4 / 3))  # a wide image: no box of ratio <= 4/3 fits
    assert torch.all(boxes[:, 3] == 10) and torch.all(boxes[:, 2] == round(10 * 4 / 3))


def test_photometric_rates():
    n = 4000
    torch.manual_seed(7)
    # jitter: a brightness-only jitter always changes a mid-grey image when applied
    grey = torch.zeros(n, 3, 8, 8)
    out = Photometric(jitter=(0.4, 0, 0, 0), **dict(OFF, jitter_prob=0.3))(grey)
    rate = (out != grey).flatten(1).any(1).float().mean().item()
    assert abs(rate - 0.3) < 0.04
    # grayscale: a coloured image ends with equal channels at the requested rate, the luma of ITU-R 601
    col = torch.tensor([0.8, -0.4, 0.2]).view(1, 3, 1, 1).expand(n, 3, 8, 8)
    out = Photometric(**dict(OFF, grayscale_prob=0.2))(col)
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert abs(gray.float().mean().item() - 0.2) < 0.03
    luma = 0.299 * 0.9 + 0.587 * 0.3 + 0.114 * 0.6
    assert torch.allclose(out[gray][:, :, 0, 0], torch.full((int(gray.sum()), 3), luma * 2 - 1), atol=1e-6)
    assert torch.allclose(out[~gray], col[~gray], atol=1e-6)
    # solarize: values >= 128/255 invert, darker ones stay
    x = torch.tensor([0.9, -0.9, 0.0]).view(1, 3, 1, 1).expand(n, 3, 4, 4)  # [0,1]: 0.95, 0.05, 0.5 (>= 128/255? no)
    out = Photometric(**dict(OFF, solarize_prob=0.2))(x)
    sol = out[:, 0, 0, 0] < 0
    assert abs(sol.float().mean().item() - 0.2) < 0.03
    assert torch.allclose(out[sol][:, 0], torch.tensor(-0.9)) and torch.all(out[:, 1] == -0.9)
    assert torch.all(out[:, 2] == 0.0)  # 0.5 < 128/255 is not solarized
    # blur: a checkerboard gets smoother at the requested rate
    board = ((torch.arange(8).view(8, 1) + torch.arange(8)) % 2).float().expand(n, 3, 8, 8) * 2 - 1
    out = Photometric(**dict(OFF, blur_prob=0.5, blur_sigma=(0.5, 2.0)))(board)
    blurred = (out != board).flatten(1).any(1).float().mean().item()
    assert abs(blurred - 0.5) < 0.04


def test_presets():
    assert (DINO_GLOBAL_1.blur_prob, DINO_GLOBAL_1.solarize_prob) == (1.0, 0.0)
    assert (DINO_GLOBAL_2.blur_prob, DINO_GLOBAL_2.solarize_prob) == (0.1, 0.2)
    assert (DINO_LOCAL.blur_prob, DINO_LOCAL.solarize_prob) == (0.5, 0.0)
    for p in (DINO_GLOBAL_1, DINO_GLOBAL_2, DINO_LOCAL):
        assert p.jitter == (0.4, 0.4, 0.2, 0.1) and p.jitter_prob == 0.8 and p.grayscale_prob == 0.2
    with pytest.raises(ValueError):
        Photometric(jitter=(0.4, 0.4, 0.2, 0.6))


def test_photometric_full_pipeline_range_and_identity():
    torch.manual_seed(8)
    x = _images(64, size=24)
    for p in (DINO_GLOBAL_1, DINO_GLOBAL_2, DINO_LOCAL):
        y = p(x)
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    off = Photometric(**OFF)
    assert off(x) is x
    assert torch.equal(x, _images(64, size=24))  # inputs are not modified in place


def test_seeded_determinism():
    images = _images(6)
    lafs, dino = LAFSViews(num_views=4), MultiCropViews(num_local=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        clean, aug = lafs(images)
        outs.append(clean + aug + dino(images))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    torch.manual_seed(124)
    other = lafs(images)[1]
    assert not torch.equal(other[0], outs[0][4])
