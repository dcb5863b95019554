"""Projection heads: one head per stage, and all stages' heads as one batched projection."""

from __future__ import annotations

import torch
from torch import nn

from ctseg.contrastive.heads import ProjectionHead, build_heads, project_stages, unit_rows

CHANNELS = (16, 32, 64, 128)


def _rows(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, 3, 10, c, generator=g, dtype=torch.float64).float().requires_grad_(True)
        for c in CHANNELS
    ]


def _grads(outputs: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, outputs.numel()).reshape(outputs.shape)
    return list(torch.autograd.grad((outputs * weights).sum(), inputs))


def test_batched_projection_equals_one_call_per_head():
    torch.manual_seed(0)
    heads = build_heads(CHANNELS, range(4), dim=24)
    rows = _rows(1)
    batched = project_stages(list(heads), rows)
    single = torch.stack([h(r) for h, r in zip(heads, rows, strict=True)])
    assert batched.shape == (4, 2, 3, 10, 24) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(4, 2, 3, 10))
    params = list(heads.parameters())
    for got, want in zip(
        _grads(batched, rows + params), _grads(single, rows + params), strict=True
    ):  # rows and every head parameter (fc1, fc2, biases) get the same gradient
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_batched_projection_uses_the_given_parameters():
    """The recorded loss differentiates with respect to tensors it passes in, not the modules' own."""
    torch.manual_seed(0)
    heads = build_heads(CHANNELS, range(4), dim=8)
    rows = [r.detach() for r in _rows(2)]
    given = [
        {n: p.detach().clone().mul_(2).requires_grad_(True) for n, p in h.named_parameters()} for h in heads
    ]
    out = project_stages(list(heads), rows, given)
    want = torch.stack(
        [torch.func.functional_call(h, p, (r,)) for h, p, r in zip(heads, given, rows, strict=True)]
    )
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is None for p in heads.parameters())
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for p in given for t in p.values())


class _OtherHead(nn.Module):
    """A user's own head (not a ProjectionHead): projected one call at a time."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unit_rows(torch.tanh(self.fc(x)))


def test_heads_that_differ_in_more_than_their_input_width_are_projected_one_by_one():
    torch.manual_seed(0)
    rows = [r.detach() for r in _rows(3)]
    mixed = [ProjectionHead(16, 8), _OtherHead(32), ProjectionHead(64, 8), ProjectionHead(128, 8, hidden=4)]
    out = project_stages(mixed, rows)
    torch.testing.assert_close(out, torch.stack([h(r) for h, r in zip(mixed, rows, strict=True)]))
