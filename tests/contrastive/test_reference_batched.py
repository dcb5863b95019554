"""``mode="reference"`` evaluates all its terms at once, and ``prefetch`` starts its host copy early.

Value parity with the loop oracle is in ``test_reference_parity.py``; here: the device work does not
grow with the number of terms, the pieces of the host-to-device plumbing, and that a prefetch changes
nothing but when the counts are computed.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from ctseg.contrastive import PatchContrastiveLoss
from ctseg.contrastive import loss as loss_module
from ctseg.contrastive.reference import HostCounts, _Upload
from ctseg.errors import ConfigError
from ctseg.utils.opcount import FloatOpCounter
from tests.contrastive.helpers import CHANNELS, blocky_mask, stage_features
from tests.contrastive.oracle import oracle_loss


def _float_ops(loss: str, num_classes: int, seed: int = 0) -> tuple[int, int]:
    """Float operators of one forward + backward, and the number of active (stage, class) terms."""
    torch.manual_seed(seed)
    fn = PatchContrastiveLoss(CHANNELS, num_classes, num_classes, loss=loss, mode="reference", clip=None)
    mask = blocky_mask(2, 128, 128, num_classes, num_classes, block=16, seed=seed, ignore_frac=0.0)
    feats = stage_features(2, 128, 128, seed)
    with FloatOpCounter() as ops:
        out, stats = fn(feats, mask)
        out.backward()
    active = sum(1 for k, v in stats.items() if k.endswith("/pairs") and "class" in k and v > 0)
    return ops.count, active


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_loss_math_does_not_grow_with_the_number_of_terms(loss):
    """All (stage, class) terms are evaluated together: 6 classes cost as many float operators as 2."""
    few, active_few = _float_ops(loss, 2)
    many, active_many = _float_ops(loss, 6)
    assert active_many >= 3 * active_few - 2 and active_many >= 16
    # The same up to the few operators of the projection's path (a stage whose every patch is read
    # projects the whole map and indexes it) and of the host stats; a loop would add ≈ 40 per term.
    assert abs(many - few) <= 8
    # On a GPU each is a kernel launch: stay below the eager paper mode's count (≈ 200–235), far from
    # the ≈ 1200 of one evaluation per term.
    assert many <= 240


def test_upload_packs_one_buffer_per_dtype_and_keeps_shapes():
    """What the device pass reads goes in one copy per dtype (on CUDA; on CPU the tensors stay)."""
    upload = _Upload()
    parts = [torch.arange(6).view(2, 3), torch.tensor([0.5, 1.5]), torch.arange(4) * 7, torch.ones(2, 2)]
    handles = [upload.add(p) for p in parts]
    upload.pack(pin=False)
    packed = upload.packed_views()
    for h, p in zip(handles, parts, strict=True):
        assert torch.equal(packed[h], p) and packed[h].dtype == p.dtype and packed[h].shape == p.shape
    storage = [packed[h].untyped_storage().data_ptr() for h in handles]
    assert storage[0] == storage[2] and storage[1] == storage[3] and storage[0] != storage[1]
    assert all(upload.send(torch.device("cpu"))[h] is p for h, p in zip(handles, parts, strict=True))
    # Another device (here "meta", standing in for a GPU this machine lacks): one copy per dtype,
    # views with the registered shapes and dtypes.
    sent = upload.send(torch.device("meta"))
    for h, p in zip(handles, parts, strict=True):
        assert sent[h].is_meta and sent[h].dtype == p.dtype and sent[h].shape == p.shape


@pytest.mark.parametrize(
    ("max_count", "wire"), [(1024, torch.int16), (32767, torch.int16), (40000, torch.int32)]
)
def test_host_counts_travel_in_the_narrowest_type_and_round_trip(max_count, wire):
    """On CUDA the counts are copied as ``wire`` (int16 for patches of up to 181² pixels); on CPU they
    are used as they are. The asynchronous CUDA copy is checked by the GPU prefetch test."""
    assert HostCounts.wire_dtype(max_count) == wire
    counts = [
        torch.randint(0, max_count + 1, (2, 3, 8, 8), dtype=torch.int32),
        torch.randint(0, 5, (2, 3, 4, 4)),
    ]
    host = HostCounts(counts, max_count).get()
    assert [tuple(h.shape) for h in host] == [(2, 3, 8, 8), (2, 3, 4, 4)]
    assert all(torch.equal(h, c) for h, c in zip(host, counts, strict=True))
    assert torch.equal(
        torch.cat([c.reshape(-1) for c in counts]).to(wire).long(),
        torch.cat([c.reshape(-1) for c in counts]).long(),
    )


def _reference(loss: str = "cl", **kw) -> PatchContrastiveLoss:
    torch.manual_seed(0)
    return PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, mode="reference", clip=None, **kw)


def _inputs(seed: int = 1):
    return stage_features(2, 128, 128, seed), blocky_mask(2, 128, 128, 6, 6, block=16, seed=seed)


def _value_and_grads(fn, feats, mask, seed, prefetch: bool):
    torch.manual_seed(seed)
    if prefetch:
        fn.prefetch(mask)
    out, _ = fn(feats, mask)
    grads = torch.autograd.grad(out, feats + list(fn.heads.parameters()), allow_unused=True)
    return out, grads


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_prefetch_changes_nothing_but_when_counts_are_made(loss, monkeypatch):
    fn = _reference(loss)
    feats, mask = _inputs()
    fn(feats, mask)  # learns the grids of this mask size
    made = []
    real = loss_module.patch_class_counts
    monkeypatch.setattr(loss_module, "patch_class_counts", lambda *a: made.append(1) or real(*a))
    plain, plain_grads = _value_and_grads(fn, feats, mask, 3, prefetch=False)
    assert len(made) == 1
    made.clear()
    early, early_grads = _value_and_grads(fn, feats, mask, 3, prefetch=True)
    assert len(made) == 1  # in prefetch; the forward used them
    assert torch.equal(plain, early)
    for a, b in zip(plain_grads, early_grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    torch.manual_seed(3)
    assert oracle_loss(fn.heads, feats, mask, loss=loss, ignore_index=6).item() == pytest.approx(
        early.item(), rel=1e-5, abs=1e-5
    )


def test_prefetch_is_ignored_unless_the_forward_gets_that_very_mask(monkeypatch):
    fn = _reference()
    feats, mask = _inputs()
    fn.prefetch(mask)
    assert fn._prefetched is None  # sizes not known yet: nothing to start
    fn(feats, mask)
    other = mask.clone()
    other[:, :64] = 0  # another batch of the same size
    fn.prefetch(mask)
    assert fn._prefetched is not None
    torch.manual_seed(4)
    got, _ = fn(feats, other)  # the forward of another mask recomputes its own counts
    assert fn._prefetched is None  # and drops the stale prefetch
    torch.manual_seed(4)
    assert got.item() == pytest.approx(oracle_loss(fn.heads, feats, other, ignore_index=6).item(), rel=1e-5)
    small_feats, small_mask = stage_features(2, 64, 64, 2), blocky_mask(2, 64, 64, 6, 6, block=16, seed=2)
    fn.prefetch(mask)
    fn(small_feats, small_mask)  # other grids: the prefetch is not used either
    assert fn._prefetched is None


def test_prefetch_of_a_bad_mask_leaves_the_error_to_the_forward():
    fn = _reference()
    feats, mask = _inputs()
    fn(feats, mask)
    fn.prefetch(mask.float())
    assert fn._prefetched is None
    with pytest.raises(ConfigError, match="mask must be a"):
        fn(feats, mask.float())


def test_prefetch_is_a_no_op_in_paper_mode_and_without_gradients():
    torch.manual_seed(0)
    paper = PatchContrastiveLoss(CHANNELS, 6, 6, clip=None)
    feats, mask = _inputs()
    paper(feats, mask)
    paper.prefetch(mask)
    assert paper._prefetched is None
    fn = _reference()
    fn(feats, mask)
    with torch.no_grad():
        fn.prefetch(mask)
    assert fn._prefetched is None


def test_a_loss_with_a_pending_prefetch_copies_and_pickles():
    fn = _reference()
    feats, mask = _inputs()
    fn(feats, mask)
    fn.prefetch(mask)
    for clone in (copy.deepcopy(fn), pickle.loads(pickle.dumps(fn))):
        assert clone._prefetched is None
        torch.manual_seed(5)
        a = clone(feats, mask)[0].item()
        torch.manual_seed(5)
        assert a == pytest.approx(oracle_loss(clone.heads, feats, mask, ignore_index=6).item(), rel=1e-5)


def test_groups_are_evaluated_together_and_match_one_by_one():
    """group_size splits the batch into replicas; one pass over all groups gives each group the loss it
    gets alone (same draws in the same order)."""
    torch.manual_seed(0)
    fn = _reference(group_size=1)
    feats, mask = stage_features(3, 128, 128, 6), blocky_mask(3, 128, 128, 6, 6, block=32, seed=6)
    torch.manual_seed(8)
    together, stats = fn(feats, mask)
    torch.manual_seed(8)
    alone = [
        oracle_loss(fn.heads, [f[b : b + 1] for f in feats], mask[b : b + 1], ignore_index=6)
        for b in range(3)
    ]
    assert together.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5, abs=1e-6)
    assert stats["loss_raw"] == pytest.approx(together.item(), rel=1e-6)


def _plan_threads(monkeypatch) -> list[str]:
    """Names of the threads on which reference plans are made (recorded from now on)."""
    names: list[str] = []
    real = loss_module.plan_reference

    def spy(*args, **kwargs):
        names.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_module, "plan_reference", spy)
    return names


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_prefetch_plans_on_its_thread_and_advances_the_generator_as_the_draws_would(loss, monkeypatch):
    fn = _reference(loss)
    feats, mask = _inputs()
    fn(feats, mask)
    threads = _plan_threads(monkeypatch)
    after = {}
    for prefetch in (False, True):
        torch.manual_seed(11)
        if prefetch:
            fn.prefetch(mask)
        value, _ = fn(feats, mask)
        after[prefetch] = (value, torch.get_rng_state(), torch.rand(4))
    assert threads[0] == threading.current_thread().name and threads[1].startswith("ctseg-ct-plan")
    assert torch.equal(after[False][0], after[True][0])
    assert torch.equal(after[False][1], after[True][1])  # the global generator ends where it would
    assert torch.equal(after[False][2], after[True][2])  # so the draws after the loss are the same


def test_prefetch_draws_again_when_something_drew_since(monkeypatch):
    """Between prefetch and forward, dropout in a CPU forward (here: torch.rand) takes numbers from the
    global generator: the thread's draws are then not the ones due, and the forward draws afresh."""
    fn = _reference()
    feats, mask = _inputs()
    fn(feats, mask)
    threads = _plan_threads(monkeypatch)
    torch.manual_seed(12)
    fn.prefetch(mask)
    noise = torch.rand(3)
    got, _ = fn(feats, mask)
    assert threads[-1] == threading.current_thread().name  # planned again, here
    torch.manual_seed(12)
    assert torch.equal(torch.rand(3), noise)
    want = oracle_loss(fn.heads, feats, mask, ignore_index=6)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_planner_thread_is_made_afresh_after_a_fork(monkeypatch):
    """A forked child (e.g. a DDP process started with fork) inherits no threads: it gets its own."""
    ours = loss_module._planner()
    assert loss_module._planner() is ours
    monkeypatch.setattr(loss_module, "_PLANNER", (-1, ours))  # as seen from a child: another pid
    fresh = loss_module._planner()
    assert fresh is not ours and fresh.submit(lambda: 7).result(timeout=10) == 7


def test_a_failing_plan_is_raised_by_the_forward(monkeypatch):
    fn = _reference()
    feats, mask = _inputs()
    fn(feats, mask)

    def broken(*args, **kwargs):
        raise RuntimeError("plan failed")

    monkeypatch.setattr(loss_module, "plan_reference", broken)
    fn.prefetch(mask)
    with pytest.raises(RuntimeError, match="plan failed"):
        fn(feats, mask)
