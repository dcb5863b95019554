"""``compile=``: the torch.compile'd loss equals the eager one (values, stats, gradients).

Compiling takes tens of seconds on CPU, so one compiled module serves the checks of this file. The GPU
timings it exists for are in docs/benchmarks.md (CT loss, CUDA).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from ctseg.contrastive import PatchContrastiveLoss
from ctseg.errors import ConfigError
from tests.contrastive.helpers import CHANNELS, blocky_mask, seeded_calls, stage_features


def _inputs(seed: int):
    mask = blocky_mask(2, 64, 64, 6, 6, block=8, seed=seed)
    feats = stage_features(2, 64, 64, seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(2, 6, 64, 64, generator=g).softmax(1)
    return feats, mask, probs


def _run(fn, seed):
    feats, mask, probs = _inputs(seed)
    loss, stats = fn(feats, mask, probs)
    loss.backward()
    return loss.detach(), dict(stats), [f.grad for f in feats], [p.grad.clone() for p in fn.parameters()]


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU (inductor) needs a C++ compiler",
)
def test_compiled_equals_eager():
    """Confidence sampling draws nothing at random, so compiled and eager must agree to rounding."""
    torch.manual_seed(0)
    kw = dict(loss="cl", clip=1.0, clip_mode="scale", sampling="confidence", check_inputs=False)
    eager = PatchContrastiveLoss(CHANNELS, 6, 6, **kw)
    compiled = PatchContrastiveLoss(CHANNELS, 6, 6, compile=True, **kw)
    compiled.load_state_dict(eager.state_dict())
    for seed in (1, 2):  # the second call reuses the compiled code (same shapes)
        le, se, ge, pe = _run(eager, seed)
        lc, sc, gc, pc = _run(compiled, seed)
        assert se["active"] == 1.0 and lc.item() == pytest.approx(le.item(), rel=1e-5, abs=1e-6)
        assert sc.keys() == se.keys()
        for key in se:
            assert sc[key] == pytest.approx(se[key], rel=1e-4, abs=1e-5), key
        for a, b in zip(gc + pc, ge + pe, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        eager.zero_grad()
        compiled.zero_grad()
    assert "compile='default'" in repr(compiled)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU (inductor) needs a C++ compiler",
)
def test_compiled_random_sampling_draws_afresh_and_follows_the_seed():
    """Compiled, the random draws come from inductor's RNG: every call samples anew (same inputs, other
    values) and a seeded run repeats."""
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss="cl", clip=None, check_inputs=False, compile=True)
    feats, mask, _ = _inputs(3)
    a, b = seeded_calls(fn, feats, mask, seed=4)
    assert a == b and len(set(a)) == 3


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"compile": "fast"}, "not a bool or one of"),
        ({"compile": "reduce-overhead"}, "CUDA graphs"),
        ({"compile": True, "mode": "reference"}, "needs mode='paper'"),
        ({"compile": True, "gather_negatives": True}, "gather_negatives"),
    ],
)
def test_compile_options_are_checked(kw, match):
    with pytest.raises(ConfigError, match=match):
        PatchContrastiveLoss(CHANNELS, 6, 6, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"loss": "cl"},
        {"loss": "infonce"},
        {"loss": "cl", "sampling": "confidence"},
        {"loss": "infonce", "group_size": 1},
        {"loss": "cl", "compute_stats": False, "clip": None},
    ],
)
def test_compiled_loss_and_its_recorded_parts_trace_without_graph_breaks(kw):
    """``compile`` exists to fuse the loss's few hundred small operations. A graph break splits the
    compiled code into pieces with eager code between them, and one inside a loop makes Dynamo skip the
    whole frame (stage-batch sampling ran eagerly that way until a division ``out=`` a view was
    replaced under compile). Traced with ``torch._dynamo.explain`` (no inductor: fast): the whole
    loss as ``compile=True`` compiles it, and the sampling and tail that ``compile`` with
    ``cuda_graph`` compiles before recording."""
    from ctseg.contrastive.graphs import split_loss
    from ctseg.contrastive.paper import gather_sampled_rows

    torch._dynamo.reset()
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, check_inputs=False, **kw)
    feats, mask, probs = _inputs(0)
    probs = probs if kw.get("sampling") == "confidence" else None
    whole = torch._dynamo.explain(fn._compute)(list(feats), mask, probs, False)
    assert whole.graph_break_count == 0, whole.break_reasons

    parts = split_loss(fn, fn._grids(feats, mask))
    sample_args = (mask, *([probs] if parts.with_probs else []))
    sampled = torch._dynamo.explain(parts.sample)(*sample_args)
    assert sampled.graph_break_count == 0, sampled.break_reasons
    sample_out = parts.sample(*sample_args)
    rows = [r.detach().requires_grad_() for r in gather_sampled_rows(feats, parts.samples(sample_out))]
    tail = torch._dynamo.explain(parts.tail)(*rows, *parts.params, *sample_out)
    assert tail.graph_break_count == 0, tail.break_reasons
