"""Finite weights only (issue 24): a step whose update made a weight non-finite is undone (weights, buffers and
optimizer state as before it) and never saved; too many skipped steps, in a row or in all, stop the run with a report
naming the last checkpoint, which holds finite weights."""

import copy

import pytest
import torch
from conftest import FAST_RUN

from lafs.checkpoint import checkpoints_in, read_training_checkpoint
from lafs.config import load_config
from lafs.train.distributed import DistEnv
from lafs.train.logging import read_metrics
from lafs.train.loop import NonFiniteLossError, Trainer
from lafs.train.run import build_task, build_train_set

RUN = FAST_RUN


class NaNGradAt(torch.nn.Module):
    """Wraps a task; after the backward of the given optimizer steps (0-based) one gradient is NaN: the loss is
    finite, the update is not."""

    def __init__(self, task, bad_steps):
        super().__init__()
        self.task, self.bad_steps, self.calls = task, set(bad_steps), 0
        self.trainer, self.seen = None, {}  # calls -> (weights, optimizer state) as the step starts

    def set_epoch(self, epoch):
        if self.trainer is not None:
            self.seen[self.calls] = ({k: v.clone() for k, v in self.state_dict().items()},
                                     copy.deepcopy(self.trainer.optimizer.state_dict()["state"]))
        self.task.set_epoch(epoch)

    def embed(self, x):
        return self.task.embed(x)

    def forward(self, images, labels):
        return self.task(images, labels)

    def after_backward(self, epoch):
        if self.calls in self.bad_steps:
            next(p for p in self.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        self.calls += 1


def nan_trainer(tmp_path, bad_steps, *overrides):
    cfg = load_config(None, [a for a in RUN if "=" in a] + [f"out_dir={tmp_path}", *overrides])
    ds = build_train_set(cfg)
    task = build_task(cfg, ds.num_identities, DistEnv(), log=lambda *_: None)
    trainer = Trainer(cfg, NaNGradAt(task, bad_steps), ds, DistEnv(), progress=False)
    trainer.task.trainer = trainer
    return trainer


def test_a_non_finite_update_is_undone_and_never_saved(tmp_path):
    trainer = nan_trainer(tmp_path, {2}, "train.steps=4")
    result = trainer.run()
    assert result.nonfinite_steps == [3] and result.step == 4
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert records[3]["skipped"] == 1 and records[3]["nonfinite"] == "update"
    saved = {p.name: read_training_checkpoint(p) for p in checkpoints_in(tmp_path / "checkpoints")}
    assert list(saved) == ["step_0000001.pt", "step_0000002.pt", "step_0000004.pt"]  # each reads: finite weights
    # step 3 was undone: step 4 started from the weights and optimizer state saved after step 2, bit for bit
    two = saved["step_0000002.pt"]
    weights, opt = trainer.task.seen[3]
    assert set(weights) == set(two["model"]) and all(torch.equal(two["model"][k], v) for k, v in weights.items())
    assert set(opt) == set(two["optimizer"]["state"])
    for i, entries in opt.items():
        assert all(torch.equal(v, two["optimizer"]["state"][i][k]) for k, v in entries.items())
    assert not torch.equal(two["model"]["task.head.weight"], saved["step_0000004.pt"]["model"]["task.head.weight"])


def test_too_many_skipped_steps_in_all_stop_the_run_with_a_report(tmp_path):
    """Never 3 in a row, but every third step: 4 of 12 is more than 0.2 of the steps (and more than 3)."""
    trainer = nan_trainer(tmp_path, set(range(2, 100, 3)), "train.steps=30", "train.max_nonfinite=3",
                          "train.max_skipped_fraction=0.2")
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()
    message = str(info.value)
    assert message.startswith("4 of 12 steps skipped for non-finite losses or updates, more than "
                              "train.max_skipped_fraction=0.2 of them (latest: steps [3, 6, 9, 12])")
    last = tmp_path / "checkpoints" / "step_0000011.pt"
    assert f"the last checkpoint, {last}, holds finite weights" in message
    assert read_training_checkpoint(last)["step"] == 11  # it does: a non-finite one would not read


def test_consecutive_non_finite_updates_stop_naming_no_checkpoint_when_none_was_written(tmp_path):
    trainer = nan_trainer(tmp_path, set(range(100)), "train.steps=10", "train.max_nonfinite=2")
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive non-finite updates \(steps \[1, 2\]\); stopped.*"
                       "no checkpoint of this run was written"):
        trainer.run()
    assert checkpoints_in(tmp_path / "checkpoints") == []


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
    lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
], ids=["sgd-momentum", "adamw-foreach", "adamw-fused"])
def test_the_guard_restores_weights_buffers_and_optimizer_state(make):
    from lafs.train.guard import StepGuard

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = make(net.parameters())
    guard = StepGuard(net, opt)

    def step(bad: bool):
        guard.snapshot()
        opt.zero_grad()
        net(torch.randn(8, 4)).square().mean().backward()  # moves the BatchNorm statistics too
        if bad:
            net[0].weight.grad[0, 0] = float("nan")
        opt.step()
        return guard.nonfinite()

    assert step(bad=True) and not opt.state == {}  # the first step creates the state ...
    guard.restore()
    assert opt.state == {} and not guard.nonfinite()  # ... and its undoing removes it
    assert not step(bad=False)
    before = copy.deepcopy((net.state_dict(), opt.state_dict()["state"]))
    assert step(bad=True)
    guard.restore()
    weights, state = before
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    now = opt.state_dict()["state"]
    assert all(torch.equal(v, now[i][k]) if torch.is_tensor(v) else v == now[i][k]
               for i, entries in state.items() for k, v in entries.items())
    assert not step(bad=False)  # training goes on from there
