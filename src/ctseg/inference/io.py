"""Scene readers and row-streaming writers for prediction.

Readers (:class:`SceneReader`) give rows of raw pixels channels-first, ``(3, h, W)`` (the layout GDAL
reads and the network takes, so no interleaving copies are made); GeoTIFFs are read by windows with
rasterio (the optional ``geo`` extra, imported lazily), PNG / JPEG / plain TIFF with Pillow (the whole
image, which those formats need anyway). Writers take row blocks in order and never hold the whole
output: PNG is written as a zlib stream of rows, GeoTIFF by row windows aligned to its tiles, ``.npy``
by appending rows. All writers of one input write to temporary files in the output folder that
:class:`OutputSet` renames into place together at the end; a failure removes them, so no partial output
is ever left behind.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ctseg.errors import DataError, OutputError

GEOTIFF_SUFFIXES = (".tif", ".tiff")
# Rasters that only GDAL reads (through rasterio): a VRT mosaic of many tiles, JPEG 2000 orthophotos,
# ERDAS Imagine scenes.
GDAL_SUFFIXES = (".vrt", ".jp2", ".j2k", ".img")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", *GDAL_SUFFIXES)
# TIFF tags whose presence makes a TIFF a GeoTIFF (pixel scale, tie points, transformation, geokeys).
_GEOTIFF_TAGS = (33550, 33922, 34264, 34735)
GEO_EXTRA_HINT = "reading and writing GeoTIFF needs rasterio: pip install ctseg[geo]"


# GDAL's block cache defaults to 5% of RAM and keeps every block read or written until it is full,
# which would make memory grow with the scene. Strips are read once (plus the overlap rows) and tiles
# written once, so a small cache loses nothing.
GDAL_CACHE_MB = 64


def gdal_env() -> contextlib.AbstractContextManager[Any]:
    """A rasterio environment with a bounded GDAL block cache (a no-op without rasterio)."""
    rasterio = import_rasterio()
    return contextlib.nullcontext() if rasterio is None else rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


def import_rasterio() -> Any:
    """rasterio, or ``None`` when the ``geo`` extra is not installed."""
    try:
        import rasterio
    except ImportError:
        return None
    return rasterio


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------


class SceneReader:
    """Rows of an RGB scene.

    Attributes:
        path: the source file (``None`` for arrays), named in every error.
        height, width: scene size in pixels.
        dtype: numpy dtype of the raw pixels.
        input_max: raw value meaning full brightness (``x / input_max`` is the 0-1 scale).
        georef: ``{"crs", "transform"}`` (rasterio objects) for georeferenced scenes, else ``None``.
    """

    path: Path | None = None
    height: int
    width: int
    dtype: np.dtype
    input_max: float
    georef: dict[str, Any] | None = None
    # Whether some pixels are nodata (a nodata value, an alpha band or a mask): see open_valid_mask().
    has_mask: bool = False

    def open_valid_mask(self) -> ValidMask | None:
        """A reader of the scene's valid pixels for another thread (its own file handle), or None when
        every pixel is valid. The caller closes it."""
        return None

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Raw pixels of rows ``[y0, y1)``, channels first: ``(3, y1 - y0, W)``."""
        raise NotImplementedError

    def read_rows_into(self, y0: int, y1: int, out: np.ndarray) -> None:
        """:meth:`read_rows` written into ``out``, a ``(3, y1 - y0, W)`` array of :attr:`dtype` that may
        be a strided view (the scene columns of a padded strip buffer). This default copies what
        :meth:`read_rows` returns; readers that can decode straight into place save that copy."""
        out[...] = self.read_rows(y0, y1)

    def close(self) -> None:
        pass

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The label of nodata pixels in label maps (uint8: classes 0–254 remain).
NODATA_LABEL = 255


def check_nodata_label_free(path: Path | str | None, num_classes: int) -> None:
    """A scene with nodata pixels needs :data:`NODATA_LABEL` free: at most that many classes."""
    if num_classes > NODATA_LABEL:
        raise ValueError(
            f"{path}: has nodata pixels, which label maps mark as {NODATA_LABEL}: at most "
            f"{NODATA_LABEL} classes (or mask_nodata=False, CLI --no-nodata-mask)"
        )


class ValidMask:
    """The valid pixels of a scene, by rows (:meth:`SceneReader.open_valid_mask`): one thread at a time."""

    def read(self, y0: int, y1: int) -> np.ndarray:
        """``(y1 - y0, W)`` bool: True where rows ``[y0, y1)`` hold data, False where they are nodata."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _is_value(rows: np.ndarray, value: float) -> np.ndarray:
    """Where ``rows`` ``(C, ...)`` equals ``value`` in every channel (NaN matches NaN): GDAL's rule for a
    nodata value shared by the bands."""
    hit = np.isnan(rows) if np.isnan(value) else rows == value
    return hit.all(axis=0)


def _check_input_max(path: Path | None, dtype: np.dtype, input_max: float | None) -> float:
    if input_max is not None:
        if not input_max > 0:
            raise DataError(path, f"input_max must be positive, got {input_max}")
        return float(input_max)
    if dtype == np.uint8:
        return 255.0
    raise DataError(
        path,
        f"pixels are {dtype}, not uint8: pass input_max (the value meaning full brightness, "
        "e.g. 65535, 10000 or 1.0; CLI --input-max)",
    )


def _check_finite(path: Path | None, rows: np.ndarray, y0: int) -> None:
    if rows.dtype.kind == "f" and not np.isfinite(rows).all():
        bad = int(np.argwhere(~np.isfinite(rows))[0][1]) + y0  # rows is (3, h, W)
        raise DataError(path, f"non-finite pixel values (NaN or Inf), first in row {bad}")


class ArrayReader(SceneReader):
    """An in-memory ``(H, W, 3)`` array (or ``(H, W, C)`` with ``bands`` choosing three, 1-based);
    ``valid``: ``(H, W)`` bool, False at nodata pixels (e.g. from an alpha channel)."""

    def __init__(
        self,
        array: np.ndarray,
        *,
        input_max: float | None = None,
        path: str | Path | None = None,
        bands: Sequence[int] | None = None,
        valid: np.ndarray | None = None,
        nodata: float | None = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        if valid is not None and valid.shape != array.shape[:2]:
            raise DataError(self.path, f"valid mask of shape {valid.shape} for an image of {array.shape[:2]}")
        if array.ndim != 3:
            raise DataError(self.path, f"expected an (H, W, 3) image, got shape {tuple(array.shape)}")
        if bands is not None:
            idx = _band_indices(self.path, bands, array.shape[2])
            array = array[:, :, idx]
        if array.shape[2] != 3:
            raise DataError(
                self.path,
                f"has {array.shape[2]} channels, expected 3 (RGB); choose three with bands / --bands",
            )
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise DataError(self.path, f"zero-size image ({array.shape[0]}x{array.shape[1]})")
        if array.dtype.kind not in "uif":
            raise DataError(self.path, f"unsupported pixel type {array.dtype}")
        if nodata is not None:  # pixels of this value in all three channels are nodata
            value_valid = ~_is_value(np.moveaxis(array, -1, 0), nodata)
            valid = value_valid if valid is None else valid & value_valid
            if np.isnan(nodata) and array.dtype.kind == "f":
                array = np.nan_to_num(array, nan=0.0, posinf=np.inf, neginf=-np.inf)
        self._valid = valid
        self.has_mask = valid is not None and not bool(valid.all())
        self.array = np.ascontiguousarray(array.transpose(2, 0, 1))  # (3, H, W)
        self.height, self.width = int(array.shape[0]), int(array.shape[1])
        self.dtype = array.dtype
        self.input_max = _check_input_max(self.path, self.dtype, input_max)

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        rows = self.array[:, y0:y1]
        _check_finite(self.path, rows, y0)
        return rows

    def open_valid_mask(self) -> ValidMask | None:
        return _ArrayValidMask(self._valid) if self.has_mask and self._valid is not None else None


class _ArrayValidMask(ValidMask):
    def __init__(self, valid: np.ndarray) -> None:
        self._valid = valid

    def read(self, y0: int, y1: int) -> np.ndarray:
        return self._valid[y0:y1]


def _band_indices(path: Path | None, bands: Sequence[int], count: int) -> list[int]:
    idx = [int(b) - 1 for b in bands]
    if len(idx) != 3 or any(not 0 <= i < count for i in idx):
        raise DataError(path, f"bands {list(bands)} invalid: need three 1-based band numbers of {count}")
    return idx


def _pillow_is_geotiff(path: Path) -> bool:
    from PIL import Image

    with contextlib.suppress(Exception), Image.open(path) as im:
        tags = getattr(im, "tag_v2", None)
        return tags is not None and any(t in tags for t in _GEOTIFF_TAGS)
    return False


class PillowReader(ArrayReader):
    """PNG / JPEG / plain TIFF, decoded whole by Pillow (palette images are expanded to RGB).

    The alpha channel of a PNG (RGBA, or a palette with transparency) is its nodata mask: pixels with
    alpha 0 are nodata, and the other three channels are the image. (A 4-channel TIFF is not read
    this way: its fourth band is as often near-infrared as alpha; choose three with ``bands``.)
    """

    def __init__(
        self,
        path: str | Path,
        *,
        input_max: float | None = None,
        bands: Sequence[int] | None = None,
        nodata: float | None = None,
    ):
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        # Scenes legitimately exceed Pillow's decompression-bomb guard (89 Mpx); the user chose the file.
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as im:
                alpha_is_mask = im.format == "PNG"
                if im.mode in ("P", "PA"):
                    im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
                alpha_is_mask = alpha_is_mask and im.mode == "RGBA"
                array = np.asarray(im)
        except FileNotFoundError as exc:
            raise DataError(path, "no such file") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(path, f"cannot read image ({exc})") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = old
        if array.ndim == 2:
            raise DataError(path, "has 1 channel (greyscale), expected 3 (RGB)")
        valid = None
        if alpha_is_mask:
            valid = array[..., 3] > 0
            if bands is None:
                array = array[..., :3]
        super().__init__(array, input_max=input_max, path=path, bands=bands, valid=valid, nodata=nodata)


# Threads GDAL decodes the compressed tiles of one read with (the GTiff driver's NUM_THREADS open
# option): a strip of a 6000-wide scene spans dozens of tiles, and a compressed scene decoded on one
# core can take longer than the GPU's forward over the same rows. On the 2-core box reading a deflate
# 6000² scene alone took 0.37 instead of 0.53 s (docs/benchmarks.md, Inference).
READ_THREADS = "ALL_CPUS"


class RasterioReader(SceneReader):
    """A GeoTIFF (or any raster GDAL reads) read by row windows; keeps CRS and transform.

    ``read_threads``: GDAL's decoding threads per read of a compressed raster (``"ALL_CPUS"`` or a
    number; 1: one thread; None: :data:`READ_THREADS`). Uncompressed rasters are read on one thread.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        input_max: float | None = None,
        bands: Sequence[int] | None = None,
        read_threads: int | str | None = None,
        nodata: float | None = None,
    ):
        rasterio = import_rasterio()
        if rasterio is None:
            raise DataError(path, GEO_EXTRA_HINT)
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "no such file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._ds = rasterio.open(self.path)
                threads = str(READ_THREADS if read_threads is None else read_threads)
                if self._ds.compression is not None and threads != "1":
                    # Reopened (≈ 1 ms) with decoding threads: for uncompressed tiles they only
                    # compete with the prediction thread (slower heads on the 2-core box).
                    self._ds.close()
                    self._ds = rasterio.open(self.path, num_threads=threads)
        except rasterio.errors.RasterioIOError as exc:
            raise DataError(self.path, f"cannot read raster ({exc})") from exc
        ds = self._ds
        try:
            if ds.width == 0 or ds.height == 0:
                raise DataError(self.path, f"zero-size raster ({ds.height}x{ds.width})")
            if bands is not None:
                self._bands = [i + 1 for i in _band_indices(self.path, bands, ds.count)]
            elif ds.count == 3:
                self._bands = [1, 2, 3]
            else:
                raise DataError(
                    self.path,
                    f"has {ds.count} bands, expected 3 (RGB); choose three with --bands, e.g. 1,2,3",
                )
            dtypes = {ds.dtypes[b - 1] for b in self._bands}
            if len(dtypes) != 1:
                raise DataError(self.path, f"bands {self._bands} have different types {sorted(dtypes)}")
            self.dtype = np.dtype(dtypes.pop())
            if self.dtype.kind not in "uif":
                raise DataError(self.path, f"unsupported pixel type {self.dtype}")
            self.input_max = _check_input_max(self.path, self.dtype, input_max)
        except BaseException:
            ds.close()
            raise
        self.height, self.width = int(ds.height), int(ds.width)
        georeferenced = ds.crs is not None or not ds.transform.is_identity
        self.georef = {"crs": ds.crs, "transform": ds.transform} if georeferenced else None
        # GDAL's mask of each band covers a nodata value, an alpha band and an internal or sidecar mask
        # alike; a band without any is "all valid".
        flags = [ds.mask_flag_enums[b - 1] for b in self._bands]
        self._own_mask = any(rasterio.enums.MaskFlags.all_valid not in f for f in flags)
        # ``nodata``: a value the caller declares nodata (e.g. black borders of a scene without a nodata
        # tag), in addition to the scene's own mask.
        self._nodata_value = nodata
        self.has_mask = self._own_mask or nodata is not None
        # NaN as the nodata value of a float raster: NaN pixels are nodata (masked, fed to the network
        # as 0), not the corrupt values that an error reports.
        values = [ds.nodatavals[b - 1] for b in self._bands] + [nodata]
        self._nan_nodata = self.dtype.kind == "f" and any(v is not None and np.isnan(v) for v in values)
        self._mask_threads = threads if ds.compression is not None else "1"

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        from rasterio.windows import Window

        try:
            data = self._ds.read(self._bands, window=Window(0, y0, self.width, y1 - y0))  # (3, h, W)
        except Exception as exc:
            raise DataError(self.path, f"cannot read rows {y0}-{y1} ({exc})") from exc
        self._check_pixels(data, y0)
        return data

    def read_rows_into(self, y0: int, y1: int, out: np.ndarray) -> None:
        from rasterio.windows import Window

        # GDAL decodes straight into the (strided) destination: no intermediate array, no copy.
        try:
            self._ds.read(self._bands, window=Window(0, y0, self.width, y1 - y0), out=out)
        except Exception as exc:
            raise DataError(self.path, f"cannot read rows {y0}-{y1} ({exc})") from exc
        self._check_pixels(out, y0)

    def _check_pixels(self, rows: np.ndarray, y0: int) -> None:
        if self._nan_nodata:
            np.nan_to_num(rows, copy=False, nan=0.0, posinf=np.inf, neginf=-np.inf)
        _check_finite(self.path, rows, y0)

    def open_valid_mask(self) -> ValidMask | None:
        if not self.has_mask:
            return None
        return _RasterioValidMask(
            self.path, self._bands, self.width, self._mask_threads, self._own_mask, self._nodata_value
        )

    def close(self) -> None:
        self._ds.close()


class _RasterioValidMask(ValidMask):
    """GDAL's masks of the chosen bands (``own``), from a handle of its own (a dataset is not shared
    between threads); a pixel is valid where any band is, as GDAL's dataset mask counts it. With
    ``nodata``, pixels of that value in every chosen band are nodata as well."""

    def __init__(
        self,
        path: Path,
        bands: Sequence[int],
        width: int,
        threads: str,
        own: bool = True,
        nodata: float | None = None,
    ) -> None:
        rasterio = import_rasterio()
        self.path, self._bands, self._width = path, list(bands), width
        self._own, self._nodata = own, nodata
        try:
            self._ds = rasterio.open(path, num_threads=threads) if threads != "1" else rasterio.open(path)
        except rasterio.errors.RasterioIOError as exc:
            raise DataError(path, f"cannot read raster ({exc})") from exc

    def read(self, y0: int, y1: int) -> np.ndarray:
        from rasterio.windows import Window

        window = Window(0, y0, self._width, y1 - y0)
        valid = np.ones((y1 - y0, self._width), dtype=bool)
        try:
            if self._own:
                valid &= self._ds.read_masks(self._bands, window=window).any(axis=0)
            if self._nodata is not None:
                valid &= ~_is_value(self._ds.read(self._bands, window=window), self._nodata)
        except Exception as exc:
            raise DataError(self.path, f"cannot read the nodata mask of rows {y0}-{y1} ({exc})") from exc
        return valid

    def close(self) -> None:
        self._ds.close()


def open_scene(
    path: str | Path,
    *,
    input_max: float | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
) -> SceneReader:
    """A reader for ``path``: rasterio for TIFF when installed, else Pillow (refusing GeoTIFFs);
    rasterio for the rasters only GDAL reads (:data:`GDAL_SUFFIXES`); Pillow for PNG / JPEG."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file")
    if path.suffix.lower() in GDAL_SUFFIXES:
        if import_rasterio() is None:
            raise DataError(path, f"is read by GDAL; {GEO_EXTRA_HINT}")
        return RasterioReader(path, input_max=input_max, bands=bands, nodata=nodata)
    if path.suffix.lower() in GEOTIFF_SUFFIXES:
        if import_rasterio() is not None:
            return RasterioReader(path, input_max=input_max, bands=bands, nodata=nodata)
        if _pillow_is_geotiff(path):
            raise DataError(path, f"is a GeoTIFF; {GEO_EXTRA_HINT}")
        try:
            return PillowReader(path, input_max=input_max, bands=bands, nodata=nodata)
        except DataError as exc:
            raise DataError(path, f"{exc.problem}; if it is a GeoTIFF, pip install ctseg[geo]") from exc
    return PillowReader(path, input_max=input_max, bands=bands, nodata=nodata)


def list_inputs(path: str | Path) -> list[Path]:
    """The image files of a folder (sorted, non-recursive), or ``[path]`` for a file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(path, f"folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.exists():
        raise DataError(path, "no such file or folder")
    return [path]


# ---------------------------------------------------------------------------------------------------
# Atomic output sets
# ---------------------------------------------------------------------------------------------------


def check_output_dir(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove it writable, raising :class:`OutputError` naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ctseg-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write output here ({exc.strerror or exc})") from exc
    return folder


class OutputSet:
    """Temporary files for the outputs of one input, renamed onto their targets together on success.

    ``with OutputSet(folder) as out: tmp = out.path("x_labels.tif")`` gives a temporary sibling of the
    target to write; leaving the block normally renames every one, an exception deletes every one.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._pending: list[tuple[Path, Path]] = []
        self._synced: set[Path] = set()

    def synced(self, tmp: Path) -> None:
        """``tmp`` is complete and already flushed to disk (its writer fsynced it, e.g. in parallel with
        the others): the rename need not fsync it again."""
        self._synced.add(Path(tmp))

    def path(self, name: str) -> Path:
        target = self.folder / name
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot write output here ({exc.strerror or exc})") from exc
        os.close(fd)
        self._pending.append((Path(tmp), target))
        return Path(tmp)

    @property
    def targets(self) -> list[Path]:
        return [t for _, t in self._pending]

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            try:
                for tmp, _ in self._pending:
                    if tmp not in self._synced:
                        with open(tmp, "rb+") as fh:
                            os.fsync(fh.fileno())
                for tmp, target in self._pending:
                    os.replace(tmp, target)
            except OSError as err:
                self._discard()
                raise OutputError(f"{self.folder}: cannot finish writing outputs ({err})") from err
        else:
            self._discard()

    def _discard(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# Row-streaming writers
# ---------------------------------------------------------------------------------------------------


class RowWriter:
    """Takes row blocks ``(h, W)`` or ``(h, W, C)`` in order, top to bottom.

    ``more=True`` says the next block continues this one (a producer splitting a large block): writers
    whose file layout depends on the block boundaries (the PNG's IDAT chunks) then keep building the
    same unit, so that the file does not depend on the split; the others write rows as they come.
    """

    def write(self, rows: np.ndarray, more: bool = False) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


# A zlib header that is valid for any level (CMF 0x78 = deflate with a 32 KiB window; (CMF*256 + FLG) % 31 == 0).
_ZLIB_HEADER = b"\x78\x01"
_PNG_PIECE = 1 << 20  # bytes of filtered rows compressed per task


def _deflate_piece(data: memoryview, level: int, strategy: int) -> bytes:
    # Raw deflate ending on a byte boundary (sync flush, not final): pieces concatenate into one stream.
    z = zlib.compressobj(level, zlib.DEFLATED, -15, 9, strategy)
    return z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)


class PNGStreamWriter(RowWriter):
    """An 8-bit PNG written row block by row block, never holding the whole image.

    The zlib stream of the image data is built like pigz does: each 1 MiB piece of filtered rows is
    deflated independently (in parallel on ``threads`` threads; zlib releases the GIL) and ends with a
    sync flush, so the pieces concatenate into one valid deflate stream; the Adler-32 checksum is
    accumulated over the rows. Compression is a little weaker than one continuous stream.

    Args:
        path: file to write.
        width, height: image size.
        channels: 1 (greyscale or palette) or 3 (RGB).
        palette: RGB colours, makes a palette ("P") image of 1 channel.
        alpha: with a palette, the opacity (0–255) of its first ``len(alpha)`` colours (a tRNS chunk;
            the others stay opaque), e.g. 0 for a nodata index.
        level: zlib level; 1 compresses label maps nearly as well as 9, many times faster.
        threads: compression threads (default: up to 8, the CPUs available).
        strategy: zlib strategy. Default: ``zlib.Z_RLE`` for 1-channel images, the zlib default for RGB.
            A label map's rows are runs of one value, which run-length matching (distance 1 only)
            finds without searching: on 6000-wide label maps (real Dubai labels, smooth to speckled
            synthetic ones) it took 9–30 % less time than the default strategy for 20–49 % fewer
            bytes (``benchmarks/label_png.py``, docs/benchmarks.md). Photographs and other RGB rows
            are not runs.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        channels: int = 1,
        palette: Sequence[Sequence[int]] | None = None,
        level: int = 1,
        threads: int | None = None,
        strategy: int | None = None,
        alpha: Sequence[int] | None = None,
    ) -> None:
        if channels not in (1, 3) or (palette is not None and channels != 1):
            raise ValueError("PNG rows: 1 channel (grey/palette) or 3 (RGB)")
        if palette is not None and not 0 < len(palette) <= 256:
            raise ValueError("a PNG palette holds 1 to 256 colours")
        if alpha is not None and (palette is None or len(alpha) > len(palette)):
            raise ValueError("PNG alpha: one value per palette colour at most, and only with a palette")
        self.path = Path(path)
        self.width, self.height, self.channels = width, height, channels
        self.level = level
        self.strategy = (
            (zlib.Z_RLE if channels == 1 else zlib.Z_DEFAULT_STRATEGY) if strategy is None else strategy
        )
        self._rows = 0
        self._adler = 1
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._threads = threads or min(8, cpus)
        self._pool: ThreadPoolExecutor | None = None
        self._chunk: list[Future[bytes]] = []  # compressed pieces of the IDAT chunk being built
        self._carry = b""  # filtered bytes of that chunk not yet making a whole piece
        self._fh = open(self.path, "wb")  # noqa: SIM115 -- closed in close()
        colour_type = 3 if palette is not None else (0 if channels == 1 else 2)
        self._fh.write(b"\x89PNG\r\n\x1a\n")
        self._fh.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)))
        if palette is not None:
            self._fh.write(_png_chunk(b"PLTE", bytes(int(v) for c in palette for v in c)))
        if alpha is not None:
            self._fh.write(_png_chunk(b"tRNS", bytes(int(a) for a in alpha)))
        self._pending_header = True

    def write(self, rows: np.ndarray, more: bool = False) -> None:
        """Append ``(h, W)`` / ``(h, W, 3)`` rows.

        Each call normally ends one IDAT chunk. With ``more=True`` the chunk goes on in the next call:
        the rows of consecutive calls ending with one ``more=False`` call give exactly the bytes of one
        call with all of them (the same 1 MiB pieces), while every piece is compressed as soon as its
        bytes are in. A producer can so hand over a large block in parts without changing the file.
        """
        rows = np.asarray(rows, dtype=np.uint8)
        h = rows.shape[0]
        flat = rows.reshape(h, self.width * self.channels)
        # Filter type 0 (None) byte before every row.
        data = np.empty((h, flat.shape[1] + 1), dtype=np.uint8)
        data[:, 0] = 0
        data[:, 1:] = flat
        view = memoryview(data.reshape(-1))
        self._adler = zlib.adler32(view, self._adler)
        if self._carry:  # the unfinished piece of the previous call(s) of this chunk comes first
            view = memoryview(self._carry + view.tobytes())
            self._carry = b""
        end = len(view) if not more else len(view) - len(view) % _PNG_PIECE
        pieces = [view[i : min(i + _PNG_PIECE, end)] for i in range(0, end, _PNG_PIECE)]
        if more:
            self._carry = view[end:].tobytes()
        # A chunk of one piece is compressed right here (no pool for small images); the pieces of a
        # larger or unfinished chunk in parallel (the bytes are the same either way).
        parallel = self._threads > 1 and (more or bool(self._chunk) or len(pieces) > 1)
        if parallel and self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="ctseg-png")
        for piece in pieces:
            if parallel:
                assert self._pool is not None
                self._chunk.append(self._pool.submit(_deflate_piece, piece, self.level, self.strategy))
            else:
                done: Future[bytes] = Future()
                done.set_result(_deflate_piece(piece, self.level, self.strategy))
                self._chunk.append(done)
        self._rows += h
        if more:
            return
        payload = b"".join(f.result() for f in self._chunk)
        self._chunk = []
        if self._pending_header:
            payload, self._pending_header = _ZLIB_HEADER + payload, False
        self._fh.write(_png_chunk(b"IDAT", payload))

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            if self._pool is not None:
                self._pool.shutdown()
            if self._rows != self.height:
                raise RuntimeError(f"{self.path}: wrote {self._rows} of {self.height} rows")
            if self._chunk or self._carry:
                raise RuntimeError(f"{self.path}: the last rows were written with more=True")
            tail = zlib.compressobj(self.level, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # final empty block
            header = _ZLIB_HEADER if self._pending_header else b""
            self._fh.write(_png_chunk(b"IDAT", header + tail + struct.pack(">I", self._adler & 0xFFFFFFFF)))
            self._fh.write(_png_chunk(b"IEND", b""))
        finally:
            self._fh.close()


class NpyStreamWriter(RowWriter):
    """A ``.npy`` array ``(H, W, C)`` (row-major, so rows can be appended) written row block by block."""

    def __init__(self, path: str | Path, width: int, height: int, channels: int, dtype: Any = np.float32):
        self.path = Path(path)
        self.shape = (height, width, channels)
        self.dtype = np.dtype(dtype)
        self._rows = 0
        self._fh = open(self.path, "wb")  # noqa: SIM115 -- closed in close()
        np.lib.format.write_array_header_1_0(
            self._fh,
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape},
        )

    def write(self, rows: np.ndarray, more: bool = False) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows of shape {rows.shape[1:]}, expected {self.shape[1:]}")
        self._fh.write(rows.tobytes())
        self._rows += rows.shape[0]

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            if self._rows != self.shape[0]:
                raise RuntimeError(f"{self.path}: wrote {self._rows} of {self.shape[0]} rows")
        finally:
            self._fh.close()


class GeoTIFFWriter(RowWriter):
    """A tiled, deflate-compressed GeoTIFF written by row windows, with the source CRS and transform.

    Rows are buffered until a whole row of tiles is complete, so that every compressed tile is written
    exactly once (GDAL would otherwise rewrite partially filled tiles). ``nodata``: the value that marks
    pixels without data (the file's nodata tag; transparent in the colour table). ``overviews``: a
    GDAL resampling (``"nearest"`` for labels, ``"average"`` for probabilities) with which internal
    overviews (factors 2, 4, … until one tile holds the image) are built when the file is closed,
    so that GIS viewers show a large scene zoomed out without reading every pixel.
    """

    BLOCK = 256

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        count: int,
        dtype: Any,
        georef: dict[str, Any] | None,
        colormap: Sequence[Sequence[int]] | None = None,
        band_names: Sequence[str] | None = None,
        nodata: float | None = None,
        overviews: str | None = None,
    ) -> None:
        rasterio = import_rasterio()
        if rasterio is None:
            raise OutputError(f"{path}: {GEO_EXTRA_HINT}")
        if overviews is not None and overviews not in rasterio.enums.Resampling.__members__:
            raise ValueError(f"unknown overview resampling {overviews!r}")
        self.path = Path(path)
        self.width, self.height, self.count = width, height, count
        self.dtype = np.dtype(dtype)
        tiled = width >= self.BLOCK and height >= self.BLOCK
        profile: dict[str, Any] = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": count,
            "dtype": self.dtype.name,
            # Level 1 and all cores: label maps compress almost as well as at level 6, several times faster.
            "compress": "deflate",
            "zlevel": 1,
            "num_threads": "ALL_CPUS",
            "tiled": tiled,
            "BIGTIFF": "IF_SAFER",
        }
        if tiled:
            profile.update(blockxsize=self.BLOCK, blockysize=self.BLOCK)
        if georef is not None:
            profile.update(crs=georef.get("crs"), transform=georef.get("transform"))
        if nodata is not None:
            profile["nodata"] = nodata
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._ds = rasterio.open(self.path, "w", **profile)
        if colormap is not None and count == 1 and self.dtype == np.uint8:
            table = {i: (*(int(v) for v in c), 255) for i, c in enumerate(colormap)}
            if nodata is not None:
                table[int(nodata)] = (0, 0, 0, 0)  # nodata: transparent in viewers that use the table
            self._ds.write_colormap(1, table)
        for i, name in enumerate(band_names or (), start=1):
            self._ds.set_band_description(i, name)
        self._overviews = overviews
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._row = 0  # first row not yet written to the file

    def write(self, rows: np.ndarray, more: bool = False) -> None:
        rows = np.asarray(rows, dtype=self.dtype)
        self._pending.append(rows)
        self._pending_rows += rows.shape[0]
        full = (self._pending_rows // self.BLOCK) * self.BLOCK
        if full:
            self._flush(full)

    def _flush(self, n: int) -> None:
        from rasterio.windows import Window

        buf = np.concatenate(self._pending, axis=0) if len(self._pending) > 1 else self._pending[0]
        out, rest = buf[:n], buf[n:]
        data = out[np.newaxis] if out.ndim == 2 else np.moveaxis(out, -1, 0)  # (count, n, W)
        self._ds.write(np.ascontiguousarray(data), window=Window(0, self._row, self.width, n))
        self._row += n
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]

    def close(self) -> None:
        if self._ds.closed:
            return
        try:
            if self._pending_rows:
                self._flush(self._pending_rows)
            if self._row != self.height:
                raise RuntimeError(f"{self.path}: wrote {self._row} of {self.height} rows")
            if self._overviews is not None:
                self._build_overviews(self._overviews)
        finally:
            self._ds.close()

    def overview_factors(self) -> list[int]:
        """2, 4, … up to the first factor at which the whole image fits in one tile (none if it does)."""
        factors, f = [], 2
        while max(self.width, self.height) > self.BLOCK * f // 2:
            factors.append(f)
            f *= 2
        return factors

    def _build_overviews(self, resampling: str) -> None:
        rasterio = import_rasterio()
        factors = self.overview_factors()
        if factors:
            self._ds.build_overviews(factors, rasterio.enums.Resampling[resampling])
            self._ds.update_tags(ns="rio_overview", resampling=resampling)


def close_quietly(items: Iterable[RowWriter]) -> None:
    """Close every writer, ignoring their errors: after a failure, so that the first error is the one
    raised (and the :class:`OutputSet` can delete the files)."""
    for writer in items:
        with contextlib.suppress(Exception):
            writer.close()


def colorize(labels: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8 RGB; indices without a colour are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    return lut[np.asarray(labels, dtype=np.uint8)]
