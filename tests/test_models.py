"""Model zoo: sizes against the papers, landmark CNN, patch sampling, ViT attention bias."""

import pytest
import torch
import torch.nn.functional as F

from lafs.models import (
    BACKBONES,
    FViT,
    LandmarkCNN,
    PartFViT,
    ViTEncoder,
    build_backbone,
    complexity,
    count_params,
    sample_patches,
)
from lafs.models.fvit import grid_tokens
from lafs.models.landmark_cnn import minmax_rescale
from lafs.models.part_fvit import sample_patches_loop


# --- sizes -------------------------------------------------------------------------------------------------

def test_part_fvit_tiny_matches_paper_params_and_macs():
    model = build_backbone("part_fvit", "tiny")
    c = complexity(model, 112)
    # Paper §4.2: 15.28 M parameters, 2.48 GFLOPs (MACs of conv + linear layers), landmark CNN included.
    assert round(c.params / 1e6, 2) == 15.28
    assert round(c.macs / 1e9, 2) == 2.48
    assert c.params == 15_280_736
    # Attention matmuls: 3 layers x 2 x 197^2 x 704 MACs, counted separately.
    assert c.attn_macs == 3 * 2 * 197 * 197 * 704


@pytest.mark.parametrize(
    "name,size,expected_m",
    [("part_fvit", "base", 66.96), ("fvit", "base", 64.08), ("iresnet", "r50", 43.59), ("iresnet", "r100", 65.16)],
)
def test_param_counts_match_references(name, size, expected_m):
    assert round(count_params(build_backbone(name, size)) / 1e6, 2) == expected_m


def test_landmark_cnn_param_count_and_feature_map():
    cnn = LandmarkCNN()
    # the official MobileNetV3 trunk: 2.81 M in the trunk + 63.1 k in the head (160 x 392 + 392).
    assert round(count_params(cnn.trunk) / 1e6, 2) == 2.81
    assert count_params(cnn.output_layer) == 160 * 392 + 392
    assert cnn.trunk(torch.zeros(1, 3, 112, 112)).shape == (1, 160, 4, 4)


def test_linear_macs_by_hand():
    # fViT-Tiny linear MACs: patch embedding + 3 layers x 197 tokens x (qkv + out + 2 FFN layers).
    model = build_backbone("fvit", "tiny")
    per_token = 512 * 3 * 704 + 704 * 512 + 2 * 512 * 2560
    assert complexity(model, 112).macs == 196 * 192 * 512 + 3 * 197 * per_token


def test_every_registered_model_builds_and_runs():
    for name, entry in BACKBONES.items():
        for size in entry.sizes:
            if size not in ("micro",):
                continue
            model = entry.build(size).eval()
            x = torch.rand(2, 3, model.img_size, model.img_size) * 2 - 1
            if getattr(model, "uses_keypoints", False):
                out = model(x, keypoints=torch.rand(2, 5, 2) * model.img_size)
            else:
                out = model(x)
            assert out["embedding"].shape == (2, model.embedding_size)
            assert torch.isfinite(out["embedding"]).all()
            assert ("landmarks" in out) == entry.has_landmarks


def test_unknown_option_and_size_are_named():
    with pytest.raises(KeyError, match="num_landmarks"):
        build_backbone("iresnet", "r18", num_landmarks=10)
    with pytest.raises(KeyError, match="huge"):
        build_backbone("fvit", "huge")
    with pytest.raises(KeyError, match="vgg"):
        build_backbone("vgg", "tiny")


# --- landmark CNN --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_landmarks,img_size", [(196, 112), (49, 56)])
def test_landmarks_span_the_image_per_sample(num_landmarks, img_size):
    cnn = LandmarkCNN(num_landmarks, img_size).eval()
    lm = cnn(torch.rand(4, 3, img_size, img_size) * 2 - 1)
    assert lm.shape == (4, num_landmarks, 2)
    flat = lm.flatten(1)
    assert (flat >= 0).all() and (flat <= img_size - 1).all()
    torch.testing.assert_close(flat.min(1).values, torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.max(1).values, torch.full((4,), float(img_size - 1)), atol=1e-4, rtol=0)


def test_minmax_rescale_by_hand():
    raw = torch.tensor([[2.0, 4.0, 3.0, 6.0], [-1.0, 1.0, 0.0, 0.5]], requires_grad=True)
    out = minmax_rescale(raw, 112)
    expected = torch.tensor([[0.0, 55.5, 27.75, 111.0], [0.0, 111.0, 55.5, 83.25]])
    torch.testing.assert_close(out, expected)
    # Gradients flow through min and max: d out[0,2] / d raw[0,0] = -111 (6-3)/(6-2)^2.
    out[0, 2].backward()
    assert raw.grad[0, 0].item() == pytest.approx(-111 * 3 / 16)
    assert raw.grad[0, 3].item() == pytest.approx(-111 * 1 / 16)


def test_minmax_rescale_per_axis_by_hand():
    # layout (x0, y0, x1, y1, x2, y2): x over (2, 3), y over (4, 6); joint, the x values would share the y range
    raw = torch.tensor([[2.0, 4.0, 3.0, 6.0, 2.5, 5.0], [-1.0, 1.0, 0.0, 0.5, -0.5, 0.75]], requires_grad=True)
    out = minmax_rescale(raw, 112, "per_axis")
    expected = torch.tensor([[0.0, 0.0, 111.0, 111.0, 55.5, 55.5], [0.0, 111.0, 111.0, 0.0, 55.5, 55.5]])
    torch.testing.assert_close(out, expected)
    # x2 = 2.5 depends on the x values alone: d/d x2 = 111 / (3 - 2); through the min x0 and the max x1,
    # -111 (3 - 2.5) / 1 and -111 (2.5 - 2) / 1; nothing through the y values
    out[0, 4].backward()
    torch.testing.assert_close(raw.grad[0], torch.tensor([-55.5, 0.0, -55.5, 0.0, 111.0, 0.0]))
    assert not raw.grad[1].any()


def test_per_axis_rescale_spreads_a_collapsed_band_over_the_face():
    """Landmarks whose raw x sit in a narrow band: joint keeps the band, per axis stretches it over the width."""
    g = torch.Generator().manual_seed(0)
    xy = torch.stack([0.5 + 0.01 * torch.rand(3, 49, generator=g), torch.rand(3, 49, generator=g)], dim=-1)
    raw = xy.flatten(1)
    joint = minmax_rescale(raw, 56).view(3, 49, 2)
    axis = minmax_rescale(raw, 56, "per_axis").view(3, 49, 2)
    width = lambda lm: (lm[..., 0].amax(1) - lm[..., 0].amin(1))  # noqa: E731
    assert (width(joint) < 1.0).all()
    torch.testing.assert_close(width(axis), torch.full((3,), 55.0))
    torch.testing.assert_close(axis[..., 1].amax(1) - axis[..., 1].amin(1), torch.full((3,), 55.0))


def test_landmark_rescale_option_reaches_the_cnn_and_bad_names_are_refused():
    from lafs.config import ConfigError, load_config

    model = build_backbone("part_fvit", "micro", landmark_rescale="per_axis")
    assert model.landmark_cnn.rescale == "per_axis"
    assert build_backbone("part_fvit", "micro").landmark_cnn.rescale == "joint"
    lm = model.eval()(torch.rand(2, 3, 56, 56) * 2 - 1)["landmarks"]
    torch.testing.assert_close(lm.amax(1) - lm.amin(1), torch.full((2, 2), 55.0), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="landmark_rescale"):
        load_config(None, ["model.landmark_rescale=diagonal"])


def test_grid_output_init_starts_every_face_on_the_patch_grid_and_still_learns():
    """landmark_output_init=grid: zero weights and a grid bias, so at init every face gets the same 7 x 7 grid
    (0, 55/6, ..., 55 px on both axes after the joint rescale), and the weights get a gradient through the
    sampler; the reference init gives face-dependent, non-grid landmarks."""
    from lafs.config import ConfigError, load_config

    torch.manual_seed(0)
    model = build_backbone("part_fvit", "micro", landmark_output_init="grid")
    x = torch.rand(3, 3, 56, 56) * 2 - 1
    out = model.train()(x)
    axis = torch.arange(7.0) * 55 / 6
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(49, 2)
    torch.testing.assert_close(out["landmarks"], grid.expand(3, 49, 2), atol=1e-4, rtol=0)
    out["embedding"].pow(2).sum().backward()
    assert model.landmark_cnn.output_layer.weight.grad.abs().sum() > 0
    ref = build_backbone("part_fvit", "micro").eval()(x)["landmarks"]
    assert (ref - grid).abs().max() > 1.0
    with pytest.raises(ValueError, match="output_init"):
        build_backbone("part_fvit", "micro", landmark_output_init="ring")
    with pytest.raises(ConfigError, match="landmark_output_init"):
        load_config(None, ["model.landmark_output_init=ring"])


# --- patch sampling ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["centred", "reference"])
def test_batched_sampling_equals_per_landmark_loop(layout):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 112, 112, generator=g) * 2 - 1
    # Some landmarks near and beyond the border exercise the zero padding.
    landmarks = torch.rand(3, 196, 2, generator=g) * 130 - 9
    batched = sample_patches(images, landmarks, 8, layout)
    loop = sample_patches_loop(images, landmarks, 8, layout)
    assert batched.shape == (3, 196, 192)
    assert (batched - loop).abs().max().item() <= 1e-6


def test_centred_patches_at_grid_centres_equal_grid_tokens():
    images = torch.rand(2, 3, 112, 112, dtype=torch.float64) * 2 - 1
    c = torch.arange(14, dtype=torch.float64) * 8 + 3.5
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    landmarks = torch.stack((xx, yy), -1).view(1, 196, 2).expand(2, -1, -1)
    torch.testing.assert_close(sample_patches(images, landmarks), grid_tokens(images, 8), atol=1e-12, rtol=0)


def test_centred_patch_by_hand():
    # A ramp image I[c, y, x] = x + 1000 y + 1e6 c; a patch at integer landmark (20, 30) holds the pixels
    # x in 16.5..23.5, y in 26.5..33.5 (bilinear mid-points), in (row=y, col=x, channel) order.
    y, x = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    img = torch.stack([x + 1000 * y + 1e6 * ch for ch in range(3)])[None].double()
    tok = sample_patches(img, torch.tensor([[[20.0, 30.0]]], dtype=torch.float64), 8).view(8, 8, 3)
    assert tok[0, 0, 0].item() == pytest.approx(16.5 + 1000 * 26.5)
    assert tok[0, 1, 0].item() == pytest.approx(17.5 + 1000 * 26.5)  # columns run along x
    assert tok[1, 0, 0].item() == pytest.approx(16.5 + 1000 * 27.5)  # rows run along y
    assert tok[7, 7, 2].item() == pytest.approx(23.5 + 1000 * 33.5 + 2e6)


def test_reference_layout_by_hand():
    # The released code samples grid (l + k - 4) / 56 - 1 (align_corners=False) and its patch rows run along x.
    y, x = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    img = (x + 1000 * y)[None, None].expand(1, 3, -1, -1).double()
    lm = torch.tensor([[[50.0, 60.0]]], dtype=torch.float64)
    tok = sample_patches(img, lm, 8, "reference").view(8, 8, 3)[..., 0]
    offsets = torch.arange(-4, 4, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(offsets + 50, offsets + 60, indexing="ij"), -1) / 56 - 1  # [a,b] = (x_a, y_b)
    ref = F.grid_sample(img[:, :1], grid[None], align_corners=False)[0, 0]
    torch.testing.assert_close(tok, ref)
    assert tok[1, 0].item() == pytest.approx(tok[0, 0].item() + 1.0)  # row index runs along x
    assert tok[0, 0].item() == pytest.approx(45.5 + 1000 * 55.5)


def test_out_of_image_samples_read_zero():
    img = torch.ones(1, 3, 16, 16)
    tok = sample_patches(img, torch.tensor([[[-50.0, -50.0]]]), 8)
    assert tok.abs().max().item() == 0.0


def test_gradients_reach_the_landmark_cnn_through_the_patches():
    model = build_backbone("part_fvit", "micro")
    model.train()
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    model(x)["embedding"].square().sum().backward()
    grads = [p.grad for p in model.landmark_cnn.parameters()]
    assert all(g is not None for g in grads)
    assert model.landmark_cnn.output_layer.weight.grad.abs().sum() > 0
    assert model.landmark_cnn.trunk.features[0].weight.grad.abs().sum() > 0


def test_landmark_gradient_matches_finite_difference():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64)
    lm = torch.tensor([[[12.3, 15.7], [20.2, 9.1]]], dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 192, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda l: (sample_patches(img, l) * w).sum(), (lm,))


def test_part_fvit_accepts_external_landmark_subsets():
    model = build_backbone("part_fvit", "micro").eval()
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    lm = model.landmark_cnn(x)
    sub = lm[:, torch.randint(0, 49, (12,))]
    out = model(x, landmarks=sub)
    assert out["embedding"].shape == (2, 96)
    assert out["landmarks"] is sub


# --- ViT encoder ---------------------------------------------------------------------------------------------

def _encoder(**kw):
    args = dict(token_dim=12, num_tokens=6, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32,
                dropout=0.0, emb_dropout=0.0, drop_path=0.0)
    args.update(kw)
    return ViTEncoder(**args).eval()


def test_zero_bias_equals_no_bias_and_bias_changes_output():
    enc = _encoder()
    tokens = torch.randn(2, 6, 12)
    base = enc(tokens)["embedding"]
    torch.testing.assert_close(enc(tokens, torch.zeros(2, 2, 7, 7))["embedding"], base)
    assert not torch.allclose(enc(tokens, torch.randn(2, 2, 7, 7))["embedding"], base)
    # Broadcastable bias (1 x H x N x N) and per-layer biases are accepted.
    enc(tokens, torch.randn(1, 2, 7, 7))
    enc(tokens, [torch.randn(2, 2, 7, 7), None])
    with pytest.raises(ValueError, match="depth 2"):
        enc(tokens, [None])


def test_attention_matches_explicit_formula_with_dim_scale_and_bias():
    enc = _encoder(attn_scale="dim")
    attn = enc.blocks[0].attn
    assert attn.scale == 16**-0.5
    assert _encoder(attn_scale="head_dim").blocks[0].attn.scale == 8**-0.5
    x = torch.randn(2, 7, 16)
    bias = torch.randn(2, 2, 7, 7)
    q, k, v = attn.to_qkv(x).view(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 16**-0.5 + bias, dim=-1)
    expected = attn.to_out((probs @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(attn(x, bias), expected, atol=1e-5, rtol=1e-5)


def test_large_negative_bias_masks_a_key():
    enc = _encoder()
    tokens = torch.randn(1, 6, 12)
    bias = torch.zeros(1, 2, 7, 7)
    bias[..., 3] = -1e9  # nobody attends to token 3 (patch 2)
    changed = tokens.clone()
    changed[0, 2] += 5.0
    # Token 2 still feeds its own residual stream, so check the CLS path of a 1-layer encoder only.
    enc1 = _encoder(depth=1)
    a = enc1(tokens, bias)["tokens"][:, 0]
    b = enc1(changed, bias)["tokens"][:, 0]
    torch.testing.assert_close(a, b)


def test_shorter_sequences_use_the_first_position_embeddings():
    enc = _encoder()
    assert enc(torch.randn(2, 4, 12))["embedding"].shape == (2, 16)
    with pytest.raises(ValueError, match="7 tokens"):
        enc(torch.randn(2, 7, 12))


def test_embedding_is_layernorm_of_cls():
    enc = _encoder()
    out = enc(torch.randn(3, 6, 12))
    torch.testing.assert_close(out["embedding"], enc.norm(out["tokens"][:, 0]))
    assert out["embedding"].mean(1).abs().max() < 1e-5  # LN weight 1, bias 0 at init


def test_drop_path_schedules():
    assert [b.drop_path.p for b in _encoder(depth=3, drop_path=0.1).blocks] == [0.1, 0.1, 0.1]
    rates = [b.drop_path.p for b in _encoder(depth=3, drop_path=0.1, drop_path_schedule="linear").blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1])


def test_fvit_tokens_row_major_patch_order():
    img = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    tok = grid_tokens(img, 8)
    assert tok.shape == (2, 4, 192)
    # Token 1 is the top-right patch; its feature (row 0, col 0, channel c) is pixel (0, 8) of channel c.
    assert tok[0, 1, 0].item() == img[0, 0, 0, 8].item()
    assert tok[0, 1, 1].item() == img[0, 1, 0, 8].item()
    assert tok[0, 2, 3].item() == img[0, 0, 8, 1].item()
    assert FViT(img_size=56, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64).num_tokens == 49


def test_part_fvit_rejects_bad_layout():
    with pytest.raises(ValueError, match="patch_layout"):
        PartFViT(img_size=56, num_landmarks=4, patch_layout="transposed", dim=16, depth=1, heads=2)
