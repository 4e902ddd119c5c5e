"""The KP-RPE Fig. 1 toy (digits -> affine digits): keypoints, affine warps, the split, and quick end-to-end runs."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason='the toy affine experiment needs scikit-learn: pip install "lafs-face[toy]"')

from lafs.cli import toy_affine as T  # noqa: E402


def test_box_keypoints_of_a_rectangle():
    img = np.zeros((40, 40), np.float32)
    img[12:31, 10:21] = 1.0  # rows 12..30, cols 10..20
    img[5, 5] = 0.2  # below the foreground threshold: ignored
    kp = T.box_keypoints(img)
    np.testing.assert_array_equal(kp, [[10, 12], [20, 12], [15, 21], [10, 30], [20, 30]])


def test_keypoints_of_digit_zero_by_hand():
    from sklearn.datasets import load_digits

    digit = load_digits().images[0]  # a "0"; column 0 and 7 empty, column 1 at most 5/16, column 6 up to 8/16
    canvas = T.digit_canvas(digit)
    assert canvas.shape == (40, 40) and canvas.min() >= 0 and canvas.max() <= 1
    # 3x bilinear upsampling (pixel u samples source x = (u + 0.5) / 3 - 0.5), pasted at offset 8:
    # left: u = 4 samples column 1 exactly (5/16 > 0.25), u = 3 gives 2/3 * 5/16 < 0.25 -> x0 = 8 + 4 = 12;
    # right: u = 20 gives 2/3 * 8/16 > 0.25, u = 21 gives 1/3 * 8/16 < 0.25 -> x1 = 8 + 20 = 28;
    # rows 0 and 7 hold 13/16 and the border rows clamp to them -> y0 = 8, y1 = 8 + 23 = 31.
    expected = [[12, 8], [28, 8], [20, 19.5], [12, 31], [28, 31]]
    np.testing.assert_array_equal(T.box_keypoints(canvas), expected)
    _, _, kps = T.load_digit_canvases()
    np.testing.assert_array_equal(kps[0], expected)


def test_affine_moves_keypoints_like_the_box_corners():
    images, _, kps = T.load_digit_canvases()
    img, kp = images[0], kps[0]
    a, sx, sy, sh = math.radians(17.0), 1.1, 0.9, 0.2
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin = rot @ np.array([[1, sh], [0, 1]]) @ np.diag([sx, sy])
    c = kp[2].astype(np.float64)
    m = np.concatenate([lin, (c - lin @ c + [1.5, -2.0])[:, None]], 1).astype(np.float32)
    moved = T.transform_points(kp, m)
    x0, y0, x1, y1 = 12.0, 8.0, 28.0, 31.0
    for got, (x, y) in zip(moved, [(x0, y0), (x1, y0), ((x0 + x1) / 2, (y0 + y1) / 2), (x0, y1), (x1, y1)]):
        np.testing.assert_allclose(got, m[:, :2] @ [x, y] + m[:, 2], atol=1e-4)
    # the centre stays the centre of the transformed corners (a parallelogram)
    np.testing.assert_allclose(moved[2], moved[[0, 1, 3, 4]].mean(0), atol=1e-4)

    warped = T.warp(img, m)
    ys, xs = np.nonzero(warped > T.FOREGROUND)
    assert len(xs) > 50
    # every warped foreground pixel comes from within one pixel of the original box (bilinear: one of the four
    # source neighbours is foreground) ...
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    src = T.transform_points(np.stack([xs, ys], 1), inv)
    assert src[:, 0].min() >= x0 - 1.01 and src[:, 0].max() <= x1 + 1.01
    assert src[:, 1].min() >= y0 - 1.01 and src[:, 1].max() <= y1 + 1.01
    # ... so it lies near the transformed keypoints, and spans most of their extent
    lo, hi = moved.min(0), moved.max(0)
    assert xs.min() >= lo[0] - 1.5 and xs.max() <= hi[0] + 1.5
    assert ys.min() >= lo[1] - 1.5 and ys.max() <= hi[1] + 1.5
    assert xs.min() <= moved[2, 0] <= xs.max() and ys.min() <= moved[2, 1] <= ys.max()


def test_affine_test_set_is_seeded_and_inside_the_canvas():
    a, b = T.make_toy_data(0, affine_copies=1), T.make_toy_data(0, affine_copies=1)
    np.testing.assert_array_equal(a["affine_matrices"], b["affine_matrices"])
    np.testing.assert_array_equal(a["affine"][0], b["affine"][0])
    images, _, kps = T.load_digit_canvases()
    # keypoints are the original ones mapped by each image's matrix, and stay inside the 40 x 40 canvas
    expected = np.stack([T.transform_points(kps[i], m) for i, m in zip(a["test_idx"], a["affine_matrices"])])
    np.testing.assert_allclose(a["affine"][2], expected, atol=1e-4)
    assert a["affine"][2].min() >= 0 and a["affine"][2].max() <= T.CANVAS - 1
    # the warped digit does not touch the border
    edge = np.concatenate([a["affine"][0][:, [0, -1], :].ravel(), a["affine"][0][:, :, [0, -1]].ravel()])
    assert edge.max() < T.FOREGROUND
    # transforms are not trivial: keypoint displacements of several pixels
    assert np.abs(a["affine"][2] - kps[a["test_idx"]]).max() > 5


def test_split_is_deterministic_and_stratified():
    _, labels, _ = T.load_digit_canvases()
    tr1, te1 = T.split_indices(labels, 0.3, seed=0)
    tr2, te2 = T.split_indices(labels, 0.3, seed=0)
    np.testing.assert_array_equal(tr1, tr2)
    np.testing.assert_array_equal(te1, te2)
    assert len(np.intersect1d(tr1, te1)) == 0 and len(tr1) + len(te1) == len(labels) == 1797
    counts, test_counts = np.bincount(labels), np.bincount(labels[te1])
    assert np.all(np.abs(test_counts - 0.3 * counts) <= 0.5)
    _, te3 = T.split_indices(labels, 0.3, seed=1)
    assert not np.array_equal(te1, te3)
    d = T.make_toy_data(0, affine_copies=1)
    np.testing.assert_array_equal(d["test_idx"], te1)


def test_jitter_moves_keypoints_with_the_pixels():
    img = torch.zeros(1, 40, 40)
    img[0, 20, 10] = 1.0  # (x, y) = (10, 20)
    kp = torch.tensor([[[10.0, 20.0]] * 5])
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        out, k = T.jitter_batch(img, kp, 3, gen)
        y, x = (out[0] == 1).nonzero()[0].tolist()
        assert (x, y) == tuple(k[0, 0].tolist()) and abs(x - 10) <= 3 and abs(y - 20) <= 3
        assert out.sum() == 1


def test_arms_share_the_initialisation():
    models = {arm: T.ToyClassifier(arm, seed=5) for arm in T.ARMS}
    ref = models["abs"].state_dict()
    for arm, model in models.items():
        sd = model.state_dict()
        for name, value in ref.items():
            assert torch.equal(sd[name], value), (arm, name)
    assert models["kprpe"].backbone.uses_keypoints and not models["irpe"].backbone.uses_keypoints


def test_missing_sklearn_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "lafs-face\[toy\]"'):
        T._sklearn_digits()


def test_run_quick_returns_every_arm():
    result = T.run_toy_affine(quick=True)
    assert list(result["arms"]) == ["abs", "rpe", "irpe", "kprpe"]
    for r in result["arms"].values():
        assert 0.0 <= r["clean_acc"] <= 1.0 and 0.0 <= r["affine_acc"] <= 1.0
        assert isinstance(r["params"], int) and 0 < r["params"] < 10**7
        assert math.isfinite(r["train_seconds"]) and math.isfinite(r["final_loss"])
    params = {arm: r["params"] for arm, r in result["arms"].items()}
    assert params["abs"] < params["rpe"] < params["kprpe"] < params["irpe"]
    assert result["settings"]["quick"] and result["settings"]["n_test"] == 128
    table = T.format_table(result)
    assert all(f"| {arm} |" in table for arm in T.ARMS)


def test_main_quick_writes_json_and_png(tmp_path, capsys):
    from lafs.cli import main as lafs_main

    assert lafs_main(["toy-affine", "--quick", "--arms", "abs,kprpe", "--quiet"]) == 0  # the CLI hands options over
    assert "| kprpe |" in capsys.readouterr().out
    assert T.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(f"| {arm} |" in out for arm in ("abs", "rpe", "irpe", "kprpe"))
    result = json.loads((tmp_path / "toy_affine.json").read_text())
    assert list(result["arms"]) == ["abs", "rpe", "irpe", "kprpe"]
    assert result["settings"]["steps"] == T.QUICK["steps"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "toy_affine.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
