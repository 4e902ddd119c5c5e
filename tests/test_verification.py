"""ROC AUC against hand-counted values; the 10-fold .bin protocol against hand counts, a loop reference and real LFW."""

import time

import cv2
import numpy as np
import pytest
import torch

from lafs.data.pairs import write_bin
from lafs.eval.verification import (
    embed_images,
    evaluate_bin,
    evaluate_pairs,
    fold_ids,
    load_bin,
    roc_auc,
    ten_fold_accuracy,
)


def test_roc_auc_by_hand():
    # genuine 0.9, 0.4; impostor 0.5, 0.1: 3 of 4 genuine-impostor orderings are right.
    assert roc_auc([0.9, 0.5, 0.4, 0.1], [True, False, True, False]) == 0.75
    # one tie between a genuine and an impostor score counts half: (1 + 0.5) / 2.
    assert roc_auc([0.7, 0.3, 0.3], [True, True, False]) == 0.75
    assert roc_auc([1.0, 0.0], [True, False]) == 1.0 and roc_auc([0.0, 1.0], [True, False]) == 0.0


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    same = rng.random(300) < 0.4
    diff = scores[same][:, None] - scores[~same][None, :]
    assert roc_auc(scores, same) == pytest.approx((diff > 0).mean() + 0.5 * (diff == 0).mean())
    with pytest.raises(ValueError, match="genuine and impostor"):
        roc_auc([0.1, 0.2], [True, True])


# --- 10-fold protocol -------------------------------------------------------------------------------------------------

def _pairs_at(dists):
    """Unit-vector pairs whose squared distance is exactly ``dists`` (up to rounding): cos = 1 - d / 2."""
    c = 1.0 - np.asarray(dists, np.float64) / 2.0
    e1 = np.tile([1.0, 0.0], (len(c), 1))
    return e1, np.stack([c, np.sqrt(1.0 - c**2)], axis=1)


def test_ten_fold_by_hand():
    # 2 folds of 5 pairs. Fold 0: genuine 0.2 0.4 1.0, impostor 2.0 3.0; fold 1: genuine 0.3 1.2 2.2, impostor 1.0 3.5.
    # Test fold 0: on fold 1, t=0.5/1.5/2.5 get 3/3/4 right -> 2.5 -> fold 0 gets 4/5 (impostor 2.0 accepted).
    # Test fold 1: on fold 0, t=0.5/1.5/2.5 get 4/5/4 right -> 1.5 -> fold 1 gets 3/5 (2.2 rejected, 1.0 accepted).
    e1, e2 = _pairs_at([0.2, 0.4, 1.0, 2.0, 3.0, 0.3, 1.2, 2.2, 1.0, 3.5])
    same = [True, True, True, False, False] * 2
    r = ten_fold_accuracy(e1, e2, same, nfolds=2, thresholds=[2.5, 0.5, 1.5])  # sorted internally
    assert r["fold_thresholds"] == [2.5, 1.5]
    assert r["fold_accuracies"] == pytest.approx([0.8, 0.6])
    assert r["accuracy"] == pytest.approx(0.7) and r["accuracy_std"] == pytest.approx(0.1)
    assert r["threshold"] == pytest.approx(2.0)
    # Without 2.5, test fold 0 sees a tie (3/5 at 0.5 and 1.5): the smallest threshold wins -> fold 0 gets 4/5.
    r = ten_fold_accuracy(e1, e2, same, nfolds=2, thresholds=[0.5, 1.5])
    assert r["fold_thresholds"] == [0.5, 1.5] and r["fold_accuracies"] == pytest.approx([0.8, 0.6])
    # Genuine-impostor orderings (6 x 4): 2.2 > 2.0, 2.2 > 1.0, 1.2 > 1.0 wrong and the 1.0 / 1.0 tie counts half.
    assert r["auc"] == pytest.approx(1 - 3.5 / 24)


def test_ten_fold_perfect_separation_and_contiguous_folds():
    rng = np.random.default_rng(1)
    e1 = rng.normal(size=(200, 16))
    same = np.arange(200) % 2 == 0
    noise = 0.01 * rng.normal(size=e1.shape)
    e2 = np.where(same[:, None], e1 + noise, -e1 + noise)  # genuine distance ~0, impostor ~4
    r = ten_fold_accuracy(e1 * 3.0, e2, same)  # scale does not matter: embeddings are normalised
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0 and r["auc"] == 1.0
    assert r["val_at_far"] == 1.0 and r["far"] == 0.0 and len(r["fold_accuracies"]) == 10
    # 20 pairs, 10 folds of 2: only pair 6 is wrong (a far genuine pair), so only fold 3 = pairs 6, 7 drops to 1/2.
    dists = np.where(np.arange(20) % 2 == 0, 0.2, 3.0)
    dists[6] = 3.5
    r = ten_fold_accuracy(*_pairs_at(dists), np.arange(20) % 2 == 0)
    assert r["fold_accuracies"] == pytest.approx([1.0] * 3 + [0.5] + [1.0] * 6)
    assert r["accuracy"] == pytest.approx(0.95)
    # nfolds=1 (insightface LFold): the threshold is chosen and tested on all pairs.
    assert ten_fold_accuracy(*_pairs_at(dists), np.arange(20) % 2 == 0, nfolds=1)["fold_accuracies"] == [0.95]
    # sklearn KFold(shuffle=False) sizes: the first n % k folds are one longer.
    assert np.bincount(fold_ids(23, 10)).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert (np.diff(fold_ids(23, 10)) >= 0).all()
    with pytest.raises(ValueError, match="nfolds"):
        fold_ids(5, 10)


def _reference(e1, e2, same, nfolds, thresholds, val_thresholds, far_target=1e-3):
    """insightface calculate_roc / calculate_val with explicit loops (largest threshold with train FAR <= target)."""
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum(np.square(e1 - e2), 1)
    accs, best, vals, fars = [], [], [], []
    for test in np.array_split(np.arange(len(same)), nfolds):
        train = np.setdiff1d(np.arange(len(same)), test)

        def acc(t, idx):
            return np.mean(np.less(dist[idx], t) == same[idx])

        acc_train = [acc(t, train) for t in thresholds]
        b = thresholds[int(np.argmax(acc_train))]
        best.append(b)
        accs.append(acc(b, test))
        far_train = [np.mean(dist[train][~same[train]] < t) for t in val_thresholds]
        t = max(v for v, f in zip(val_thresholds, far_train) if f <= far_target)
        vals.append(np.mean(dist[test][same[test]] < t))
        fars.append(np.mean(dist[test][~same[test]] < t))
    return np.mean(accs), np.std(accs), np.mean(best), accs, np.mean(vals), np.mean(fars)


@pytest.mark.parametrize("n, nfolds", [(600, 10), (437, 7)])
def test_ten_fold_matches_loop_reference(n, nfolds):
    rng = np.random.default_rng(n)
    e1 = rng.normal(size=(n, 32)).astype(np.float32)
    same = rng.random(n) < 0.5
    e2 = np.where(same[:, None], e1 + 1.3 * rng.normal(size=e1.shape), rng.normal(size=e1.shape)).astype(np.float32)
    thresholds, val_thresholds = np.arange(0, 4, 0.01), np.arange(0, 4, 0.004)
    r = ten_fold_accuracy(e1, e2, same, nfolds=nfolds, val_thresholds=val_thresholds)
    acc, std, thr, accs, val, far = _reference(e1, e2, same, nfolds, thresholds, val_thresholds)
    assert 0.6 < r["accuracy"] < 0.99  # overlapping classes: the threshold choice matters
    assert r["fold_accuracies"] == pytest.approx(accs) and r["accuracy"] == pytest.approx(acc)
    assert r["accuracy_std"] == pytest.approx(std) and r["threshold"] == pytest.approx(thr)
    assert r["val_at_far"] == pytest.approx(val) and r["far"] == pytest.approx(far)
    assert 0.0 < r["val_at_far"] < 1.0 and 0.0 <= r["far"] < 0.02  # test FAR near the 1e-3 target
    cos = np.sum(e1 * e2, 1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(e2, axis=1)
    assert r["auc"] == pytest.approx(roc_auc(cos, same))  # -dist = 2 cos - 2 ranks pairs like cos


# --- embedding --------------------------------------------------------------------------------------------------------


def _linear(h=4, w=5, d=3, seed=0):
    weight = torch.randn(d, 3 * h * w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    seen = []

    def fn(x):
        seen.append((len(x), float(x.min()), float(x.max())))
        return (x.double().flatten(1) @ weight.T).float()

    return fn, weight, seen


def test_embed_images_scales_every_batch_and_adds_flip():
    images = torch.randint(0, 256, (10, 3, 4, 5), dtype=torch.uint8)
    images[0] = 0
    images[9] = 255  # last image, in the last (partial) batch
    fn, weight, seen = _linear()
    x = images.double() / 127.5 - 1.0
    plain = x.flatten(1) @ weight.T
    flipped = x.flip(3).flatten(1) @ weight.T  # weight is not mirror-symmetric, so this differs from `plain`
    out = embed_images(fn, images, batch_size=4, flip=False)
    assert out.dtype == torch.float32 and out.shape == (10, 3) and not out.requires_grad
    assert torch.allclose(out.double(), plain, atol=1e-5)
    assert [s[0] for s in seen] == [4, 4, 2]
    assert seen[0][1] == -1.0 and seen[-1][2] == 1.0  # every batch, the partial one included, is in [-1, 1]
    # an image's embedding does not depend on whether it falls in a full or a partial batch
    assert torch.equal(embed_images(fn, images, batch_size=10, flip=False)[8:], out[8:])
    with_flip = embed_images(fn, images, batch_size=3)
    assert torch.allclose(with_flip.double(), plain + flipped, atol=1e-5)
    assert not torch.allclose(plain, flipped, atol=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        embed_images(fn, images.float())


@pytest.mark.parametrize("training", [True, False])
def test_embed_images_leaves_model_mode_alone(training):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8), torch.nn.Dropout(0.5))
    model.train(training)
    out = embed_images(model, torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8), batch_size=2)
    assert model.training is training and all(m.training is training for m in model.modules())
    assert out.shape == (5, 8) and not out.requires_grad


# --- .bin files -------------------------------------------------------------------------------------------------------


def _png(rgb):
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))  # lossless; cv2 encodes BGR arrays
    assert ok
    return buf.tobytes()


def test_load_bin_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    path = write_bin(tmp_path / "toy.bin", [_png(im) for im in rgb], [True, False, True])
    images, issame = load_bin(path)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 12, 10)
    assert np.array_equal(images.numpy(), rgb.transpose(0, 3, 1, 2)) and issame.tolist() == [True, False, True]
    assert np.array_equal(load_bin(path, color="bgr")[0].numpy(), rgb[..., ::-1].transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"toy\.bin: image 0 is 10x12, expected 16x16"):
        load_bin(path, image_size=16)

    encoded = [_png(im) for im in rgb]
    encoded[3] = b"\xff\xd8 not a jpeg"
    bad = write_bin(tmp_path / "corrupt.bin", encoded, [True] * 3)
    with pytest.raises(ValueError, match=r"corrupt\.bin: image 3: cannot decode"):
        load_bin(bad)
    encoded[3] = _png(rgb[3][:8])
    bad = write_bin(tmp_path / "sizes.bin", encoded, [True] * 3)
    with pytest.raises(ValueError, match=r"sizes\.bin: image 3 is 10x8, expected 10x12"):
        load_bin(bad)


def test_evaluate_bin_end_to_end(tmp_path):
    # genuine pairs are the same image, impostor pairs two random ones: raw pixels separate them perfectly.
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    issame = np.arange(20) % 2 == 0
    rgb[1::2][issame] = rgb[0::2][issame]
    path = write_bin(tmp_path / "pairs.bin", [_png(im) for im in rgb], issame)
    r = evaluate_bin(lambda x: x.flatten(1), path, batch_size=7)
    assert r["name"] == "pairs" and r["pairs"] == 20
    assert r["accuracy"] == 1.0 and r["auc"] == 1.0 and len(r["fold_accuracies"]) == 10
    images, _ = load_bin(path)
    assert evaluate_pairs(lambda x: x.flatten(1), images, issame, nfolds=5)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="40 images for 19 pairs"):
        evaluate_pairs(lambda x: x.flatten(1), images, issame[:19])


# --- real data --------------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_lfw_bin_raw_pixel_baseline(shared_data):
    path = shared_data / "lfw" / "lfw.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found: the real LFW pairs are needed for this test")
    start = time.perf_counter()
    images, issame = load_bin(path)
    loaded = time.perf_counter() - start
    assert images.shape == (12000, 3, 112, 112) and images.dtype == torch.uint8
    assert issame.shape == (6000,) and issame.sum() == 3000
    # Every third pair (2,000, each fold still mixed) and pixels at stride 4, to keep the test to a few seconds.
    keep = np.arange(0, 6000, 3)
    subset = images[np.stack([2 * keep, 2 * keep + 1], 1).ravel()]
    r = evaluate_pairs(lambda x: x[:, :, ::4, ::4].flatten(1), subset, issame[keep])
    print(f"\nlfw.bin: loaded in {loaded:.1f}s; raw pixels, {len(keep)} pairs: accuracy {r['accuracy']:.4f} "
          f"± {r['accuracy_std']:.4f}, AUC {r['auc']:.4f}, VAL@FAR=1e-3 {r['val_at_far']:.4f}")
    assert 0.55 < r["accuracy"] < 0.85
