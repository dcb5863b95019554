"""Device constants of the loss: built once per (key, device), normal tensors, never shared by keys."""

from __future__ import annotations

import torch

from ctseg.contrastive import constants
from ctseg.contrastive.constants import device_constant
from ctseg.contrastive.losses import keep_counts


def test_built_once_per_key_and_device():
    constants.clear()
    calls = []

    def build():
        calls.append(1)
        return torch.arange(3)

    cpu = torch.device("cpu")
    first = device_constant("test-arange", cpu, build)
    assert device_constant("test-arange", cpu, build) is first and len(calls) == 1
    other = device_constant(("test-arange", 2), cpu, build)
    assert other is not first and len(calls) == 2
    constants.clear()
    assert device_constant("test-arange", cpu, build) is not first and len(calls) == 3


def test_first_built_under_inference_mode_is_still_usable_by_autograd():
    """A constant first asked for in inference mode (e.g. a validation step) is a normal tensor: a
    later training call may use it in operators autograd records."""
    constants.clear()
    with torch.inference_mode():
        table = device_constant("test-table", torch.device("cpu"), lambda: torch.linspace(0, 1, 4))
    assert not table.is_inference()
    x = torch.ones(4, requires_grad=True)
    (x * table).sum().backward()
    assert torch.equal(x.grad, table)


def test_keep_counts_equal_the_formula_for_every_count():
    """The table lookup equals ``floor(n · take_top)``, at least 1 when a pair exists, for all n."""
    for take_top in (0.5, 0.3, 1.0, 0.01, 0.7):
        for width in (1, 7, 256):
            n = torch.arange(width + 1)
            expected = [0] + [max(1, int(k * take_top // 1)) for k in range(1, width + 1)]
            assert keep_counts(n, take_top, width).tolist() == expected
