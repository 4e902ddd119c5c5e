"""Synchronised batch norm on gloo (lafs.train.sync_bn): two processes = one process with the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lafs.train.sync_bn import SyncBatchNorm2d, convert_sync_batchnorm


def _reference(x: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = x.clone().requires_grad_(True)
    out = bn(x)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum().backward()
    return out.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _worker(rank: int, world: int, path: str, x: torch.Tensor, q) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1)
        bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
        assert isinstance(bn, SyncBatchNorm2d)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        part = x.chunk(world)[rank].clone().requires_grad_(True)
        out = bn(part)
        # the same per-element weights as the reference's loss, on this rank's rows
        w = torch.arange(x.numel(), dtype=x.dtype).view_as(x).sin().chunk(world)[rank]
        (out * w).sum().backward()
        grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
        for g in grads:  # what DDP does with parameter gradients (sum here: the loss is a sum over rows)
            dist.all_reduce(g)
        # numpy copies: torch tensors would travel as shared memory that dies with this process
        q.put((rank, *(t.detach().numpy().copy() for t in (out, part.grad, *grads, bn.running_mean,
                                                         bn.running_var))))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_normalise_like_one_process_with_the_global_batch(tmp_path):
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    ref = _reference(x, 1)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    path = str(tmp_path / "store")
    procs = [ctx.Process(target=_worker, args=(r, 2, path, x, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted((q.get(timeout=120) for _ in procs), key=lambda r: r[0])
    got = [(r[0], *(torch.from_numpy(a) for a in r[1:])) for r in got]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    out = torch.cat([g[1] for g in got])
    dx = torch.cat([g[2] for g in got])
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, ref[1], atol=1e-5, rtol=1e-5)
    for g in got:
        torch.testing.assert_close(g[3], ref[2], atol=1e-4, rtol=1e-5)  # weight grad
        torch.testing.assert_close(g[4], ref[3], atol=1e-4, rtol=1e-5)  # bias grad
        torch.testing.assert_close(g[5], ref[4], atol=1e-6, rtol=1e-5)  # running mean (global batch)
        torch.testing.assert_close(g[6], ref[5], atol=1e-6, rtol=1e-5)  # running var, unbiased over 200 values


def test_single_process_and_eval_are_plain_batch_norm():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    synced = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0]
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(synced(x), plain(x))  # no process group: nn.BatchNorm2d
    torch.testing.assert_close(synced.running_mean, plain.running_mean)
    synced.eval(), plain.eval()
    torch.testing.assert_close(synced(x), plain(x))


def test_conversion_keeps_the_parameters_an_optimizer_holds():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    weight = net[1].weight
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    convert_sync_batchnorm(net)
    assert isinstance(net[1], SyncBatchNorm2d) and net[1].weight is weight
    assert any(p is weight for g in opt.param_groups for p in g["params"])
