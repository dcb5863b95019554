"""CUDA checks (run on a GPU machine; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from ctseg.contrastive import PatchContrastiveLoss
from tests.contrastive.helpers import CHANNELS, blocky_mask, seeded_calls, stage_features
from tests.contrastive.oracle import oracle_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cuda_inputs(B=4, size=128, seed=0):
    mask = blocky_mask(B, size, size, 6, 6, block=16, seed=seed)
    feats = stage_features(B, size, size, seed, requires_grad=False)
    return [f.cuda().requires_grad_() for f in feats], mask.cuda(), feats, mask


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_paper_mode_has_no_host_sync(loss):
    """With stats and input checks off, forward + backward issue no synchronising CUDA call."""
    feats, mask, _, _ = _cuda_inputs()
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, compute_stats=False, check_inputs=False).cuda()
    fn(feats, mask)[0].backward()  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = fn(feats, mask)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats == {} and torch.isfinite(out).item()


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_default_paper_mode_has_no_host_sync_until_stats_are_read(loss):
    """Defaults (stats on, auto input check): no sync in forward + backward; the stats fetch once later."""
    feats, mask, _, _ = _cuda_inputs(seed=4)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, clip=None).cuda()
    fn(feats, mask)[0].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = fn(feats, mask)
        out.backward()
        acc = stats.tensor * 2  # accumulating on the device needs no sync either
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not stats.fetched and stats["active"] == 1.0 and stats.fetched
    assert stats["loss"] == pytest.approx(out.item()) and acc.device.type == "cuda"


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_reference_mode_parity_on_cuda(loss):
    """CUDA features, CPU RNG draws: equals the CPU loop oracle."""
    feats, mask, feats_cpu, mask_cpu = _cuda_inputs(seed=3)
    torch.manual_seed(0)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, mode="reference", clip=None)
    torch.manual_seed(5)
    ref = oracle_loss(fn.heads, feats_cpu, mask_cpu, loss=loss, ignore_index=6)
    fn = fn.cuda()
    torch.manual_seed(5)
    ours, _ = fn(feats, mask)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-4)  # TF32-free fp32 GEMMs differ slightly


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_reference_mode_prefetch_on_cuda_same_values_and_deterministic(loss):
    """A prefetch (the plan made on the planner thread from counts copied to pinned memory) gives the
    value of the plain call exactly, and its gradients (up to the order in which CUDA accumulates the
    gradient of rows read by several pairs); two calls with one seed agree the same way; the global
    CPU generator ends where the plain call leaves it."""
    feats, mask, _, _ = _cuda_inputs(seed=6)
    torch.manual_seed(0)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, mode="reference", clip=None).cuda()
    fn(feats, mask)  # learns the grids
    runs = []
    for prefetch in (False, True, True):
        torch.manual_seed(9)
        if prefetch:
            fn.prefetch(mask)
            assert fn._prefetched is not None
        out, _ = fn(feats, mask)
        grads = torch.autograd.grad(out, feats + list(fn.heads.parameters()), allow_unused=True)
        runs.append([out, torch.get_rng_state(), *grads])
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])
        for a, b in zip(runs[0][2:], other[2:], strict=True):
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_paper_mode_cuda_deterministic_and_bf16(loss):
    feats, mask, _, _ = _cuda_inputs(seed=1)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, clip=None).cuda()
    torch.manual_seed(2)
    a, sa = fn(feats, mask)
    torch.manual_seed(2)
    b, sb = fn(feats, mask)
    assert a.item() == b.item() and sa == sb and sa["active"] == 1.0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        c, _ = fn([f.bfloat16() for f in feats], mask)
    assert c.dtype == torch.float32 and torch.isfinite(c)
    c.backward()


@pytest.mark.timeout(480)  # torch.compile of the loss: minutes on a GPU machine
def test_compiled_loss_equals_eager_on_cuda_without_sync():
    """``compile=True`` on CUDA gives the eager values and gradients (confidence sampling draws nothing
    at random); after compiling, a call issues no synchronising operation."""
    feats, mask, _, _ = _cuda_inputs(seed=6)
    probs = torch.randn(mask.shape[0], 6, *mask.shape[1:], device="cuda").softmax(1)
    kw = dict(clip=1.0, clip_mode="scale", sampling="confidence")
    eager = PatchContrastiveLoss(CHANNELS, 6, 6, **kw).cuda()
    compiled = PatchContrastiveLoss(CHANNELS, 6, 6, compile=True, **kw).cuda()
    compiled.load_state_dict(eager.state_dict())
    ref, ref_stats = eager(feats, mask, probs)
    ref.backward()
    ref_grads = [f.grad.clone() for f in feats]
    for f in feats:
        f.grad = None
    compiled(feats, mask, probs)[0].backward()  # compiles
    torch.cuda.synchronize()
    for f in feats:
        f.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = compiled(feats, mask, probs)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.item() == pytest.approx(ref.item(), rel=1e-4)
    assert stats["active"] == ref_stats["active"] == 1.0
    for f, g in zip(feats, ref_grads, strict=True):
        torch.testing.assert_close(f.grad, g, rtol=1e-3, atol=1e-6)


def _graph_pair(**kw) -> tuple[PatchContrastiveLoss, PatchContrastiveLoss]:
    eager = PatchContrastiveLoss(CHANNELS, 6, 6, **kw).cuda()
    graphed = PatchContrastiveLoss(CHANNELS, 6, 6, cuda_graph=True, **kw).cuda()
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


def _probs(mask: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(mask.shape[0], 6, *mask.shape[1:], device="cuda", generator=g).softmax(1)


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_cuda_graph_loss_equals_eager_over_steps(loss):
    """``cuda_graph=True``, confidence sampling (no random draws): recorded at the first call, then
    replayed on new inputs, it gives the eager values, stats and feature gradients at every call, and
    the head gradients accumulate over the calls like the eager ones (no aliasing of graph buffers)."""
    kw = dict(loss=loss, sampling="confidence", clip=1.0, clip_mode="scale", group_size=2)
    eager, graphed = _graph_pair(**kw)
    for seed in range(3):
        feats, mask, _, _ = _cuda_inputs(seed=10 + seed)
        probs = _probs(mask, seed)
        ref, ref_stats = eager(feats, mask, probs)
        ref.backward()
        ref_grads = [f.grad.clone() for f in feats]
        for f in feats:
            f.grad = None
        out, stats = graphed(feats, mask, probs)
        out.backward()
        assert ref_stats["active"] == 1.0
        assert out.item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(stats.tensor, ref_stats.tensor, rtol=1e-5, atol=1e-6)
        for f, g in zip(feats, ref_grads, strict=True):
            torch.testing.assert_close(f.grad, g, rtol=1e-4, atol=1e-7)
    for (name, pe), pg in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(pg.grad, pe.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert len(graphed._graphs.graphs) == 1 and None not in graphed._graphs.graphs.values()


def test_cuda_graph_replays_draw_afresh_and_follow_the_seed():
    feats, mask, _, _ = _cuda_inputs(seed=7)
    _, graphed = _graph_pair(loss="cl", clip=None)
    graphed(feats, mask)[0].backward()  # records
    a, b = seeded_calls(graphed, feats, mask, seed=3, n=2)
    assert a == b and a[0] != a[1]  # reproducible from the seed; every replay samples anew
    assert len(graphed._graphs.graphs) == 1


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_cuda_graph_replay_has_no_host_sync(loss):
    feats, mask, _, _ = _cuda_inputs(seed=8)
    _, graphed = _graph_pair(loss=loss)
    graphed(feats, mask)[0].backward()  # records
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = graphed(feats, mask)
        out.backward()
        acc = stats.tensor * 2
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats["active"] == 1.0 and acc.device.type == "cuda"


def test_cuda_graph_under_bf16_autocast():
    """Recorded inside an autocast region (as in bf16-mixed training): works, fp32 loss, gradients."""
    feats, mask, _, _ = _cuda_inputs(seed=9)
    _, graphed = _graph_pair(loss="infonce")
    for _ in range(2):  # record, then replay
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = graphed([f.bfloat16() for f in feats], mask)
        assert out.dtype == torch.float32 and torch.isfinite(out)
        out.backward()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in feats)
    assert None not in graphed._graphs.graphs.values()


def test_cuda_graph_second_call_before_backward_keeps_both_gradients_right():
    """Two calls, then one backward (e.g. two crops of a batch): the second call must not replay over
    the state the first one's backward reads; it runs eagerly, and the gradients equal the eager ones."""
    kw = dict(loss="cl", sampling="confidence", clip=None)
    eager, graphed = _graph_pair(**kw)
    (fa, ma, _, _), (fb, mb, _, _) = _cuda_inputs(seed=20), _cuda_inputs(seed=21)
    pa, pb = _probs(ma, 0), _probs(mb, 1)
    graphed(fa, ma, pa)[0].backward()  # records
    for f in (*fa, *fb):
        f.grad = None
    ref = eager(fa, ma, pa)[0] + eager(fb, mb, pb)[0]
    ref_grads = torch.autograd.grad(ref, [*fa, *fb])
    first = graphed(fa, ma, pa)[0]
    with pytest.warns(RuntimeWarning, match="before the backward of an earlier result"):
        second = graphed(fb, mb, pb)[0]
    total = first + second
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(total, [*fa, *fb]), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.timeout(480)  # compiling both parts took > 120 s on the H100 machine (2026-11-26)
def test_compiled_cuda_graph_loss_equals_eager_without_sync():
    """``compile`` and ``cuda_graph``: compiled parts recorded as graphs (minutes of compiling) give the
    eager values and gradients (confidence sampling), and a replay issues no synchronising call."""
    kw = dict(loss="cl", sampling="confidence", clip=1.0, clip_mode="scale")
    eager = PatchContrastiveLoss(CHANNELS, 6, 6, **kw).cuda()
    graphed = PatchContrastiveLoss(CHANNELS, 6, 6, compile=True, cuda_graph=True, **kw).cuda()
    graphed.load_state_dict(eager.state_dict())
    feats, mask, _, _ = _cuda_inputs(seed=12)
    probs = _probs(mask, 3)
    graphed(feats, mask, probs)[0].backward()  # compiles and records
    for f in feats:
        f.grad = None
    ref, ref_stats = eager(feats, mask, probs)
    ref_grads = torch.autograd.grad(ref, feats)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = graphed(feats, mask, probs)
        grads = torch.autograd.grad(out, feats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert None not in graphed._graphs.graphs.values()  # recorded, no fallback
    assert out.item() == pytest.approx(ref.item(), rel=1e-4)
    torch.testing.assert_close(stats.tensor, ref_stats.tensor, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)


@pytest.mark.timeout(480)  # minutes of compiling, as above
def test_compiled_cuda_graph_replays_draw_afresh_and_follow_the_seed():
    """``compile`` and ``cuda_graph`` with random sampling: the compiled sampling draws through
    inductor's RNG, whose seeds come from the CUDA generator inside the recorded graph. Every replay
    must still sample anew (a seed frozen at recording would give the same sample at every step), and a
    seeded run must repeat."""
    feats, mask, _, _ = _cuda_inputs(seed=13)
    graphed = PatchContrastiveLoss(CHANNELS, 6, 6, loss="cl", clip=None, compile=True, cuda_graph=True).cuda()
    graphed(feats, mask)[0].backward()  # compiles and records
    a, b = seeded_calls(graphed, feats, mask, seed=4)
    assert a == b and len(set(a)) == 3
    assert len(graphed._graphs.graphs) == 1 and None not in graphed._graphs.graphs.values()


def test_cuda_graph_recordings_share_one_side_stream():
    """Every recording warms up and records on the process's one capture stream: the memory it leaves
    behind outside the current stream (cuBLAS's per-stream workspaces, 2 × 32 MiB on an H100, and the
    graphs' pools) is on that stream only, however many signatures are recorded."""
    from ctseg.contrastive.graphs import capture_stream

    def segments() -> dict[int, int]:
        return {s["address"]: s["stream"] for s in torch.cuda.memory_snapshot()}

    before = segments()
    _, graphed = _graph_pair(loss="cl", clip=None)
    for B in (2, 4):  # two signatures, two recordings
        feats, mask, _, _ = _cuda_inputs(B=B, seed=11)
        graphed(feats, mask)[0].backward()
    assert len(graphed._graphs.graphs) == 2 and None not in graphed._graphs.graphs.values()
    torch.cuda.synchronize()
    new_streams = {st for addr, st in segments().items() if addr not in before}
    allowed = {torch.cuda.current_stream().cuda_stream, capture_stream(feats[0].device).cuda_stream}
    assert new_streams <= allowed, new_streams - allowed
