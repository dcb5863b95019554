"""Dubai preparation on the real data in ../shared/data/dubai (Tiles 1-6; Tiles 7-8 are withheld)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctseg.data.layout import read_manifest
from ctseg.data.prepare import prepare
from ctseg.data.protocols import DUBAI_COLORS
from ctseg.data.stats import compute_stats
from ctseg.errors import DataError

TOP = "Semantic segmentation dataset"


def mini_dubai(dubai_root: Path, dest: Path, tiles: dict[int, tuple[int, ...]]) -> Path:
    """A copy of a few real images in the Kaggle layout: ``tiles`` = tile number → image numbers."""
    for tile, parts in tiles.items():
        for sub, ext in (("images", "jpg"), ("masks", "png")):
            (dest / TOP / f"Tile {tile}" / sub).mkdir(parents=True, exist_ok=True)
            for k in parts:
                name = f"image_part_{k:03d}.{ext}"
                shutil.copy(
                    dubai_root / f"Tile {tile}" / sub / name, dest / TOP / f"Tile {tile}" / sub / name
                )
    shutil.copy(dubai_root / "classes.json", dest / TOP / "classes.json")
    return dest


@pytest.mark.slow
def test_real_dubai_prepares_with_withheld_test_tiles(dubai_root: Path, tmp_path: Path) -> None:
    """All 54 real images with the dubai preset (about 10-20 s on 2 cores)."""
    with pytest.warns(
        UserWarning, match=r"test split of protocol dubai: 2 of 2 entries absent \(Tile 7, Tile 8\)"
    ):
        prepare("dubai", dubai_root.parent, tmp_path / "out")
    m = read_manifest(tmp_path / "out")
    assert [len(m.split(s)) for s in ("train", "val", "test")] == [45, 9, 0]
    assert {t.extra["source_id"].split("/")[0] for t in m.split("val")} == {"Tile 2"}
    assert len(m.sources) == 108  # 54 images + 54 masks, each with size and sha256
    train = compute_stats(tmp_path / "out").splits["train"]
    assert train.invalid_pixels == 0 and train.labelled_pixels > 30_000_000
    assert abs(train.shares().sum() - 1) < 1e-9 and (train.shares() > 0.05).all()
    with pytest.warns(UserWarning, match="test split"):
        again = prepare("dubai", dubai_root.parent, tmp_path / "out")
    assert (again.written, again.skipped) == (0, 54)


def test_two_real_tiles_prepare_with_withheld_test_tiles(dubai_root: Path, tmp_path: Path) -> None:
    """The default-suite version of the above: Tiles 1 and 2 in full (18 real images)."""
    src = mini_dubai(dubai_root, tmp_path / "src", {1: tuple(range(1, 10)), 2: tuple(range(1, 10))})
    splits = {"train": ("Tile 1",), "val": ("Tile 2",), "test": ("Tile 7", "Tile 8")}
    with pytest.warns(
        UserWarning, match=r"test split of protocol dubai: 2 of 2 entries absent \(Tile 7, Tile 8\)"
    ):
        res = prepare("dubai", src, tmp_path / "out", splits=splits)
    m = read_manifest(tmp_path / "out")
    assert [len(m.split(s)) for s in ("train", "val", "test")] == [9, 9, 0]
    assert res.manifest.extra["warnings"] and len(m.sources) == 36
    stats = compute_stats(tmp_path / "out")
    assert stats.splits["train"].invalid_pixels == 0 and stats.splits["val"].labelled_pixels > 2_000_000
    with pytest.warns(UserWarning, match="test split"):
        again = prepare("dubai", src, tmp_path / "out", splits=splits)
    assert (again.written, again.skipped) == (0, 18)


def test_palette_and_rgb_masks_decode_to_the_real_colours(dubai_root: Path, tmp_path: Path) -> None:
    src = mini_dubai(dubai_root, tmp_path / "src", {1: (1,), 2: (2,)})  # Tile 2 masks are palette PNGs
    res = prepare("dubai", src, tmp_path / "out", splits={"train": ("Tile 1",), "val": ("Tile 2",)})
    for t in res.manifest.tiles:
        rgb = np.asarray(Image.open(t.extra["label_source"]).convert("RGB"))
        mask = np.asarray(Image.open(tmp_path / "out" / t.mask))
        for k, colour in enumerate(DUBAI_COLORS):
            np.testing.assert_array_equal(mask == k, (rgb == colour).all(-1))
        unlabeled = (rgb == (155, 155, 155)).all(-1) | (rgb == (0, 0, 0)).all(-1)
        np.testing.assert_array_equal(mask == 255, unlabeled)
    assert Image.open(dubai_root / "Tile 2/masks/image_part_002.png").mode == "P"
    assert (
        np.asarray(Image.open(tmp_path / "out/val/masks/tile2_part002.png")) == 255
    ).any()  # its grey pixels


def test_dubai_zip_equals_folder(dubai_root: Path, tmp_path: Path) -> None:
    src = mini_dubai(dubai_root, tmp_path / "src", {1: (1, 2), 2: (1,)})
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(src).as_posix())
    splits = {"train": ("Tile 1",), "val": ("Tile 2",)}
    a = prepare("dubai", src, tmp_path / "a", splits=splits).manifest
    b = prepare("dubai", tmp_path / "archive.zip", tmp_path / "b", splits=splits).manifest

    def key(m):
        return sorted((t.id, t.extra["image_sha256"], t.extra["mask_sha256"]) for t in m.tiles)

    assert key(a) == key(b) and len(a.tiles) == 3
    assert [s["kind"] for s in b.sources] == ["zip"]


def test_missing_val_tile_is_an_error(dubai_root: Path, tmp_path: Path) -> None:
    src = mini_dubai(dubai_root, tmp_path / "src", {1: (1,)})
    with pytest.raises(DataError, match=r"val split of protocol dubai: missing Tile 2 \('Tile 2/images"):
        prepare("dubai", src, tmp_path / "out", splits={"train": ("Tile 1",), "val": ("Tile 2",)})
    with pytest.raises(DataError, match=r"train split of protocol dubai: missing Tile 3 .*Tile 6"):
        prepare("dubai", src, tmp_path / "out")


def test_unknown_mask_colour_names_the_file(dubai_root: Path, tmp_path: Path) -> None:
    src = mini_dubai(dubai_root, tmp_path / "src", {1: (1,), 2: (1,)})
    mask_path = src / TOP / "Tile 1/masks/image_part_001.png"
    rgb = np.asarray(Image.open(mask_path).convert("RGB")).copy()
    rgb[0, :4] = (80, 227, 194)  # classes.json's (wrong) Water colour
    Image.fromarray(rgb).save(mask_path)
    splits = {"train": ("Tile 1",), "val": ("Tile 2",)}
    with pytest.raises(DataError, match=r"Tile 1/masks/image_part_001\.png.*\(80, 227, 194\) \(4 px\)"):
        prepare("dubai", src, tmp_path / "out", splits=splits)
    with pytest.warns(UserWarning, match="4 label pixels in 1 files"):
        res = prepare("dubai", src, tmp_path / "out", splits=splits, unknown_colors="ignore")
    assert list(res.unknown.values()) == [{"(80, 227, 194)": 4}]
