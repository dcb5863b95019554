"""``mode="reference"`` equals the loop oracle of spec §1.3 (same seed → same RNG draws → same value)."""

from __future__ import annotations

import pytest
import torch

from ctseg.contrastive import PatchContrastiveLoss
from tests.contrastive.helpers import (
    CHANNELS,
    DUBAI_IGNORE,
    DUBAI_NUM_CLASSES,
    blocky_mask,
    dubai_crops,
    stage_features,
)
from tests.contrastive.oracle import oracle_clipped, oracle_loss

SEEDS = range(5)


def _pair(loss_fn, feats, mask, seed, **oracle_kw):
    torch.manual_seed(seed)
    ours, stats = loss_fn(feats, mask)
    torch.manual_seed(seed)
    ref = oracle_kw.pop("fn", oracle_loss)(loss_fn.heads, feats, mask, **oracle_kw)
    return ours, ref, stats


@pytest.mark.parametrize("loss", ["cl", "infonce"])
@pytest.mark.parametrize("seed", SEEDS)
def test_parity_synthetic(loss, seed):
    torch.manual_seed(100 + seed)
    fn = PatchContrastiveLoss(CHANNELS, num_classes=6, ignore_index=6, loss=loss, mode="reference", clip=None)
    mask = blocky_mask(4, 128, 128, 6, 6, block=16 * (1 + seed % 3), seed=seed)
    feats = stage_features(4, 128, 128, seed)
    ours, ref, stats = _pair(fn, feats, mask, seed, loss=loss, ignore_index=6)
    assert stats["active"] == 1.0
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    assert stats["loss_raw"] == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("loss", ["cl", "infonce"])
@pytest.mark.parametrize("seed", SEEDS)
def test_parity_real_dubai(loss, seed, dubai_root):
    torch.manual_seed(200 + seed)
    fn = PatchContrastiveLoss(
        CHANNELS,
        num_classes=DUBAI_NUM_CLASSES,
        ignore_index=DUBAI_IGNORE,
        loss=loss,
        mode="reference",
        clip=None,
    )
    mask = dubai_crops(dubai_root, 2, 256, seed=seed)
    feats = stage_features(2, 256, 256, seed)
    ours, ref, _ = _pair(fn, feats, mask, seed, loss=loss, ignore_index=DUBAI_IGNORE)
    # InfoNCE values reach ~5 here; float reduction order (thread count, torch version) moves the
    # last digits, so the 1e-5 bound is absolute or relative, whichever is larger.
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_parity_groups_and_clip(loss):
    """group_size emulates the reference's DP replicas: clip per replica, then average."""
    torch.manual_seed(7)
    fn = PatchContrastiveLoss(
        CHANNELS, num_classes=6, ignore_index=6, loss=loss, mode="reference", clip=1.0, group_size=2
    )
    mask = blocky_mask(4, 128, 128, 6, 6, block=32, seed=3)
    feats = stage_features(4, 128, 128, 3)
    ours, ref, _stats = _pair(fn, feats, mask, 11, fn=oracle_clipped, group_size=2, loss=loss, ignore_index=6)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


def test_parity_gradients_cl():
    """Projecting only the used rows gives the same gradients as projecting every row."""
    torch.manual_seed(5)
    fn = PatchContrastiveLoss(CHANNELS, num_classes=6, ignore_index=6, loss="cl", mode="reference", clip=None)
    mask = blocky_mask(2, 128, 128, 6, 6, block=32, seed=5)
    feats = stage_features(2, 128, 128, 5)
    ours, ref, _ = _pair(fn, feats, mask, 9, loss="cl", ignore_index=6)
    inputs = feats + list(fn.heads.parameters())
    g_ours = torch.autograd.grad(ours, inputs, allow_unused=True)
    g_ref = torch.autograd.grad(ref, inputs, allow_unused=True)
    for x, a, b in zip(inputs, g_ours, g_ref):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert g_ours[0].abs().sum() > 0


def test_infonce_small_branch_consumes_two_permutations():
    """5-9 positives: InfoNCE draws two permutations and contributes 0 (later draws stay aligned)."""
    mask = torch.zeros(1, 64, 64, dtype=torch.long)
    mask[:, :, 32:] = 1
    mask[:, :8, :8] = 2  # 2×2 stage-0 patches of 4 px
    mask[:, 8:12, :20] = 2  # + 5: class 2 has 9 stage-0 positives (5 ≤ 9 < 10)
    fn = PatchContrastiveLoss(
        CHANNELS, num_classes=3, ignore_index=6, loss="infonce", mode="reference", clip=None
    )
    feats = stage_features(1, 64, 64, 1)
    ours, ref, stats = _pair(fn, feats, mask, 4, loss="infonce", ignore_index=6)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert stats["stage0/class2/loss_infonce"] == 0.0 and stats["stage0/class2/pairs"] == 0.0
    assert stats["stage0/class0/pairs"] > 0
    torch.manual_seed(4)
    fn(feats, mask)
    after_ours = torch.rand(1).item()
    torch.manual_seed(4)
    oracle_loss(fn.heads, feats, mask, loss="infonce", ignore_index=6)
    assert torch.rand(1).item() == after_ours  # same number of RNG draws


def test_parity_when_a_stage_projects_every_patch(monkeypatch):
    """Two classes in halves, InfoNCE: every patch of every stage is a positive or a negative of class
    0 and all of them are zipped, so the plan marks each stage EVERY_ROW (the device pass projects the
    whole map, no index); the value and the features' gradients still equal the oracle's."""
    from ctseg.contrastive import loss as loss_module
    from ctseg.contrastive import reference

    plans = []

    def recording(*args, **kwargs):
        plans.append(reference.plan_reference(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(loss_module, "plan_reference", recording)
    mask = torch.zeros(8, 64, 64, dtype=torch.long)
    mask[:, :, 32:] = 1
    fn = PatchContrastiveLoss(CHANNELS, num_classes=2, loss="infonce", mode="reference", clip=None)
    feats = stage_features(8, 64, 64, 0)
    ours, ref, _ = _pair(fn, feats, mask, 0, loss="infonce", ignore_index=None)
    assert [p.stage_rows for p in plans] == [[reference.EVERY_ROW] * 4]
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    ours_grads = torch.autograd.grad(ours, feats, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, feats)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
