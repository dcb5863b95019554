"""Tiling arithmetic, label decoding, mask resizing, source lookup and the resumable writer."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctseg.data.layout import TileEntry
from ctseg.data.prepare.common import (
    PendingTile,
    ResumableWriter,
    SourceIndex,
    crop_padded,
    decode_colors,
    decode_indices,
    resize_mask,
    sha256_file,
    tile_count,
    tile_grid,
)
from ctseg.data.protocols import ISPRS_COLORS
from ctseg.errors import DataError, OutputError


def test_potsdam_tile_arithmetic() -> None:
    # 6000² at 500/500: 12 x 12 = 144 tiles, no padding (6000 = 12 · 500).
    assert tile_count(6000, 500, 500) == 12
    grid = tile_grid(6000, 6000, 500, 500)
    assert len(grid) == 144 and grid[0] == (0, 0) and grid[-1] == (5500, 5500)
    assert grid[1] == (0, 500)  # row-major
    # GeoSeg train: 1024 / 512 → windows at 0, 512, …, 5120 (the last padded).
    assert tile_count(6000, 1024, 512) == 11
    assert tile_count(6000, 1024, 1024) == 6
    assert tile_count(300, 500, 500) == 1
    with pytest.raises(ValueError, match="skip pixels"):
        tile_count(100, 10, 20)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 5000), size=st.integers(1, 700), frac=st.floats(0.01, 1.0))
def test_tiles_cover_everything_without_a_redundant_last_tile(length: int, size: int, frac: float) -> None:
    stride = max(1, round(size * frac))
    n = tile_count(length, size, stride)
    last = (n - 1) * stride
    assert last + size >= length  # the whole axis is covered
    assert last < length  # no tile lies entirely in the padding
    if n > 1:
        assert (n - 2) * stride + size < length  # one tile fewer would not cover it


def test_smaller_stride_really_overlaps() -> None:
    img = np.arange(40 * 40, dtype=np.int32).reshape(40, 40)
    grid = tile_grid(40, 40, 20, 10)
    assert [x for y, x in grid if y == 0] == [0, 10, 20]
    a = crop_padded(img, 0, 0, 20, fill=-1)
    b = crop_padded(img, 0, 10, 20, fill=-1)
    np.testing.assert_array_equal(a[:, 10:], b[:, :10])  # shared 10 px strip


def test_edges_are_padded_with_ignore_never_a_class() -> None:
    mask = np.zeros((600, 600), dtype=np.uint8)  # all class 0
    grid = tile_grid(600, 600, 500, 500)
    assert grid == [(0, 0), (0, 500), (500, 0), (500, 500)]
    corner = crop_padded(mask, 500, 500, 500, fill=255)
    assert corner.shape == (500, 500)
    assert (corner[:100, :100] == 0).all()
    assert (corner[100:, :] == 255).all() and (corner[:, 100:] == 255).all()
    image = np.full((600, 600, 3), 7, dtype=np.uint8)
    img_corner = crop_padded(image, 500, 0, 500, fill=0)
    assert (
        img_corner.shape == (500, 500, 3) and (img_corner[100:] == 0).all() and (img_corner[:100] == 7).all()
    )


def test_decode_colors_maps_classes_ignore_and_refuses_unknown(tmp_path: Path) -> None:
    rgb = np.array(
        [[[255, 255, 255], [0, 0, 255], [0, 0, 0]], [[255, 0, 0], [255, 255, 0], [0, 255, 0]]], np.uint8
    )
    mask, bad = decode_colors(rgb, ISPRS_COLORS, [(0, 0, 0)], 255, path="lab.tif")
    np.testing.assert_array_equal(mask, [[0, 1, 255], [5, 4, 3]])
    assert bad == {}
    rgb[0, 0] = (252, 255, 0)  # a near-yellow typo colour as found in real ISPRS labels
    with pytest.raises(DataError, match=r"lab\.tif.*\(252, 255, 0\) \(1 px\).*--unknown-colors ignore"):
        decode_colors(rgb, ISPRS_COLORS, [(0, 0, 0)], 255, path="lab.tif")
    mask, bad = decode_colors(rgb, ISPRS_COLORS, [(0, 0, 0)], 255, unknown="ignore")
    assert mask[0, 0] == 255 and bad == {(252, 255, 0): 1}


def test_decode_colors_is_rgb_not_bgr() -> None:
    # GeoSeg's constants are BGR; in RGB (0, 0, 255) is blue = building, (255, 0, 0) red = clutter.
    mask, _ = decode_colors(np.array([[[0, 0, 255], [255, 0, 0]]], np.uint8), ISPRS_COLORS, [], 255)
    np.testing.assert_array_equal(mask, [[1, 5]])


def test_decode_indices() -> None:
    ann = np.array([[0, 1, 7], [3, 9, 2]], np.uint8)
    mapping = {0: 255, **{v: v - 1 for v in range(1, 8)}}
    with pytest.raises(DataError, match=r"ann\.png.*9 \(1 px\)"):
        decode_indices(ann, mapping, 255, path="ann.png")
    mask, bad = decode_indices(ann, mapping, 255, unknown="ignore")
    np.testing.assert_array_equal(mask, [[255, 0, 6], [2, 255, 1]])
    assert bad == {9: 1}


def test_resize_mask_nearest_keeps_labels_bicubic_invents_them() -> None:
    mask = np.zeros((500, 500), np.uint8)
    mask[:, 250:] = 2
    mask[::50, :] = 255  # boundary lines, as in eroded labels
    near = resize_mask(mask, 512, "nearest", 255, 6)
    assert near.shape == (512, 512) and set(np.unique(near)) <= {0, 2, 255}
    cubic = resize_mask(mask, 512, "bicubic", 255, 6)
    values = set(np.unique(cubic).tolist())
    assert values - {0, 2, 255}, "bicubic should invent in-between labels (the paper's quirk)"
    assert all(v < 6 or v == 255 for v in values)
    assert (cubic != near).mean() > 0.01


def test_source_index_reads_folders_and_zips(tmp_path: Path) -> None:
    folder = tmp_path / "src" / "5_Labels_all"
    folder.mkdir(parents=True)
    (folder / "a_label.tif").write_bytes(b"plain")
    with zipfile.ZipFile(tmp_path / "src" / "5_Labels_all_noBoundary.zip", "w") as zf:
        zf.writestr("5_Labels_all_noBoundary/a_label.tif", b"zipped")
        zf.writestr("5_Labels_all_noBoundary/b.tif", b"b")
    index = SourceIndex([tmp_path / "src"])
    assert len(index) == 3
    assert index.find("a_label.tif").read_bytes() == b"plain"  # an extracted copy is preferred
    assert index.find("a_label.tif", prefer=("5_labels_all_noboundary",)).read_bytes() == b"zipped"
    assert index.find("A_LABEL.TIF", exclude=("5_labels_all",)).member is not None
    assert index.find("missing.tif") is None
    with pytest.raises(DataError, match="no such file"):
        SourceIndex([tmp_path / "nope"])
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with pytest.raises(DataError, match="neither a folder nor a zip"):
        SourceIndex([tmp_path / "broken.zip"])


def test_sha256_file_streams(tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def _pending(split: str, tid: str, payload: bytes) -> PendingTile:
    entry = TileEntry(split, tid, f"{split}/images/{tid}.png", f"{split}/masks/{tid}.png", 1, 1)
    return PendingTile(entry, payload + b"i", payload + b"m")


def test_resumable_writer_verifies_hashes(tmp_path: Path) -> None:
    proto = {"name": "p"}
    w = ResumableWriter(tmp_path / "out", proto, "d")
    entries = w.write("train/a", ["fp"], [_pending("train", "a", b"x")])
    assert entries[0].extra["image_sha256"] == hashlib.sha256(b"xi").hexdigest()
    w2 = ResumableWriter(tmp_path / "out", proto, "d")
    assert w2.cached("train/a", ["fp"]) == entries
    assert w2.cached("train/a", ["other source"]) is None
    (tmp_path / "out" / "train" / "masks" / "a.png").write_bytes(b"tampered")
    assert w2.cached("train/a", ["fp"]) is None
    with pytest.raises(OutputError, match="protocol 'p'"):
        ResumableWriter(tmp_path / "out", {"name": "q"}, "d")
    assert ResumableWriter(tmp_path / "out", {"name": "q"}, "d", overwrite=True).state["units"] == {}
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        ResumableWriter(tmp_path / "foreign", proto, "d")
