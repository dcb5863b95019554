"""``ctseg data stats`` numbers and the colour previews (colorize / overlay / grid)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctseg.data.layout import Manifest, TileEntry, write_manifest
from ctseg.data.preview import INVALID_COLOR, colorize, make_grid, overlay, save_png
from ctseg.data.protocols import ISPRS_COLORS, get_protocol
from ctseg.data.stats import compute_stats, format_stats
from ctseg.errors import DataError, OutputError

PROTO = get_protocol("potsdam-paper")


def write_folder(root: Path, masks: dict[str, list[np.ndarray | None]]) -> Path:
    """A prepared folder with the given masks per split (images are grey); val may alias test."""
    tiles = []
    for split, items in masks.items():
        for i, mask in enumerate(items):
            tid = f"{split}{i}"
            h, w = (8, 8) if mask is None else mask.shape
            image_rel = f"{split}/images/{tid}.png"
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / image_rel)
            mask_rel = None
            if mask is not None:
                mask_rel = f"{split}/masks/{tid}.png"
                (root / split / "masks").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8)).save(root / mask_rel)
            tiles.append(TileEntry(split, tid, image_rel, mask_rel, h, w))
    tiles += [TileEntry("val", t.id, t.image, t.mask, t.height, t.width) for t in tiles if t.split == "test"]
    write_manifest(root, Manifest(protocol=PROTO.to_dict(), tiles=tiles))
    return root


def test_stats_count_every_pixel(tmp_path: Path) -> None:
    a = np.zeros((4, 6), np.uint8)
    a[0] = 255
    a[1, :3] = 5
    b = np.full((5, 3), 1, np.uint8)
    b[0, 0] = 7  # neither a class nor ignore
    t = np.full((2, 2), 3, np.uint8)
    root = write_folder(tmp_path, {"train": [a, b], "test": [t, None]})
    stats = compute_stats(root)
    tr = stats.splits["train"]
    assert tr.tiles == 2 and tr.min_hw == (4, 3) and tr.max_hw == (5, 6)
    assert tr.class_pixels.tolist() == [15, 14, 0, 0, 0, 3]
    assert (tr.ignore_pixels, tr.invalid_pixels, tr.labelled_pixels, tr.total_pixels) == (6, 1, 32, 39)
    np.testing.assert_allclose(tr.shares(), np.array([15, 14, 0, 0, 0, 3]) / 32)
    te = stats.splits["test"]
    assert te.unlabelled_tiles == 1 and te.class_pixels.tolist() == [0, 0, 0, 4, 0, 0]
    assert stats.splits["val"].alias_of == "test" and stats.splits["train"].alias_of is None
    text = format_stats(stats)
    assert "potsdam-paper" in text and "val=test" in text
    assert "  clutter *" in text and "not in the mean metrics" in text
    assert "46.88%" in text  # impervious share in train: 15 / 32
    assert "INVALID pixels" in text and "unlabelled tiles" in text
    d = json.loads(json.dumps(stats.to_dict()))
    assert d["splits"]["train"]["class_pixels"]["building"] == 14


def test_stats_refuse_a_colour_mask(tmp_path: Path) -> None:
    root = write_folder(tmp_path, {"train": [np.zeros((2, 2), np.uint8)]})
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "train/masks/train0.png")
    with pytest.raises(DataError, match=r"train0\.png: mask has shape"):
        compute_stats(root)


def test_colorize_uses_protocol_colours_black_ignore_magenta_invalid() -> None:
    mask = np.array([[0, 1, 2], [5, 255, 9]])
    rgb = colorize(mask, PROTO)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert tuple(rgb[0, 1]) == ISPRS_COLORS[1] and tuple(rgb[1, 0]) == ISPRS_COLORS[5]
    assert tuple(rgb[1, 1]) == (0, 0, 0) and tuple(rgb[1, 2]) == INVALID_COLOR
    assert tuple(colorize(np.array([[-1, 300]]), PROTO)[0, 1]) == INVALID_COLOR


def test_overlay_keeps_the_image_under_ignore() -> None:
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[1, 255], [0, 0]], np.uint8)
    out = overlay(image, mask, PROTO, alpha=1.0)
    assert tuple(out[0, 0]) == ISPRS_COLORS[1] and tuple(out[0, 1]) == (100, 100, 100)
    half = overlay(image, mask, PROTO, alpha=0.5)
    assert tuple(half[1, 0]) == (178, 178, 178)  # (100 + 255) / 2, rounded


def test_grid_and_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 6, (20, 30)).astype(np.uint8) for _ in range(3)]
    root = write_folder(tmp_path / "d", {"train": masks, "test": [None]})
    grid = make_grid(root, "train", n=2, size=32)
    assert grid.shape[1] == 96 and grid.shape[0] > 64 and grid.dtype == np.uint8
    assert make_grid(root, None, n=10, size=16).shape[0] > 4 * 16  # all tiles, unlabelled ones too
    with pytest.raises(DataError, match="no tiles in split 'nope'"):
        make_grid(root, "nope")
    path = save_png(grid, tmp_path / "g.png")
    assert np.asarray(Image.open(path)).shape == grid.shape
    with pytest.raises(OutputError, match="PNG"):
        save_png(grid, tmp_path / "g.jpg")
