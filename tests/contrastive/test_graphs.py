"""The CUDA-graph path of the paper-mode loss (``cuda_graph=True``), the parts that run without a GPU.

Recording and replaying a CUDA graph needs a GPU (tests/contrastive/test_gpu.py). What a graph records
is checked here: the three parts (sampling → gather → tail, with the head parameters passed as tensors)
must give the eager loss exactly, with the same stats and the same gradients.
"""

from __future__ import annotations

import copy
import pickle
import shutil

import pytest
import torch

from ctseg.contrastive import PatchContrastiveLoss
from ctseg.contrastive.graphs import _GradCopy, _Recording, _Replay, signature, split_loss
from ctseg.errors import ConfigError
from tests.contrastive.helpers import CHANNELS, RecordingStandIn, blocky_mask, stage_features


def _inputs(seed: int, B: int = 4, size: int = 64):
    mask = blocky_mask(B, size, size, 6, 6, block=8, seed=seed)
    feats = stage_features(B, size, size, seed)
    probs = torch.randn(B, 6, size, size, generator=torch.Generator().manual_seed(seed)).softmax(1)
    return feats, mask, probs


def _grads(fn: PatchContrastiveLoss, feats, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in fn.parameters()]
    return list(torch.autograd.grad(loss, [*feats, *params]))


@pytest.mark.parametrize(
    ("loss", "sampling", "group_size"),
    [
        ("cl", "random", None),
        ("infonce", "random", 2),
        ("cl", "confidence", 2),
        ("infonce", "confidence", None),
    ],
)
def test_split_parts_equal_the_eager_loss(loss, sampling, group_size):
    """Sampling, eager gather and tail (what the graphs record) = the eager loss: value, stats, gradients."""
    fn = PatchContrastiveLoss(
        CHANNELS, 6, 6, loss=loss, sampling=sampling, group_size=group_size, clip=1.0, clip_mode="scale"
    )
    feats, mask, probs = _inputs(seed=3)
    torch.manual_seed(11)
    ref, ref_stats = fn(feats, mask, probs)
    ref_grads = _grads(fn, feats, ref)
    grids = fn._grids(feats, mask)
    parts = split_loss(fn, grids)
    torch.manual_seed(11)  # the parts draw in the eager order
    out, packed = parts(feats, mask, probs)
    assert ref_stats["active"] == 1.0
    assert out.item() == ref.item()
    assert packed.tolist() == ref_stats.tensor.tolist()
    for got, want in zip(_grads(fn, feats, out), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_split_parts_without_stats_return_the_loss_only():
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, compute_stats=False)
    feats, mask, _ = _inputs(seed=5)
    out, packed = split_loss(fn, fn._grids(feats, mask))(feats, mask, None)
    assert packed is None and out.requires_grad and torch.isfinite(out)


def test_grad_copy_hands_out_fresh_gradients():
    """The tail graph's parameter gradients are buffers that the next replay overwrites: what reaches
    ``AccumulateGrad`` must be a copy, or ``param.grad`` could alias the buffer."""
    w = torch.nn.Parameter(torch.randn(3, 2))
    static_grad = torch.ones(3, 2)

    class Static(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            return static_grad  # like a recorded graph: always the same buffer

    Static.apply(*_GradCopy.apply(w)).backward()
    Static.apply(*_GradCopy.apply(w)).backward()  # gradient accumulation over two micro-batches
    assert w.grad.data_ptr() != static_grad.data_ptr()
    assert torch.equal(w.grad, 2 * torch.ones(3, 2))
    static_grad.fill_(5.0)  # a later replay
    assert torch.equal(w.grad, 2 * torch.ones(3, 2))


class _ReplayedOnCPU:
    """Stands in for a recorded ``torch.cuda.CUDAGraph`` on the CPU: ``replay()`` reruns the work that
    the graph would have recorded, reading and writing the same static buffers."""

    def __init__(self, work) -> None:
        self.replay = work


def _cpu_recording(fn, args) -> _Recording:
    """What :func:`ctseg.contrastive.graphs.graphed` builds, with the graphs replaced by reruns."""
    inputs = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    first = fn(*inputs)
    outputs = tuple(o.detach().clone() for o in first)
    grad_outputs = tuple(torch.empty_like(o) if o.requires_grad else None for o in first)
    grad_inputs = tuple(torch.zeros_like(a) if a.requires_grad else None for a in inputs)

    def forward() -> None:
        with torch.no_grad():
            for static, o in zip(outputs, fn(*inputs), strict=True):
                static.copy_(o)

    def backward() -> None:
        with torch.enable_grad():
            outs = fn(*inputs)
            pairs = [(o, g) for o, g in zip(outs, grad_outputs, strict=True) if g is not None]
            wanted = [a for a in inputs if a.requires_grad]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs]))
        for static in grad_inputs:
            if static is not None:
                static.copy_(next(grads))

    return _Recording(
        _ReplayedOnCPU(forward), _ReplayedOnCPU(backward), inputs, outputs, grad_outputs, grad_inputs
    )


def test_replay_node_routes_values_and_gradients_through_the_static_buffers():
    """``_Replay`` (the autograd node of a recorded function): copies new inputs into the static ones
    (not when the caller passes those very tensors), returns the static outputs with the count output
    non-differentiable, and hands the upstream gradients to the backward graph and its input gradients
    back to autograd (None for inputs that need none)."""

    def fn(x, w, idx):
        y = (x @ w).sin().sum() * 2.0
        return y, (x > 0).sum().to(torch.float32) + idx.sum()

    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(5, 3, generator=g), torch.randn(3, 4, generator=g)
    idx = torch.arange(3)
    rec = _cpu_recording(fn, (x0.requires_grad_(), w0.requires_grad_(), idx))
    for seed in (1, 2):
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        w_static = rec.inputs[1]  # passed as the static buffer itself, as the tail gets the parameters
        loss, count = _Replay.apply(rec, x, w_static, idx)
        ref_loss, ref_count = fn(x.detach().requires_grad_(), w_static.detach().requires_grad_(), idx)
        assert loss.item() == pytest.approx(ref_loss.item()) and count.item() == ref_count.item()
        assert loss.requires_grad and not count.requires_grad
        gx, gw = torch.autograd.grad(3.0 * loss, [x, w_static])
        rx, rw = torch.autograd.grad(3.0 * fn(x, w_static, idx)[0], [x, w_static])
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gw, rw)
        assert rec.grad_outputs[0].item() == 3.0  # the upstream gradient reached the backward graph
        assert torch.equal(rec.inputs[0], x.detach())  # the new input was copied in


def test_cuda_graph_on_cpu_runs_the_eager_loss():
    feats, mask, _ = _inputs(seed=1)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6)
    graphed = PatchContrastiveLoss(CHANNELS, 6, 6, cuda_graph=True)
    graphed.load_state_dict(fn.state_dict())
    torch.manual_seed(0)
    a, sa = fn(feats, mask)
    torch.manual_seed(0)
    b, sb = graphed(feats, mask)
    assert a.item() == b.item() and dict(sa) == dict(sb) and not graphed._graphs.graphs
    assert "cuda_graph=True" in repr(graphed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "reference"}, "needs mode='paper'.*set cuda_graph to false for mode='reference'"),
        ({"gather_negatives": True}, "gather_negatives.*set cuda_graph to false"),
        ({"cuda_graph": "yes"}, "must be true or false"),
    ],
)
def test_cuda_graph_rejects_what_it_cannot_record(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PatchContrastiveLoss(CHANNELS, 6, 6, **{"cuda_graph": True, **kwargs})


def test_a_loss_with_cuda_graph_copies_and_pickles_without_its_graphs():
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, cuda_graph=True)
    fn._graphs.graphs["fake"] = None  # stands for a recorded graph (not picklable, device-bound)
    for clone in (copy.deepcopy(fn), pickle.loads(pickle.dumps(fn))):
        assert clone.cuda_graph and clone._graphs.graphs == {}
        assert clone.state_dict().keys() == fn.state_dict().keys()


def test_a_graph_is_specific_to_shapes_dtypes_and_requires_grad():
    feats, mask, probs = _inputs(seed=2)
    base = signature(feats, mask, None)
    assert signature(feats, mask.clone(), None) == base
    assert signature([f.detach() for f in feats], mask, None) != base
    assert signature([f.double() for f in feats], mask, None) != base
    assert signature(feats, mask[:2], None) != base
    assert signature(feats, mask, probs) != base


def test_graph_cache_records_once_per_shape_and_caps_the_number_of_shapes(monkeypatch):
    from ctseg.contrastive import graphs

    fake = RecordingStandIn()
    monkeypatch.setattr(graphs, "record", fake)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, cuda_graph=True)
    cache = graphs.GraphCache()
    shapes = [(B, size) for B in (1, 2) for size in (32, 64, 96)]  # 6 shapes > MAX_GRAPHS = 4
    with pytest.warns(RuntimeWarning, match="more than 4 input shapes") as caught:
        for B, size in shapes + shapes:  # every shape twice
            feats, mask, _ = _inputs(seed=0, B=B, size=size)
            parts = cache.get(fn, feats, mask, None, fn._grids(feats, mask))
            assert (parts is None) == ((B, size) in shapes[graphs.MAX_GRAPHS :])
    assert fake.calls == graphs.MAX_GRAPHS  # one recording per shape, none beyond the cap
    assert len([w for w in caught if "cuda_graph" in str(w.message)]) == 1  # warned once


def test_a_failed_recording_falls_back_to_the_eager_loss_with_one_warning(monkeypatch):
    from ctseg.contrastive import graphs

    fake = RecordingStandIn(fail=True)
    monkeypatch.setattr(graphs, "record", fake)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, cuda_graph=True)
    feats, mask, _ = _inputs(seed=1)
    with pytest.warns(RuntimeWarning, match=r"recording failed \(RuntimeError: operation not permitted"):
        assert fn._graphs.get(fn, feats, mask, None, fn._grids(feats, mask)) is None
    assert fn._graphs.get(fn, feats, mask, None, fn._grids(feats, mask)) is None  # not retried
    assert fake.calls == 1


@pytest.fixture
def recorded_on_cpu(monkeypatch):
    """Route CPU inputs through the recorded path, with recording mocked (it needs a GPU). The losses
    under test turn the input check off, as it is by default on CUDA (where the path applies)."""
    from ctseg.contrastive import graphs, loss

    fake = RecordingStandIn()
    monkeypatch.setattr(graphs, "record", fake)
    monkeypatch.setattr(loss, "_recordable", lambda mask: True)
    return fake


def test_recorded_path_in_a_training_loop_equals_the_eager_loss(recorded_on_cpu):
    eager = PatchContrastiveLoss(CHANNELS, 6, 6)
    graphed = PatchContrastiveLoss(CHANNELS, 6, 6, cuda_graph=True, check_inputs=False)
    graphed.load_state_dict(eager.state_dict())
    for step in range(3):
        feats, mask, _ = _inputs(seed=step)
        torch.manual_seed(step)
        ref = eager(feats, mask)[0]
        ref_grads = _grads(eager, feats, ref)
        torch.manual_seed(step)
        out = graphed(feats, mask)[0]
        assert out.item() == ref.item()
        for got, want in zip(_grads(graphed, feats, out), ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert recorded_on_cpu.calls == 1 and recorded_on_cpu.replays == 3


def test_a_second_call_before_the_backward_runs_the_eager_loss(recorded_on_cpu):
    """A replay would overwrite what the pending backward reads: the second call runs eagerly, and both
    results keep correct gradients."""
    eager = PatchContrastiveLoss(CHANNELS, 6, 6)
    graphed = PatchContrastiveLoss(CHANNELS, 6, 6, cuda_graph=True, check_inputs=False)
    graphed.load_state_dict(eager.state_dict())
    (fa, ma, _), (fb, mb, _) = _inputs(seed=1), _inputs(seed=2)
    torch.manual_seed(0)
    ref = eager(fa, ma)[0] + eager(fb, mb)[0]
    ref_grads = _grads(eager, [*fa, *fb], ref)
    torch.manual_seed(0)
    first = graphed(fa, ma)[0]
    with pytest.warns(RuntimeWarning, match="before the backward of an earlier result"):
        second = graphed(fb, mb)[0]
    assert recorded_on_cpu.replays == 1  # the second call did not replay
    total = first + second
    assert total.item() == ref.item()
    for got, want in zip(_grads(graphed, [*fa, *fb], total), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    graphed(fa, ma)[0].backward()  # the backward ran: replays again
    assert recorded_on_cpu.replays == 2


def test_a_dropped_result_does_not_block_replays_but_a_kept_one_does(recorded_on_cpu):
    graphed = PatchContrastiveLoss(CHANNELS, 6, 6, cuda_graph=True, check_inputs=False)
    feats, mask, _ = _inputs(seed=4)
    graphed(feats, mask)  # result dropped: its autograd graph is gone
    graphed(feats, mask)[0].backward()
    assert recorded_on_cpu.replays == 2
    kept = graphed(feats, mask)[0]  # kept, e.g. for logging, without detaching and never backpropagated
    with pytest.warns(RuntimeWarning, match="keep detached copies"):
        graphed(feats, mask)
    assert recorded_on_cpu.replays == 3 and kept.requires_grad


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU (inductor) needs a C++ compiler",
)
def test_compiled_split_parts_equal_the_eager_loss():
    """``compile`` with ``cuda_graph``: the parts are compiled before recording. Compiled, they still
    give the eager loss (confidence sampling draws nothing at random), stats and gradients."""
    kw = dict(loss="infonce", sampling="confidence", clip=1.0, clip_mode="scale", check_inputs=False)
    eager = PatchContrastiveLoss(CHANNELS, 6, 6, **kw)
    graphed = PatchContrastiveLoss(CHANNELS, 6, 6, compile=True, cuda_graph=True, **kw)
    graphed.load_state_dict(eager.state_dict())
    feats, mask, probs = _inputs(seed=6, B=2)
    parts = split_loss(graphed, graphed._grids(feats, mask))
    for _ in range(2):  # the second call reuses the compiled code
        ref, ref_stats = eager(feats, mask, probs)
        out, packed = parts(feats, mask, probs)
        assert ref_stats["active"] == 1.0 and out.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(packed, ref_stats.tensor, rtol=1e-4, atol=1e-5)
        for got, want in zip(_grads(graphed, feats, out), _grads(eager, feats, ref), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
