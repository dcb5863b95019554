"""Hypothesis fuzzing of shapes, class sets and ignore patterns: never NaN, never a crash."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctseg.contrastive import PatchContrastiveLoss

CHANNELS = (8, 8, 16, 16)  # small heads: the fuzzing is about shapes and label patterns


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    H, W = draw(st.integers(8, 72)), draw(st.integers(8, 72))
    K = draw(st.integers(1, 5))
    present = draw(st.lists(st.integers(0, K - 1), min_size=1, max_size=K, unique=True))
    block = draw(st.sampled_from([1, 2, 4, 8, 16]))
    ignore_pattern = draw(st.sampled_from(["none", "sprinkle", "rows", "all", "border"]))
    return {
        "B": B,
        "H": H,
        "W": W,
        "K": K,
        "present": present,
        "block": block,
        "ignore": ignore_pattern,
        "seed": draw(st.integers(0, 2**16)),
        "mode": draw(st.sampled_from(["paper", "reference"])),
        "loss": draw(st.sampled_from(["cl", "infonce"])),
        "group": draw(st.sampled_from([None, 1, 2])),
        "budget": draw(st.sampled_from([2, 7, 64])),
        "clip_mode": draw(st.sampled_from(["clamp", "scale", "none"])),
    }


def build(case):
    g = torch.Generator().manual_seed(case["seed"])
    B, H, W, K, blk = case["B"], case["H"], case["W"], case["K"], case["block"]
    present = torch.tensor(case["present"])
    coarse = present[torch.randint(0, len(present), (B, -(-H // blk), -(-W // blk)), generator=g)]
    mask = coarse.repeat_interleave(blk, 1).repeat_interleave(blk, 2)[:, :H, :W].clone()
    ignore = K
    if case["ignore"] == "sprinkle":
        mask[torch.rand(B, H, W, generator=g) < 0.2] = ignore
    elif case["ignore"] == "rows":
        mask[:, ::3] = ignore
    elif case["ignore"] == "all":
        mask[:] = ignore
    elif case["ignore"] == "border":
        mask[:, :, -3:] = ignore
    feats = [
        torch.randn(B, c, -(-H // p), -(-W // p), generator=g).requires_grad_()
        for c, p in zip(CHANNELS, (1, 2, 4, 8))
    ]
    return feats, mask, ignore


def loss_for_case(case, ignore):
    """The loss configured as a drawn case asks (also used by the reliability fuzzing)."""
    sampling_kw = (
        {"num_positives": case["budget"], "num_negatives": case["budget"]} if case["mode"] == "paper" else {}
    )
    return PatchContrastiveLoss(
        CHANNELS,
        num_classes=case["K"],
        ignore_index=ignore,
        loss=case["loss"],
        mode=case["mode"],
        group_size=case["group"],
        clip_mode=case["clip_mode"],
        proj_dim=8,
        **sampling_kw,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fuzz_never_nan_never_crash(case):
    feats, mask, ignore = build(case)
    fn = loss_for_case(case, ignore)
    torch.manual_seed(case["seed"])
    loss, stats = fn(feats, mask)
    assert torch.isfinite(loss)
    assert all(v == v for v in stats.values())  # no NaN in the stats either
    assert 0.0 <= stats["skipped_fraction"] <= 1.0
    loss.backward()
    assert all(f.grad is None or torch.isfinite(f.grad).all() for f in feats)
