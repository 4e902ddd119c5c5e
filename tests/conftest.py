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
