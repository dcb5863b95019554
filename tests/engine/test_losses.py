"""Segmentation losses against literal re-statements of reference-spec §3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctseg.engine.losses import DiceLoss, SoftCrossEntropyLoss, create_seg_loss, list_seg_losses
from ctseg.errors import ConfigError

IGN = 255


def _batch(seed: int = 0, k: int = 6, ignore_frac: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, k, (2, 8, 8), generator=g)
    target[torch.rand(2, 8, 8, generator=g) < ignore_frac] = IGN
    return logits, target


def _softce_loop(logits, target, eps, k):
    # Pixel by pixel, as the spec states it: means over ALL pixels, ignored ones count as 0.
    lp = F.log_softmax(logits, 1)
    nll_sum = smooth_sum = 0.0
    n = 0
    for b in range(target.shape[0]):
        for i in range(target.shape[1]):
            for j in range(target.shape[2]):
                n += 1
                y = int(target[b, i, j])
                if y == IGN:
                    continue
                nll_sum += -float(lp[b, y, i, j])
                smooth_sum += -float(lp[b, :, i, j].sum())
    return (1 - eps) * nll_sum / n + (eps / k) * smooth_sum / n


def test_softce_matches_spec_loop():
    logits, target = _batch()
    got = SoftCrossEntropyLoss(6, IGN, 0.05)(logits, target)
    assert float(got.detach()) == pytest.approx(_softce_loop(logits.detach(), target, 0.05, 6), rel=1e-5)


def test_softce_without_smoothing_is_ce_diluted_by_ignored_pixels():
    logits, target = _batch(1)
    valid = (target != IGN).float().mean()
    ce = F.cross_entropy(logits, target, ignore_index=IGN)
    got = SoftCrossEntropyLoss(6, IGN, 0.0)(logits, target)
    assert float(got) == pytest.approx(float(ce * valid), rel=1e-5)


def _dice_loop(logits, target, k, smooth=0.05):
    p = F.softmax(logits, 1)
    losses = []
    for c in range(k):
        inter = card = 0.0
        present = False
        for b in range(target.shape[0]):
            for i in range(target.shape[1]):
                for j in range(target.shape[2]):
                    y = int(target[b, i, j])
                    if y == IGN:
                        continue
                    t = 1.0 if y == c else 0.0
                    present |= t > 0
                    pc = float(p[b, c, i, j])
                    inter += pc * t
                    card += pc + t
        dice = (2 * inter + smooth) / max(card + smooth, 1e-7)
        losses.append((1 - dice) if present else 0.0)
    return sum(losses) / k


def test_dice_matches_spec_loop_with_absent_class():
    logits, target = _batch(2, k=6)
    target[target == 3] = 0  # class 3 absent: contributes 0 but still counts in the mean
    got = DiceLoss(6, IGN)(logits, target)
    assert float(got) == pytest.approx(_dice_loop(logits.detach(), target, 6), rel=1e-5)


@pytest.mark.parametrize("name", ["softce_dice", "softce", "ce", "ce_dice", "dice"])
def test_registry_losses_backprop_and_handle_all_ignored(name):
    loss_fn = create_seg_loss(name, num_classes=6, ignore_index=IGN, smoothing=0.05)
    logits, target = _batch(3)
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None and torch.isfinite(logits.grad).all()
    all_ignored = torch.full_like(target, IGN)
    loss2 = loss_fn(logits, all_ignored)
    assert torch.isfinite(loss2)


def test_softce_dice_is_sum_of_parts():
    logits, target = _batch(4)
    joint = create_seg_loss("softce_dice", num_classes=6, ignore_index=IGN, smoothing=0.05)(logits, target)
    parts = SoftCrossEntropyLoss(6, IGN, 0.05)(logits, target) + DiceLoss(6, IGN)(logits, target)
    assert float(joint) == pytest.approx(float(parts), rel=1e-6)


def test_bf16_logits_computed_in_fp32():
    logits, target = _batch(5)
    loss = create_seg_loss("softce_dice", num_classes=6, ignore_index=IGN)(logits.detach().bfloat16(), target)
    assert loss.dtype == torch.float32


def test_unknown_loss_and_bad_smoothing_are_config_errors():
    assert "softce_dice" in list_seg_losses()
    with pytest.raises(ConfigError, match="unknown seg_loss"):
        create_seg_loss("focal", num_classes=6, ignore_index=IGN)
    with pytest.raises(ConfigError, match="smoothing"):
        create_seg_loss("softce", num_classes=6, ignore_index=IGN, smoothing=1.5)
