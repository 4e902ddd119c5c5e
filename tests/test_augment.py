import math

import kornia.enhance as KE
import pytest
import torch
from kornia.color import rgb_to_grayscale

import lafs.augment.supervised as sup
from lafs.augment import MIXUP_PRESETS, RANDAUGMENT_OPS, Mixup, SupervisedAugment, rand_augment_op
from lafs.augment.ops import color_jitter, shift_hue

PRESETS = ("none", "flip", "shift", "webface4m", "ms1mv3", "misalign")


def _op(images, name, magnitude, sign=1.0):
    n = len(images)
    return rand_augment_op(images, name, torch.full((n,), float(magnitude)), torch.full((n,), float(sign)))


def _blob_centre(img):
    """(x, y) centroid of the pixels brighter than the grey fill, pixel centres at p + 0.5."""
    w = (img.mean(0) - 0.5).clamp_min(0)
    ys, xs = torch.meshgrid(torch.arange(img.shape[1]) + 0.5, torch.arange(img.shape[2]) + 0.5, indexing="ij")
    return (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()


@pytest.mark.parametrize("name", PRESETS)
def test_presets_keep_shape_dtype_range(name):
    x = torch.rand(16, 3, 40, 40, dtype=torch.float64) * 2 - 1
    y = SupervisedAugment.preset(name)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all() and y.min() >= -1 and y.max() <= 1


def test_preset_settings_follow_the_paper():
    wf, ms = SupervisedAugment.preset("webface4m"), SupervisedAugment.preset("ms1mv3")
    for aug in (wf, ms):
        assert aug.flip and aug.randaugment_ops == 2 and aug.randaugment_prob == 0.5
        assert aug.randaugment_magnitude_std == 0.5 and aug.resized_crop_scale == (0.9, 1.0)
        assert aug.color_jitter == 0.1 and aug.erasing_prob == 0.5 and aug.erasing_scale == (0.02, 0.1)
    assert (wf.randaugment_magnitude, ms.randaugment_magnitude) == (1.0, 2.0)
    flip = SupervisedAugment.preset("flip")
    assert flip.flip and not (flip.randaugment_ops or flip.resized_crop_scale or flip.color_jitter or flip.erasing_prob)
    assert set(MIXUP_PRESETS) == set(PRESETS) and MIXUP_PRESETS["webface4m"] == (0.2, 0.1)
    assert MIXUP_PRESETS["ms1mv3"] == (0.2, 0.2) and MIXUP_PRESETS["flip"][1] == 0


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        SupervisedAugment.preset("imagenet")
    assert all(name in str(err.value) for name in PRESETS)


def test_none_is_exact_identity():
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    assert torch.equal(SupervisedAugment.preset("none")(x), x)


def test_flip_mirrors_about_half_exactly():
    x = torch.rand(200, 3, 6, 6) * 2 - 1
    y = SupervisedAugment.preset("flip")(x)
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all()
    assert 70 <= mirrored.sum() <= 130


def test_same_seed_same_output_other_seed_differs():
    x = torch.rand(16, 3, 40, 40) * 2 - 1
    aug = SupervisedAugment.preset("ms1mv3")
    torch.manual_seed(1)
    a = aug(x)
    torch.manual_seed(1)
    b = aug(x)
    torch.manual_seed(2)
    c = aug(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_randaugment_draws_ops_uniformly_with_prob_and_clipped_magnitude(monkeypatch):
    calls = []

    def record(images, name, magnitude, sign):
        calls.append((name, magnitude.clone(), sign.clone()))
        return images

    monkeypatch.setattr(sup, "rand_augment_op", record)
    aug = SupervisedAugment(flip=False, randaugment_ops=2, randaugment_magnitude=1.0, randaugment_prob=0.5)
    aug(torch.zeros(2600, 3, 2, 2))
    counts = {name: 0 for name in RANDAUGMENT_OPS}
    for name, magnitude, _ in calls:
        counts[name] += len(magnitude)
    assert 2 * 2600 * 0.45 < sum(counts.values()) < 2 * 2600 * 0.55  # 2 ops per image, each with p = 0.5
    assert all(150 < n < 250 for n in counts.values())  # ~200 each: uniform over the 13 ops
    mags = torch.cat([m for _, m, _ in calls])
    signs = torch.cat([s for _, _, s in calls])
    assert mags.min() >= 0 and mags.max() <= 10 and (mags == 0).any()  # N(1, 0.5) clipped at 0
    assert abs(mags.mean() - 1.0) < 0.05 and set(signs.tolist()) == {-1.0, 1.0}


def test_randaugment_prob_zero_and_one():
    x = torch.rand(32, 3, 24, 24) * 2 - 1
    assert torch.equal(SupervisedAugment(flip=False, randaugment_ops=2, randaugment_prob=0.0)(x), x)
    on = SupervisedAugment(flip=False, randaugment_ops=2, randaugment_magnitude=9, randaugment_prob=1.0)
    changed = ((on(x) - x).abs().flatten(1).amax(1) > 1e-3).float().mean()
    assert changed > 0.8


def test_invert_negates_in_project_range():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(_op((x + 1) / 2, "Invert", 5) * 2 - 1, -x)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rotate_moves_a_known_pixel_counter_clockwise(sign):
    img = torch.full((1, 3, 64, 64), 0.5)
    img[..., 30:34, 50:54] = 1.0  # blob centred 20 px right of the image centre (32, 32)
    x, y = _blob_centre(_op(img, "Rotate", 10, sign)[0])  # 30 degrees, counter-clockwise for sign +1
    assert abs(x - (32 + 20 * math.cos(math.pi / 6))) < 0.3
    assert abs(y - (32 - sign * 20 * math.sin(math.pi / 6))) < 0.3


def test_geometric_fill_is_grey_128():
    out = _op(torch.ones(1, 3, 32, 32), "Rotate", 10)
    assert torch.allclose(out[..., 0, 0], torch.tensor(0.5))  # a corner rotated in from outside the image
    out = _op(torch.ones(1, 3, 32, 32), "TranslateYRel", 10, -1)  # 0.45 * 32 = 14.4 px down
    assert torch.allclose(out[..., :14, :], torch.tensor(0.5)) and torch.allclose(out[..., 15:, :], torch.tensor(1.0))


def test_shear_x_is_about_the_top_left_corner():
    img = torch.full((1, 3, 40, 40), 0.5)
    img[..., :, 30] = 1.0
    out = _op(img, "ShearX", 10)  # out(x, y) = in(x + 0.3 y, y)
    for row in (0, 10, 20, 30):
        assert out[0, 0, row].argmax() == round(30 - 0.3 * (row + 0.5))


def test_translate_rel_shifts_by_a_fraction_of_the_size():
    img = torch.rand(1, 3, 40, 40)
    out = _op(img, "TranslateXRel", 5)  # 0.225 * 40 = 9 px; out(x) = in(x + 9)
    torch.testing.assert_close(out[..., :31], img[..., 9:])
    assert torch.allclose(out[..., 31:], torch.tensor(0.5))
    torch.testing.assert_close(_op(img, "TranslateYRel", 5, -1)[..., 9:, :], img[..., :31, :])


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "Color", "Contrast", "Sharpness"])
def test_magnitude_zero_is_identity(name):
    img = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(_op(img, name, 0), img, atol=1e-5, rtol=0)


def test_posterize_keeps_fewer_bits_as_magnitude_grows():
    img = torch.arange(256.0).div(255).repeat(3, 16, 1).unsqueeze(0)
    four = _op(img, "Posterize", 1)  # 4 - int(0.4) = 4 bits
    assert four.unique().numel() == 16
    torch.testing.assert_close(four * 255 % 16, torch.zeros_like(four), atol=1e-3, rtol=0)
    assert _op(img, "Posterize", 5).unique().numel() == 4  # 2 bits
    assert (_op(img, "Posterize", 10) == 0).all()  # 0 bits: black, as PIL


def test_equalize_flattens_the_histogram():
    img = (0.5 + 0.1 * torch.randn(1, 3, 64, 64)).clamp(0, 1)
    out = _op(img, "Equalize", 5)
    hist_in, hist_out = torch.histc(img, 8, 0, 1), torch.histc(out, 8, 0, 1)
    assert hist_out.max() < 0.5 * hist_in.max()
    assert hist_out.min() > 0.5 * hist_out.mean()


def test_autocontrast_stretches_each_channel_and_keeps_flat_ones():
    img = 0.25 + 0.5 * torch.rand(1, 3, 16, 16)
    img[:, 2] = 0.3
    out = _op(img, "AutoContrast", 5)
    assert torch.allclose(out[0, :2].amin((1, 2)), torch.zeros(2)) and torch.allclose(out[0, :2].amax((1, 2)), torch.ones(2))
    assert torch.equal(out[:, 2], img[:, 2])


def test_enhance_ops_use_increasing_factors():
    img = 0.2 + 0.6 * torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(_op(img, "Brightness", 10, -1), img * 0.1)  # factor 1 - 0.9
    torch.testing.assert_close(_op(img, "Brightness", 5, 1), (img * 1.45).clamp(0, 1))  # factor 1 + 0.45
    spread = img.amax(1) - img.amin(1)
    torch.testing.assert_close(_op(img, "Color", 10, -1).amax(1) - _op(img, "Color", 10, -1).amin(1), spread * 0.1)
    grey = rgb_to_grayscale(img)
    low = rgb_to_grayscale(_op(img, "Contrast", 10, -1))
    torch.testing.assert_close(low.std(), grey.std() * 0.1)
    sharp = _op(img, "Sharpness", 10, 1)
    assert torch.equal(sharp[..., 0, :], img[..., 0, :]) and not torch.allclose(sharp, img)  # PIL keeps the border


def test_unknown_op_raises():
    with pytest.raises(ValueError, match="Solarize"):
        _op(torch.rand(1, 3, 8, 8), "Solarize", 5)


def test_hue_shift_matches_hsv_rotation():
    img = torch.rand(4, 3, 16, 16)
    img[:, :, :3] = img[:, :1, :3]  # grey rows: no hue to rotate
    shift = torch.tensor([-0.5, -0.1, 0.05, 0.3])
    out = shift_hue(img, shift)
    torch.testing.assert_close(out, KE.adjust_hue(img, shift * 2 * math.pi), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :, :3], img[:, :, :3])


def _shift_hue_remainder_formula(x, shift):
    """shift_hue as first written (issue 18 made it 2.5x faster on CPU): its outputs must stay bit for bit."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = x.amax(1, keepdim=True)
    c = v - x.amin(1, keepdim=True)
    d = torch.where(c > 0, c, 1)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.remainder(h / 6 + shift.view(-1, 1, 1, 1), 1) * 6
    k = torch.remainder(x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + h, 6)
    return v - c * torch.minimum(k, 4 - k).clamp(0, 1)


def test_hue_shift_is_bit_identical_to_the_remainder_formula():
    torch.manual_seed(0)
    levels = torch.tensor([0.0, 1e-7, 0.25, 0.5, 0.75, 1 - 1e-7, 1.0])
    corners = torch.cartesian_prod(levels, levels, levels).T.reshape(1, 3, 7, 49)  # greys, primaries, ties
    shifts = torch.tensor([0.0, 0.5, -0.5, 1 / 6, -1 / 6, 1 / 3, 0.1, -0.1, 1e-7, -1e-7])
    x = torch.cat([corners.expand(len(shifts), -1, -1, -1), torch.rand(len(shifts), 3, 7, 49)], 3)
    for dtype in (torch.float32, torch.float64):
        for sh in (shifts, torch.rand(len(shifts)) - 0.5):
            got, want = shift_hue(x.to(dtype), sh.to(dtype)), _shift_hue_remainder_formula(x.to(dtype), sh.to(dtype))
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_color_jitter_on_grey_only_scales_brightness():
    x = torch.zeros(64, 3, 8, 8)  # grey 0.5 in [0, 1]: contrast, saturation and hue leave it alone
    y = (SupervisedAugment(flip=False, color_jitter=0.1)(x) + 1) / 2
    assert (y.flatten(1).amax(1) - y.flatten(1).amin(1)).max() < 1e-5
    assert y.min() >= 0.45 - 1e-5 and y.max() <= 0.55 + 1e-5 and y.std() > 0.01


def test_resized_crop_keeps_size_and_crops_at_least_scale_of_the_width():
    ramp = torch.linspace(-1, 1, 56).expand(32, 3, 56, 56).contiguous()
    y = SupervisedAugment(flip=False, resized_crop_scale=(0.9, 1.0))(ramp)
    assert y.shape == ramp.shape
    assert (y.diff(dim=-1) >= -1e-6).all()  # still a left-to-right ramp: no flip, no rotation
    # area >= 0.9 and height <= H force width >= 0.9 W; on a ramp, the output's span is the crop's width fraction
    span = (y[..., -1] - y[..., 0]).flatten() / 2
    assert span.min() > 0.88 and span.max() < 1.0 + 1e-5 and span.min() < 0.99


def test_erasing_blackens_one_rectangle_within_scale():
    x = torch.zeros(64, 3, 40, 40)
    y = SupervisedAugment(flip=False, erasing_prob=1.0)(x)
    erased = y[:, 0] == -1  # value 0 of the uint8 image, i.e. black
    assert ((y == -1) == erased.unsqueeze(1)).all() and (y[~erased.unsqueeze(1).expand_as(y)] == 0).all()
    for mask in erased:
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == h * w  # a filled rectangle
        assert 0.02 * 0.9 <= mask.float().mean() <= 0.1 * 1.1  # area fraction in scale, up to rounding
    half = SupervisedAugment(flip=False, erasing_prob=0.5)(x)
    assert 16 <= (half == -1).flatten(1).any(1).sum() <= 48


def test_mixup_always_mixes_batch_with_its_reverse():
    x, labels = torch.randn(6, 3, 4, 4), torch.arange(6)
    for _ in range(10):
        out, a, b, lam = Mixup(alpha=0.2, prob=1.0)(x, labels)
        assert 0 < lam < 1 and isinstance(lam, float)
        torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
        assert torch.equal(a, labels) and torch.equal(b, labels.flip(0))


def test_mixup_prob_zero_is_identity_without_rng():
    x, labels = torch.randn(4, 3, 4, 4), torch.arange(4)
    torch.manual_seed(3)
    out, a, b, lam = Mixup(prob=0.0)(x, labels)
    assert out is x and a is labels and b is labels and lam == 1.0
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


def test_mixup_rate_and_beta_weights():
    x, labels = torch.randn(2, 1, 1, 1), torch.arange(2)
    lams = [Mixup(alpha=0.2, prob=0.3)(x, labels)[3] for _ in range(400)]
    mixed = [lam for lam in lams if lam != 1.0]
    assert 0.2 < len(mixed) / 400 < 0.4
    assert abs(sum(mixed) / len(mixed) - 0.5) < 0.15  # Beta(0.2, 0.2): symmetric, U-shaped
    assert sum(lam < 0.1 or lam > 0.9 for lam in mixed) > 0.4 * len(mixed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_gpu_deterministically():
    x = torch.rand(32, 3, 112, 112, device="cuda") * 2 - 1
    aug = SupervisedAugment.preset("webface4m")
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    assert a.device == x.device and torch.equal(a, aug(x))
    out, _, _, lam = Mixup(prob=1.0)(x, torch.arange(32, device="cuda"))
    assert out.device == x.device and 0 < lam < 1


def test_shift_moves_whole_pixels_replicates_edges_and_keypoints_follow():
    from lafs.augment.supervised import SupervisedAugment

    torch.manual_seed(3)
    aug = SupervisedAugment(flip=False, shift=1 / 16)  # 4 px at 64
    x = torch.full((16, 3, 64, 64), -1.0)
    x[:, :, 20, 30] = 1.0  # one bright pixel per image, at (x=30, y=20)
    kp = torch.tensor([[30.0, 20.0]]).repeat(16, 5, 1)
    y, moved = aug(x, kp)
    assert set(y.unique().tolist()) <= {-1.0, 1.0}  # stored values only: no resampling
    for i in range(16):
        ys, xs = torch.nonzero(y[i, 0] == 1.0, as_tuple=True)
        assert len(ys) == 1
        assert (xs.item(), ys.item()) == tuple(moved[i, 0].int().tolist())
        assert abs(xs.item() - 30) <= 4 and abs(ys.item() - 20) <= 4
    assert len({tuple(m[0].tolist()) for m in moved}) > 4  # per-image shifts
    edge = torch.zeros(1, 3, 8, 8)
    edge[..., 0] = 1.0  # the left column: a right shift replicates it into the gap
    torch.manual_seed(0)
    out = SupervisedAugment(flip=False, shift=0.25)(edge)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"shift must be in \[0, 0.5\)"):
        SupervisedAugment(shift=0.5)


# --- one RandomResizedCrop and one ColorJitter for the supervised and multi-crop views ----------------------------
# The two pipelines each had their own until issue 23; these are those copies, frozen: the shared implementation
# must give the same floats for the same seed (CPU, where torch's uniform draws are one serial stream).


def _old_uniform(low, high, shape):
    return low + (high - low) * torch.rand(shape)


def _old_supervised_resized_crop(x, scale, kp):
    (b, _, h, w) = x.shape
    ratio_lo, ratio_hi = 3 / 4, 4 / 3
    area = h * w * _old_uniform(*scale, (b, 10))
    ratio = torch.exp(_old_uniform(math.log(ratio_lo), math.log(ratio_hi), (b, 10)))
    cw, ch = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)
    found = fits.any(1)
    fw = w if w / h <= ratio_hi else round(h * ratio_hi)
    fh = h if w / h >= ratio_lo else round(w / ratio_lo)
    cw = torch.where(found, cw.gather(1, first).squeeze(1), float(fw))
    ch = torch.where(found, ch.gather(1, first).squeeze(1), float(fh))
    top = torch.where(found, torch.floor(torch.rand(b) * (h - ch + 1)), (h - ch) // 2)
    left = torch.where(found, torch.floor(torch.rand(b) * (w - cw + 1)), (w - cw) // 2)
    zero = torch.zeros_like(cw)
    theta = torch.stack([cw / w, zero, left, zero, ch / h, top], -1).view(-1, 2, 3)
    kp.copy_(sup.move_points(kp, theta))
    return sup._warp(x, theta, "border").clamp_(0, 1)


def _old_supervised_color_jitter(x, s):
    b = len(x)
    factors = _old_uniform(max(0.0, 1 - s), 1 + s, (3, b))
    hue = _old_uniform(-s, s, (b,))
    ops = (lambda x, f: x * f.view(-1, 1, 1, 1), KE.adjust_contrast_with_mean_subtraction,
           KE.adjust_saturation_with_gray_subtraction, _shift_hue_remainder_formula)
    params = (factors[0], factors[1], factors[2], hue)
    order = torch.rand(b, 4).argsort(1)
    for step in range(4):
        for k in range(4):
            idx = (order[:, step] == k).nonzero().squeeze(1)
            if len(idx):
                x[idx] = ops[k](x.index_select(0, idx), params[k][idx]).clamp_(0, 1)
    return x


def _old_photometric_color_jitter(y, jitter):
    b = len(y)
    bs, cs, ss, hs = jitter
    params = (_old_uniform(max(0.0, 1 - bs), 1 + bs, (b,)), _old_uniform(max(0.0, 1 - cs), 1 + cs, (b,)),
              _old_uniform(max(0.0, 1 - ss), 1 + ss, (b,)), _old_uniform(-hs, hs, (b,)))
    ops = (lambda x, f: x * f.view(-1, 1, 1, 1), KE.adjust_contrast_with_mean_subtraction,
           KE.adjust_saturation_with_gray_subtraction, _shift_hue_remainder_formula)
    order = torch.rand(b, 4).argsort(1)
    for step in range(4):
        for k in range(4):
            idx = (order[:, step] == k).nonzero().squeeze(1)
            if len(idx) and jitter[k] > 0:
                y[idx] = ops[k](y[idx], params[k][idx]).clamp(0, 1)
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resized_crop_and_jitter_are_bit_identical_to_the_two_former_copies(seed):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(48, 3, 40, 36, generator=g)  # [0, 1], not square: the ratio fallback is reached too
    kp = torch.rand(48, 5, 2, generator=g) * 36
    aug = SupervisedAugment(flip=False, resized_crop_scale=(0.3, 1.0), color_jitter=0.1)
    for scale in ((0.9, 1.0), (0.05, 1.0), (0.95, 1.0)):
        aug.resized_crop_scale = scale
        torch.manual_seed(seed)
        want_kp = kp.clone()
        want = _old_supervised_resized_crop(x.clone(), scale, want_kp)
        torch.manual_seed(seed)
        got_kp = kp.clone()
        assert torch.equal(aug._resized_crop(x.clone(), got_kp), want) and torch.equal(got_kp, want_kp)
    torch.manual_seed(seed)
    want = _old_supervised_color_jitter(x.clone(), 0.1)
    torch.manual_seed(seed)
    assert torch.equal(color_jitter(x.clone(), (0.1,) * 4), want)
    for jitter in ((0.4, 0.4, 0.2, 0.1), (0.0, 0.3, 0.0, 0.05)):
        torch.manual_seed(seed)
        want = _old_photometric_color_jitter(x.clone(), jitter)
        torch.manual_seed(seed)
        assert torch.equal(color_jitter(x.clone(), jitter), want)
    # and the whole pipelines, which call them
    y = x * 2 - 1
    torch.manual_seed(seed)
    want = _old_supervised_resized_crop(y.add(1).div_(2).clamp_(0, 1), (0.9, 1.0), kp.clone())
    want = _old_supervised_color_jitter(want, 0.1).mul_(2).sub_(1)
    torch.manual_seed(seed)
    assert torch.equal(SupervisedAugment(flip=False, resized_crop_scale=(0.9, 1.0), color_jitter=0.1)(y), want)
