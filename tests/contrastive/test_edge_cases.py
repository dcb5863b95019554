"""Edge cases: nothing to contrast, all-ignore, one class, tiny maps, bad inputs and configs."""

from __future__ import annotations

import pytest
import torch

from ctseg.contrastive import NonFiniteFeaturesError, PatchContrastiveLoss, check_ct_options
from ctseg.errors import ConfigError, DataError
from tests.contrastive.helpers import CHANNELS, blocky_mask, stage_features

MODES = [("paper", "cl"), ("paper", "infonce"), ("reference", "cl"), ("reference", "infonce")]


def _check_zero_attached(fn, feats, mask):
    loss, st = fn(feats, mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)
    assert all(p.grad is not None for p in fn.heads.parameters())  # every head is in the graph (DDP)
    return st


@pytest.mark.parametrize("mode, loss", MODES)
def test_all_ignore_batch(mode, loss):
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, mode=mode)
    st = _check_zero_attached(fn, stage_features(2, 64, 64, 0), torch.full((2, 64, 64), 6))
    assert st["active"] == 0.0 and st["skipped_fraction"] == 0.0


@pytest.mark.parametrize("mode, loss", MODES)
def test_one_class_only_has_no_negatives(mode, loss):
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, mode=mode)
    st = _check_zero_attached(fn, stage_features(2, 64, 64, 0), torch.full((2, 64, 64), 3))
    assert st["skipped_fraction"] == 1.0


@pytest.mark.parametrize("mode, loss", MODES)
def test_too_few_samples_everywhere(mode, loss):
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    mask[:, :4, :4] = 1  # class 1: one stage-0 positive; class 0 has no negatives beyond 1 patch
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, mode=mode)
    st = _check_zero_attached(fn, stage_features(1, 32, 32, 0), mask)
    assert st["active"] == 0.0


@pytest.mark.parametrize("mode, loss", MODES)
def test_stage_maps_smaller_than_budget(mode, loss):
    """32² input: stage 3 is 1×1 per image, far below the 512-row budgets."""
    torch.manual_seed(0)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, loss=loss, mode=mode, clip=None)
    mask = blocky_mask(3, 32, 32, 6, 6, block=8, seed=1)
    loss_v, st = fn(stage_features(3, 32, 32, 0), mask)
    assert torch.isfinite(loss_v) and st["stage3/pairs"] == 0.0
    loss_v.backward()


def test_non_divisible_input_500():
    """A 500² input with 125/63/32/16 maps is padded, not rejected."""
    torch.manual_seed(0)
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, clip=None)
    mask = blocky_mask(1, 500, 500, 6, 6, block=50, seed=0)
    feats = stage_features(1, 500, 500, 0)
    assert [f.shape[-1] for f in feats] == [125, 63, 32, 16]
    loss, st = fn(feats, mask)
    assert torch.isfinite(loss) and st["active"] == 1.0


@pytest.mark.parametrize("mode", ["paper", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise(mode, bad):
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, mode=mode)
    feats = stage_features(1, 64, 64, 0, requires_grad=False)
    feats[2][0, 5, 1, 1] = bad
    with pytest.raises(NonFiniteFeaturesError, match=r"stage\(s\) \[2\]"):
        fn(feats, blocky_mask(1, 64, 64, 6, 6, block=16, seed=0))
    fn.compute_stats = False  # the check does not depend on the stats
    with pytest.raises(FloatingPointError):
        fn(feats, blocky_mask(1, 64, 64, 6, 6, block=16, seed=0))


def test_labels_out_of_range_raise():
    fn = PatchContrastiveLoss(CHANNELS, 6, 6)
    mask = blocky_mask(1, 64, 64, 6, 6, block=16, seed=0)
    mask[0, 0, 0] = 9
    with pytest.raises(DataError, match=r"labels \[9\]"):
        fn(stage_features(1, 64, 64, 0), mask)


@pytest.mark.parametrize(
    "feats, mask, match",
    [
        (
            lambda: stage_features(1, 64, 64, 0)[:3],
            lambda: torch.zeros(1, 64, 64, dtype=torch.long),
            "3 feature maps",
        ),
        (lambda: stage_features(2, 64, 64, 0), lambda: torch.zeros(1, 64, 64, dtype=torch.long), "stage 0"),
        (lambda: stage_features(1, 64, 64, 0), lambda: torch.zeros(1, 64, 64), "integer"),
        (lambda: stage_features(1, 64, 64, 0), lambda: torch.zeros(1, 64, 96, dtype=torch.long), "square"),
    ],
)
def test_bad_shapes_raise(feats, mask, match):
    with pytest.raises(ConfigError, match=match):
        PatchContrastiveLoss(CHANNELS, 6, 6)(feats(), mask())


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"loss": "triplet"}, "loss='triplet'"),
        ({"mode": "head"}, "mode='head'"),
        ({"ignore_index": 3}, "ignore_index 3 is a class"),
        ({"take_top": 0.0}, "take_top"),
        ({"stages": [0, 4]}, "stages"),
        ({"mode": "reference", "sampling": "confidence"}, "sampling='confidence'"),
        ({"mode": "reference", "gather_negatives": True}, "gather_negatives"),
        ({"clip": -1.0}, "clip"),
        ({"group_size": 0}, "group_size"),
        ({"num_positives": 1}, "num_positives"),
    ],
)
def test_bad_config_raises(kw, match):
    kw = {"ignore_index": 6, **kw}
    with pytest.raises(ConfigError, match=match):
        PatchContrastiveLoss(CHANNELS, 6, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"loss": "triplet"}, "loss='triplet'"),
        ({"mode": "head"}, "mode='head'"),
        ({"sampling": "hardest"}, "sampling='hardest'"),
        ({"clip_mode": "soft"}, "clip_mode='soft'"),
        ({"clip": 0.0}, "clip"),
        ({"group_size": 0}, "group_size"),
        ({"cuda_graph": True, "mode": "reference"}, "set cuda_graph to false"),
        ({"compile": True, "gather_negatives": True}, "set compile to false"),
        ({"compile": "reduce-overhead"}, "not supported"),
    ],
)
def test_model_free_options_are_checked_before_a_model_exists(kw, match):
    # What a training run checks at its start (check_ct_options) fails exactly as the loss itself does.
    with pytest.raises(ConfigError, match=match):
        check_ct_options(kw)
    with pytest.raises(ConfigError, match=match):
        PatchContrastiveLoss(CHANNELS, 6, 6, **kw)


def test_check_ct_options_names_unknown_options_and_accepts_the_paper_configs():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['tau'\].*'temperature'"):
        check_ct_options({"loss": "infonce", "tau": 0.1})
    check_ct_options({})
    check_ct_options({"loss": "cl", "mode": "paper", "clip": 1.0, "cuda_graph": True, "compile": True})
    check_ct_options({"mode": "reference", "clip": None, "ignore_index": 6, "group_size": 16})


def test_stage_subset_heads():
    fn = PatchContrastiveLoss(CHANNELS, 6, 6, stages=[0, 2])
    assert isinstance(fn.heads[1], torch.nn.Identity) and fn.heads[2].fc1.in_features == 256
    loss, st = fn(stage_features(2, 64, 64, 0), blocky_mask(2, 64, 64, 6, 6, block=16, seed=0))
    assert "stage1/pairs" not in st and "stage2/pairs" in st and torch.isfinite(loss)
