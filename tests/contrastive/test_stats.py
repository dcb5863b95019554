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


@pytest.mark.parametrize("loss", ["cl", "infonce"])
@pytest.mark.parametrize("group_size", [None, 2])
def test_reference_host_made_count_stats_equal_the_device_computed_ones(monkeypatch, loss, group_size):
    """The reference mode sends its count statistics and per-term weights with the plan; packing
    them from the result's fields instead (as the paper mode does) gives the same statistics."""
    from ctseg.contrastive import loss as loss_module
    from ctseg.contrastive.config import GroupResult

    fn = PatchContrastiveLoss(
        CHANNELS, num_classes=6, ignore_index=6, loss=loss, mode="reference", group_size=group_size
    )
    mask = blocky_mask(4, 64, 64, 6, 6, block=8, seed=3)
    feats = stage_features(4, 64, 64, 1)
    torch.manual_seed(0)
    _, host_made = fn(feats, mask)
    seen = []
    original = loss_module.PatchContrastiveLoss._pack_stats

    def without_host_parts(self, loss_value, raws, res: GroupResult):
        seen.append(res.count_stats is not None and res.term_weights is not None)
        res = GroupResult(**{**res.__dict__, "count_stats": None, "term_weights": None})
        return original(self, loss_value, raws, res)

    monkeypatch.setattr(loss_module.PatchContrastiveLoss, "_pack_stats", without_host_parts)
    torch.manual_seed(0)
    _, computed = fn(feats, mask)
    assert seen == [True]
    assert list(host_made) == list(computed)
    for name in host_made:
        assert host_made[name] == pytest.approx(computed[name], rel=1e-6, abs=1e-7), name
    assert host_made["active"] == 1.0 and sum(host_made[f"stage0/class{c}/pairs"] for c in range(6)) > 0


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_single_group_term_stats_equal_the_weighted_means(monkeypatch, loss):
    """With one group the paper mode packs its per-term values as they are (no weighting over groups):
    equal to the weighted form, inactive terms included (the mode gives them 0)."""
    from ctseg.contrastive import loss as loss_module
    from ctseg.contrastive.stats import term_weights

    captured = []
    original = loss_module.PatchContrastiveLoss._pack_stats

    def capture(self, loss_value, raws, res):
        captured.append(res)
        return original(self, loss_value, raws, res)

    monkeypatch.setattr(loss_module.PatchContrastiveLoss, "_pack_stats", capture)
    fn = PatchContrastiveLoss(CHANNELS, num_classes=6, ignore_index=6, loss=loss, clip=None)
    mask = blocky_mask(2, 64, 64, 6, 6, block=8, seed=3)
    torch.manual_seed(0)
    _, stats = fn(stage_features(2, 64, 64, 1, requires_grad=True), mask)
    (res,) = captured
    assert res.terms.shape[0] == 1 and res.term_active.any() and not res.term_active.all()
    expected = (res.terms * term_weights(res.term_active)).sum(0).flatten()
    assert torch.equal(stats.tensor[-expected.numel() :], expected)
