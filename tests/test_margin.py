"""Margin heads (CosFace, ArcFace, AdaFace) against values worked out by hand with ``math``.

Geometry used throughout (2-D): the three class centres point at 0, 120 and 240 degrees and have different
lengths (the head must normalise them). An embedding at angle phi (degrees) with length r is
r * (cos phi, sin phi); its cosine to class k is cos(phi - alpha_k). Every expected number below is computed
from these angles with ``math`` only, never with the code's own helpers.
"""

import math

import pytest
import torch

from lafs.heads import AdaFace, ArcFace, CosFace, build_head

S = 64.0
ALPHAS = (0.0, 120.0, 240.0)  # class-centre angles, degrees
CENTRE_LENGTHS = (2.0, 3.0, 0.5)


def approx(x):
    return pytest.approx(x, rel=1e-4, abs=1e-3)


def centres() -> torch.Tensor:
    return torch.tensor(
        [[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in zip(ALPHAS, CENTRE_LENGTHS)]
    )


def embed(samples) -> torch.Tensor:
    """samples: (phi in degrees, length) pairs -> B x 2 embeddings."""
    return torch.tensor([[r * math.cos(math.radians(p)), r * math.sin(math.radians(p))] for p, r in samples])


def cosines(phi: float) -> list[float]:
    return [math.cos(math.radians(phi - a)) for a in ALPHAS]


def make(cls, **kw):
    head = cls(2, 3, **kw)
    with torch.no_grad():
        head.weight.copy_(centres())
    return head


def hand_ce(rows, labels) -> float:
    """Mean softmax cross-entropy over rows with label >= 0 (stable log-sum-exp)."""
    terms = []
    for row, y in zip(rows, labels):
        if y < 0:
            continue
        mx = max(row)
        lse = mx + math.log(sum(math.exp(v - mx) for v in row))
        terms.append(lse - row[y])
    return sum(terms) / len(terms)


def assert_rows(got: torch.Tensor, expected) -> None:
    got = got.detach().double().tolist()
    assert len(got) == len(expected)
    for g_row, e_row in zip(got, expected):
        assert g_row == approx(e_row)


# Hand formulas (plain floats).
def cosface_target(c, m=0.4):
    return S * (c - m)


def arcface_target(c, m=0.5):
    theta = math.acos(c)
    if theta + m <= math.pi:
        return S * math.cos(theta + m)
    return S * (c - m * math.sin(m))


EPS = 1e-3


def clampc(c):
    return min(max(c, -1 + EPS), 1 - EPS)


def adaface_z(norm, mean, std, h=0.333):
    safe = min(max(norm, 0.001), 100.0)
    return min(max(h * (safe - mean) / (std + EPS), -1.0), 1.0)


def adaface_target(c, z, m=0.4):
    theta = math.acos(clampc(c))
    theta_m = min(max(theta - m * z, EPS), math.pi - EPS)
    return S * (math.cos(theta_m) - (m + m * z))


def ema_stats(norms, mean, std, a=0.01):
    safe = [min(max(n, 0.001), 100.0) for n in norms]
    mu = sum(safe) / len(safe)
    sd = math.sqrt(sum((x - mu) ** 2 for x in safe) / (len(safe) - 1))  # unbiased
    return a * mu + (1 - a) * mean, a * sd + (1 - a) * std


# --- CosFace -----------------------------------------------------------------------------------------------

def test_cosface_logits_and_loss_by_hand():
    samples = [(0.0, 5.0), (60.0, 2.0), (90.0, 0.5)]
    labels = [0, 1, 1]
    cos = [cosines(p) for p, _ in samples]
    # sanity of the hand geometry: simple angles
    assert cos[0] == pytest.approx([1.0, -0.5, -0.5])
    assert cos[1] == pytest.approx([0.5, 0.5, -1.0])
    assert cos[2] == pytest.approx([0.0, math.sqrt(3) / 2, -math.sqrt(3) / 2], abs=1e-12)
    expected = [[S * c for c in row] for row in cos]
    for i, y in enumerate(labels):
        expected[i][y] = cosface_target(cos[i][y])
    # explicit numbers for the three targets: 64*(1-0.4), 64*(0.5-0.4), 64*(sqrt(3)/2-0.4)
    assert [expected[i][y] for i, y in enumerate(labels)] == approx([38.4, 6.4, 64 * (math.sqrt(3) / 2 - 0.4)])

    head = make(CosFace)
    assert head.scale == S and head.margin == 0.4
    emb, lab = embed(samples), torch.tensor(labels)
    assert_rows(head.logits(emb, lab), expected)
    assert head(emb, lab).item() == approx(hand_ce(expected, labels))


# --- ArcFace -----------------------------------------------------------------------------------------------

def test_arcface_logits_and_loss_by_hand_including_fallback():
    m = 0.5
    # target angles: 0 deg, 150 deg (150 deg + 0.5 rad = 178.6 deg, still cos(theta+m)), 170 deg (> pi: fallback)
    samples = [(0.0, 5.0), (90.0, 0.5), (50.0, 3.0)]
    labels = [0, 2, 2]
    cos = [cosines(p) for p, _ in samples]
    assert math.degrees(math.acos(cos[1][2])) == pytest.approx(150.0)
    assert math.degrees(math.acos(cos[2][2])) == pytest.approx(170.0)
    assert math.radians(150.0) + m <= math.pi < math.radians(170.0) + m

    expected = [[S * c for c in row] for row in cos]
    expected[0][0] = S * math.cos(0.0 + m)
    expected[1][2] = S * math.cos(math.radians(150.0) + m)
    expected[2][2] = S * (math.cos(math.radians(170.0)) - m * math.sin(m))  # insightface fallback
    # the generic hand formula agrees with the explicit branches above
    assert [expected[i][y] for i, y in enumerate(labels)] == approx([arcface_target(cos[i][y]) for i, y in enumerate(labels)])
    # the fallback differs clearly from the raw cos(theta+m), so the test tells the branches apart
    assert abs(expected[2][2] - S * math.cos(math.radians(170.0) + m)) > 1.0

    head = make(ArcFace)
    assert head.scale == S and head.margin == m
    emb, lab = embed(samples), torch.tensor(labels)
    logits = head.logits(emb, lab)
    assert_rows(logits, expected)
    assert logits[2, 2].item() == approx(S * (math.cos(math.radians(170.0)) - m * math.sin(m)))
    assert head(emb, lab).item() == approx(hand_ce(expected, labels))


@pytest.mark.parametrize("cls", [ArcFace, CosFace, AdaFace])
def test_gradients_finite_when_parallel_or_antiparallel(cls):
    head = make(cls)
    # sample 0 exactly parallel to centre 0 (theta = 0), sample 1 exactly anti-parallel (theta = pi)
    emb = torch.tensor([[3.0, 0.0], [-2.0, 0.0], [0.0, 1.5]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    cos = head.cosine(emb.detach())
    assert cos[0, 0].item() == 1.0 and cos[1, 0].item() == -1.0
    loss = head(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(head.weight.grad).all()
    if cls is ArcFace:
        logits = head.logits(emb.detach(), labels)
        assert logits[0, 0].item() == approx(S * math.cos(0.5))
        assert logits[1, 0].item() == approx(S * (-1.0 - 0.5 * math.sin(0.5)))


# --- AdaFace -----------------------------------------------------------------------------------------------

ADA_SAMPLES_1 = [(0.0, 5.0), (60.0, 25.0), (50.0, 150.0)]  # 150 is clipped to 100
ADA_LABELS_1 = [0, 1, 2]  # target angles 0 (cos clamped to 0.999), 60, 170 degrees
ADA_SAMPLES_2 = [(90.0, 0.0001), (30.0, 8.0), (150.0, 40.0)]  # 0.0001 is clipped to 0.001
ADA_LABELS_2 = [1, 2, 0]


def adaface_expected_logits(samples, labels, mean, std):
    rows = []
    for (phi, r), y in zip(samples, labels):
        c = cosines(phi)
        row = [S * clampc(v) for v in c]
        row[y] = adaface_target(c[y], adaface_z(r, mean, std))
        rows.append(row)
    return rows


def test_adaface_running_stats_after_one_and_two_forwards():
    head = make(AdaFace)
    assert head.batch_mean.item() == 20.0 and head.batch_std.item() == 100.0
    head.train()

    head(embed(ADA_SAMPLES_1), torch.tensor(ADA_LABELS_1))
    # safe norms [5, 25, 100]: mean 130/3, unbiased std sqrt(((5-43.33)^2+(25-43.33)^2+(100-43.33)^2)/2)
    mu1 = 0.01 * (130.0 / 3.0) + 0.99 * 20.0
    sd1 = 0.01 * math.sqrt(((5 - 130 / 3) ** 2 + (25 - 130 / 3) ** 2 + (100 - 130 / 3) ** 2) / 2) + 0.99 * 100.0
    assert (mu1, sd1) == pytest.approx(ema_stats([5.0, 25.0, 150.0], 20.0, 100.0))
    assert head.batch_mean.item() == pytest.approx(mu1, rel=1e-5)
    assert head.batch_std.item() == pytest.approx(sd1, rel=1e-5)
    assert mu1 == pytest.approx(20.233333, rel=1e-6)

    head(embed(ADA_SAMPLES_2), torch.tensor(ADA_LABELS_2))
    mu2, sd2 = ema_stats([0.001, 8.0, 40.0], mu1, sd1)
    assert head.batch_mean.item() == pytest.approx(mu2, rel=1e-5)
    assert head.batch_std.item() == pytest.approx(sd2, rel=1e-5)


def test_adaface_logits_and_loss_by_hand_training_mode():
    # stats are updated before use: the first batch's logits use the stats after one EMA step
    mu1, sd1 = ema_stats([5.0, 25.0, 150.0], 20.0, 100.0)
    expected1 = adaface_expected_logits(ADA_SAMPLES_1, ADA_LABELS_1, mu1, sd1)
    # z for the three rows are distinct and not zero (so the margin really adapts)
    zs = [adaface_z(r, mu1, sd1) for _, r in ADA_SAMPLES_1]
    assert zs[0] < 0 < zs[1] < zs[2] < 1
    # the row-1 non-target at cos = -1 is clamped to -1 + 1e-3
    assert expected1[1][2] == pytest.approx(S * (-1 + 1e-3))

    head = make(AdaFace).train()
    assert_rows(head.logits(embed(ADA_SAMPLES_1), torch.tensor(ADA_LABELS_1)), expected1)

    mu2, sd2 = ema_stats([0.001, 8.0, 40.0], mu1, sd1)
    expected2 = adaface_expected_logits(ADA_SAMPLES_2, ADA_LABELS_2, mu2, sd2)
    loss = head(embed(ADA_SAMPLES_2), torch.tensor(ADA_LABELS_2))
    assert loss.item() == approx(hand_ce(expected2, ADA_LABELS_2))

    # loss on a fresh head equals the hand loss with one update
    head = make(AdaFace).train()
    assert head(embed(ADA_SAMPLES_1), torch.tensor(ADA_LABELS_1)).item() == approx(hand_ce(expected1, ADA_LABELS_1))


def test_adaface_eval_mode_freezes_stats():
    head = make(AdaFace).eval()
    emb, lab = embed(ADA_SAMPLES_1), torch.tensor(ADA_LABELS_1)
    loss = head(emb, lab)
    logits = head.logits(emb, lab)
    assert head.batch_mean.item() == 20.0 and head.batch_std.item() == 100.0
    # eval uses the stored (initial) statistics
    assert_rows(logits, adaface_expected_logits(ADA_SAMPLES_1, ADA_LABELS_1, 20.0, 100.0))
    assert loss.item() == approx(hand_ce(adaface_expected_logits(ADA_SAMPLES_1, ADA_LABELS_1, 20.0, 100.0), ADA_LABELS_1))
    # training mode does move them (so the check above can fail)
    head.train()(emb, lab)
    assert head.batch_mean.item() != 20.0 and head.batch_std.item() != 100.0


# No cosine of +-1 anywhere, so AdaFace's clamp does not touch these rows.
SPECIAL_PHIS = (90.0, 30.0, 150.0)
SPECIAL_LABELS = [0, 2, 1]  # target angles 90, 150, 30 degrees


def special_head(mean, std):
    head = make(AdaFace)
    with torch.no_grad():
        head.batch_mean.fill_(mean)
        head.batch_std.fill_(std)
    return head.eval()


def test_adaface_z_zero_is_cosface():
    head = special_head(7.0, 3.0)
    emb, lab = embed([(p, 7.0) for p in SPECIAL_PHIS]), torch.tensor(SPECIAL_LABELS)
    assert all(adaface_z(7.0, 7.0, 3.0) == 0.0 for _ in SPECIAL_PHIS)
    cos = [cosines(p) for p in SPECIAL_PHIS]
    expected = [[S * c for c in row] for row in cos]
    for i, y in enumerate(SPECIAL_LABELS):
        expected[i][y] = S * (cos[i][y] - 0.4)
    # explicit: 64*(0-0.4), 64*(-sqrt(3)/2-0.4), 64*(sqrt(3)/2-0.4)
    assert [expected[i][y] for i, y in enumerate(SPECIAL_LABELS)] == approx(
        [-25.6, 64 * (-math.sqrt(3) / 2 - 0.4), 64 * (math.sqrt(3) / 2 - 0.4)]
    )
    logits = head.logits(emb, lab)
    assert_rows(logits, expected)
    torch.testing.assert_close(logits, make(CosFace).logits(emb, lab), rtol=1e-4, atol=1e-3)


def test_adaface_z_minus_one_is_arcface_like():
    head = special_head(50.0, 1.0)
    emb, lab = embed([(p, 5.0) for p in SPECIAL_PHIS]), torch.tensor(SPECIAL_LABELS)
    assert adaface_z(5.0, 50.0, 1.0) == -1.0
    cos = [cosines(p) for p in SPECIAL_PHIS]
    expected = [[S * c for c in row] for row in cos]
    for i, y in enumerate(SPECIAL_LABELS):
        theta = math.acos(cos[i][y])
        assert theta + 0.4 < math.pi - EPS
        expected[i][y] = S * math.cos(theta + 0.4)
    logits = head.logits(emb, lab)
    assert_rows(logits, expected)
    torch.testing.assert_close(logits, make(ArcFace, margin=0.4).logits(emb, lab), rtol=1e-4, atol=1e-3)

    # theta + m past pi - eps is clipped there: theta = 170 deg -> 64 * cos(pi - 1e-3), and no extra margin
    cosine = torch.tensor([cosines(50.0)])
    got = head.margin_logits(cosine, torch.tensor([2]), torch.tensor([5.0]))
    assert got[0, 2].item() == approx(S * math.cos(math.pi - 1e-3))
    assert got[0, 0].item() == approx(S * math.cos(math.radians(50.0)))


def test_adaface_z_plus_one():
    head = special_head(10.0, 1.0)
    emb, lab = embed([(p, 90.0) for p in SPECIAL_PHIS]), torch.tensor(SPECIAL_LABELS)
    assert adaface_z(90.0, 10.0, 1.0) == 1.0
    cos = [cosines(p) for p in SPECIAL_PHIS]
    expected = [[S * c for c in row] for row in cos]
    for i, y in enumerate(SPECIAL_LABELS):
        expected[i][y] = S * (math.cos(math.acos(cos[i][y]) - 0.4) - 0.8)
    assert_rows(head.logits(emb, lab), expected)

    # theta - m below eps is clipped: cos = 1 is clamped to 0.999, acos(0.999) - 0.4 < 1e-3 -> cos(1e-3) - 0.8
    cosine = torch.tensor([cosines(0.0)])
    got = head.margin_logits(cosine, torch.tensor([0]), torch.tensor([90.0]))
    assert got[0, 0].item() == approx(S * (math.cos(1e-3) - 0.8))
    assert got[0, 1].item() == approx(S * -0.5)


def test_adaface_margin_logits_needs_norms():
    head = make(AdaFace)
    with pytest.raises(ValueError):
        head.margin_logits(torch.zeros(1, 3), torch.tensor([0]))


# --- shared behaviour --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [CosFace, ArcFace, AdaFace])
def test_logits_without_labels_have_no_margin(cls):
    head = make(cls).train()
    samples = [(0.0, 5.0), (60.0, 25.0), (90.0, 0.5)]
    expected = [[S * c for c in cosines(p)] for p, _ in samples]
    assert expected[0] == approx([64.0, -32.0, -32.0])
    assert expected[1] == approx([32.0, 32.0, -64.0])
    assert_rows(head.logits(embed(samples)), expected)


@pytest.mark.parametrize("cls", [CosFace, ArcFace, AdaFace])
def test_ignored_labels_get_no_margin_and_no_loss(cls):
    head = make(cls).eval()  # eval: AdaFace uses its initial stats (20, 100)
    samples = [(30.0, 5.0), (60.0, 25.0), (150.0, 0.5)]
    labels = [0, -1, 1]
    cos = [cosines(p) for p, _ in samples]
    if cls is AdaFace:
        expected = [[S * clampc(c) for c in row] for row in cos]
    else:
        expected = [[S * c for c in row] for row in cos]
    for i, y in enumerate(labels):
        if y < 0:
            continue
        if cls is CosFace:
            expected[i][y] = cosface_target(cos[i][y])
        elif cls is ArcFace:
            expected[i][y] = arcface_target(cos[i][y])
        else:
            expected[i][y] = adaface_target(cos[i][y], adaface_z(samples[i][1], 20.0, 100.0))
    emb, lab = embed(samples), torch.tensor(labels)
    logits = head.logits(emb, lab)
    assert_rows(logits, expected)
    # the ignored row is the plain scaled cosine (column 0 would have got the margin under clamp_min(0))
    assert logits[1, 0].item() == approx(S * 0.5)
    loss = head(emb, lab).item()
    assert loss == approx(hand_ce([expected[0], expected[2]], [0, 1]))
    assert loss == approx(hand_ce(expected, labels))


def test_build_head_unknown_name_raises():
    with pytest.raises(KeyError, match="nope"):
        build_head("nope", 2, 3)


def test_build_head_known_names_and_defaults():
    cos = build_head("cosface", 4, 5, h=0.5, t_alpha=0.1)
    arc = build_head("arcface", 4, 5)
    ada = build_head("adaface", 4, 5, h=0.5, t_alpha=0.1)
    assert type(cos) is CosFace and (cos.scale, cos.margin) == (64.0, 0.4)
    assert type(arc) is ArcFace and (arc.scale, arc.margin) == (64.0, 0.5)
    assert type(ada) is AdaFace and (ada.scale, ada.margin, ada.h, ada.t_alpha) == (64.0, 0.4, 0.5, 0.1)
    assert cos.weight.shape == (5, 4)


def test_mixup_soft_targets_weight_each_margin():
    """CosFace with mixup: logit_j = s (cos_j - m y_j) with y = lam onehot(a) + (1 - lam) onehot(b) (the reference
    code's soft one-hot mask), loss = lam CE(a) + (1 - lam) CE(b)."""
    head = make(CosFace, margin=0.4)
    phi, lam = 50.0, 0.7
    emb = embed([(phi, 1.5)])
    cos = cosines(phi)
    rows = [[S * (cos[0] - 0.4 * lam), S * (cos[1] - 0.4 * (1 - lam)), S * cos[2]]]
    got = head.logits(emb, torch.tensor([0]), torch.tensor([1]), lam)
    assert_rows(got, rows)
    loss = head(emb, torch.tensor([0]), torch.tensor([1]), lam)
    assert loss.item() == approx(lam * hand_ce(rows, [0]) + (1 - lam) * hand_ce(rows, [1]))
    # both targets the same class: the full margin, as without mixup
    same = head(emb, torch.tensor([2]), torch.tensor([2]), lam)
    assert same.item() == approx(head(emb, torch.tensor([2])).item())


def test_mixup_adaface_updates_norm_statistics_once():
    a, b = make(AdaFace), make(AdaFace)
    emb = embed([(10.0, 30.0), (200.0, 5.0)])
    a(emb, torch.tensor([0, 1]), torch.tensor([1, 2]), 0.6)
    b(emb, torch.tensor([0, 1]))
    assert a.batch_mean.item() == pytest.approx(b.batch_mean.item())
    assert a.batch_std.item() == pytest.approx(b.batch_std.item())
