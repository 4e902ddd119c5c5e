"""The training loops on a CUDA device (skipped without one; CI has none).

A DINO pretraining on CUDA once stopped at its first logged step: the task's ``teacher_temp`` scalar sits on the CPU
and the loop's one-sync reduction of the logged scalars stacked it with CUDA tensors (it now moves each scalar to the
loss's device). These runs take each loop
through a few steps and a validation on the GPU and check what they log.
"""

from __future__ import annotations

import math

import pytest
import torch

from lafs.checkpoint import checkpoints_in
from lafs.cli import main
from lafs.train.logging import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SYNTH = ["data.source=synthetic", "data.num_identities=8", "data.images_per_identity=8", "data.val_pairs=40",
         "data.workers=0", "train.batch_size=16", "train.log_every=1", "train.device=cuda", "train.amp=bf16"]
PART = ["model.name=part_fvit", "model.size=micro", "model.drop_path=0.0"]


def _train_records(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.parametrize("method,model", [("dino", ["model.name=iresnet", "model.size=micro"]),
                                          ("lafs", PART)])
def test_pretraining_on_cuda_logs_its_scalars(tmp_path, method, model):
    landmarks = []
    if method == "lafs":  # LAFS's landmark CNN comes from a supervised Part fViT (stage 1)
        stage1 = tmp_path / "stage1"
        assert main(["train", *SYNTH, *PART, "train.steps=2", "--out", str(stage1), "--quiet"]) == 0
        landmarks = [f"ssl.landmark_init={checkpoints_in(stage1 / 'checkpoints')[-1]}"]
    run = tmp_path / method
    argv = ["pretrain", *SYNTH, *model, f"ssl.method={method}", "ssl.out_dim=256", "ssl.hidden_dim=128",
            "ssl.bottleneck_dim=32", "ssl.num_local=0" if method == "dino" else "ssl.num_local=2",
            "ssl.koleo_weight=0.1", "ssl.centering=sinkhorn", "ssl.freeze_last_layer=0", "train.steps=3",
            "train.val_every=3", *landmarks, "--out", str(run), "--quiet"]
    assert main(argv) == 0
    rec = _train_records(run)
    assert [r["step"] for r in rec] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["teacher_temp"] > 0 and r["teacher_entropy"] > 0 for r in rec)
    val = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"]
    assert val and 0.0 <= val[-1]["synthetic_val_accuracy"] <= 1.0


def test_finetune_option_c_on_cuda_logs_beta(tmp_path):
    stage1 = tmp_path / "stage1"
    assert main(["train", *SYNTH, *PART, "train.steps=2", "--out", str(stage1), "--quiet"]) == 0
    ckpt = checkpoints_in(stage1 / "checkpoints")[-1]
    ft = tmp_path / "ft"
    assert main(["finetune", *SYNTH, *PART, "train.steps=2", "finetune.landmark=c", "--init", str(ckpt),
                 "--landmark-init", str(ckpt), "--out", str(ft), "--quiet"]) == 0
    rec = _train_records(ft)
    assert rec[0]["beta"] == 1000.0 and math.isfinite(rec[0]["landmark_loss"])
