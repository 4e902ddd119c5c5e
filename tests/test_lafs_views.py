"""LAFS landmark views: subset sampling, shuffle, perturbation (LAFS §3.2-§3.4, Eq. 6)."""

import math

import pytest
import torch

from lafs.ssl.lafs import landmark_view, perturb_landmarks, sample_subset


def grid_landmarks(b: int = 4, r: int = 196) -> torch.Tensor:
    """Landmark i of every image at (i, 1000 + i): a coordinate identifies its landmark."""
    i = torch.arange(r, dtype=torch.float32)
    return torch.stack([i, 1000 + i], -1).expand(b, r, 2).clone()


def test_subset_with_replacement_is_uniform_and_has_duplicates():
    torch.manual_seed(0)
    idx = sample_subset(4000, 196, 36, replacement=True)
    assert idx.shape == (4000, 36) and idx.min() >= 0 and idx.max() < 196
    counts = torch.bincount(idx.flatten(), minlength=196).float()
    expected = 4000 * 36 / 196
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 195 + 5 * math.sqrt(2 * 195)  # chi-square, 195 dof, ~5 sigma
    distinct = torch.tensor([len(set(row.tolist())) for row in idx[:500]]).float().mean().item()
    # E[distinct] = 196 (1 - (195/196)^36) = 32.9 (the spec's "about 33 distinct, 3 duplicates")
    assert distinct == pytest.approx(196 * (1 - (195 / 196) ** 36), abs=0.3)


def test_subset_without_replacement_is_distinct():
    idx = sample_subset(100, 196, 36, replacement=False)
    assert all(len(set(row.tolist())) == 36 for row in idx)
    with pytest.raises(ValueError, match="subset_size 200 > num_landmarks 196"):
        sample_subset(1, 196, 200, replacement=False)


def test_perturbation_standard_deviation_and_independence():
    torch.manual_seed(1)
    lm = grid_landmarks(256)
    noise = perturb_landmarks(lm, 2.0) - lm
    assert noise.std().item() == pytest.approx(2.0, rel=0.02)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.02)
    flat = noise.reshape(-1, 2)
    assert abs(torch.corrcoef(flat.T)[0, 1].item()) < 0.02  # x and y independent
    assert torch.equal(perturb_landmarks(lm, 0.0), lm)
    with pytest.raises(ValueError):
        perturb_landmarks(lm, -1.0)


def test_student_view_shuffled_positions_break_the_landmark_correspondence():
    torch.manual_seed(2)
    lm = grid_landmarks(8)
    picked, pos = landmark_view(lm, student=True, subset_size=36, shuffle="student")
    assert picked.shape == (8, 36, 2) and pos.shape == (8, 36)
    ids = picked[..., 0].long()
    assert torch.equal(picked[..., 1], 1000 + picked[..., 0])  # whole landmarks, not mixed coordinates
    assert torch.equal(pos, torch.arange(36).expand(8, 36))  # positions 0..35 whatever the landmark
    assert not torch.equal(ids, ids.sort(dim=1).values)  # random order


def test_teacher_view_shuffle_scope():
    torch.manual_seed(3)
    lm = grid_landmarks(4, 49)
    kept, pos = landmark_view(lm, student=False, shuffle="student")  # reference: teachers untouched
    assert torch.equal(kept, lm) and torch.equal(pos, torch.arange(49).expand(4, 49))
    perm, pos = landmark_view(lm, student=False, shuffle="both")  # paper Eq. 4: a permutation of the tokens
    ids = perm[..., 0].long()
    assert torch.equal(ids.sort(dim=1).values, torch.arange(49).expand(4, 49))
    assert not torch.equal(ids, torch.arange(49).expand(4, 49))
    assert torch.equal(pos, torch.arange(49).expand(4, 49))


def test_without_shuffle_tokens_keep_their_landmark_position():
    lm = grid_landmarks(4)
    picked, pos = landmark_view(lm, student=True, subset_size=36, shuffle="none", replacement=False)
    ids = picked[..., 0].long()
    assert torch.equal(pos, ids) and torch.equal(ids, ids.sort(dim=1).values)
    with pytest.raises(ValueError, match="shuffle must be one of"):
        landmark_view(lm, student=True, shuffle="sometimes")


def test_encoder_positions_select_position_embeddings():
    """A view without shuffle feeds each token its landmark's position embedding."""
    from lafs.models import build_backbone

    torch.manual_seed(4)
    model = build_backbone("part_fvit", "micro", dropout=0.0, emb_dropout=0.0, drop_path=0.0).eval()
    enc = model.encoder
    tokens = torch.randn(2, 10, enc.to_embedding.in_features)
    pos = torch.tensor([[5, 0, 48, 7, 7, 1, 2, 3, 9, 30], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    seen = {}
    enc.emb_drop.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    with torch.no_grad():
        enc(tokens, positions=pos)
        x = seen.pop("x")
        table = enc.pos_embedding[0]
        assert torch.allclose(x[:, 0], enc.cls_token[0, 0] + table[0])
        assert torch.allclose(x[:, 1:], enc.to_embedding(tokens) + table[1 + pos])
        enc(tokens)  # default: token j at position j (the reference)
        assert torch.allclose(seen["x"][:, 1:], enc.to_embedding(tokens) + table[1:11])
    with pytest.raises(ValueError, match="positions must be 2 x 10 indices"):
        enc(tokens, positions=pos + 1000)
