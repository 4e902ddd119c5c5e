"""Face pictures: the landmark overlay draws the model's landmarks where they are (pixel check); attention maps
come out of real models with one weight per token."""

import numpy as np
import pytest
import torch

from lafs.models import build_backbone
from lafs.viz import attention_overlay, cls_attention, landmark_overlay, png_bytes, tile


def test_landmark_overlay_draws_dots_and_squares_at_the_landmarks():
    img = np.zeros((56, 56, 3), np.uint8)
    lm = np.array([[10.0, 12.0], [40.0, 30.0]])
    out = landmark_overlay(img, lm, patch_size=8, color=(255, 0, 0), scale=4)
    assert out.shape == (224, 224, 3)
    for x, y in lm:
        cx, cy = int(round((x + 0.5) * 4 - 0.5)), int(round((y + 0.5) * 4 - 0.5))
        assert tuple(out[cy, cx]) == (255, 0, 0)  # the dot, on the landmark
        assert out[cy, cx - 16].any() and out[cy - 16, cx].any()  # the square's edges, half a patch away
        assert not out[cy, cx - 8].any()  # inside the square, between dot and edge: untouched
    assert not out[200, 10].any()  # far from every landmark: untouched
    with pytest.raises(ValueError, match=r"\(R, 2\)"):
        landmark_overlay(img, np.zeros(4))


def test_overlay_of_a_part_fvit_uses_its_own_landmarks():
    torch.manual_seed(0)
    model = build_backbone("part_fvit", "micro").eval()
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        lm = model(x)["landmarks"][0].numpy()
    img = ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    out = landmark_overlay(img, lm, color=(0, 255, 0), scale=2)
    hits = [tuple(out[int(round((y + 0.5) * 2 - 0.5)), int(round((x_ + 0.5) * 2 - 0.5))]) for x_, y in lm]
    assert all(h == (0, 255, 0) for h in hits)  # every one of the 49 landmarks is drawn where it is
    png = png_bytes(tile([out, out], columns=2))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["part_fvit", "fvit", "vit"])
def test_cls_attention_has_one_weight_per_token(name):
    torch.manual_seed(0)
    model = build_backbone(name, "micro").eval()
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    w, token_xy = cls_attention(model, x)
    assert w.shape == (2, 49) and np.isfinite(w).all() and (w >= 0).all()
    if name != "vit":  # CLS row of a softmax over CLS + 49 tokens: the token part sums to at most 1
        assert (w.sum(1) <= 1 + 1e-5).all()
    assert (token_xy is not None) == (name == "part_fvit")
    img = ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    heat = attention_overlay(img, w[0], None if token_xy is None else token_xy[0])
    assert heat.shape == (224, 224, 3) and heat.std() > 0


def test_attention_heat_paints_each_landmark_patch_with_its_normalised_weight():
    from lafs.viz import attention_heat

    # two tokens: weight 0.2 at pixel (4, 4), weight 0.4 at (10, 4); patches of 4 pixels; max-normalised to 0.5 / 1
    heat = attention_heat(np.array([0.2, 0.4]), np.array([[4.0, 4.0], [10.0, 4.0]]), 16, 16, patch_size=4)
    assert heat.shape == (16, 16) and heat.max() == 1.0
    assert np.allclose(heat[2:6, 2:6], 0.5) and np.allclose(heat[2:6, 8:12], 1.0)
    assert heat[6:, :].sum() == 0 and heat[:, 12:].sum() == 0
    # overlapping patches keep the larger weight
    both = attention_heat(np.array([0.2, 0.4]), np.array([[4.0, 4.0], [6.0, 4.0]]), 16, 16, patch_size=4)
    assert np.allclose(both[2:6, 4:8], 1.0) and np.allclose(both[2:6, 2:4], 0.5)
    # a grid model (no landmarks): the 2 x 2 grid fills its cells
    grid = attention_heat(np.array([1.0, 0.0, 0.0, 0.5]), None, 8, 8)
    assert np.allclose(grid[:4, :4], 1.0) and np.allclose(grid[4:, 4:], 0.5) and grid[:4, 4:].sum() == 0


def test_labelled_face_figures_are_pngs():
    pytest.importorskip("matplotlib")
    import cv2

    from lafs.viz import attention_png, face_rows_png

    faces = [np.full((56, 56, 3), 40 * i, np.uint8) for i in range(4)]
    png = face_rows_png([("before", faces), ("after", faces[:3])], "title", caption="what is drawn",
                        column_titles=["a", "b", "c", "d"])
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[1] > img.shape[0] > 200
    heat = [np.eye(56, dtype=np.float32)] * 4
    img = cv2.imdecode(np.frombuffer(attention_png(faces, heat, "t", "c"), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[1] > 2 * img.shape[0]
