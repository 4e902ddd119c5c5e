import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    root = Path(os.environ.get("LAFS_SHARED_DATA", SHARED_DATA))
    if not root.is_dir():
        pytest.skip(f"real face data not found at {root} (set LAFS_SHARED_DATA or place ../shared/data)")
    return root


TINY_RUN = ["model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0", "model.drop_path=0.0",
            "data.source=synthetic", "data.num_identities=8", "data.images_per_identity=4", "data.workers=0",
            "augment.preset=none", "train.batch_size=16", "train.steps=2"]


def train_tiny(out: Path, *overrides: str) -> Path:
    """A 2-step micro training run on synthetic faces (for tests that need a real checkpoint); its last checkpoint."""
    from lafs.checkpoint import checkpoints_in
    from lafs.config import load_config
    from lafs.train.run import train

    torch.manual_seed(0)
    train(load_config(None, TINY_RUN + list(overrides) + [f"out_dir={out}"]), progress=False)
    return checkpoints_in(Path(out) / "checkpoints")[-1]


# fViT-micro (no BatchNorm, no dropout), a checkpoint every step: the CLI runs of the run-safety tests (issue 24)
FAST_RUN = ["model.name=fvit", "model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0", "model.drop_path=0.0",
            "data.source=synthetic", "data.num_identities=8", "data.images_per_identity=4", "data.val_pairs=0",
            "data.workers=0", "augment.preset=none", "train.batch_size=8", "train.log_every=1", "train.ckpt_every=1",
            "train.keep_last=10", "optim.warmup_steps=0", "--quiet"]


def lafs_cli(capsys, command: str, *args: str) -> tuple[int, str, str]:
    """``lafs COMMAND FAST_RUN ARGS`` in this process: (exit code, stdout, stderr). Never a traceback."""
    from lafs.cli import main

    code = main([command, *FAST_RUN, *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def step_losses(out: Path) -> dict[int, float]:
    """step -> loss of a run folder's training records."""
    from lafs.train.logging import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train"}
