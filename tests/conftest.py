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
