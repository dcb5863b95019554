"""Nodata pixels (a GeoTIFF's nodata value, NaN or alpha band; a PNG's alpha) are masked in every output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctseg.errors import DataError
from ctseg.inference.io import NODATA_LABEL, PillowReader, open_scene
from ctseg.inference.predict import predict_file
from ctseg.inference.sliding import SlidingWindow, predict_large
from tests.inference.conftest import pointwise_net, write_geotiff

COLORS = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0)]
# Small windows and blocks: the scene spans several strips, blocks and GeoTIFF tile rows of the output.
SETTINGS = SlidingWindow(window=32, overlap=8, batch_size=4)


def scene_with_holes(smooth_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image with nodata (0 in every band) in a left margin and a block inside, and some pixels
    with 0 in one band only (dark, but data); returns it and the nodata mask ``(H, W)``."""
    img = np.maximum(smooth_image, 1)
    nodata = np.zeros(img.shape[:2], dtype=bool)
    nodata[:, :9] = True  # an irregular footprint's edge
    nodata[40:70, 50:61] = True  # a hole across strip and block borders
    img[nodata] = 0
    img[5:9, 20:30, 0] = 0  # one band at 0: valid
    return img, nodata


def predict(src: Path, out: Path, **kw):
    return predict_file(
        pointwise_net(5), src, out, SETTINGS, num_classes=5, colors=COLORS, class_names=list("abcde"), **kw
    )


def test_nodata_value_gives_the_nodata_label_a_transparent_colour_and_nan_probabilities(
    tmp_path: Path, smooth_image: np.ndarray
) -> None:
    rasterio = pytest.importorskip("rasterio")
    img, nodata = scene_with_holes(smooth_image)
    src = write_geotiff(tmp_path / "scene.tif", img, nodata=0)
    with open_scene(src) as reader:
        assert reader.has_mask
        valid_mask = reader.open_valid_mask()
        assert valid_mask is not None
        try:
            np.testing.assert_array_equal(valid_mask.read(30, 77), ~nodata[30:77])
        finally:
            valid_mask.close()
    masked = predict(src, tmp_path / "masked", probs=True)
    plain = predict(src, tmp_path / "plain", probs=True, mask_nodata=False)

    with rasterio.open(masked.outputs["labels"]) as d, rasterio.open(plain.outputs["labels"]) as p:
        labels, unmasked = d.read(1), p.read(1)
        assert d.nodata == NODATA_LABEL and p.nodata is None
        assert d.crs == p.crs and d.transform == p.transform
        assert d.colormap(1)[NODATA_LABEL] == (0, 0, 0, 0) and d.colormap(1)[1] == (*COLORS[1], 255)
    assert (labels[nodata] == NODATA_LABEL).all()
    # Elsewhere the prediction is the unmasked one: the network saw the same pixels.
    np.testing.assert_array_equal(labels[~nodata], unmasked[~nodata])
    assert (unmasked < 5).all()

    colour = Image.open(masked.outputs["color"])
    assert colour.mode == "P"
    np.testing.assert_array_equal(np.asarray(colour), labels)
    rgba = np.asarray(colour.convert("RGBA"))
    np.testing.assert_array_equal(rgba[..., 3], np.where(nodata, 0, 255))
    np.testing.assert_array_equal(rgba[~nodata][:, :3], np.asarray(COLORS, np.uint8)[labels[~nodata]])

    with rasterio.open(masked.outputs["probs"]) as d, rasterio.open(plain.outputs["probs"]) as p:
        probs, unmasked_probs = d.read(), p.read()
        assert np.isnan(d.nodata)
    assert np.isnan(probs[:, nodata]).all()
    np.testing.assert_array_equal(probs[:, ~nodata], unmasked_probs[:, ~nodata])

    # The in-memory API masks alike and returns the mask.
    kw = {"window": 32, "overlap": 8, "batch_size": 4, "return_probs": True}
    pred = predict_large(pointwise_net(5), src, **kw)
    np.testing.assert_array_equal(pred.valid, ~nodata)
    np.testing.assert_array_equal(pred.labels, labels)
    np.testing.assert_allclose(pred.probs, probs, atol=1e-6)  # NaN where both are
    plain_pred = predict_large(pointwise_net(5), src, mask_nodata=False, **kw)
    assert plain_pred.valid is None
    np.testing.assert_array_equal(plain_pred.labels, unmasked)


def test_nan_nodata_of_a_float_scene_is_masked_not_an_error(tmp_path: Path, smooth_image: np.ndarray) -> None:
    rasterio = pytest.importorskip("rasterio")
    img, nodata = scene_with_holes(smooth_image)
    scene = img.astype(np.float32) / 255
    scene[nodata] = np.nan
    src = write_geotiff(tmp_path / "reflectance.tif", scene, nodata=float("nan"))
    res = predict(src, tmp_path / "out", input_max=1.0)
    with rasterio.open(res.outputs["labels"]) as d:
        labels = d.read(1)
    np.testing.assert_array_equal(labels == NODATA_LABEL, nodata)
    # Inf is no nodata: still the error that names the file and the row.
    scene[60, 3, 2] = np.inf
    src = write_geotiff(tmp_path / "inf.tif", scene, nodata=float("nan"))
    with pytest.raises(DataError, match=r"inf\.tif.*NaN or Inf.*row 60"):
        predict(src, tmp_path / "out2", input_max=1.0)
    assert list((tmp_path / "out2").iterdir()) == []


def test_alpha_band_masks_the_pixels_it_makes_transparent(tmp_path: Path, smooth_image: np.ndarray) -> None:
    rasterio = pytest.importorskip("rasterio")
    from rasterio.enums import ColorInterp

    img, nodata = scene_with_holes(smooth_image)
    rgba = np.concatenate([img, np.where(nodata, 0, 255).astype(np.uint8)[..., None]], axis=-1)
    src = write_geotiff(tmp_path / "rgba.tif", rgba, photometric="RGB")
    with rasterio.open(src, "r+") as ds:
        ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    res = predict(src, tmp_path / "out", bands=[1, 2, 3])
    with rasterio.open(res.outputs["labels"]) as d:
        np.testing.assert_array_equal(d.read(1) == NODATA_LABEL, nodata)


def test_a_scene_without_nodata_reads_no_mask(tmp_path: Path, smooth_image: np.ndarray) -> None:
    rasterio = pytest.importorskip("rasterio")
    src = write_geotiff(tmp_path / "full.tif", smooth_image)
    with open_scene(src) as reader:
        assert not reader.has_mask and reader.open_valid_mask() is None
    res = predict(src, tmp_path / "out")
    with rasterio.open(res.outputs["labels"]) as d:
        assert d.nodata is None and (d.read(1) < 5).all()
    assert "transparency" not in Image.open(res.outputs["color"]).info


def test_nodata_needs_a_free_label(tmp_path: Path, smooth_image: np.ndarray) -> None:
    pytest.importorskip("rasterio")
    img, _ = scene_with_holes(smooth_image)
    src = write_geotiff(tmp_path / "scene.tif", img, nodata=0)
    net = pointwise_net(256)
    with pytest.raises(ValueError, match=r"scene\.tif.*nodata.*at most 255 classes.*mask_nodata=False"):
        predict_file(net, src, tmp_path / "out", SETTINGS, num_classes=256)
    assert list((tmp_path / "out").iterdir()) == []
    res = predict_file(net, src, tmp_path / "out", SETTINGS, num_classes=256, mask_nodata=False)
    assert res.outputs["labels"].is_file()


def test_overviews_keep_classes_and_nodata(tmp_path: Path, smooth_image: np.ndarray) -> None:
    rasterio = pytest.importorskip("rasterio")
    img, nodata = scene_with_holes(smooth_image)
    big = np.tile(img, (8, 8, 1))[:, :800]  # 616 x 800 (even): overview factors 2 and 4
    src = write_geotiff(tmp_path / "big.tif", big, nodata=0)
    res = predict(src, tmp_path / "out", probs=True, overviews=True)
    with rasterio.open(res.outputs["labels"]) as d:
        assert d.overviews(1) == [2, 4] and d.tags(ns="rio_overview")["resampling"] == "nearest"
        labels = d.read(1)
    with rasterio.open(res.outputs["labels"], overview_level=0) as o:  # the factor-2 overview itself
        half = o.read(1)
    np.testing.assert_array_equal(labels == NODATA_LABEL, np.tile(nodata, (8, 8))[:, :800])
    # Nearest neighbour: classes and nodata stay what they are, no averaged labels.
    np.testing.assert_array_equal(half, labels[::2, ::2])
    with rasterio.open(res.outputs["probs"]) as p:
        assert p.overviews(1) == [2, 4] and p.tags(ns="rio_overview")["resampling"] == "average"
    plain = predict(src, tmp_path / "plain")
    with rasterio.open(plain.outputs["labels"]) as d:
        assert d.overviews(1) == []


def test_png_alpha_is_the_nodata_mask(tmp_path: Path, smooth_image: np.ndarray) -> None:
    img, nodata = scene_with_holes(smooth_image)
    alpha = np.where(nodata, 0, 255).astype(np.uint8)
    Image.fromarray(np.concatenate([img, alpha[..., None]], axis=-1), mode="RGBA").save(tmp_path / "t.png")
    Image.fromarray(img).save(tmp_path / "rgb.png")
    res = predict(tmp_path / "t.png", tmp_path / "out")
    ref = predict(tmp_path / "rgb.png", tmp_path / "ref")
    labels = np.asarray(Image.open(res.outputs["labels"]))
    unmasked = np.asarray(Image.open(ref.outputs["labels"]))
    np.testing.assert_array_equal(labels == NODATA_LABEL, nodata)
    np.testing.assert_array_equal(labels[~nodata], unmasked[~nodata])
    rgba = np.asarray(Image.open(res.outputs["color"]).convert("RGBA"))
    np.testing.assert_array_equal(rgba[..., 3], np.where(nodata, 0, 255))
    # Fully opaque: no mask at all; a 4-band TIFF is not taken as RGB + alpha.
    Image.fromarray(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]), mode="RGBA").save(
        tmp_path / "o.png"
    )
    with open_scene(tmp_path / "o.png") as r:
        assert not r.has_mask and r.open_valid_mask() is None
    Image.fromarray(np.dstack([img, alpha]), mode="RGBA").save(tmp_path / "four.tif")
    with pytest.raises(DataError, match=r"four\.tif.*4 channels"):
        PillowReader(tmp_path / "four.tif")  # the reader of plain TIFFs without rasterio
    with PillowReader(tmp_path / "four.tif", bands=[1, 2, 3]) as r:
        assert not r.has_mask


def test_a_declared_nodata_value_masks_untagged_black_borders(
    tmp_path: Path, smooth_image: np.ndarray
) -> None:
    rasterio = pytest.importorskip("rasterio")
    img, nodata = scene_with_holes(smooth_image)
    src = write_geotiff(tmp_path / "untagged.tif", img)  # black borders, but no nodata tag
    with open_scene(src) as r:
        assert not r.has_mask
    res = predict(src, tmp_path / "out", nodata=0)
    with rasterio.open(res.outputs["labels"]) as d:
        labels = d.read(1)
        assert d.nodata == NODATA_LABEL
    # Pixels that are 0 in one band only (rows 5-8) are data: nodata is 0 in every band.
    np.testing.assert_array_equal(labels == NODATA_LABEL, nodata)
    # The same for an image Pillow reads, and in memory.
    Image.fromarray(img).save(tmp_path / "untagged.png")
    png = predict(tmp_path / "untagged.png", tmp_path / "png", nodata=0)
    np.testing.assert_array_equal(np.asarray(Image.open(png.outputs["labels"])) == NODATA_LABEL, nodata)
    pred = predict_large(pointwise_net(5), img, window=32, overlap=8, nodata=0)
    np.testing.assert_array_equal(pred.valid, ~nodata)
    np.testing.assert_array_equal(pred.labels, labels)


def test_a_declared_nan_nodata_value_masks_a_float_scene_without_a_tag(
    tmp_path: Path, smooth_image: np.ndarray
) -> None:
    rasterio = pytest.importorskip("rasterio")
    img, nodata = scene_with_holes(smooth_image)
    scene = img.astype(np.float32) / 255
    scene[nodata] = np.nan
    src = write_geotiff(tmp_path / "untagged.tif", scene)
    with pytest.raises(DataError, match="NaN or Inf"):
        predict(src, tmp_path / "out", input_max=1.0)
    res = predict(src, tmp_path / "out", input_max=1.0, nodata=float("nan"))
    with rasterio.open(res.outputs["labels"]) as d:
        np.testing.assert_array_equal(d.read(1) == NODATA_LABEL, nodata)
