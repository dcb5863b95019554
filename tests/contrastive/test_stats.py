"""``CTStats``: the loss's statistics stay on the device until first read, then fetch once."""

from __future__ import annotations

import pytest
import torch

from ctseg.contrastive import CTStats, PatchContrastiveLoss
from tests.contrastive.helpers import CHANNELS, blocky_mask, stage_features


def _call(**kw):
    mask = blocky_mask(2, 64, 64, 6, 6, block=8, seed=0)
    feats = stage_features(2, 64, 64, 0, requires_grad=True)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, clip=None, **kw)
    torch.manual_seed(0)
    return fn(feats, mask)


def test_unchecked_stats_are_not_fetched_until_read():
    loss, stats = _call(check_inputs=False)
    assert isinstance(stats, CTStats) and not stats.fetched
    names = list(stats)  # keys need no values
    assert not stats.fetched and "loss" in stats and len(stats) == len(names)
    assert stats["loss"] == pytest.approx(loss.item())
    assert stats.fetched
    assert stats.tensor.shape == (len(names),) and not stats.tensor.requires_grad


def test_checked_stats_equal_unchecked_and_are_prefetched():
    _, checked = _call()  # CPU: auto check, which fetched the values already
    _, unchecked = _call(check_inputs=False)
    assert checked.fetched
    assert dict(checked) == dict(unchecked)
    assert torch.equal(checked.tensor, unchecked.tensor)


def test_auto_check_still_raises_on_cpu():
    mask = blocky_mask(2, 64, 64, 6, 6, block=8, seed=0)
    feats = stage_features(2, 64, 64, 0, requires_grad=False)
    for f in feats:
        f.fill_(float("nan"))
    fn = PatchContrastiveLoss(CHANNELS, 6, 6)
    with pytest.raises(FloatingPointError, match=r"stage\(s\) \[0, 1, 2, 3\]"):
        fn(feats, mask)
    fn.check_inputs = False  # explicitly off: no check, the NaN reaches the loss
    loss, _ = fn(feats, mask)
    assert not torch.isfinite(loss)


def test_names_and_values_must_match():
    with pytest.raises(ValueError, match="3 values for 2 names"):
        CTStats(torch.zeros(3), ["a", "b"])
