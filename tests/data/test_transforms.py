"""Augmentation: the label guarantee (hypothesis), each transform, the registry and the config checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from torchvision import tv_tensors

from ctseg.data import transforms as T
from ctseg.data.transforms import (
    AugmentConfig,
    Mosaic,
    RandomRot90,
    RandomScale,
    ResizeTo,
    SmartCrop,
    TransformContext,
    build_eval_transform,
    build_train_transform,
    list_transforms,
    register_transform,
)
from ctseg.errors import ConfigError

IGNORE = 255
K = 6
# A second mask carried through the pipeline: 1 on source pixels; the pipeline fills padding in every
# Mask with ignore, so afterwards it marks exactly the pixels that came from padding.
SOURCE = 1


def make_sample(mask: np.ndarray, image: np.ndarray | None = None) -> dict:
    h, w = mask.shape
    if image is None:
        image = np.full((3, h, w), 200, dtype=np.uint8)
    return {
        "image": tv_tensors.Image(torch.from_numpy(image)),
        "mask": tv_tensors.Mask(torch.from_numpy(mask)),
        "marker": tv_tensors.Mask(torch.full((h, w), SOURCE, dtype=torch.uint8)),
        "id": "x",
    }


@st.composite
def source_masks(draw: st.DrawFn) -> np.ndarray:
    h = draw(st.integers(4, 40))
    w = draw(st.integers(4, 40))
    labels = draw(st.lists(st.sampled_from([*range(K), IGNORE]), min_size=1, max_size=4, unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(labels, dtype=np.uint8), size=(h, w))


@st.composite
def augment_configs(draw: st.DrawFn) -> tuple[AugmentConfig, TransformContext]:
    ops = [op for op in T.DEFAULT_OPS if draw(st.booleans())]
    cfg = AugmentConfig(
        ops=tuple(ops),
        mosaic_p=draw(st.sampled_from([0.0, 1.0])),
        scales=tuple(
            draw(st.lists(st.sampled_from([0.5, 0.75, 1.0, 1.25, 1.5, 2.0]), min_size=1, max_size=3))
        ),
        crop_tries=draw(st.integers(1, 4)),
        hflip_p=draw(st.sampled_from([0.0, 0.5, 1.0])),
        vflip_p=draw(st.sampled_from([0.0, 0.5, 1.0])),
        rot90_p=draw(st.sampled_from([0.0, 0.5, 1.0])),
        color_jitter=draw(st.sampled_from([(0.0, 0.0, 0.0, 0.0), (0.4, 0.4, 0.4, 0.1)])),
    )
    ctx = TransformContext(
        num_classes=K,
        ignore_index=IGNORE,
        crop_size=draw(st.integers(4, 48)),
        crop_window=draw(st.integers(4, 48)),
        image_interp=draw(st.sampled_from(["bilinear", "bicubic"])),
    )
    return cfg, ctx


def check_label_guarantee(out: dict, sources: list[np.ndarray]) -> None:
    """Output labels on source pixels come from the sources; padded pixels (marker = ignore) are ignore."""
    allowed = set(np.unique(np.concatenate([s.ravel() for s in sources])).tolist())
    mask = out["mask"].numpy()
    marker = out["marker"].numpy()
    assert set(np.unique(marker).tolist()) <= {SOURCE, IGNORE}
    assert set(np.unique(mask[marker == SOURCE]).tolist()) <= allowed
    assert (mask[marker == IGNORE] == IGNORE).all()
    assert out["mask"].shape == out["image"].shape[-2:]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    masks=st.lists(source_masks(), min_size=4, max_size=4),
    config=augment_configs(),
    seed=st.integers(0, 2**31 - 1),
)
def test_train_pipeline_never_invents_labels(masks, config, seed):
    """Any op order/config, nearest masks: labels ⊆ source labels; ignore added only where padded."""
    cfg, ctx = config
    pipeline = build_train_transform(cfg, ctx)
    sample = make_sample(masks[0])
    sample["partners"] = lambda: [make_sample(m) for m in masks[1:]]
    torch.manual_seed(seed)
    out = pipeline(sample)
    used = masks if cfg.mosaic_p == 1.0 and "mosaic" in cfg.ops else masks[:1]
    check_label_guarantee(out, used)
    assert out["image"].dtype == torch.float32
    assert "partners" not in out


@settings(max_examples=60, deadline=None)
@given(mask=source_masks(), resize=st.integers(3, 64))
def test_eval_resize_never_invents_labels(mask, resize):
    ctx = TransformContext(num_classes=K, ignore_index=IGNORE, crop_size=8, crop_window=8)
    out = build_eval_transform(ctx, resize)(make_sample(mask))
    assert out["mask"].shape == (resize, resize)
    check_label_guarantee(out, [mask])
    assert (out["marker"].numpy() == SOURCE).all()  # resizing never pads


def test_padding_adds_ignore_exactly_where_padded():
    """SmartCrop on a 20×24 input with a 32 window pads rows ≥ 20 and columns ≥ 24, nothing else."""
    mask = np.full((20, 24), 3, dtype=np.uint8)
    out = SmartCrop(32, IGNORE, tries=3)(make_sample(mask))
    m, img = out["mask"].numpy(), out["image"].numpy()
    padded = np.zeros((32, 32), dtype=bool)
    padded[20:, :] = True
    padded[:, 24:] = True
    assert (m[padded] == IGNORE).all() and (m[~padded] == 3).all()
    assert (img[:, padded] == 0).all() and (img[:, ~padded] == 200).all()


def test_no_padding_no_new_ignore():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, K, size=(40, 40), dtype=np.uint8)
    torch.manual_seed(0)
    out = SmartCrop(32, IGNORE)(make_sample(mask))
    assert IGNORE not in out["mask"].unique().tolist()


def test_image_stays_aligned_with_mask_through_exact_ops():
    """Mosaic, crop, flips and rot90 move image and mask pixels together (image encodes the label)."""
    rng = np.random.default_rng(1)
    masks = [rng.integers(0, K, size=(36, 30), dtype=np.uint8) for _ in range(4)]
    samples = [make_sample(m, np.stack([m * 40] * 3).astype(np.uint8)) for m in masks]
    cfg = AugmentConfig(ops=("mosaic", "smart_crop", "hflip", "vflip", "rot90"), mosaic_p=1.0, rot90_p=1.0)
    ctx = TransformContext(
        num_classes=K, ignore_index=IGNORE, crop_size=24, crop_window=24, mean=(0, 0, 0), std=(1, 1, 1)
    )
    pipeline = build_train_transform(cfg, ctx)
    for seed in range(10):
        torch.manual_seed(seed)
        sample = dict(samples[0])
        sample["partners"] = lambda: samples[1:]
        out = pipeline(sample)
        image = torch.round(out["image"][0] * 255).to(torch.int64)
        assert torch.equal(image, out["mask"].as_subclass(torch.Tensor).to(torch.int64) * 40)


def _halves(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 1
    return mask


def _balanced(mask: np.ndarray, max_ratio: float = 0.75) -> bool:
    counts = np.bincount(mask[mask != IGNORE].ravel(), minlength=K)
    return (counts > 0).sum() >= 2 and counts.max() < max_ratio * counts.sum()


def test_smart_crop_retries_until_balanced():
    """Left half class 0, right half class 1, window 32: only windows straddling near the middle pass."""
    mask = _halves()
    retried, single = SmartCrop(32, IGNORE, tries=40), SmartCrop(32, IGNORE, tries=1)
    ok_retried, ok_single = [], []
    for seed in range(50):
        torch.manual_seed(seed)
        ok_retried.append(_balanced(retried(make_sample(mask))["mask"].numpy()))
        torch.manual_seed(seed)
        ok_single.append(_balanced(single(make_sample(mask))["mask"].numpy()))
    assert all(ok_retried)
    assert not all(ok_single)


def test_smart_crop_keeps_a_crop_when_none_is_balanced():
    mask = np.full((40, 40), 2, dtype=np.uint8)
    out = SmartCrop(16, IGNORE, tries=5)(make_sample(mask))
    assert out["mask"].shape == (16, 16) and (out["mask"] == 2).all()


def test_random_scale_sizes_follow_reference_rounding():
    mask = np.zeros((30, 50), dtype=np.uint8)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = RandomScale([0.75, 1.5])(make_sample(mask))
        seen.add(tuple(out["mask"].shape))
        assert out["image"].shape[-2:] == out["mask"].shape
    assert seen == {(int(0.75 * 30), int(0.75 * 50)), (45, 75)}


def test_rot90_is_exact_rotation():
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    ks = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out = RandomRot90(p=1.0)(make_sample(mask))["mask"].numpy()
        k = next(
            k for k in (1, 2, 3) if out.shape == np.rot90(mask, k).shape and (out == np.rot90(mask, k)).all()
        )
        ks.add(k)
    assert ks == {1, 2, 3}
    torch.manual_seed(0)
    assert (RandomRot90(p=0.0)(make_sample(mask))["mask"].numpy() == mask).all()


def test_mosaic_quadrants_come_from_the_four_tiles():
    masks = [np.full((32, 32), c, dtype=np.uint8) for c in range(4)]
    samples = [make_sample(m) for m in masks]
    torch.manual_seed(3)
    sample = dict(samples[0])
    sample["partners"] = lambda: samples[1:]
    out = Mosaic(p=1.0, ignore_index=IGNORE)(sample)
    m = out["mask"].numpy()
    assert m.shape == (32, 32) and "partners" not in out
    assert m[0, 0] == 0 and m[0, -1] == 1 and m[-1, 0] == 2 and m[-1, -1] == 3
    oy = int((m[:, 0] == 0).sum())
    ox = int((m[0, :] == 0).sum())
    assert 8 <= oy <= 24 and 8 <= ox <= 24
    assert (m[:oy, :ox] == 0).all() and (m[oy:, ox:] == 3).all()


def test_mosaic_pads_small_partners_with_ignore():
    big = make_sample(np.zeros((32, 32), dtype=np.uint8))
    small = [make_sample(np.full((4, 4), 1, dtype=np.uint8)) for _ in range(3)]
    torch.manual_seed(0)
    big["partners"] = lambda: small
    out = Mosaic(p=1.0, ignore_index=IGNORE)(big)
    assert set(out["mask"].unique().tolist()) == {0, 1, IGNORE}
    assert torch.equal(out["mask"] == IGNORE, out["marker"] == IGNORE)


def test_mosaic_does_not_load_partners_when_not_applied():
    calls = []
    sample = make_sample(np.zeros((8, 8), dtype=np.uint8))
    sample["partners"] = lambda: calls.append(1) or []
    out = Mosaic(p=0.0, ignore_index=IGNORE)(sample)
    assert calls == [] and "partners" not in out


def test_bicubic_mask_quirk_invents_labels_maps_overshoot_to_ignore_and_warns_once(monkeypatch):
    """The paper's PIL-bicubic mask resize: intermediate classes along edges; values ≥ K → ignore."""
    monkeypatch.setattr(T, "_BICUBIC_WARNED", False)
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[:, 10:] = 5
    mask[15:, :] = IGNORE
    resize = ResizeTo((37, 37), K, IGNORE, mask_interp="bicubic")
    with pytest.warns(UserWarning, match="quirk"):
        out = resize(make_sample(mask))["mask"].numpy()
    reference = np.where(mask == IGNORE, K, mask).astype(np.uint8)  # the reference's ignore is K
    expected = np.array(PILImage.fromarray(reference, mode="L").resize((37, 37), PILImage.Resampling.BICUBIC))
    expected[expected >= K] = IGNORE
    assert (out == expected).all()
    assert set(np.unique(out).tolist()) - {0, 5, IGNORE}, "bicubic should interpolate new labels at the edge"
    assert ((out < K) | (out == IGNORE)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resize(make_sample(mask))


def test_normalisation_uses_mean_and_std():
    ctx = TransformContext(
        num_classes=K,
        ignore_index=IGNORE,
        crop_size=8,
        crop_window=8,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.5, 1.0),
    )
    out = build_eval_transform(ctx, None)(make_sample(np.zeros((4, 4), dtype=np.uint8)))
    expected = torch.tensor([(200 / 255 - 0.5) / s for s in (0.25, 0.5, 1.0)])
    assert torch.allclose(out["image"][:, 0, 0], expected, atol=1e-6)
    assert out["mask"].dtype == torch.uint8


def test_disabled_steps_are_dropped():
    ctx = TransformContext(num_classes=K, ignore_index=IGNORE, crop_size=8, crop_window=8)
    cfg = AugmentConfig(mosaic_p=0, scales=(1.0,), hflip_p=0, vflip_p=0, rot90_p=0)
    names = [type(t).__name__ for t in build_train_transform(cfg, ctx).transforms]
    assert names == ["SmartCrop", "ResizeTo", "Compose"]
    assert build_train_transform(cfg, ctx).partners == 0
    assert build_train_transform(AugmentConfig(), ctx).partners == 3


def test_registry_lists_and_rejects_duplicates():
    assert set(T.DEFAULT_OPS) <= set(list_transforms())
    with pytest.raises(ValueError, match="twice"):
        register_transform("hflip")(lambda cfg, ctx: None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ops": ("hflip", "warp")}, "unknown transform"),
        ({"ops": ("hflip", "mosaic")}, "first step"),
        ({"rot90_p": 1.5}, "rot90_p"),
        ({"scales": ()}, "scales"),
        ({"crop_max_ratio": 0.0}, "crop_max_ratio"),
        ({"color_jitter": (0.1, 0.1, 0.1)}, "color_jitter"),
    ],
)
def test_augment_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AugmentConfig(**kwargs)


def test_augment_config_from_dict_and_none():
    assert AugmentConfig.from_any(None) == AugmentConfig()
    assert AugmentConfig.from_any({"mosaic_p": 0.0, "scales": [1.0]}).scales == (1.0,)
    with pytest.raises(ConfigError, match="unknown keys"):
        AugmentConfig.from_any({"mosiac_p": 0.0})
