"""Engine tests run torch on one thread.

On a shared 2-core machine, two busy-waiting OpenMP threads per process slow small CPU steps down by
10-100× as soon as other processes compete for the cores (measured: 0.11 s vs 2-12 s per tiny training
step); one thread is also what the numbers of these tests are sized for.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
