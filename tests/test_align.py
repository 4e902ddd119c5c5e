import itertools
import pickle

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from lafs.data.align import align_face, align_keypoints, inverse_warp  # noqa: E402
from lafs.geometry import (  # noqa: E402
    ARCFACE_TEMPLATE,
    estimate_similarity,
    estimate_similarity_batch,
    invert_affine,
    template,
    transform_points,
)

T = ARCFACE_TEMPLATE.astype(np.float64)


def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.radians(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([r, [[tx], [ty]]], axis=1)


def sse(m: np.ndarray, src: np.ndarray, dst: np.ndarray) -> float:
    return float(((transform_points(src, m) - dst) ** 2).sum())


def closed_form_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent reference: in complex numbers a similarity is z -> c z + t, a linear least-squares problem."""
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    zs_c, zd_c = zs - zs.mean(), zd - zd.mean()
    c = (np.conj(zs_c) * zd_c).sum() / (np.abs(zs_c) ** 2).sum()
    t = zd.mean() - c * zs.mean()
    return np.array([[c.real, -c.imag, t.real], [c.imag, c.real, t.imag]])


def blob_image(shape, centre, sigma, channel=0) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))
    img = np.zeros((h, w, 3), np.uint8)
    img[..., channel] = np.round(255 * g).astype(np.uint8)
    return img


def centroid(channel: np.ndarray, near, radius: int = 8) -> np.ndarray:
    """Intensity centroid in a window around ``near``: sub-pixel location of a blob, pixel centres at integers."""
    x0, y0 = int(round(near[0])), int(round(near[1]))
    win = channel[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1].astype(np.float64)
    yy, xx = np.mgrid[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
    assert win.sum() > 0, "blob not found in the window"
    return np.array([(win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()])


# --- template -------------------------------------------------------------------------------------------------


def test_template_112_is_exact_and_scales():
    t = template()
    assert t.dtype == np.float32 and t.shape == (5, 2)
    np.testing.assert_array_equal(t, ARCFACE_TEMPLATE)
    assert t[0, 0] == np.float32(38.2946) and t[4, 1] == np.float32(92.2041)
    t[0, 0] = 0  # a copy: editing it must not move the shared template
    assert ARCFACE_TEMPLATE[0, 0] == np.float32(38.2946)
    np.testing.assert_allclose(template(224), ARCFACE_TEMPLATE * 2, rtol=1e-6)
    np.testing.assert_allclose(template(56), ARCFACE_TEMPLATE / 2, rtol=1e-6)
    # Image order: the "left" eye and mouth corner are on the image's left.
    assert t[0, 0] < t[1, 0] and ARCFACE_TEMPLATE[3, 0] < ARCFACE_TEMPLATE[4, 0]


@pytest.mark.parametrize("bad", [0, -112, 112.0, True])
def test_template_bad_size(bad):
    with pytest.raises(ValueError, match="positive integer"):
        template(bad)


# --- estimate_similarity --------------------------------------------------------------------------------------


def test_template_onto_itself_is_identity():
    m = estimate_similarity(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE)
    assert m.shape == (2, 3) and m.dtype == np.float64
    np.testing.assert_allclose(m, np.eye(2, 3), atol=1e-6)


def test_recovers_known_similarity():
    true = similarity(30.0, 1.7, 40.0, -12.5)
    kps = transform_points(T, true)  # the template seen in a rotated, scaled, shifted image
    m = estimate_similarity(T, kps)
    np.testing.assert_allclose(m, true, atol=1e-9)
    # Aligning those keypoints (the inverse direction) maps them back onto the template.
    m_align = estimate_similarity(kps.astype(np.float32), ARCFACE_TEMPLATE)
    back = align_keypoints(kps.astype(np.float32), m_align)
    assert back.dtype == np.float32
    assert np.abs(back - ARCFACE_TEMPLATE).max() < 1e-3
    np.testing.assert_allclose(m_align, invert_affine(true), atol=1e-5)


def test_matches_independent_closed_form_on_noisy_points():
    rng = np.random.default_rng(1)
    for _ in range(20):
        true = similarity(rng.uniform(-180, 180), rng.uniform(0.2, 5), *rng.uniform(-100, 100, 2))
        src = rng.uniform(0, 250, (7, 2))
        dst = transform_points(src, true) + rng.normal(0, 3, (7, 2))
        np.testing.assert_allclose(estimate_similarity(src, dst), closed_form_similarity(src, dst), atol=1e-8)


def test_mirrored_points_give_no_reflection():
    mirrored = T.copy()
    mirrored[:, 0] = 112 - mirrored[:, 0]  # horizontally flipped face: left and right swapped geometrically
    m = estimate_similarity(mirrored, T)
    assert np.linalg.det(m[:, :2]) > 0
    # Same for a mirror about an arbitrary axis, and in batch form.
    flip = np.array([[0.0, 1.0], [1.0, 0.0]])
    src = np.stack([mirrored, T @ flip.T + 5, transform_points(T, similarity(70, 0.5, 3, 4)) @ flip.T])
    mb = estimate_similarity_batch(src, T)
    assert np.all(np.linalg.det(mb[:, :, :2]) > 0)
    # A pure rotation is the best proper fit: M[:, :2] is scale * rotation (orthogonal rows, equal norms).
    a = m[:, :2]
    np.testing.assert_allclose(a @ a.T, np.eye(2) * np.linalg.det(a), atol=1e-9)


def test_least_squares_beats_every_three_point_fit():
    rng = np.random.default_rng(0)
    true = similarity(-12, 1.3, 20, 30)
    clean = transform_points(T, true)
    noisy = clean + rng.normal(0, 1.5, clean.shape)
    m = estimate_similarity(T, noisy)
    best = sse(m, T, noisy)
    rms = np.sqrt(best / 5)
    assert rms < 3.0  # noise of 1.5 px per coordinate
    np.testing.assert_allclose(m, true, atol=0.15 * np.abs(true).max())
    for idx in itertools.combinations(range(5), 3):
        sub = estimate_similarity(T[list(idx)], noisy[list(idx)])
        assert sse(sub, T, noisy) >= best - 1e-9
    # And it is the optimum among similarities: nudging any of the 4 parameters (a, b, tx, ty of
    # [[a, -b, tx], [b, a, ty]]) makes the fit worse. (A single matrix entry would leave the family.)
    directions = [
        np.array([[1.0, 0, 0], [0, 1, 0]]),
        np.array([[0, -1.0, 0], [1, 0, 0]]),
        np.array([[0, 0, 1.0], [0, 0, 0]]),
        np.array([[0, 0, 0], [0, 0, 1.0]]),
    ]
    for d in directions:
        for eps in (1e-3, -1e-3):
            assert sse(m + eps * d, T, noisy) > best


def test_two_points_and_collinear_points():
    src = np.array([[0.0, 0.0], [10.0, 0.0]])
    dst = np.array([[5.0, 5.0], [5.0, 25.0]])  # rotated 90 degrees, scaled 2
    m = estimate_similarity(src, dst)
    np.testing.assert_allclose(m, similarity(90, 2, 5, 5), atol=1e-9)
    line = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    m = estimate_similarity(line, line * 3 + 1)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(transform_points(line, m), line * 3 + 1, atol=1e-9)


def test_batch_matches_single():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 250, (16, 5, 2))
    mb = estimate_similarity_batch(src, ARCFACE_TEMPLATE)
    assert mb.shape == (16, 2, 3)
    for b in range(16):
        np.testing.assert_allclose(mb[b], estimate_similarity(src[b], ARCFACE_TEMPLATE), atol=1e-10)
    # A per-item dst batch works too.
    dst = rng.uniform(0, 112, (16, 5, 2))
    mb = estimate_similarity_batch(src, dst)
    np.testing.assert_allclose(mb[5], estimate_similarity(src[5], dst[5]), atol=1e-10)
    assert estimate_similarity_batch(np.zeros((0, 5, 2)), T).shape == (0, 2, 3)


def test_batch_names_degenerate_index():
    src = np.stack([T, T, np.full((5, 2), 7.0)])
    with pytest.raises(ValueError, match="batch index 2"):
        estimate_similarity_batch(src, T)


@pytest.mark.parametrize(
    "src, dst, msg",
    [
        (np.zeros((1, 2)), np.zeros((1, 2)), "at least 2 points"),
        (np.zeros((5, 3)), np.zeros((5, 3)), r"shape \(N, 2\)"),
        (np.zeros(10), np.zeros(10), r"shape \(N, 2\)"),
        (T, T[:4], "same shape"),
        (np.full((5, 2), 3.0), T, "src points are degenerate"),
        (np.full((5, 2), 1e6), T, "src points are degenerate"),
        (T, np.full((5, 2), 50.0), "dst points are degenerate"),
        (np.where(np.eye(5, 2, dtype=bool), np.nan, T), T, "NaN"),
    ],
)
def test_bad_input_errors(src, dst, msg):
    with pytest.raises(ValueError, match=msg):
        estimate_similarity(src, dst)


# --- point transforms -----------------------------------------------------------------------------------------


def test_transform_points_shapes_dtypes_and_inverse():
    m = similarity(25, 0.8, 3, -4)
    pts = np.random.default_rng(0).uniform(0, 100, (4, 3, 5, 2)).astype(np.float32)
    out = transform_points(pts, m)
    assert out.shape == pts.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[1, 2], transform_points(pts[1, 2].astype(np.float64), m), atol=1e-4)
    assert transform_points(pts.astype(np.float64), m).dtype == np.float64
    np.testing.assert_allclose(transform_points(out, invert_affine(m)), pts, atol=1e-4)
    np.testing.assert_allclose(transform_points([10.0, 0.0], m), m[:, 0] * 10 + m[:, 2])
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        transform_points(pts, np.eye(3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        transform_points(np.zeros((5, 3)), m)


def test_invert_affine():
    m = np.array([[1.2, 0.3, 5.0], [-0.4, 0.9, -7.0]])  # a general affine, not only similarities
    inv = invert_affine(m)
    full = np.vstack([m, [0, 0, 1]]) @ np.vstack([inv, [0, 0, 1]])
    np.testing.assert_allclose(full, np.eye(3), atol=1e-12)
    with pytest.raises(ValueError, match="singular"):
        invert_affine(np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]]))


# --- images ---------------------------------------------------------------------------------------------------


def test_dot_lands_on_template_and_inverse_warp_brings_it_back():
    true = similarity(20, 1.5, 40, 10)  # template -> a 250x250 "photo"
    kps = transform_points(ARCFACE_TEMPLATE, true)
    assert kps.min() > 20 and kps.max() < 230
    eye = kps[0]
    img = blob_image((250, 250), eye, sigma=2.0, channel=0)

    aligned, m = align_face(img, kps)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    np.testing.assert_allclose(m, invert_affine(true), atol=1e-5)
    # The red blob stays red (RGB order untouched) and sits on the template's left eye.
    assert aligned[..., 1:].max() == 0 and aligned[..., 0].max() > 100
    found = centroid(aligned[..., 0], ARCFACE_TEMPLATE[0])
    assert np.linalg.norm(found - ARCFACE_TEMPLATE[0]) < 1.0, found
    np.testing.assert_allclose(align_keypoints(kps, m), ARCFACE_TEMPLATE, atol=1e-3)

    back = inverse_warp(aligned, m, img.shape)
    assert back.shape == img.shape and back.dtype == np.uint8
    found_back = centroid(back[..., 0], eye)
    assert np.linalg.norm(found_back - eye) < 1.0, found_back
    # Away from the crop the pasted-back image is black.
    assert back[0, 0].max() == 0 and back[-1, -1].max() == 0


def test_other_sizes_and_borders():
    true = similarity(-10, 2.0, 10, 5)
    kps = transform_points(ARCFACE_TEMPLATE, true)
    img = blob_image((260, 260), kps[2], sigma=3.0, channel=1)  # nose in green
    img[..., 2] = 200  # a flat blue background to tell the border modes apart
    aligned, m = align_face(img, kps, size=224)
    assert aligned.shape == (224, 224, 3)
    found = centroid(aligned[..., 1], template(224)[2], radius=12)
    assert np.linalg.norm(found - template(224)[2]) < 1.0, found

    # A face near the image corner: the crop runs off the image, so the border mode shows.
    corner = kps - kps.min(axis=0) + 1
    black, _ = align_face(img, corner, border="constant")
    repl, _ = align_face(img, corner, border="replicate")
    refl, _ = align_face(img, corner, border="reflect")
    assert black[0, 0, 2] == 0
    assert repl[0, 0, 2] == 200 and refl[0, 0, 2] == 200


def test_bilinear_sampling_at_half_pixels():
    # Keypoints half a pixel right of the template: the crop samples midway between pixels, where bilinear
    # interpolation averages neighbours (odd values on an even ramp) and nearest-neighbour would not.
    ramp = np.broadcast_to((2 * np.arange(120, dtype=np.uint8))[None, :, None], (120, 120, 3)).copy()
    aligned, m = align_face(ramp, ARCFACE_TEMPLATE + np.array([0.5, 0.0], np.float32))
    np.testing.assert_allclose(m, [[1, 0, -0.5], [0, 1, 0]], atol=1e-6)
    np.testing.assert_array_equal(aligned[50, 10:100, 0], 2 * np.arange(10, 100) + 1)


def test_align_face_bad_input():
    img = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        align_face(img, T[:4])
    with pytest.raises(ValueError, match="RGB uint8"):
        align_face(img.astype(np.float32), T)
    with pytest.raises(ValueError, match="RGB uint8"):
        align_face(img[..., 0], T)
    with pytest.raises(ValueError, match="border"):
        align_face(img, T, border="wrap")
    with pytest.raises(ValueError, match="degenerate"):
        align_face(img, np.full((5, 2), 50.0))
    with pytest.raises(ValueError, match="out_shape"):
        inverse_warp(img, np.eye(2, 3), (0, 10))


# --- real data ------------------------------------------------------------------------------------------------


def _lfw(shared_data, name):
    path = shared_data / "lfw" / name
    if not path.is_file():
        pytest.skip(f"{path} not found: real LFW keypoints/images are needed for this test")
    return path


@pytest.mark.shared_data
def test_lfw_aligned_keypoints_sit_on_template(shared_data):
    kps = np.load(_lfw(shared_data, "lfw_kps.npy"))
    assert kps.shape == (12000, 5, 2)
    m = estimate_similarity_batch(kps, ARCFACE_TEMPLATE)
    resid = np.linalg.norm(_apply_batch(kps, m) - T, axis=-1)
    # Detected landmarks vary from face to face, so the template is only met on average: a few px.
    assert np.median(resid) < 3.0
    assert np.percentile(resid, 90) < 7.0
    assert np.percentile(resid.mean(axis=1), 99) < 8.0
    # These images were aligned with this very protocol, so re-fitting finds (almost) the identity.
    np.testing.assert_allclose(m[:, :, :2], np.broadcast_to(np.eye(2), (12000, 2, 2)), atol=1e-4)
    assert np.abs(m[:, :, 2]).max() < 1e-2


def _apply_batch(pts: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.einsum("bij,bnj->bni", m[:, :, :2], pts.astype(np.float64)) + m[:, None, :, 2]


@pytest.mark.shared_data
def test_lfw_unaligned_crops_align_to_the_released_aligned_images(shared_data):
    aligned_kps = np.load(_lfw(shared_data, "lfw_kps.npy"))
    raw_kps = np.load(_lfw(shared_data, "lfw_unaligned_kps.npy"))
    # Keypoints: aligning the raw crops' points reproduces the aligned images' points.
    m = estimate_similarity_batch(raw_kps, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(_apply_batch(raw_kps, m), aligned_kps, atol=1e-2)

    # Pixels: align_face on a few raw crops gives the released aligned images (up to JPEG and resampling).
    with open(_lfw(shared_data, "lfw.bin"), "rb") as f:
        aligned_jpegs, _ = pickle.load(f)
    with open(_lfw(shared_data, "lfw_unaligned.bin"), "rb") as f:
        raw_jpegs, _ = pickle.load(f)

    def decode(b):  # stored RGB, encoded from BGR arrays by OpenCV: imdecode gives the stored order back
        return np.ascontiguousarray(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])

    diffs, others = [], []
    for i in range(0, 12000, 1500):
        ours, _ = align_face(decode(raw_jpegs[i]), raw_kps[i])
        ref = decode(aligned_jpegs[i]).astype(np.float64)
        diffs.append(np.abs(ours[20:100, 20:100] - ref[20:100, 20:100]).mean())
        other = decode(aligned_jpegs[i + 1]).astype(np.float64)  # another face, as a scale for "different"
        others.append(np.abs(other[20:100, 20:100] - ref[20:100, 20:100]).mean())
    assert np.median(diffs) < 3.0, diffs
    assert max(diffs) < 6.0, diffs
    assert max(diffs) < min(others) / 3, (diffs, others)
