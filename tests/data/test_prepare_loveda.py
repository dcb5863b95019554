"""LoveDA preparation on the official layout, built in tmp_path from the three real sample tiles."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctseg.data.prepare import prepare
from ctseg.data.prepare.loveda import loveda_mapping
from ctseg.errors import DataError
from tests.conftest import shared_data_path

SPLITS = {"train": ("Train",), "val": ("Val",), "test": ("Test",)}


def build_layout(root: Path) -> dict[str, np.ndarray]:
    """Train/Rural: tiles 0 and 1, Val/Urban: tile 2, Test/Rural: tile 0's image without a mask.

    Tile 1's mask gets a no-data (0) corner so that the ignore mapping is exercised on real data.
    """
    samples = shared_data_path("loveda_samples")
    layout = {"Train/Rural": ("0", "1"), "Val/Urban": ("2",)}
    anns = {}
    for group, names in layout.items():
        (root / group / "images_png").mkdir(parents=True)
        (root / group / "masks_png").mkdir(parents=True)
        for n in names:
            shutil.copy(samples / "img" / f"{n}.png", root / group / "images_png" / f"{n}.png")
            ann = np.asarray(Image.open(samples / "ann" / f"{n}.png")).copy()
            if n == "1":
                ann[:16, :16] = 0
            Image.fromarray(ann).save(root / group / "masks_png" / f"{n}.png")
            anns[f"{group}/{n}"] = ann
    (root / "Test/Rural/images_png").mkdir(parents=True)
    shutil.copy(samples / "img" / "0.png", root / "Test/Rural/images_png/4000.png")
    return anns


def test_loveda_official_layout_and_id_shift(tmp_path: Path) -> None:
    anns = build_layout(tmp_path / "LoveDA")
    res = prepare("loveda", tmp_path / "LoveDA", tmp_path / "out", "loveda", splits=SPLITS, val_fraction=None)
    m = res.manifest
    assert [t.id for t in m.split("train")] == ["train_rural_0", "train_rural_1"]
    assert [t.id for t in m.split("val")] == ["val_urban_2"]
    test = m.split("test")
    assert [t.id for t in test] == ["test_rural_4000"] and test[0].mask is None  # no public test labels
    for t in m.split("train") + m.split("val"):
        mask = np.asarray(Image.open(tmp_path / "out" / t.mask))
        ann = anns[t.extra["source_id"]]
        np.testing.assert_array_equal(mask == 255, ann == 0)
        np.testing.assert_array_equal(mask[ann > 0], ann[ann > 0] - 1)  # 1..7 → 0..6
        assert (t.height, t.width) == (1024, 1024)
    assert (np.asarray(Image.open(tmp_path / "out/train/masks/train_rural_1.png"))[:16, :16] == 255).all()
    assert loveda_mapping()[0] == 255 and loveda_mapping()[7] == 6


def test_loveda_from_zips_matches_folders(tmp_path: Path) -> None:
    build_layout(tmp_path / "LoveDA")
    for split in ("Train", "Val", "Test"):
        with zipfile.ZipFile(tmp_path / f"{split}.zip", "w") as zf:
            for f in sorted((tmp_path / "LoveDA" / split).rglob("*.png")):
                zf.write(f, f.relative_to(tmp_path / "LoveDA").as_posix())
    zips = [tmp_path / f"{s}.zip" for s in ("Train", "Val", "Test")]
    a = prepare("loveda", zips, tmp_path / "a", "loveda", splits=SPLITS, val_fraction=None).manifest
    b = prepare(
        "loveda", tmp_path / "LoveDA", tmp_path / "b", "loveda", splits=SPLITS, val_fraction=None
    ).manifest

    def key(m):
        return sorted((t.id, t.extra["image_sha256"], t.extra.get("mask_sha256")) for t in m.tiles)

    assert key(a) == key(b)
    assert {s["kind"] for s in a.sources} == {"zip"}


def test_loveda_default_protocol_holds_out_val_from_train(tmp_path: Path) -> None:
    build_layout(tmp_path / "LoveDA")
    res = prepare("loveda", tmp_path / "LoveDA", tmp_path / "out", val_fraction=0.5)
    m = res.manifest
    train_val = {t.extra["source_id"] for t in m.split("train") + m.split("val")}
    assert train_val == {"Train/Rural/0", "Train/Rural/1"}
    assert {t.extra["source_id"] for t in m.split("test")} == {"Val/Urban/2"}  # official Val = our test


def test_loveda_unknown_mask_value_names_the_file(tmp_path: Path) -> None:
    build_layout(tmp_path / "LoveDA")
    bad = tmp_path / "LoveDA/Val/Urban/masks_png/2.png"
    ann = np.asarray(Image.open(bad)).copy()
    ann[0, 0] = 9
    Image.fromarray(ann).save(bad)
    with pytest.raises(DataError, match=r"Val/Urban/masks_png/2\.png.*9 \(1 px\)"):
        prepare("loveda", tmp_path / "LoveDA", tmp_path / "out", "loveda", splits=SPLITS, val_fraction=None)
