"""Rasters that only GDAL reads: a VRT mosaic of GeoTIFF tiles and a JPEG 2000 scene predict like the
GeoTIFF that holds the same pixels, with its georeference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctseg.errors import DataError
from ctseg.inference import io as cio
from ctseg.inference.io import list_inputs, open_scene
from ctseg.inference.predict import predict_file
from ctseg.inference.sliding import SlidingWindow
from tests.inference.conftest import pointwise_net, write_geotiff

SETTINGS = SlidingWindow(window=32, overlap=8, batch_size=4)
ORIGIN, GSD = (500000.0, 5800000.0), 0.5


def write_vrt(path: Path, tiles: list[tuple[Path, int, int, int, int]], width: int, height: int) -> Path:
    """A VRT mosaic (EPSG:32632, north up): ``tiles`` are ``(file, x_off, y_off, w, h)`` placements."""
    import rasterio

    crs_wkt = rasterio.crs.CRS.from_epsg(32632).to_wkt()
    bands = []
    for b in (1, 2, 3):
        sources = "".join(
            f"<SimpleSource><SourceFilename relativeToVRT='1'>{f.name}</SourceFilename>"
            f"<SourceBand>{b}</SourceBand>"
            f"<SrcRect xOff='0' yOff='0' xSize='{w}' ySize='{h}'/>"
            f"<DstRect xOff='{x}' yOff='{y}' xSize='{w}' ySize='{h}'/></SimpleSource>"
            for f, x, y, w, h in tiles
        )
        bands.append(f"<VRTRasterBand dataType='Byte' band='{b}'>{sources}</VRTRasterBand>")
    path.write_text(
        f"<VRTDataset rasterXSize='{width}' rasterYSize='{height}'><SRS>{crs_wkt}</SRS>"
        f"<GeoTransform>{ORIGIN[0]}, {GSD}, 0, {ORIGIN[1]}, 0, {-GSD}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )
    return path


def predicted_labels(src: Path, out: Path) -> tuple[np.ndarray, object, object]:
    import rasterio

    res = predict_file(pointwise_net(5), src, out, SETTINGS, num_classes=5)
    with rasterio.open(res.outputs["labels"]) as d:
        return d.read(1), d.crs, d.transform


def test_vrt_mosaic_predicts_as_the_whole_scene(tmp_path: Path, smooth_image: np.ndarray) -> None:
    pytest.importorskip("rasterio")
    h, w, _ = smooth_image.shape
    cut = 45  # two tiles side by side, the seam inside a window
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    left = write_geotiff(tiles / "left.tif", smooth_image[:, :cut], origin=ORIGIN, gsd=GSD)
    right_origin = (ORIGIN[0] + cut * GSD, ORIGIN[1])
    right = write_geotiff(tiles / "right.tif", smooth_image[:, cut:], origin=right_origin, gsd=GSD)
    vrt = write_vrt(tiles / "mosaic.vrt", [(left, 0, 0, cut, h), (right, cut, 0, w - cut, h)], w, h)
    whole = write_geotiff(tmp_path / "whole.tif", smooth_image, origin=ORIGIN, gsd=GSD)

    assert vrt in list_inputs(tiles)
    with open_scene(vrt) as r:
        assert (r.height, r.width) == (h, w) and r.georef is not None
        np.testing.assert_array_equal(r.read_rows(10, 20), smooth_image[10:20].transpose(2, 0, 1))
    labels, crs, transform = predicted_labels(vrt, tmp_path / "out")
    ref_labels, ref_crs, ref_transform = predicted_labels(whole, tmp_path / "ref")
    np.testing.assert_array_equal(labels, ref_labels)
    assert crs == ref_crs and transform == ref_transform


def test_jpeg2000_scene_predicts_with_its_georeference(tmp_path: Path, smooth_image: np.ndarray) -> None:
    rasterio = pytest.importorskip("rasterio")
    if "JP2OpenJPEG" not in rasterio.drivers.raster_driver_extensions().values():
        pytest.skip("this GDAL has no JPEG 2000 driver")
    from affine import Affine

    h, w, _ = smooth_image.shape
    jp2 = tmp_path / "ortho.jp2"
    profile = {
        "driver": "JP2OpenJPEG",
        "width": w,
        "height": h,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32632",
        "transform": Affine(GSD, 0.0, ORIGIN[0], 0.0, -GSD, ORIGIN[1]),
        "quality": 100,
        "reversible": True,  # lossless: the same pixels as the GeoTIFF
    }
    with rasterio.open(jp2, "w", **profile) as ds:
        ds.write(np.moveaxis(smooth_image, -1, 0))
    whole = write_geotiff(tmp_path / "whole.tif", smooth_image, origin=ORIGIN, gsd=GSD)
    labels, crs, transform = predicted_labels(jp2, tmp_path / "out")
    ref_labels, ref_crs, ref_transform = predicted_labels(whole, tmp_path / "ref")
    np.testing.assert_array_equal(labels, ref_labels)
    assert crs == ref_crs and transform == ref_transform


def test_gdal_rasters_without_rasterio_say_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text("<VRTDataset rasterXSize='1' rasterYSize='1'></VRTDataset>")
    monkeypatch.setattr(cio, "import_rasterio", lambda: None)
    with pytest.raises(DataError, match=r"mosaic\.vrt.*GDAL.*pip install ctseg\[geo\]"):
        open_scene(vrt)
