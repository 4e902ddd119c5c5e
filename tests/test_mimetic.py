"""2-D sin-cos positions and mimetic attention init (models/mimetic.py): values by hand, the factorisation the paper
asks for, and the behaviour they are for (a patch shuffle moves the embedding at step 0)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lafs.models.mimetic import mimetic_init_, sincos_2d
from lafs.models.registry import build_backbone
from lafs.models.vit import ViTEncoder


def test_sincos_2d_by_hand():
    # side 2, width 4: one frequency (1), cells row-major (x, y) = (0, 0), (1, 0), (0, 1), (1, 1)
    s, c = math.sin(1.0), math.cos(1.0)
    want = torch.tensor([[0, 1, 0, 1], [s, c, 0, 1], [0, 1, s, c], [s, c, s, c]], dtype=torch.float32)
    torch.testing.assert_close(sincos_2d(2, 4), want)
    # width 8: frequencies 1 and 1 / 10000
    pe = sincos_2d(3, 8)
    assert pe.shape == (9, 8)
    assert pe[5, 1].item() == pytest.approx(math.sin(2 / 10000.0))  # cell (x=2, y=1): sin of x at the low frequency
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 6)


def test_sincos_neighbours_are_more_alike_than_far_cells():
    pe = F.normalize(sincos_2d(8, 192), dim=1)
    sim = pe @ pe.T
    assert sim[0, 1] > sim[0, 7] and sim[0, 8] > sim[0, 63]  # (0,0)-(1,0) vs (0,0)-(7,0); (0,0)-(0,1) vs (0,0)-(7,7)


def _encoder(**kw) -> ViTEncoder:
    args = dict(token_dim=12, num_tokens=16, dim=32, depth=2, heads=1, dim_head=32, dropout=0.0, emb_dropout=0.0,
                drop_path=0.0)
    return ViTEncoder(**{**args, **kw})


def test_mimetic_products_are_identity_plus_noise():
    torch.manual_seed(0)
    enc = _encoder(attn_init="mimetic")
    for block in enc.blocks:  # one head of full width: the products are alpha Z +- beta I exactly
        w = block.attn.to_qkv.weight
        qk = w[:32].T @ w[32:64]
        vo = block.attn.to_out.weight @ w[64:]
        eye = torch.eye(32)
        assert torch.trace(qk).item() / 32 == pytest.approx(0.7, abs=0.05)
        assert torch.trace(vo).item() / 32 == pytest.approx(-0.4, abs=0.05)
        # the rest is alpha Z with Z ~ N(0, I / d): Frobenius norm alpha * sqrt(d) (within 15 %)
        assert (qk - 0.7 * eye).norm().item() == pytest.approx(0.7 * math.sqrt(32), rel=0.15)
        assert (vo + 0.4 * eye).norm().item() == pytest.approx(0.4 * math.sqrt(32), rel=0.15)
        assert not torch.allclose(qk, qk.T, atol=1e-3)  # Z is not symmetric: not a plain identity


def test_mimetic_low_rank_heads_and_wide_inner():
    torch.manual_seed(0)
    enc = _encoder(heads=3, dim_head=16, attn_init="mimetic")  # inner 48 > dim 32: value factors shrink by 32/48
    w = enc.blocks[0].attn.to_qkv.weight
    for h in range(3):
        q, k = w[16 * h: 16 * (h + 1)], w[48 + 16 * h: 48 + 16 * (h + 1)]
        prod = q.T @ k
        assert torch.linalg.matrix_rank(prod).item() == 16
        assert torch.trace(prod).item() > 0  # the top singular directions of 0.7 Z + 0.7 I: self-similar
    vo = enc.blocks[0].attn.to_out.weight @ w[96:]
    assert torch.trace(vo).item() < 0
    with pytest.raises(ValueError, match="dim_head <= dim"):
        _encoder(heads=1, dim_head=64, attn_init="mimetic")


def test_options_are_checked_and_named():
    with pytest.raises(ValueError, match="attn_init must be one of"):
        _encoder(attn_init="conv")
    with pytest.raises(ValueError, match="square token grid, got 15"):
        _encoder(num_tokens=15, token_init="sincos")
    enc = _encoder(token_init="sincos")
    torch.testing.assert_close(enc.pos_embedding[0, 1:], sincos_2d(4, 32))
    assert enc.pos_embedding[0, 0].abs().max().item() == 0.0


def test_a_patch_shuffle_moves_the_position_aware_start_more():
    """The reason for the options: at step 0 the preset fViT is a bag of patches (a shuffle of the patches barely
    moves its CLS embedding); with sin-cos positions and mimetic attention the shuffle moves it several times more,
    relative to the distance between different images (docs/results.md, "Why the CLS token plateaus")."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(16, 3, 8, 8, generator=g), size=32, mode="bilinear") * 2 - 1
    perm = torch.randperm(16, generator=g)
    t = smooth.reshape(16, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(16, 16, 3, 8, 8)[:, perm]
    shuffled = t.reshape(16, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(16, 3, 32, 32)

    def ratio(**kw) -> float:
        torch.manual_seed(0)
        model = build_backbone("fvit", "micro", img_size=32, dim=64, depth=2, heads=2, dim_head=32,
                               token_init=kw.pop("token_init", "trunc_normal"), **kw).eval()
        with torch.no_grad():
            a = F.normalize(model(smooth)["embedding"], dim=1)
            b = F.normalize(model(shuffled)["embedding"], dim=1)
        return float((a - b).norm(dim=1).mean() / (torch.cdist(a, a).sum() / (16 * 15)))

    preset, aware = ratio(), ratio(token_init="sincos", attn_init="mimetic")
    assert aware > 3 * preset, (preset, aware)
