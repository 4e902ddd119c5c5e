"""KP-RPE training: keypoints travel with the batch, follow every geometric augmentation, and reach the backbone;
a micro ViT + KP-RPE trains with AdaFace through the shared loop."""

import math

import numpy as np
import pytest
import torch

from lafs.augment.supervised import SupervisedAugment, _geometric_theta, _warp, move_points
from lafs.config import ConfigError, load_config
from lafs.data.datasets import resize_keypoints
from lafs.geometry import flip_keypoints
from lafs.train.run import build_train_set, model_uses_keypoints, train

BASE = ["model.name=vit_kprpe", "model.size=micro", "model.drop_path=0.0", "data.source=synthetic",
        "data.num_identities=8", "data.images_per_identity=8", "data.val_pairs=0", "data.workers=0",
        "augment.preset=none", "train.batch_size=16", "train.log_every=1", "optim.lr=1e-3", "optim.warmup_steps=0",
        "head.name=adaface", "head.scale=16"]


def dot_centre(img: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centre (x, y) of a single bright dot in a 1 x H x W image."""
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    m = img[0].clamp_min(0)
    return torch.stack([(m * xs).sum() / m.sum(), (m * ys).sum() / m.sum()])


@pytest.mark.parametrize("name,level", [("Rotate", 25.0), ("Rotate", -30.0), ("ShearX", 0.3), ("ShearY", -0.2),
                                        ("TranslateXRel", 0.2), ("TranslateYRel", -0.3)])
def test_move_points_follows_the_warp(name, level):
    h = w = 56
    p = torch.tensor([[[20.0, 30.0]]])
    img = torch.zeros(1, 1, h, w)
    img[0, 0, 29:32, 19:22] = 1.0  # a 3 x 3 dot centred on p
    theta = _geometric_theta(name, torch.tensor([level]), h, w)
    moved = move_points(p, theta)[0, 0]
    torch.testing.assert_close(dot_centre(_warp(img, theta, "zeros")[0]), moved, atol=0.15, rtol=0)


def test_augment_with_keypoints_gives_the_same_images_and_moves_points_with_them():
    aug = SupervisedAugment(flip=True, randaugment_ops=2, randaugment_magnitude=9, randaugment_prob=1.0,
                            resized_crop_scale=(0.6, 1.0))
    x = torch.rand(8, 3, 56, 56) * 2 - 1
    kp = torch.rand(8, 5, 2) * 40 + 8
    torch.manual_seed(3)
    plain = aug(x)
    torch.manual_seed(3)
    with_kp, moved = aug(x, kp)
    assert torch.equal(plain, with_kp)  # the keypoint path draws no extra random numbers
    assert moved.shape == kp.shape and not torch.equal(moved, kp)
    # a dot image through the same random pipeline lands where its keypoint went
    dots = torch.full((8, 3, 56, 56), -1.0)
    for i in range(8):
        x0, y0 = kp[i, 0].round().long().tolist()
        dots[i, :, y0 - 1 : y0 + 2, x0 - 1 : x0 + 2] = 1.0
    kp0 = kp.clone()
    kp0[:, :, :] = kp[:, :1, :].round()  # all five points on the dot, so a flip's label swap cannot matter
    torch.manual_seed(3)
    out, moved0 = aug(dots, kp0)
    for i in range(8):
        lum = (out[i].mean(0, keepdim=True) + 1) / 2
        if lum.std() < 0.05 or lum.max() < 0.5:
            continue  # an op like Invert / Posterize left no clear dot; the geometry is checked above
        bright = (lum > lum.mean() + 3 * lum.std()).float()
        if bright.sum() == 0:
            continue
        centre = dot_centre(bright)
        assert torch.linalg.norm(centre - moved0[i, 0]) < 2.0, (i, centre, moved0[i, 0])


def test_flip_only_augment_flips_keypoints_with_labels():
    aug = SupervisedAugment(flip=True)
    x = torch.rand(16, 3, 20, 20)
    kp = torch.rand(16, 5, 2) * 19
    torch.manual_seed(0)
    out, moved = aug(x, kp)
    flipped = (out != x).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < 16
    for i in range(16):
        expected = flip_keypoints(kp[i : i + 1], 20)[0] if flipped[i] else kp[i]
        torch.testing.assert_close(moved[i], expected)


def test_resize_keypoints_matches_the_image_resize():
    img = torch.zeros(1, 1, 112, 112)
    img[0, 0, 40:44, 60:64] = 1.0
    p = torch.tensor([[61.5, 41.5]])
    small = torch.nn.functional.interpolate(img, size=(56, 56), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(dot_centre(small[0]), resize_keypoints(p, 112, 56)[0], atol=0.05, rtol=0)


def test_micro_vit_kprpe_trains_with_adaface_and_keypoints_reach_the_backbone(tmp_path, monkeypatch):
    cfg = load_config(None, BASE + [f"out_dir={tmp_path}", "train.steps=30", "optim.lr=2e-3",
                                    "augment.preset=flip"])
    assert model_uses_keypoints(cfg)
    seen = []
    from lafs.models.fvit import FViT

    original = FViT.forward

    def spy(self, images, *a, keypoints=None, **kw):
        seen.append(None if keypoints is None else keypoints.detach().clone())
        return original(self, images, *a, keypoints=keypoints, **kw)

    monkeypatch.setattr(FViT, "forward", spy)
    result = train(cfg, progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert seen and all(k is not None and k.shape == (16, 5, 2) for k in seen)
    # synthetic 112 px keypoints, resized to the 56 px model: near the half-scale ArcFace template
    assert 10 < float(seen[0][..., 0].mean()) < 46 and math.isfinite(float(seen[-1].sum()))


def test_records_without_keypoint_sidecar_are_refused(tmp_path):
    from lafs.data.datasets import encode_image
    from lafs.data.recordio import write_face_records

    rng = np.random.default_rng(0)
    imgs = [encode_image(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(4)]
    rec = tmp_path / "t.rec"
    write_face_records(rec, ((i // 2, b) for i, b in enumerate(imgs)))
    cfg = load_config(None, BASE + ["data.source=records", f"data.train=[{rec}]"])
    with pytest.raises(ConfigError, match="t_kps.npy"):
        build_train_set(cfg)
    np.save(tmp_path / "t_kps.npy", np.tile(np.float32([[38, 51], [73, 51], [56, 71], [41, 92], [70, 92]]), (4, 1, 1)))
    ds = build_train_set(cfg)
    assert ds[0]["keypoints"].shape == (5, 2)


def test_misalign_preset_moves_keypoints_with_the_face():
    """The KP-RPE training augmentation (random similarity + flip): a dot drawn at a keypoint is found where the
    moved keypoint says, image by image."""
    aug = SupervisedAugment.preset("misalign")
    x = torch.full((8, 3, 56, 56), -1.0)
    x[:, :, 29:32, 19:22] = 1.0
    kp = torch.tensor([20.0, 30.0]).expand(8, 5, 2)
    torch.manual_seed(0)
    out, moved = aug(x, kp)
    assert aug.affine_scale == (0.8, 1.2) and aug.affine_rotate == 20.0
    shifts = []
    for i in range(8):
        centre = dot_centre((out[i].mean(0, keepdim=True) + 1) / 2)
        torch.testing.assert_close(centre, moved[i, 0], atol=0.3, rtol=0)
        shifts.append(float(torch.linalg.norm(moved[i, 0] - kp[i, 0])))
    assert max(shifts) > 2.0  # the faces really moved
