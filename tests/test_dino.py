"""DINO components (lafs.ssl.dino; Caron et al. 2021): head, loss and centre, schedules, EMA, clipping, collapse
stats."""

import copy
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lafs.ssl import (
    TEACHER_TEMP_PRESETS,
    DINOHead,
    DINOLoss,
    cancel_last_layer_grads,
    clip_gradients_per_param,
    ema_update,
    mean_entropy,
    momentum_at,
    teacher_entropy,
    teacher_student_kl,
    teacher_temp_at,
    weight_decay_at,
)

# ---------------------------------------------------------------------------------------------------------- head


def test_head_shape_unit_prototypes_and_frozen_g():
    head = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 50)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones(50, 1))
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(50))
    # logits are cosines between the L2-normalised bottleneck and unit prototypes
    assert out.abs().max() <= 1 + 1e-5
    names = [n for n, _ in head.named_parameters() if n.startswith("last_layer.")]
    assert sorted(names) == [f"last_layer.parametrizations.weight.original{i}" for i in (0, 1)]
    # MLP layout and init: 3 Linear layers with GELUs, zero biases
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    # g stays at 1 after an optimizer step; v moves
    head.last_layer.parametrizations.weight.original1.data.mul_(3.0)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    loss = head(torch.randn(4, 16)).sum()
    loss.backward()
    assert g.grad is None


def test_head_without_norm_last_layer_trains_g():
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False, nlayers=1)
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.equal(g, torch.ones(10, 1))
    assert isinstance(head.mlp, nn.Linear)


# ---------------------------------------------------------------------------------------------------------- loss


def _loop_loss(students, teachers, center, tt, ts):
    total, n = 0.0, 0
    for iq, t in enumerate(teachers):
        q = F.softmax((t - center) / tt, dim=-1)
        for v, s in enumerate(students):
            if v != iq:
                per_sample = [-(q[b] * F.log_softmax(s[b] / ts, dim=-1)).sum() for b in range(s.shape[0])]
                total += sum(per_sample) / len(per_sample)
                n += 1
    return total / n, n


def test_loss_matches_direct_loop_over_view_pairs():
    K, B = 12, 3
    students = [torch.randn(B, K) for _ in range(6)]  # 2 global + 4 local
    teachers = [torch.randn(B, K) for _ in range(2)]
    crit = DINOLoss(K, num_teacher_views=2, student_temp=0.2)
    crit.center.copy_(0.3 * torch.randn(1, K))
    old_center = crit.center.clone()
    for tt in (0.04, 0.07):
        expected, n = _loop_loss(students, teachers, old_center, tt, 0.2)
        assert n == 2 * 6 - 2
        crit.center.copy_(old_center)
        loss = crit(students, teachers, tt)
        torch.testing.assert_close(loss, expected)
    # concatenated (DINO-style) inputs give the same value
    crit.center.copy_(old_center)
    torch.testing.assert_close(crit(torch.cat(students), torch.cat(teachers), 0.07), expected)


def test_loss_hand_value_two_classes():
    # one global teacher view, student sees it plus one other view; centre 0
    crit = DINOLoss(2, num_teacher_views=1, student_temp=1.0, center_momentum=0.5)
    teacher = [torch.tensor([[math.log(3.0), 0.0]])]  # tau_t = 1 -> q = (3/4, 1/4)
    students = [torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])]  # only view 1 counts: p = (1/4, 3/4)
    loss = crit(students, teacher, 1.0)
    expected = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # centre after: 0.5 * 0 + 0.5 * teacher mean
    torch.testing.assert_close(crit.center, torch.tensor([[0.5 * math.log(3.0), 0.0]]))


def test_centre_ema_uses_old_centre_for_loss_and_all_teacher_views():
    K = 4
    crit = DINOLoss(K, num_teacher_views=2, center_momentum=0.9)
    c0 = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    crit.center.copy_(c0)
    t = [torch.randn(3, K), torch.randn(3, K)]
    s = [torch.randn(3, K) for _ in range(3)]
    expected_loss, _ = _loop_loss(s, t, c0, 0.05, 0.1)
    loss = crit(s, t, 0.05)
    torch.testing.assert_close(loss, expected_loss)  # loss used the OLD centre
    batch_mean = torch.cat(t).mean(dim=0, keepdim=True)
    torch.testing.assert_close(crit.center, 0.9 * c0 + 0.1 * batch_mean)


def test_loss_is_fp32_and_teacher_gets_no_grad():
    crit = DINOLoss(8)
    s = [torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    loss = crit(s, t, 0.04)
    assert loss.dtype == torch.float32 and crit.center.dtype == torch.float32
    loss.backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)


def test_wrong_view_counts_raise():
    crit = DINOLoss(4, num_teacher_views=2)
    with pytest.raises(ValueError, match="teacher views"):
        crit([torch.randn(1, 4)] * 3, [torch.randn(1, 4)], 0.04)


# ---------------------------------------------------------------------------------------------------------- collapse


def test_entropy_uniform_and_one_hot():
    K = 100
    assert teacher_entropy([torch.zeros(4, K)], torch.zeros(1, K), 0.04) == pytest.approx(math.log(K), rel=1e-5)
    one_hot = torch.zeros(4, K)
    one_hot[:, 7] = 10.0
    assert teacher_entropy(torch.cat([one_hot, one_hot]), torch.zeros(1, K), 0.04) < 1e-6
    assert mean_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx(math.log(2) / 2, rel=1e-6)
    # KL is 0 for identical distributions, > 0 otherwise
    x = torch.randn(3, K)
    assert teacher_student_kl(x, x, torch.zeros(1, K), 0.1, 0.1) == pytest.approx(0.0, abs=1e-6)
    assert teacher_student_kl(torch.randn(3, K), x, torch.zeros(1, K), 0.1, 0.1) > 0


# ---------------------------------------------------------------------------------------------------------- schedules


def test_teacher_temp_presets_and_values():
    assert TEACHER_TEMP_PRESETS == {"dino": (0.04, 0.07, 30), "lafs_code": (0.07, 0.04, 30)}
    a, b, w = TEACHER_TEMP_PRESETS["lafs_code"]
    assert teacher_temp_at(0, a, b, w) == pytest.approx(0.07)
    assert teacher_temp_at(29, a, b, w) == pytest.approx(0.04)  # np.linspace(a, b, 30)[29]
    assert teacher_temp_at(40, a, b, w) == pytest.approx(0.04)
    a, b, w = TEACHER_TEMP_PRESETS["dino"]
    assert teacher_temp_at(0, a, b, w) == pytest.approx(0.04)
    assert teacher_temp_at(10, a, b, w) == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert teacher_temp_at(99, a, b, w) == pytest.approx(0.07)
    assert teacher_temp_at(0, 0.04, 0.04, 0) == pytest.approx(0.04)  # DINO code default


def test_cosine_schedules():
    assert momentum_at(0, 1000) == pytest.approx(0.996)
    assert momentum_at(500, 1000) == pytest.approx((0.996 + 1.0) / 2)
    assert momentum_at(1000, 1000) == pytest.approx(1.0)
    assert momentum_at(250, 1000) == pytest.approx(1.0 + 0.5 * (0.996 - 1.0) * (1 + math.cos(math.pi / 4)))
    assert weight_decay_at(0, 10) == pytest.approx(0.04)
    assert weight_decay_at(5, 10) == pytest.approx(0.22)
    assert weight_decay_at(10, 10) == pytest.approx(0.4)
    assert weight_decay_at(20, 10) == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------------------- EMA, grads


class _Two(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.register_buffer("buf", torch.tensor([float(a[0])]))


def test_ema_update_params_only():
    teacher, student = _Two([1.0, 2.0], [[4.0]]), _Two([3.0, -2.0], [[0.0]])
    ema_update(teacher, student, 0.75)
    torch.testing.assert_close(teacher.a.data, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(teacher.b.data, torch.tensor([[3.0]]))
    assert teacher.buf.item() == 1.0  # buffers untouched
    torch.testing.assert_close(student.a.data, torch.tensor([3.0, -2.0]))  # student untouched
    assert not teacher.a.requires_grad or teacher.a.grad is None


def test_ema_update_on_head_and_mismatch_errors():
    student = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(teacher, student, 0.9)
    for (n, tp), sp in zip(teacher.named_parameters(), student.parameters()):
        torch.testing.assert_close(tp, sp - 0.9, msg=n)  # 0.9 t + 0.1 (t + 1)
    with pytest.raises(ValueError, match="shape"):
        ema_update(_Two([1.0, 2.0], [[4.0]]), _Two([1.0, 2.0, 3.0], [[4.0]]), 0.9)
    with pytest.raises(ValueError, match="differ"):
        ema_update(_Two([1.0], [[4.0]]), nn.Linear(1, 1), 0.9)


def test_clip_gradients_per_param():
    m = _Two([0.0, 0.0], [[0.0]])
    m.a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> clipped to 3
    m.b.grad = torch.tensor([[0.5]])  # small: unchanged
    norms = clip_gradients_per_param(m, clip=3.0)
    assert norms == pytest.approx([5.0, 0.5])
    assert m.a.grad.norm().item() == pytest.approx(3.0, abs=1e-5)
    torch.testing.assert_close(m.a.grad, torch.tensor([1.8, 2.4]), atol=1e-5, rtol=0)
    assert torch.equal(m.b.grad, torch.tensor([[0.5]]))


def test_cancel_last_layer_grads_only_in_first_epoch():
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    for epoch, cancelled in ((0, True), (1, False)):
        head.zero_grad(set_to_none=True)
        head(torch.randn(3, 8)).pow(2).sum().backward()
        cancel_last_layer_grads(head, epoch, freeze_last_layer=1)
        for n, p in head.named_parameters():
            assert (p.grad is None) == (cancelled and n.startswith("last_layer.")), n


# ---------------------------------------------------------------------------------------------------------- 2 ranks

WORLD = 2


def _centre_worker(rank, port, folder):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        data = torch.load(os.path.join(folder, "inputs.pt"))
        crit = DINOLoss(data["K"], num_teacher_views=2, center_momentum=0.9)
        crit.center.copy_(data["c0"])
        loss = crit(data["students"][rank], data["teachers"][rank], 0.04)
        torch.save({"center": crit.center.clone(), "loss": loss.detach()}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_centre_is_mean_over_global_batch(tmp_path):
    K = 6
    # unequal per-rank batches (3 and 1 rows per view): the centre must be the mean over all 8 teacher rows
    teachers = [[torch.randn(3, K), torch.randn(3, K)], [torch.randn(1, K) + 5.0, torch.randn(1, K) + 5.0]]
    students = [[torch.randn(3, K) for _ in range(3)], [torch.randn(1, K) for _ in range(3)]]
    c0 = torch.randn(1, K)
    torch.save({"K": K, "teachers": teachers, "students": students, "c0": c0}, tmp_path / "inputs.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_centre_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    global_mean = torch.cat([t for per_rank in teachers for t in per_rank]).mean(dim=0, keepdim=True)
    expected = 0.9 * c0 + 0.1 * global_mean
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["center"], expected)
        local, _ = _loop_loss(students[r], teachers[r], c0, 0.04, 0.1)  # the loss itself stays per rank
        torch.testing.assert_close(results[r]["loss"], local)


# ----------------------------------------------------------------------------- DINOv2 options: Sinkhorn-Knopp, KoLeo

def test_sinkhorn_knopp_rows_are_distributions_and_columns_equipartitioned():
    from lafs.ssl.dino import sinkhorn_knopp

    torch.manual_seed(0)
    logits = torch.randn(12, 6) * 0.5
    q = sinkhorn_knopp(logits, 0.1, iterations=3)
    assert q.shape == (12, 6) and (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-5)  # the last normalisation is per sample
    # converged: every prototype gets N / K = 2 of the mass, and the ranking within a row follows the logits
    q50 = sinkhorn_knopp(logits, 0.1, iterations=50)
    assert torch.allclose(q50.sum(0), torch.full((6,), 2.0), atol=1e-3)
    # a logit matrix whose columns already balance (a doubly stochastic softmax) is left as the plain softmax
    sym = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(sinkhorn_knopp(sym, 1.0, 3), torch.softmax(sym, 1), atol=1e-6)
    # where the EMA centre would let every row pick prototype 0, equipartition spreads them
    skew = torch.tensor([[5.0, 0.0], [4.0, 0.0], [5.0, 1.0], [4.0, 1.0]])
    assert torch.softmax(skew / 0.5, 1)[:, 0].min() > 0.85
    assert sinkhorn_knopp(skew, 0.5, 20).sum(0).tolist() == pytest.approx([2.0, 2.0], abs=1e-3)


def test_dino_loss_sinkhorn_centering_uses_sinkhorn_targets():
    from lafs.ssl.dino import sinkhorn_knopp

    torch.manual_seed(1)
    t = [torch.randn(4, 8), torch.randn(4, 8)]
    s = [torch.randn(4, 8), torch.randn(4, 8)]
    loss = DINOLoss(8, 2, student_temp=0.1, centering="sinkhorn")(s, t, 0.05)
    q = sinkhorn_knopp(torch.cat(t), 0.05, 3).split(4)
    lp = [torch.log_softmax(x / 0.1, -1) for x in s]
    hand = ((-q[0] * lp[1]).sum(-1).mean() + (-q[1] * lp[0]).sum(-1).mean()) / 2
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    with pytest.raises(ValueError, match="centering must be one of"):
        DINOLoss(8, centering="mean")


def test_koleo_loss_hand_values_and_it_spreads_close_points():
    from lafs.ssl.dino import koleo_loss

    # four unit vectors 90 degrees apart on a circle: every nearest neighbour is sqrt(2) away
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0  # the norm does not matter
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # two points 0.1 rad apart and one opposite: nearest distances 2 sin(0.05), 2 sin(0.05), and to the nearer one
    a = torch.tensor([[1.0, 0.0], [math.cos(0.1), math.sin(0.1)], [-1.0, 0.0]])
    d = 2 * math.sin(0.05)
    d3 = 2 * math.sin((math.pi - 0.1) / 2)
    assert koleo_loss(a).item() == pytest.approx(-(2 * math.log(d) + math.log(d3)) / 3, abs=1e-5)
    # a gradient step pushes the close pair apart
    x = a.clone().requires_grad_(True)
    koleo_loss(x).backward()
    with torch.no_grad():
        moved = torch.nn.functional.normalize(x - 0.01 * x.grad, dim=-1)
    assert (moved[0] @ moved[1]).item() < math.cos(0.1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        koleo_loss(torch.ones(1, 3))
