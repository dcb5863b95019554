"""Readers, streaming writers, predict_file outputs, GeoTIFF round trip, bad input, atomic outputs."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctseg.errors import DataError, OutputError
from ctseg.inference import io as cio
from ctseg.inference.io import (
    ArrayReader,
    NpyStreamWriter,
    OutputSet,
    PNGStreamWriter,
    colorize,
    list_inputs,
    open_scene,
)
from ctseg.inference.predict import predict_file
from ctseg.inference.sliding import SlidingWindow, predict_large
from tests.inference.conftest import pointwise_net, write_geotiff

COLORS = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0)]
SETTINGS = SlidingWindow(window=32, overlap=8, batch_size=4)


def test_every_output_is_fsynced_exactly_once_before_the_rename(
    tmp_path: Path, smooth_image: np.ndarray, monkeypatch
) -> None:
    """The write lanes fsync their files in parallel; the rename then does not fsync them again, and a
    file not marked as synced still is."""
    import os as os_module

    from ctseg.inference import io as io_module

    synced: list[str] = []
    real_fsync = os_module.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os_module.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os_module, "fsync", counting_fsync)
    src = tmp_path / "tile.png"
    Image.fromarray(smooth_image).save(src)
    res = predict_file(pointwise_net(5), src, tmp_path / "out", SETTINGS, num_classes=5, probs=True)
    assert len(synced) == len(set(synced)) == len(res.outputs) == 3  # labels, colour, probabilities
    synced.clear()
    with io_module.OutputSet(tmp_path) as out:
        done, other = out.path("done.txt"), out.path("other.txt")
        done.write_text("a")
        other.write_text("b")
        out.synced(done)
    assert [Path(p).name for p in synced] == [other.name]
    assert (tmp_path / "done.txt").read_text() == "a" and (tmp_path / "other.txt").read_text() == "b"


@pytest.mark.parametrize(("channels", "palette"), [(1, None), (1, COLORS), (3, None)])
def test_png_stream_writer_round_trips(
    tmp_path: Path, rng: np.random.Generator, channels: int, palette
) -> None:
    h, w = 45, 37
    shape = (h, w) if channels == 1 else (h, w, 3)
    hi = len(palette) if palette else 256
    data = rng.integers(0, hi, shape, dtype=np.uint8)
    with PNGStreamWriter(tmp_path / "a.png", w, h, channels=channels, palette=palette) as wr:
        for y in range(0, h, 10):
            wr.write(data[y : y + 10])
    im = Image.open(tmp_path / "a.png")
    assert im.mode == {(1, False): "L", (1, True): "P", (3, False): "RGB"}[(channels, palette is not None)]
    np.testing.assert_array_equal(np.asarray(im), data)
    if palette:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), colorize(data, palette))


def test_png_writer_refuses_to_finish_an_incomplete_image(tmp_path: Path) -> None:
    wr = PNGStreamWriter(tmp_path / "a.png", 4, 4)
    wr.write(np.zeros((2, 4), np.uint8))
    with pytest.raises(RuntimeError, match="2 of 4 rows"):
        wr.close()


def test_npy_stream_writer_round_trips(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.random((13, 9, 4)).astype(np.float32)
    with NpyStreamWriter(tmp_path / "p.npy", 9, 13, 4) as wr:
        wr.write(data[:5])
        wr.write(data[5:])
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), data)


def test_output_set_renames_all_or_nothing(tmp_path: Path) -> None:
    with OutputSet(tmp_path) as out:
        out.path("a.txt").write_text("a")
        out.path("b.txt").write_text("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(KeyError), OutputSet(other) as out:
        out.path("a.txt").write_text("a")
        raise KeyError("boom")
    assert list(other.iterdir()) == []


def test_predict_png_writes_labels_and_colour(tmp_path: Path, smooth_image: np.ndarray) -> None:
    src = tmp_path / "in" / "tile.png"
    src.parent.mkdir()
    Image.fromarray(smooth_image).save(src)
    model = pointwise_net(5)
    res = predict_file(model, src, tmp_path / "out", SETTINGS, num_classes=5, colors=COLORS, probs=True)
    assert set(res.outputs) == {"labels", "color", "probs"} and not res.georeferenced
    labels = np.asarray(Image.open(res.outputs["labels"]))
    ref = predict_large(model, smooth_image, window=32, overlap=8, return_probs=True)
    np.testing.assert_array_equal(labels, ref.labels)
    colour = np.asarray(Image.open(res.outputs["color"]).convert("RGB"))
    np.testing.assert_array_equal(colour, colorize(ref.labels, COLORS))
    probs = np.load(res.outputs["probs"])
    assert probs.shape == (77, 101, 5)
    np.testing.assert_allclose(probs, np.moveaxis(ref.probs, 0, -1), atol=1e-6)
    # Only the outputs: no temporary files left behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "tile_color.png",
        "tile_labels.png",
        "tile_probs.npy",
    ]


def test_geotiff_round_trip_keeps_crs_transform_and_size(tmp_path: Path, smooth_image: np.ndarray) -> None:
    rasterio = pytest.importorskip("rasterio")
    src = write_geotiff(tmp_path / "scene.tif", smooth_image)
    model = pointwise_net(5)
    res = predict_file(
        model,
        src,
        tmp_path / "out",
        SETTINGS,
        num_classes=5,
        colors=COLORS,
        probs=True,
        class_names=list("abcde"),
    )
    assert res.georeferenced and res.outputs["labels"].name == "scene_labels.tif"
    with rasterio.open(src) as s, rasterio.open(res.outputs["labels"]) as d:
        assert d.crs == s.crs and d.transform == s.transform
        assert (d.width, d.height, d.count, d.dtypes[0]) == (s.width, s.height, 1, "uint8")
        labels = d.read(1)
        assert d.colormap(1)[1][:3] == COLORS[1]
    ref = predict_large(model, smooth_image, window=32, overlap=8, return_probs=True)
    np.testing.assert_array_equal(labels, ref.labels)
    with rasterio.open(res.outputs["probs"]) as p:
        assert (
            p.count == 5 and p.crs == rasterio.crs.CRS.from_epsg(32632) and p.descriptions == tuple("abcde")
        )
        np.testing.assert_allclose(p.read(), ref.probs, atol=1e-6)
    colour = np.asarray(Image.open(res.outputs["color"]).convert("RGB"))
    np.testing.assert_array_equal(colour, colorize(ref.labels, COLORS))


def test_geotiff_larger_than_a_tile_block_is_written_by_windows(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    rasterio = pytest.importorskip("rasterio")
    image = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
    src = write_geotiff(tmp_path / "big.tif", image, crs="EPSG:4326", origin=(10.0, 50.0), gsd=1e-5)
    model = pointwise_net(3)
    res = predict_file(
        model, src, tmp_path, SlidingWindow(window=64, overlap=16, batch_size=8), num_classes=3
    )
    with rasterio.open(res.outputs["labels"]) as d, rasterio.open(src) as s:
        assert d.crs == s.crs and d.transform == s.transform and d.shape == s.shape
        assert d.profile["tiled"] and d.block_shapes[0] == (256, 256)
        np.testing.assert_array_equal(d.read(1), predict_large(model, image, window=64, overlap=16).labels)


@pytest.mark.parametrize("compress", ["deflate", "lzw"])
def test_compressed_tiled_geotiff_decoded_on_several_threads_reads_the_written_pixels(
    tmp_path: Path, rng: np.random.Generator, compress: str
) -> None:
    """A strip spans many compressed tiles, decoded in parallel (``read_threads``): into a fresh
    array and into a strided destination, with rows that cross tile borders."""
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine
    from rasterio.windows import Window

    from ctseg.inference.io import RasterioReader

    image = rng.integers(0, 256, (300, 700, 3), dtype=np.uint8)
    profile = {
        "driver": "GTiff", "width": 700, "height": 300, "count": 3, "dtype": "uint8",
        "tiled": True, "blockxsize": 64, "blockysize": 64, "compress": compress,
        "crs": "EPSG:32632", "transform": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5800000.0),
    }  # fmt: skip
    path = tmp_path / f"{compress}.tif"
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, 300, 100):  # written by windows: the tiles are compressed one by one
            ds.write(np.moveaxis(image[y0 : y0 + 100], -1, 0), window=Window(0, y0, 700, 100))
    for threads in (1, 4, "ALL_CPUS"):
        with RasterioReader(path, read_threads=threads) as reader:
            np.testing.assert_array_equal(reader.read_rows(37, 201), np.moveaxis(image[37:201], -1, 0))
            out = np.zeros((3, 164, 710), np.uint8)
            reader.read_rows_into(37, 201, out[:, :, 5:705])
            np.testing.assert_array_equal(out[:, :, 5:705], np.moveaxis(image[37:201], -1, 0))
            assert not out[:, :, :5].any() and not out[:, :, 705:].any()


def test_geotiff_band_selection_and_non_uint8(tmp_path: Path, rng: np.random.Generator) -> None:
    pytest.importorskip("rasterio")
    rgbi = rng.integers(0, 4000, (40, 50, 4), dtype=np.uint16)
    src = write_geotiff(tmp_path / "rgbi.tif", rgbi)
    with pytest.raises(DataError, match="4 bands"):
        open_scene(src, input_max=4000)
    with pytest.raises(DataError, match=r"uint16.*input_max"):
        open_scene(src, bands=(3, 2, 1))
    with open_scene(src, bands=(3, 2, 1), input_max=4000) as r:
        np.testing.assert_array_equal(r.read_rows(5, 9), rgbi[5:9, :, [2, 1, 0]].transpose(2, 0, 1))
    model = pointwise_net()
    a = predict_large(model, src, window=32, overlap=8, return_logits=True, input_max=4000, bands=(1, 2, 3))
    b = predict_large(
        model,
        rgbi[:, :, :3].astype(np.float32) / 4000 * 255,
        window=32,
        overlap=8,
        input_max=255.0,
        return_logits=True,
    )
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)


def test_float_geotiff_with_nan_is_a_data_error_naming_the_file(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    pytest.importorskip("rasterio")
    img = rng.random((40, 40, 3)).astype(np.float32)
    img[33, 7, 1] = np.nan
    src = write_geotiff(tmp_path / "nan.tif", img)
    with pytest.raises(DataError, match=r"nan\.tif.*NaN or Inf.*row 33"):
        predict_file(pointwise_net(), src, tmp_path / "out", SETTINGS, num_classes=5, input_max=1.0)
    assert list((tmp_path / "out").iterdir()) == []  # nothing partial left


def test_failure_midway_leaves_no_partial_output(tmp_path: Path, smooth_image: np.ndarray) -> None:
    class Flaky(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.calls = pointwise_net(), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 4:
                raise RuntimeError("device lost")
            return self.net(x)

    src = tmp_path / "t.png"
    Image.fromarray(smooth_image).save(src)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="device lost"):
        predict_file(
            Flaky(), src, out, SlidingWindow(window=32, overlap=8, batch_size=1), num_classes=5, probs=True
        )
    assert list(out.iterdir()) == []


def test_geotiff_without_rasterio_says_how_to_install(
    tmp_path: Path, smooth_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("rasterio")  # to write the fixture
    src = write_geotiff(tmp_path / "g.tif", smooth_image)
    plain = tmp_path / "plain.tif"
    Image.fromarray(smooth_image).save(plain)
    monkeypatch.setattr(cio, "import_rasterio", lambda: None)
    with pytest.raises(DataError, match=r"g\.tif.*GeoTIFF.*pip install ctseg\[geo\]"):
        open_scene(src)
    # A plain TIFF is read with Pillow and predicted to PNG.
    with open_scene(plain) as r:
        assert r.georef is None and (r.height, r.width) == smooth_image.shape[:2]
        np.testing.assert_array_equal(r.read_rows(0, 3), smooth_image[:3].transpose(2, 0, 1))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p.write_bytes(b"not an image at all"), "cannot read image"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: Image.fromarray(np.zeros((8, 8), np.uint8)).save(p), "1 channel"),
        (lambda p: Image.fromarray(np.zeros((8, 8, 2), np.uint8)).save(p), "2 channels"),
    ],
)
def test_bad_images_are_data_errors_naming_the_file(tmp_path: Path, make, match: str) -> None:
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(DataError, match=rf"bad\.png.*{match}"):
        open_scene(path)


def test_bad_arrays_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="zero-size"):
        ArrayReader(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(DataError, match="channels"):
        ArrayReader(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(DataError, match="no such file"):
        open_scene(tmp_path / "missing.jpg")
    with pytest.raises(DataError, match="no images"):
        list_inputs(tmp_path)


def test_unwritable_output_folder_is_an_output_error(tmp_path: Path, smooth_image: np.ndarray) -> None:
    src = tmp_path / "t.png"
    Image.fromarray(smooth_image).save(src)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file"):
        predict_file(pointwise_net(), src, blocker / "out", SETTINGS, num_classes=5)


def test_palette_png_and_jpeg_inputs(tmp_path: Path, smooth_image: np.ndarray) -> None:
    Image.fromarray(smooth_image).convert("P").save(tmp_path / "p.png")
    Image.fromarray(smooth_image).save(tmp_path / "j.jpg", quality=95)
    assert [p.name for p in list_inputs(tmp_path)] == ["j.jpg", "p.png"]
    for name in ("p.png", "j.jpg"):
        with open_scene(tmp_path / name) as r:
            assert r.read_rows(0, 2).shape == (3, 2, 101) and r.dtype == np.uint8


@pytest.mark.parametrize("threads", [1, 4])
def test_png_pieces_compressed_in_parallel_form_one_valid_stream(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(cio, "_PNG_PIECE", 97)  # many pieces per block, odd size on purpose
    data = rng.integers(0, 4, (61, 83, 3), dtype=np.uint8)
    with PNGStreamWriter(tmp_path / "a.png", 83, 61, channels=3, threads=threads) as wr:
        for y in range(0, 61, 20):
            wr.write(data[y : y + 20])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), data)


def test_label_pngs_are_deflated_as_runs_and_read_back_exactly(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1-channel PNGs use zlib's run-length strategy by default: still one valid stream of parallel
    pieces, and on a label map (runs of classes) smaller than the default strategy gives."""
    monkeypatch.setattr(cio, "_PNG_PIECE", 4096)
    # Blocky class regions with a little salt, like a segmentation of a real scene.
    labels = np.kron(rng.integers(0, 5, (30, 40)), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    salt = rng.random(labels.shape) < 0.02
    labels[salt] = rng.integers(0, 5, int(salt.sum()))
    h, w = labels.shape
    sizes = {}
    for name, strategy in (("rle", None), ("default", zlib.Z_DEFAULT_STRATEGY)):
        path = tmp_path / f"{name}.png"
        with PNGStreamWriter(path, w, h, palette=COLORS, threads=3, strategy=strategy) as wr:
            assert wr.strategy == (zlib.Z_RLE if strategy is None else strategy)
            for y in range(0, h, 50):
                wr.write(labels[y : y + 50])
        np.testing.assert_array_equal(np.asarray(Image.open(path)), labels)
        sizes[name] = path.stat().st_size
    assert sizes["rle"] < sizes["default"]
    assert PNGStreamWriter(tmp_path / "rgb.png", 4, 4, channels=3).strategy == zlib.Z_DEFAULT_STRATEGY


def test_a_failing_writer_leaves_no_partial_output(
    tmp_path: Path, smooth_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = PNGStreamWriter.write

    def flaky_write(self: PNGStreamWriter, rows: np.ndarray, more: bool = False) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        original(self, rows, more)

    monkeypatch.setattr(PNGStreamWriter, "write", flaky_write)
    src = tmp_path / "t.png"
    Image.fromarray(smooth_image).save(src)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"t_(labels|color)\.png: cannot write \(No space left on device\)"):
        predict_file(
            pointwise_net(), src, out, SlidingWindow(window=32, overlap=8), num_classes=5, probs=True
        )
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("threads", [1, 3])
def test_png_rows_continued_with_more_give_the_same_bytes_as_one_write(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(cio, "_PNG_PIECE", 97)  # pieces that span several of the small writes
    data = rng.integers(0, 4, (61, 83, 3), dtype=np.uint8)
    with PNGStreamWriter(tmp_path / "one.png", 83, 61, channels=3, threads=threads) as wr:
        wr.write(data[:20])
        wr.write(data[20:])
    with PNGStreamWriter(tmp_path / "parts.png", 83, 61, channels=3, threads=threads) as wr:
        wr.write(data[:20])
        for y in range(20, 61, 3):
            wr.write(data[y : y + 3], more=y + 3 < 61)
    assert (tmp_path / "parts.png").read_bytes() == (tmp_path / "one.png").read_bytes()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "parts.png")), data)
    unfinished = PNGStreamWriter(tmp_path / "x.png", 83, 2, channels=3)
    unfinished.write(data[:2], more=True)
    with pytest.raises(RuntimeError, match="more=True"):
        unfinished.close()


@pytest.mark.parametrize(
    ("suffix", "probs"), [(".tif", False), (".png", False), (".tif", True), (".png", True)]
)
def test_last_strip_written_in_small_blocks_gives_identical_files(
    tmp_path: Path, smooth_image: np.ndarray, monkeypatch: pytest.MonkeyPatch, suffix: str, probs: bool
) -> None:
    # Labels and colours: the last strip goes to the writers in blocks of FINAL_BLOCK_ROWS, and the files
    # are byte for byte those of one block. With probabilities it stays one block (softmax rounds by
    # block shape), so they are identical too.
    import ctseg.inference.predict as cpredict

    src = tmp_path / f"s{suffix}"
    if suffix == ".tif":
        write_geotiff(src, smooth_image)
    else:
        Image.fromarray(smooth_image).save(src)
    monkeypatch.setattr(cio, "_PNG_PIECE", 1000)  # PNG pieces that span the small final blocks
    model = pointwise_net(5)
    blocks = {"n": 0}
    start_copy = cpredict._start_copy

    def counting(*a: object, **k: object) -> object:
        blocks["n"] += 1
        return start_copy(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(cpredict, "_start_copy", counting)
    outputs, counts = [], []
    for rows in (10**6, 7, 1):  # one final block (as before the split existed), blocks of 7 rows, of 1
        monkeypatch.setattr(cpredict, "FINAL_BLOCK_ROWS", rows)
        blocks["n"] = 0
        res = predict_file(
            model, src, tmp_path / f"out{rows}", SETTINGS, num_classes=5, colors=COLORS, probs=probs
        )
        outputs.append({k: p.read_bytes() for k, p in res.outputs.items()})
        counts.append(blocks["n"])
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    assert counts[0] == counts[1] == counts[2] if probs else counts[0] < counts[1] < counts[2]


def test_a_writer_that_cannot_be_opened_leaves_no_partial_output(
    tmp_path: Path, smooth_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writers are opened in a background thread while the first strip is computed: their error is
    # still the one raised, and no file is left behind.
    import ctseg.inference.predict as cpredict

    class Broken(NpyStreamWriter):
        def __init__(self, *a: object, **k: object) -> None:
            raise OutputError("probs: cannot create")

    monkeypatch.setattr(cpredict, "NpyStreamWriter", Broken)
    src = tmp_path / "t.png"
    Image.fromarray(smooth_image).save(src)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="probs: cannot create"):
        predict_file(pointwise_net(), src, out, SETTINGS, num_classes=5, probs=True)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("budget", "bound"), [(0, 2), (2**30, None)])
def test_blocks_ahead_of_slow_writers_are_bounded_by_the_byte_budget(
    tmp_path: Path, smooth_image: np.ndarray, monkeypatch, budget: int, bound: int | None
) -> None:
    """The host runs ahead of the writers by at most ``WRITE_BEHIND`` blocks, or more while their
    host copies fit ``WRITE_BEHIND_BYTES`` (bounded memory, writers' jitter absorbed). Outputs are
    the same either way."""
    from ctseg.inference import predict as cpred

    started, written, ahead = [0], [0], []
    real_start, real_write = cpred._start_copy, cpred._write

    def start(*args, **kwargs):
        started[0] += 1
        ahead.append(started[0] - written[0])
        return real_start(*args, **kwargs)

    def slow_write(writer, block, key, *args, **kwargs):
        import time

        time.sleep(0.01)  # a slow disk: the host gets ahead
        real_write(writer, block, key, *args, **kwargs)
        if key == "labels":
            written[0] += 1

    monkeypatch.setattr(cpred, "WRITE_BEHIND_BYTES", budget)
    monkeypatch.setattr(cpred, "_start_copy", start)
    monkeypatch.setattr(cpred, "_write", slow_write)
    src = tmp_path / "tile.png"
    Image.fromarray(np.tile(smooth_image, (3, 1))).save(src)  # 231 rows: 9 strips of 32-px windows
    res = predict_file(pointwise_net(5), src, tmp_path / "out", SETTINGS, num_classes=5)
    labels = np.asarray(Image.open(res.outputs["labels"]))
    ref = predict_large(pointwise_net(5), np.tile(smooth_image, (3, 1)), window=32, overlap=8)
    np.testing.assert_array_equal(labels, ref.labels)
    if bound is None:
        assert max(ahead) > cpred.WRITE_BEHIND + 1  # a large budget lets the host run further ahead
    else:
        assert max(ahead[:-2]) <= bound + 1  # started minus written, counting this one; last strip free
