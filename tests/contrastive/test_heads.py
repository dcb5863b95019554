"""Projection heads: one head per stage, and all stages' heads as one batched projection."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from ctseg.contrastive.heads import (
    ProjectionHead,
    _UnitRows,
    build_heads,
    project_rows,
    project_stages,
    project_taken,
    split_rows,
    take_rows,
    unit_rows,
)

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


# --------------------------------------------------------------------------- take_rows: late gradient
def _index(feature: torch.Tensor, image: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    return feature.flatten(2)[image, :, patch]  # the plain index take_rows must equal


def _rows_case(seed: int, dtype=torch.float32, channels_last: bool = False):
    g = torch.Generator().manual_seed(seed)
    leaf = torch.randn(3, 6, 5, 4, generator=g).to(dtype)
    if channels_last:
        leaf = leaf.to(memory_format=torch.channels_last)
    image = torch.randint(0, 3, (4, 7), generator=g)
    patch = torch.randint(0, 20, (4, 7), generator=g)
    patch[0, :3] = patch[1, :3]  # the same patch in several rows: the gradients add up
    image[0, :3] = image[1, :3]
    weights = torch.randn(4, 7, 6, generator=g).to(dtype)
    return leaf.requires_grad_(True), image, patch, weights


@pytest.mark.parametrize(
    ("other_consumer", "dtype", "channels_last"),
    [
        (True, torch.float32, False),
        (False, torch.float32, False),
        (True, torch.bfloat16, False),
        (True, torch.float32, True),
    ],
)
def test_rows_gradient_equals_the_plain_index(other_consumer, dtype, channels_last):
    """With another consumer of the map (a decoder) or without, duplicate rows, bf16, channels-last."""
    grads = []
    for take in (_index, take_rows):
        leaf, image, patch, weights = _rows_case(0, dtype, channels_last)
        feature = leaf * 2  # a non-leaf map, like a backbone's output
        loss = (take(feature, image, patch) * weights).sum()
        if other_consumer:
            loss = loss + (feature.float() ** 2).sum()
        loss.backward()
        grads.append(leaf.grad)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(grads[1], grads[0], **tol)


def test_rows_gradient_of_a_leaf_map_through_autograd_grad_and_a_retained_graph():
    leaf, image, patch, weights = _rows_case(1)
    (want,) = torch.autograd.grad((_index(leaf, image, patch) * weights).sum(), leaf)
    loss = (take_rows(leaf, image, patch) * weights).sum()
    (got,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    torch.testing.assert_close(got, want)
    loss.backward(retain_graph=True)  # a second pass over the same graph adds the rows again
    loss.backward()
    torch.testing.assert_close(leaf.grad, 2 * want)


def test_repeated_gathers_from_a_kept_map_share_one_hook():
    """A loss called again and again on the same tensor (a benchmark, cached features) must not pile
    up hooks on it; calls that are never backpropagated add nothing, two losses add both."""
    leaf, image, patch, weights = _rows_case(5)
    for _ in range(20):
        take_rows(leaf, image, patch)
    a = (take_rows(leaf, image, patch) * weights).sum()
    b = (take_rows(leaf, image.flip(0), patch.flip(0)) * weights).sum()
    (a + 2 * b).backward()
    assert len(leaf._backward_hooks) == 1  # private, but the only way to count a leaf's hooks
    want_a = torch.autograd.grad((_index(leaf, image, patch) * weights).sum(), leaf)[0]
    want_b = torch.autograd.grad((_index(leaf, image.flip(0), patch.flip(0)) * weights).sum(), leaf)[0]
    torch.testing.assert_close(leaf.grad, want_a + 2 * want_b)


def test_rows_left_out_of_the_backward_pass_add_nothing():
    leaf, image, patch, _ = _rows_case(2)
    feature = leaf * 1
    take_rows(feature, image, patch)  # computed, never used in the loss
    (feature**2).sum().backward()
    torch.testing.assert_close(leaf.grad, 2 * leaf.detach())


def test_rows_second_derivatives_equal_the_plain_index():
    """With ``create_graph`` the rows' gradient, added in the hook, is itself differentiated."""
    results = []
    for take in (_index, take_rows):
        leaf, image, patch, weights = _rows_case(3, torch.float64)
        feature = leaf * 2
        loss = (take(feature, image, patch) ** 2 * weights).sum() + (feature**3).sum()
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        (h,) = torch.autograd.grad((g**2).sum(), leaf)
        results.append((g.detach(), h))
    torch.testing.assert_close(results[1], results[0])


class _Probe(torch.autograd.Function):
    """Identity whose backward is marked in the profiler: when the decoder's gradient is computed."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        with record_function("probe"):
            return grad * 1


def _live_bytes_at_probe(take, gathers: int = 1) -> int:
    """CPU tensor bytes allocated between the start of the backward pass and the decoder's gradient."""
    g = torch.Generator().manual_seed(4)
    big = torch.randn(8, 64, 32, 32, requires_grad=True)  # 2 MiB map
    image, patch = torch.randint(0, 8, (5, 30), generator=g), torch.randint(0, 1000, (5, 30), generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        feature = big * 1
        decoder = _Probe.apply(feature).sum()  # created first: its backward runs after the loss's
        loss = decoder + sum(take(feature, image, patch + k).sum() for k in range(gathers))
        with record_function("backward"):
            loss.backward()
    events = prof.profiler.kineto_results.events()
    start = next(e.start_ns() for e in events if e.name() == "backward")
    probe = next(e.start_ns() for e in events if e.name() == "probe")
    return sum(e.nbytes() for e in events if e.name() == "[memory]" and start <= e.start_ns() < probe)


@pytest.mark.parametrize("gathers", [1, 3])
def test_rows_gradient_holds_no_map_sized_buffer_until_the_decoder_gradient_arrives(gathers):
    """What the late gradient is for: with the plain index a zero map-sized gradient is allocated at
    the start of the backward pass and held while the decoder's backward runs (the step's peak).
    Several gathers from one map (the reference mode, several losses) must not sum zeros into one."""
    map_bytes = 8 * 64 * 32 * 32 * 4
    assert _live_bytes_at_probe(_index, gathers) > map_bytes * 3 // 4  # the control: it is seen
    assert _live_bytes_at_probe(take_rows, gathers) < map_bytes // 8


@pytest.mark.parametrize("whole_map", [False, True])
def test_unnormalized_rows_normalised_later_equal_the_head(whole_map):
    """``project_rows(normalized=False)`` leaves the L2 normalisation to the caller (the reference mode
    normalises all stages' rows at once); other heads normalise anyway."""
    torch.manual_seed(0)
    head = ProjectionHead(16, 8)
    feature = torch.randn(2, 16, 4, 4)
    rows = torch.arange(32) if whole_map else torch.tensor([3, 17, 5, 30])
    raw = project_rows(head, feature, rows, normalized=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(rows)))
    torch.testing.assert_close(unit_rows(raw), project_rows(head, feature, rows), rtol=1e-6, atol=1e-6)

    class Custom(nn.Module):
        def forward(self, x):
            return unit_rows(x[:, :8])

    custom = project_rows(Custom(), feature, rows, normalized=False)
    torch.testing.assert_close(custom, project_rows(Custom(), feature, rows))


@pytest.mark.parametrize("normalized", [True, False])
def test_taken_rows_equal_the_flat_rows_and_none_is_the_whole_map(normalized):
    """``project_taken`` (image and patch split on the host, as the reference plan sends them) equals
    ``project_rows`` on the flat rows; ``None`` projects every row of the map in row-major order."""
    torch.manual_seed(0)
    head = ProjectionHead(16, 8)
    feature = torch.randn(3, 16, 4, 5, requires_grad=True)
    rows = torch.tensor([59, 3, 17, 40, 22])
    taken = torch.stack(split_rows(rows, 20))
    expected = project_rows(head, feature, rows, normalized=normalized)
    torch.testing.assert_close(project_taken(head, feature, taken, normalized=normalized), expected)
    whole = project_taken(head, feature, None, normalized=normalized)
    torch.testing.assert_close(whole, project_rows(head, feature, torch.arange(60), normalized=normalized))
    (whole.sum() + project_taken(head, feature, taken).sum()).backward()
    assert feature.grad is not None and feature.grad.abs().sum() > 0


def test_unit_rows_equal_f_normalize_in_values_gradients_and_second_derivatives():
    """The hand-written backward of ``unit_rows`` equals autograd's through ``F.normalize``, also for a
    zero row (norm below eps: the projection term vanishes); it reads the outputs only and stays
    exact to second order (gradcheck and gradgradcheck, both outputs: the rows and their norms)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 40, 16, generator=g)
    z[0, 0] = 0.0
    weights = torch.randn(3, 40, 16, generator=g)
    ours, plain = z.clone().requires_grad_(), z.clone().requires_grad_()
    y = unit_rows(ours)
    assert torch.equal(y, nn.functional.normalize(z, dim=-1))
    (y * weights).sum().backward()
    (nn.functional.normalize(plain, dim=-1) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, plain.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.grad[0, 0], weights[0, 0] / 1e-12)
    z64 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_UnitRows.apply, (z64,))
    assert torch.autograd.gradgradcheck(_UnitRows.apply, (z64,))
