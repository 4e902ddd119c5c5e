"""Resume checks what it resumes (issue 24): a run configured otherwise (model, head, data, batch size, world size,
seed, torch threads) is refused with the keys listed unless --resume-anyway, which goes on at the same sample of the
epoch; tensors of another shape are named."""

import pytest
import torch
from conftest import FAST_RUN, lafs_cli, step_losses

from lafs.checkpoint import checkpoints_in, data_position, read_training_checkpoint, resume_mismatches, resume_position
from lafs.config import load_config, to_yaml
from lafs.data.sampler import EpochBatchSampler

RUN = FAST_RUN


@pytest.mark.parametrize(("change", "listed"), [
    ("train.batch_size=16", "train.batch_size: 8 in the checkpoint, 16 now"),
    ("train.seed=1", "train.seed: 0 in the checkpoint, 1 now"),
    ("data.num_identities=6", "data.num_identities: 8 in the checkpoint, 6 now"),
])
def test_resume_with_another_config_is_refused_listing_the_keys(tmp_path, capsys, change, listed):
    out = tmp_path / "run"
    assert lafs_cli(capsys, "train", "train.steps=2", "--out", str(out))[0] == 0
    config_before = (out / "config.yaml").read_text()
    code, _, err = lafs_cli(capsys, "train", "train.steps=3", change, "--out", str(out), "--resume")
    assert code == 2
    assert err.startswith("lafs: error: ") and "step_0000002.pt was written by a run configured otherwise" in err
    assert listed in err and "--resume-anyway" in err
    assert sorted(step_losses(out)) == [1, 2]  # nothing trained, nothing rewritten
    assert (out / "config.yaml").read_text() == config_before


def test_resume_anyway_continues_with_the_keys_listed(tmp_path, capsys):
    out = tmp_path / "run"
    assert lafs_cli(capsys, "train", "train.steps=3", "--out", str(out))[0] == 0
    code, stdout, _ = lafs_cli(capsys, "train", "train.steps=5", "train.batch_size=16", "train.seed=3", "--out",
                               str(out), "--resume-anyway")
    assert code == 0
    assert "--resume-anyway: train.batch_size: 8 in the checkpoint, 16 now" in stdout
    assert "--resume-anyway: train.seed: 0 in the checkpoint, 3 now" in stdout
    # 3 batches of 8 of epoch 0 (4 batches of 8 per epoch) = 24 samples: batch 1 of 16 holds the next unseen one
    assert ("24 samples of epoch 0 seen in global batches of 8; going on at batch 1 of 16 (8 samples seen again)"
            in stdout)
    assert "resumed from" in stdout and "at step 3" in stdout
    assert sorted(step_losses(out)) == [1, 2, 3, 4, 5]
    state = read_training_checkpoint(checkpoints_in(out / "checkpoints")[-1])
    assert state["step"] == 5 and state["data_position"] == {"epoch": 1, "epoch_samples": 16, "global_batch": 16}


def test_changed_world_size_and_threads_are_listed():
    cfg = load_config(None, [a for a in RUN if "=" in a])
    state = {"config": to_yaml(cfg), "world_size": 2, "threads": 4}
    assert resume_mismatches(state, to_yaml(cfg), 2, 4) == []
    assert resume_mismatches(state, to_yaml(cfg), 1, 4) == ["world size: 2 processes in the checkpoint, 1 now"]
    assert resume_mismatches(state, to_yaml(cfg), 2, 1) == [
        "torch threads: 4 in the checkpoint, 1 now (CPU losses depend on the count; OMP_NUM_THREADS sets it)"]
    assert resume_mismatches(state, to_yaml(cfg), 2, None) == []  # on a GPU the count is not compared
    # what is measured or how data is loaded may change
    other = load_config(None, [a for a in RUN if "=" in a] + ["data.workers=2", "data.val_pairs=10", "train.steps=99",
                                                            "optim.lr=1.0"])
    assert resume_mismatches(state, to_yaml(other), 2, 4) == []


def test_resume_with_another_thread_count_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert lafs_cli(capsys, "train", "train.steps=2", "--out", str(out))[0] == 0
    assert read_training_checkpoint(checkpoints_in(out / "checkpoints")[-1])["threads"] == torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        code, _, err = lafs_cli(capsys, "train", "train.steps=3", "--out", str(out), "--resume")
    finally:
        torch.set_num_threads(before)
    assert code == 2 and f"torch threads: {before} in the checkpoint, {before + 1} now" in err


def test_data_position_is_kept_in_global_samples_across_world_sizes():
    """A 2-process run (2 x 8) killed after 5 micro-batches, resumed on one process with batch 16 and with batch 8:
    both go on with exactly the samples the 2-process run would have drawn next."""
    n = 72  # 4 global batches of 16 per epoch (8 left over, dropped), 9 of 8
    two = [EpochBatchSampler(n, 8, r, 2, seed=5) for r in (0, 1)]
    state = {"micro_batches": 5, "data_position": data_position(5, two[0].batches_per_epoch, 16)}
    assert state["data_position"] == {"epoch": 1, "epoch_samples": 16, "global_batch": 16}

    def drawn(samplers, micro_batches, count):
        """the next ``count`` global batches' samples, rank after rank, from ``micro_batches`` on"""
        epoch, batch = divmod(micro_batches, samplers[0].batches_per_epoch)
        for s in samplers:
            s.set_position(epoch, batch)
        per_rank = [list(iter(s))[:count] for s in samplers]
        return [i for b in range(count) for rank in per_rank for i in rank[b]]

    want = drawn(two, 5, 2)  # what the 2-process run draws next: batches 1 and 2 of epoch 1
    mb, note = resume_position(state, n, 16)
    assert mb == 5 and note is None  # the same global batch (1 x 16 = 2 x 8): the same position
    assert drawn([EpochBatchSampler(n, 16, 0, 1, seed=5)], mb, 2) == want
    mb, note = resume_position(state, n, 8)
    assert mb == 9 + 2 and "going on at batch 2 of 8" in note  # 16 samples = 2 batches of 8 into epoch 1
    assert drawn([EpochBatchSampler(n, 8, 0, 1, seed=5)], mb, 4) == want
    # an older checkpoint without the entry: the position from its stored batch size and world size
    cfg = load_config(None, ["train.batch_size=8"])
    assert resume_position({"micro_batches": 5, "world_size": 2, "config": to_yaml(cfg)}, n, 8)[0] == 11


def test_tensors_of_another_shape_are_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert lafs_cli(capsys, "train", "train.steps=2", "--out", str(out))[0] == 0
    code, _, err = lafs_cli(capsys, "train", "train.steps=3", "data.num_identities=6", "--out", str(out),
                            "--resume-anyway")
    assert code == 2
    assert "another shape than this config's model: head.weight: (8, 96) in the checkpoint, (6, 96) now" in err
