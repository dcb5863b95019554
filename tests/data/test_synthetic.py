"""The embedded synthetic aerial scenes: determinism, class shares, realism checks, the written folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from ctseg.data.layout import read_manifest
from ctseg.data.protocols import get_protocol
from ctseg.data.synthetic import (
    CLASS_NAMES,
    SHARE_RANGES,
    _shadow_strength,
    generate_scene,
    scene_seed,
    write_synthetic_dataset,
)
from ctseg.errors import ConfigError, OutputError

CAR = CLASS_NAMES.index("car")
N_SCENES = 20
SIZE = 512


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    """20 scenes of 512² (about 0.2 s of CPU each), shared by the statistical tests."""
    return [generate_scene(SIZE, SIZE, seed=1000 + i) for i in range(N_SCENES)]


# ------------------------------------------------------------------------------------------ the scenes


def test_class_names_follow_protocol_synthetic() -> None:
    assert get_protocol("synthetic").classes == CLASS_NAMES
    assert set(SHARE_RANGES) == set(CLASS_NAMES)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (64, 64), (37, 200), (128, 96)])
def test_any_size_gives_rgb_image_and_class_mask(shape: tuple[int, int]) -> None:
    image, mask = generate_scene(*shape, seed=3)
    assert image.shape == (*shape, 3) and image.dtype == np.uint8
    assert mask.shape == shape and mask.dtype == np.uint8
    assert mask.max() < len(CLASS_NAMES)


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 80), st.integers(1, 80), st.integers(0, 2**64 - 1), st.sampled_from([0.1, 0.15, 0.4]))
def test_any_shape_seed_and_gsd_give_valid_scenes(height: int, width: int, seed: int, gsd_m: float) -> None:
    image, mask = generate_scene(height, width, seed=seed, gsd_m=gsd_m)
    assert image.shape == (height, width, 3) and mask.shape == (height, width)
    assert mask.max() < len(CLASS_NAMES)


def test_same_seed_gives_identical_bytes() -> None:
    a_img, a_mask = generate_scene(128, 160, seed=42)
    b_img, b_mask = generate_scene(128, 160, seed=42)
    assert a_img.tobytes() == b_img.tobytes()
    assert a_mask.tobytes() == b_mask.tobytes()


def test_different_seeds_differ() -> None:
    a_img, a_mask = generate_scene(128, 128, seed=1)
    b_img, b_mask = generate_scene(128, 128, seed=2)
    assert not np.array_equal(a_img, b_img)
    assert not np.array_equal(a_mask, b_mask)


def test_bad_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="height"):
        generate_scene(0, 10)
    with pytest.raises(ConfigError, match="width"):
        generate_scene(10, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="gsd_m"):
        generate_scene(10, 10, gsd_m=0.0)
    with pytest.raises(ConfigError, match="seed"):
        generate_scene(10, 10, seed=-1)


def test_every_class_appears(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    present = set()
    for _, mask in scenes:
        present.update(np.unique(mask).tolist())
    assert present == set(range(len(CLASS_NAMES)))


def test_class_shares_within_documented_ranges(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    counts = sum(np.bincount(mask.ravel(), minlength=len(CLASS_NAMES)) for _, mask in scenes)
    shares = counts / counts.sum()
    for name, share in zip(CLASS_NAMES, shares):
        lo, hi = SHARE_RANGES[name]
        assert lo <= share <= hi, f"{name}: {share:.3f} outside [{lo}, {hi}]"


def test_cars_are_small_separate_instances(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for _, mask in scenes:
        labelled, n = ndimage.label(mask == CAR)
        assert n >= 5, "a 512² scene should hold several cars"
        sizes = np.bincount(labelled.ravel())[1:]
        assert sizes.max() < 0.01 * mask.size, f"a car blob covers {sizes.max() / mask.size:.2%} of the scene"


def test_scenes_have_structure_not_noise(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for image, mask in scenes[:5]:
        grey = image.astype(np.float64).mean(axis=2)
        corr = np.corrcoef(grey[:, :-1].ravel(), grey[:, 1:].ravel())[0, 1]
        assert corr > 0.8, f"neighbouring pixels correlate only {corr:.2f}"
        same = (mask[:, :-1] == mask[:, 1:]).mean()
        assert same > 0.9, f"labels change between {1 - same:.1%} of neighbours: too fragmented"


def _pixels(scenes: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Every second pixel in both directions: (N, 3) float32 colours and (N,) labels."""
    colours = np.concatenate([img[::2, ::2].reshape(-1, 3) for img, _ in scenes]).astype(np.float32)
    labels = np.concatenate([m[::2, ::2].ravel() for _, m in scenes])
    return colours, labels


def test_colour_alone_does_not_separate_the_classes(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Confusable classes overlap in colour, so spatial context is needed.

    Fitted on 10 scenes, evaluated on 10 others. The generator gives about 0.30 pixel accuracy for the
    nearest class-mean colour and about 0.61 for the best colour-only classifier (a per-class histogram
    of 16³ colour bins, i.e. the Bayes rule on quantised colour); the bounds leave room for seed noise.
    """
    fit_x, fit_y = _pixels(scenes[:10])
    test_x, test_y = _pixels(scenes[10:])
    means = np.stack([fit_x[fit_y == c].mean(axis=0) for c in range(len(CLASS_NAMES))])
    dist = np.stack([((test_x - m) ** 2).sum(axis=1) for m in means])
    nearest_mean_acc = float((dist.argmin(axis=0) == test_y).mean())
    assert nearest_mean_acc < 0.6, nearest_mean_acc

    def bins(x: np.ndarray) -> np.ndarray:
        q = x.astype(np.int64) // 16
        return q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2]

    hist = np.stack([np.bincount(bins(fit_x[fit_y == c]), minlength=4096) for c in range(len(CLASS_NAMES))])
    bayes_acc = float((hist.argmax(axis=0)[bins(test_x)] == test_y).mean())
    assert bayes_acc < 0.8, bayes_acc
    assert nearest_mean_acc < bayes_acc  # the histogram is the stronger colour classifier


def test_shadow_falls_away_from_the_sun_with_length_height_over_tan() -> None:
    height = np.zeros((40, 60), dtype=np.float32)
    height[10:20, 10:20] = 10.0  # a 10 m block
    rise = 1.0  # the ray climbs 1 m per pixel: a 10 m wall casts a 10 px shadow
    strength = _shadow_strength(height, sun=(0.0, -1.0), rise=rise)  # sun towards -x: shadow towards +x
    assert strength[15, 21:28].min() == 1.0  # right behind the block
    assert strength[15, 31:].max() == 0.0  # beyond 10 px
    assert strength[15, :10].max() == 0.0  # nothing on the sunny side
    assert strength[10:20, 10:20].max() == 0.0  # a flat roof does not shade itself
    diagonal = _shadow_strength(height, sun=(-math.sqrt(0.5), -math.sqrt(0.5)), rise=rise)
    assert diagonal[22, 22] == 1.0 and diagonal[5, 5] == 0.0


# ------------------------------------------------------------------------------------------ the written set


def test_scene_seed_depends_on_split_and_index_only() -> None:
    seeds = {scene_seed(0, split, i) for split in ("train", "val", "test") for i in range(50)}
    assert len(seeds) == 150
    assert scene_seed(0, "train", 3) == scene_seed(0, "train", 3) != scene_seed(1, "train", 3)
    with pytest.raises(ConfigError, match="split"):
        scene_seed(0, "holdout", 0)
    with pytest.raises(ConfigError, match="seed"):
        scene_seed(-3, "train", 0)
    assert scene_seed(2**40, "train", 0) != scene_seed(0, "train", 0)  # no 32-bit wrap-around


def _write(root: Path, **kw: int) -> object:
    args = {"n_train": 2, "n_val": 1, "n_test": 1, "size": 48, "seed": 5} | kw
    return write_synthetic_dataset(root, **args)


def test_written_folder_round_trips_through_read_manifest(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "set")
    back = read_manifest(tmp_path / "set")
    assert back.to_dict() == manifest.to_dict()
    assert back.protocol == json.loads(json.dumps(get_protocol("synthetic").to_dict()))
    assert get_protocol(back.protocol) == get_protocol("synthetic")
    assert [len(back.split(s)) for s in ("train", "val", "test")] == [2, 1, 1]
    for tile in back.tiles:
        with Image.open(tmp_path / "set" / tile.image) as im:
            assert im.mode == "RGB" and im.size == (48, 48)
            image = np.asarray(im)
        with Image.open(tmp_path / "set" / tile.mask) as im:
            assert im.mode == "L"
            mask = np.asarray(im)
        expected_image, expected_mask = generate_scene(48, 48, seed=tile.extra["scene_seed"])
        assert np.array_equal(image, expected_image) and np.array_equal(mask, expected_mask)
        assert tile.extra["class_pixels"] == np.bincount(mask.ravel(), minlength=6).tolist()
    assert not list((tmp_path / "set").rglob("*.tmp")), "temporary files left behind"


def test_scenes_do_not_depend_on_how_many_are_generated(tmp_path: Path) -> None:
    _write(tmp_path / "small", n_train=1, n_val=1, n_test=0)
    _write(tmp_path / "large", n_train=3, n_val=2, n_test=1)
    for rel in ("train/images/synthetic_train_00000.png", "val/masks/synthetic_val_00000.png"):
        assert (tmp_path / "small" / rel).read_bytes() == (tmp_path / "large" / rel).read_bytes()


def _stamps(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*.png")}


def test_rerun_with_same_arguments_skips_existing_tiles(tmp_path: Path) -> None:
    root = tmp_path / "set"
    first = _write(root)
    before = _stamps(root)
    second = _write(root)
    assert _stamps(root) == before, "unchanged tiles were rewritten"
    assert second.to_dict()["tiles"] == first.to_dict()["tiles"]

    # A damaged file and a missing one are regenerated; the other tiles are left alone.
    damaged, missing = (
        root / "train/masks/synthetic_train_00000.png",
        root / "val/images/synthetic_val_00000.png",
    )
    original_mask, original_image = damaged.read_bytes(), missing.read_bytes()
    Image.fromarray(np.zeros((48, 48), dtype=np.uint8), mode="L").save(damaged)
    missing.unlink()
    _write(root)
    assert damaged.read_bytes() == original_mask and missing.read_bytes() == original_image
    after = _stamps(root)
    untouched = set(before) - {"train/masks/synthetic_train_00000.png", "val/images/synthetic_val_00000.png"}
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}


def test_interrupted_run_without_manifest_is_completed(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _write(root)
    (root / "manifest.json").unlink()
    (root / "test/images/synthetic_test_00000.png").unlink()
    before = _stamps(root)
    _write(root)
    after = _stamps(root)
    assert {k: after[k] for k in before} == before  # matching tiles verified by pixels, not rewritten
    assert "test/images/synthetic_test_00000.png" in after
    read_manifest(root)


def test_other_arguments_into_a_used_folder_raise(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _write(root)
    with pytest.raises(OutputError, match=r"made with seed=5 \(asked: seed=6\)"):
        _write(root, seed=6)
    with pytest.raises(OutputError, match="n_train=2"):
        _write(root, n_train=3)


def test_folder_from_another_generator_version_is_not_reused(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _write(root)
    raw = json.loads((root / "manifest.json").read_text())
    raw["extra"]["synthetic"]["fingerprint"] = "0123456789abcdef"  # as if the scenes had changed since
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(OutputError, match="fingerprint=0123456789abcdef"):
        _write(root)


def test_foreign_folders_are_not_touched(tmp_path: Path) -> None:
    root = tmp_path / "other"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"notes\.txt"):
        _write(root)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]

    prepared = tmp_path / "prepared"
    _write(prepared)
    raw = json.loads((prepared / "manifest.json").read_text())
    raw["extra"] = {}  # as written by `ctseg prepare`
    (prepared / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(OutputError, match="other data"):
        _write(prepared)


def test_bad_set_arguments_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="size"):
        _write(tmp_path / "a", size=0)
    with pytest.raises(ConfigError, match="n_val"):
        _write(tmp_path / "b", n_val=-1)
    with pytest.raises(ConfigError, match="at least 1"):
        _write(tmp_path / "c", n_train=0, n_val=0, n_test=0)
    assert not (tmp_path / "a").exists()
