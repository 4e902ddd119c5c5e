"""Partial FC against a plain single-process margin head on the same weight.

Single process: with sample_rate = 1 PartialFC must be the plain head; with sampling, the loss must be the
softmax over the sampled centres only, computed by hand here. Two processes on gloo: every rank scores half of a
global batch against its shard; the loss must be the single-process loss on the global batch, the weight-shard
gradient the reference's rows, and the embedding gradient world_size x the reference's rows (DDP then averages).
The two-process runs happen once per module (spawning costs seconds) and their results are checked test by test.
"""

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lafs.heads.margin import build_head
from lafs.heads.partial_fc import PartialFC, _DistSoftmaxCrossEntropy, build_partial_fc

WORLD = 2
D = 16


def cosface_loss_by_hand(emb, centres, labels, s=64.0, m=0.4):
    """CosFace softmax cross-entropy over the given centres, from the formula (no lafs code)."""
    cos = F.normalize(emb.float(), dim=1) @ F.normalize(centres.float(), dim=1).T
    rows = torch.arange(len(labels))
    logits = s * cos
    logits[rows, labels] = s * (cos[rows, labels] - m)
    return (torch.logsumexp(logits, dim=1) - logits[rows, labels]).mean()


def reference(head_name, weight, emb, labels, **kw):
    """Plain single-process head on the global batch: (loss, d loss/d emb, d loss/d weight, head)."""
    head = build_head(head_name, weight.shape[1], weight.shape[0], **kw)
    with torch.no_grad():
        head.weight.copy_(weight)
    x = emb.clone().requires_grad_()
    loss = head(x, labels)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad, head


def close(a, b, tol=1e-6):
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


# -- single process -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes,world_size", [(10, 1), (10, 2), (7, 2), (10, 3), (205990, 8), (5, 5), (9, 4)])
def test_shard_range_covers_every_class_once(num_classes, world_size):
    ranges = [PartialFC.shard_range(num_classes, r, world_size) for r in range(world_size)]
    covered = [c for start, n in ranges for c in range(start, start + n)]
    assert covered == list(range(num_classes))
    sizes = [n for _, n in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_range_rejects_more_ranks_than_classes():
    with pytest.raises(ValueError):
        PartialFC.shard_range(3, 0, 4)


@pytest.mark.parametrize("head_name", ["cosface", "arcface", "adaface"])
def test_single_process_is_the_plain_head(head_name):
    weight, emb = torch.randn(10, D), 4 * torch.randn(8, D)
    labels = torch.tensor([0, 3, 3, 9, 5, 1, 0, 7])
    ref_loss, ref_emb_grad, ref_w_grad, ref_head = reference(head_name, weight, emb, labels)

    pfc = build_partial_fc(head_name, D, 10)
    assert (pfc.rank, pfc.world_size, pfc.num_local) == (0, 1, 10)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    x = emb.clone().requires_grad_()
    loss = pfc(x, labels)
    loss.backward()
    assert loss.shape == ()
    assert close(loss, ref_loss)
    assert close(x.grad, ref_emb_grad)
    assert close(pfc.weight.grad, ref_w_grad)
    for name, buf in ref_head.named_buffers():  # AdaFace norm statistics
        assert close(dict(pfc.margin_head.named_buffers())[name], buf)


def test_bf16_embeddings_are_scored_in_fp32():
    weight = torch.randn(10, D)
    emb = (4 * torch.randn(6, D)).bfloat16()
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    pfc = build_partial_fc("arcface", D, 10)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    x = emb.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pfc(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert close(loss, reference("arcface", weight, emb.float(), labels)[0])


def test_sampling_keeps_every_positive_and_the_right_count():
    pfc = build_partial_fc("cosface", D, 50, sample_rate=0.2)
    assert pfc.num_sample == 10
    few = torch.tensor([3, 3, 17, 42])
    index, local = pfc.sample(few)
    assert len(index) == 10 and len(set(index.tolist())) == 10
    assert {3, 17, 42} <= set(index.tolist())
    assert torch.equal(index[local], few)  # local labels point at the label's centre
    many = torch.arange(0, 45, 3)  # 15 positives > 10
    index, local = pfc.sample(many)
    assert torch.equal(index, many)
    assert torch.equal(index[local], many)


def test_sampling_draws_from_the_global_rng_and_only_when_sampling():
    pfc = build_partial_fc("cosface", D, 50, sample_rate=0.3)
    labels = torch.tensor([1, 2])
    torch.manual_seed(5)
    first = pfc.sample(labels)[0]
    torch.manual_seed(5)
    assert torch.equal(pfc.sample(labels)[0], first)
    negatives = {tuple(pfc.sample(labels)[0].tolist()) for _ in range(5)}
    assert len(negatives) > 1  # the negatives change from step to step

    full = build_partial_fc("cosface", D, 50, sample_rate=1.0)
    emb = torch.randn(2, D)
    state = torch.get_rng_state()
    full(emb, labels)
    assert torch.equal(torch.get_rng_state(), state) and full.sampled_index is None


@pytest.mark.parametrize("head_name", ["cosface", "adaface"])
def test_sampled_loss_is_the_softmax_over_the_sampled_centres(head_name):
    num_classes = 40
    weight, emb = torch.randn(num_classes, D), 4 * torch.randn(6, D)
    labels = torch.tensor([2, 2, 11, 30, 39, 0])
    pfc = build_partial_fc(head_name, D, num_classes, sample_rate=0.3)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    x = emb.clone().requires_grad_()
    loss = pfc(x, labels)
    loss.backward()
    index = pfc.sampled_index
    assert len(index) == max(5, int(0.3 * num_classes))
    assert set(labels.tolist()) <= set(index.tolist())
    column = torch.searchsorted(index, labels)

    if head_name == "cosface":
        w = weight.clone().requires_grad_()
        xe = emb.clone().requires_grad_()
        expected = cosface_loss_by_hand(xe, w[index], column)
        expected.backward()
        expected_emb_grad, expected_w_grad = xe.grad, w.grad
    else:  # AdaFace's margin is tested on its own; here only the restriction to the sampled columns
        expected, expected_emb_grad, sampled_grad, _ = reference("adaface", weight[index], emb, column)
        expected_w_grad = torch.zeros_like(weight).index_copy_(0, index, sampled_grad)
    assert close(loss, expected, 1e-5)
    assert close(x.grad, expected_emb_grad, 1e-5)
    assert close(pfc.weight.grad, expected_w_grad, 1e-5)
    unsampled = torch.ones(num_classes, dtype=torch.bool)
    unsampled[index] = False
    assert torch.count_nonzero(pfc.weight.grad[unsampled]) == 0
    assert torch.all(pfc.weight.grad[index].abs().sum(dim=1) > 0)


def test_split_softmax_cross_entropy_on_one_rank_is_cross_entropy():
    logits = (30 * torch.randn(5, 7, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([0, 6, 3, 3, 1])
    loss = _DistSoftmaxCrossEntropy.apply(logits, labels, 1)
    assert close(loss, F.cross_entropy(logits, labels), 1e-12)
    assert torch.autograd.gradcheck(lambda z: _DistSoftmaxCrossEntropy.apply(z, labels, 1), (logits,))


@pytest.mark.parametrize("bad", [10, -1, 57])
def test_labels_outside_the_classes_are_rejected(bad):
    pfc = build_partial_fc("cosface", D, 10)
    with pytest.raises(ValueError, match=str(bad)):
        pfc(torch.randn(3, D), torch.tensor([0, bad, 4]))


def test_mismatched_head_is_rejected():
    with pytest.raises(ValueError, match="owns 5"):
        PartialFC(build_head("cosface", D, 10), num_classes=10, rank=0, world_size=2)


def test_initial_centres_do_not_depend_on_the_number_of_processes():
    torch.manual_seed(3)
    single = build_partial_fc("cosface", D, 11).weight.detach()
    shards = []
    for rank in range(3):
        torch.manual_seed(3)
        shards.append(build_partial_fc("cosface", D, 11, rank=rank, world_size=3).weight.detach())
    assert torch.equal(torch.cat(shards), single)
    assert single.abs().max() <= math.sqrt(6 / (11 + D))  # xavier bound of the full matrix


def test_a_plain_head_has_the_plain_hooks_and_the_trainer_asks_no_head_its_type():
    """Partial FC is injected: the trainer (lafs.train) uses the ClassifierState hooks, which do the plain thing on a
    replicated head, and never names PartialFC."""
    import ast
    from pathlib import Path

    import lafs.train

    head = build_head("adaface", D, 12)
    assert not head.sharded and head.supports_mixup
    assert build_partial_fc("adaface", D, 12).sharded and not build_partial_fc("adaface", D, 12).supports_mixup
    state = head.full_state_dict()
    plain = head.state_dict()
    assert state.keys() == plain.keys() and all(torch.equal(state[k], v) for k, v in plain.items())
    other = build_head("adaface", D, 12)
    other.load_full_state_dict(state)
    assert torch.equal(other.weight, head.weight)
    moment = torch.randn(12, D)
    assert head.gather_rows(moment) is moment and head.shard_rows(moment) is moment
    # build_classifier (train/supervised.py) builds the head from the config; nothing in lafs.train names its class
    for path in Path(lafs.train.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "PartialFC" not in names, path.name


def test_state_round_trip_single_process():
    pfc = build_partial_fc("adaface", D, 12)
    pfc(4 * torch.randn(5, D), torch.tensor([0, 1, 2, 3, 11]))  # moves the norm statistics
    state = pfc.full_state_dict()
    assert state["weight"].shape == (12, D) and "batch_mean" in state
    other = build_partial_fc("adaface", D, 12)
    other.load_full_state_dict(state)
    plain = build_head("adaface", D, 12)
    plain.load_state_dict(state)  # a full state is a plain head's state
    emb, labels = 4 * torch.randn(4, D), torch.tensor([5, 6, 7, 8])
    assert close(other(emb, labels), plain(emb, labels))
    with pytest.raises(ValueError):
        other.load_full_state_dict({**state, "weight": torch.randn(11, D)})


# -- two processes on gloo ----------------------------------------------------------------------------------

CASES = {
    # name: head, classes, sample rate, local batch sizes, embedding dtype
    "cosface": ("cosface", 10, 1.0, (6, 6), torch.float32),
    "arcface": ("arcface", 10, 1.0, (6, 6), torch.float32),
    "adaface": ("adaface", 10, 1.0, (6, 6), torch.float32),
    "uneven_classes": ("cosface", 7, 1.0, (6, 6), torch.float32),
    "uneven_batches": ("arcface", 9, 1.0, (5, 7), torch.float32),
    "bf16": ("cosface", 10, 1.0, (6, 6), torch.bfloat16),
    "sampled": ("cosface", 40, 0.25, (6, 6), torch.float32),
}


def _make_inputs():
    g = torch.Generator().manual_seed(1234)
    inputs = {}
    for name, (head, classes, rate, sizes, dtype) in CASES.items():
        n = sum(sizes)
        emb = (4 * torch.randn(n, D, generator=g)).to(dtype).float()  # representable in dtype
        labels = torch.randint(0, classes, (n,), generator=g)
        if name == "sampled":
            labels[:4] = torch.tensor([0, 5, 25, 39])  # positives on both shards
        inputs[name] = dict(head=head, classes=classes, rate=rate, sizes=sizes, dtype=dtype,
                            weight=torch.randn(classes, D, generator=g), emb=emb, labels=labels)
    return inputs


def _worker(rank, port, folder):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    inputs = torch.load(os.path.join(folder, "inputs.pt"))
    out = {}
    try:
        for name, case in inputs.items():
            torch.manual_seed(100 + rank)
            pfc = build_partial_fc(case["head"], D, case["classes"], case["rate"])
            with torch.no_grad():
                pfc.weight.copy_(pfc.shard_rows(case["weight"]))
            start = sum(case["sizes"][:rank])
            stop = start + case["sizes"][rank]
            x = case["emb"][start:stop].to(case["dtype"]).requires_grad_()
            loss = pfc(x, case["labels"][start:stop])
            loss.backward()
            out[name] = dict(
                loss=loss.detach(), emb_grad=x.grad, weight_grad=pfc.weight.grad.clone(),
                class_start=pfc.class_start, num_local=pfc.num_local, sampled_index=pfc.sampled_index,
                gathered_grad=pfc.gather_rows(pfc.weight.grad), full_state=pfc.full_state_dict(),
            )
        # a bad label on one rank only: both must raise rather than one waiting forever in a collective
        pfc = build_partial_fc("cosface", D, 10)
        labels = torch.tensor([1, 2, 13]) if rank == 0 else torch.tensor([1, 2, 3])
        try:
            pfc(torch.randn(3, D), labels)
            out["bad_label"] = None
        except ValueError as error:
            out["bad_label"] = str(error)
        # resume from a full checkpoint: each rank keeps its rows and the buffers
        pfc = build_partial_fc("adaface", D, 9)
        pfc.load_full_state_dict({"weight": torch.arange(9.0)[:, None].expand(9, D).clone(),
                                  "batch_mean": torch.tensor(7.0), "batch_std": torch.tensor(3.0)})
        out["loaded"] = dict(weight=pfc.weight.detach().clone(), mean=pfc.margin_head.batch_mean.clone())
    finally:
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("partial_fc")
    inputs = _make_inputs()
    torch.save(inputs, folder / "inputs.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(folder)), nprocs=WORLD, join=True)
    return inputs, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CASES if n != "sampled"])
def test_two_ranks_equal_single_process_on_the_global_batch(two_ranks, name):
    inputs, ranks = two_ranks
    case = inputs[name]
    ref_loss, ref_emb_grad, ref_w_grad, ref_head = reference(case["head"], case["weight"], case["emb"], case["labels"])
    offsets = [0, case["sizes"][0], sum(case["sizes"])]
    tol = 1e-2 if case["dtype"] == torch.bfloat16 else 1e-5
    for rank, got in enumerate(r[name] for r in ranks):
        start, n = got["class_start"], got["num_local"]
        assert (start, n) == PartialFC.shard_range(case["classes"], rank, WORLD)
        assert close(got["loss"], ref_loss, 1e-5)
        assert close(got["weight_grad"], ref_w_grad[start : start + n], 1e-5)
        assert got["emb_grad"].dtype == case["dtype"]
        assert close(got["emb_grad"], WORLD * ref_emb_grad[offsets[rank] : offsets[rank + 1]], tol)
        assert close(got["gathered_grad"], ref_w_grad, 1e-5)
        state = got["full_state"]
        assert torch.equal(state["weight"], case["weight"])
        for key, buf in ref_head.named_buffers():  # AdaFace statistics from the global batch, on every rank
            assert close(state[key], buf)


@pytest.mark.slow
def test_two_ranks_sampled_loss_is_the_softmax_over_the_union_of_sampled_centres(two_ranks):
    inputs, ranks = two_ranks
    case, got = inputs["sampled"], [r["sampled"] for r in ranks]
    columns = []
    for rank, g in enumerate(got):
        positives = {c - g["class_start"] for c in case["labels"].tolist()
                     if 0 <= c - g["class_start"] < g["num_local"]}
        assert positives <= set(g["sampled_index"].tolist())
        assert len(g["sampled_index"]) == max(len(positives), int(case["rate"] * g["num_local"]))
        columns.append(g["sampled_index"] + g["class_start"])
    columns = torch.cat(columns)
    w = case["weight"].clone().requires_grad_()
    emb = case["emb"].clone().requires_grad_()
    expected = cosface_loss_by_hand(emb, w[columns], torch.searchsorted(columns, case["labels"]))
    expected.backward()
    for rank, g in enumerate(got):
        assert close(g["loss"], expected, 1e-5)
        start, n = g["class_start"], g["num_local"]
        assert close(g["weight_grad"], w.grad[start : start + n], 1e-5)
        rows = slice(rank * 6, rank * 6 + 6)
        assert close(g["emb_grad"], WORLD * emb.grad[rows], 1e-5)
        unsampled = torch.ones(n, dtype=torch.bool)
        unsampled[g["sampled_index"]] = False
        assert torch.count_nonzero(g["weight_grad"][unsampled]) == 0


@pytest.mark.slow
def test_state_gathered_from_two_ranks_resumes_in_one_process(two_ranks):
    inputs, ranks = two_ranks
    case = inputs["adaface"]
    state = ranks[0]["adaface"]["full_state"]
    for key, value in ranks[1]["adaface"]["full_state"].items():
        assert torch.equal(value, state[key])
    single = build_partial_fc("adaface", D, case["classes"])
    single.load_full_state_dict(state)
    plain = build_head("adaface", D, case["classes"])
    plain.load_state_dict(state)
    emb, labels = 4 * torch.randn(5, D), torch.tensor([0, 2, 4, 6, 8])
    assert close(single(emb, labels), plain(emb, labels))
    assert close(single.margin_head.batch_mean, plain.batch_mean)


@pytest.mark.slow
def test_two_ranks_load_their_rows_of_a_full_state(two_ranks):
    _, ranks = two_ranks
    for rank, r in enumerate(ranks):
        start, n = PartialFC.shard_range(9, rank, WORLD)
        assert torch.equal(r["loaded"]["weight"][:, 0], torch.arange(start, start + n, dtype=torch.float32))
        assert r["loaded"]["mean"] == 7.0


@pytest.mark.slow
def test_a_bad_label_on_one_rank_raises_on_every_rank(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert r["bad_label"] is not None and "13" in r["bad_label"]
