"""Shared test fixtures.

Real data lives in ``../shared/data`` beside the checkout (developers and CI have it, a user's fresh
clone does not); tests that need it use the ``shared_data`` fixture and skip with a reason when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_data_path(*parts: str) -> Path:
    """Path under ../shared/data, skipping the calling test when it does not exist."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"real data not available: {path} is absent (expected ../shared/data beside the checkout)"
        )
    return path


@pytest.fixture
def shared_data() -> Path:
    return shared_data_path()


@pytest.fixture
def dubai_root() -> Path:
    return shared_data_path("dubai", "Semantic segmentation dataset")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Torch on one thread in every test.

    On a 2-core machine, two busy-waiting OpenMP threads per process slow small CPU steps down by
    10-100× as soon as another process (a DataLoader worker, a DDP peer, a subprocess under test)
    competes for the cores; the tests' sizes are chosen for one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
