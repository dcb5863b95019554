"""Predict one image or GeoTIFF scene into files, streaming rows from the sliding window to the writers.

Outputs for an input ``<stem>.<ext>`` in the output folder:

* ``<stem>_labels.tif`` (GeoTIFF input: same CRS, transform and size, uint8, with a colour table) or
  ``<stem>_labels.png`` (other inputs: 8-bit greyscale, value = class index);
* ``<stem>_color.png``: the label map as a palette PNG in the protocol's class colours;
* with ``probs``: ``<stem>_probs.tif`` (GeoTIFF input: K float32 bands, one per class) or
  ``<stem>_probs.npy`` (float32 ``(H, W, K)``).

Pixels that the scene marks as nodata (a nodata value, an alpha band or a mask) get the label
:data:`NODATA_LABEL` (the label GeoTIFF's nodata value, transparent in both colour tables) and NaN
probabilities, unless ``mask_nodata=False``.

All of them are written to temporary files and renamed into place together at the end.
"""

from __future__ import annotations

import colorsys
import contextlib
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import OutputError
from ctseg.inference.io import (
    NODATA_LABEL,
    GeoTIFFWriter,
    NpyStreamWriter,
    OutputSet,
    PNGStreamWriter,
    RowWriter,
    check_nodata_label_free,
    check_output_dir,
    close_quietly,
    gdal_env,
    open_scene,
)
from ctseg.inference.sliding import ProgressFn, SlidingWindow, iter_blended_rows


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours for models without a protocol palette (evenly spaced hues)."""
    out = []
    for i in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


@dataclass
class PredictedFile:
    """What :func:`predict_file` wrote for one input."""

    input: Path
    height: int
    width: int
    outputs: dict[str, Path] = field(default_factory=dict)
    georeferenced: bool = False


def output_names(stem: str, georeferenced: bool, probs: bool) -> dict[str, str]:
    """File names of the outputs of the input ``stem`` (``labels``, ``color``, optionally ``probs``)."""
    names = {
        "labels": f"{stem}_labels.tif" if georeferenced else f"{stem}_labels.png",
        "color": f"{stem}_color.png",
    }
    if probs:
        names["probs"] = f"{stem}_probs.tif" if georeferenced else f"{stem}_probs.npy"
    return names


# Finished row blocks whose writes may still be in flight: at least WRITE_BEHIND blocks, more while
# their host copies total at most WRITE_BEHIND_BYTES. The host runs at most that far ahead of the
# writers (and so, on CUDA, of the device), which bounds host memory by a constant (not by the scene)
# while the writers' jitter (a loaded disk, compression threads sharing cores) does not hold up the
# device: with two blocks an H100 waited 63 ms for the writers at 6000² although writing alone takes
# 0.23 s against a 0.37 s forward. Label blocks are 2.3 MB at W = 6000 (about 13 in flight); blocks
# with probabilities (float32, K times more) stay at two or three.
WRITE_BEHIND = 2
WRITE_BEHIND_BYTES = 32 * 2**20

# The last strip (up to a whole window of rows, all finished by the last forward) is handed to the
# writers in blocks of this many rows: its first rows are compressed and written while the rest are
# still being reduced, instead of all of them after all of it. A quarter of a GeoTIFF tile row: small
# enough to start early, large enough that the per-block costs (a copy, an event, a task per file) stay
# negligible. Only for labels and colours (exact operations per pixel); probabilities are written as
# before, the last strip as one block.
FINAL_BLOCK_ROWS = 64


@dataclass
class _HostBlock:
    """Outputs of one finished row block on their way to the host.

    ``rows`` maps output keys to ``(h, W)`` / ``(h, W, K)`` host tensors; on CUDA they are pinned and
    filled by asynchronous copies, which are complete once ``ready`` (an event recorded after them) is.
    ``valid``: the block's valid pixels ``(h, W)`` bool, being read (None: all valid); the first
    :meth:`get` of a key marks its nodata pixels, in place (the write lanes share the block).
    """

    rows: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None = None
    valid: Future[np.ndarray] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _masked: set[str] = field(default_factory=set, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())

    def get(self, key: str) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()  # waits for this block only; the device goes on with later strips
        rows = self.rows[key].numpy()
        if self.valid is not None:
            with self._lock:
                if key not in self._masked:
                    rows[~self.valid.result()] = NODATA_LABEL if key == "labels" else np.nan
                    self._masked.add(key)
        return rows


@torch.inference_mode()
def _start_copy(block: torch.Tensor, probs: bool) -> _HostBlock:
    """Argmax (and softmax) of blended logits ``(K, h, W)`` on their device, then copies to the host.

    On CUDA the copies are queued behind the kernels that compute them, into pinned memory, and nothing
    waits here: the caller goes on queuing the next strip while a write thread waits for the event.
    """
    out = {"labels": block.max(0).indices.to(torch.uint8)}  # (h, W)
    if probs:
        out["probs"] = F.softmax(block, dim=0).permute(1, 2, 0)  # (h, W, K)
    if block.device.type != "cuda":
        return _HostBlock({k: v.cpu() for k, v in out.items()})
    host = {}
    for k, v in out.items():
        host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        host[k].copy_(v, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return _HostBlock(host, ready)


def _write(writer: RowWriter, block: _HostBlock, key: str, target: Path, more: bool = False) -> None:
    """Write one block; ``more``: the next block continues it (a PNG keeps building the same chunk, so
    that the file is the same as if both had come as one block)."""
    rows = block.get("labels" if key == "color" else key)
    try:
        writer.write(rows, more=more)
    except OSError as exc:  # disk full, quota, I/O error: the user's output location, not a bug
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc


def _close(writer: RowWriter, target: Path) -> bool:
    """Close ``writer`` and flush its file to disk, in its write thread: files are finished in parallel.
    Returns whether the file was fsynced here (then :class:`OutputSet` need not do it again)."""
    try:
        writer.close()
        path = getattr(writer, "path", None)
        if path is None:
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc


def predict_file(
    model: nn.Module,
    input_path: str | Path,
    output_dir: str | Path,
    settings: SlidingWindow | None = None,
    *,
    num_classes: int,
    normalization: dict[str, Sequence[float]] | None = None,
    colors: Sequence[Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    probs: bool = False,
    input_max: float | None = None,
    bands: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    mask_nodata: bool = True,
    nodata: float | None = None,
    overviews: bool = False,
) -> PredictedFile:
    """Predict ``input_path`` with sliding windows and write its outputs into ``output_dir``.

    Memory is bounded by the window batch, the ``(K, window, W)`` blending buffer and the writers' row
    buffers, whatever the scene size (GeoTIFF input; PNG/JPEG are decoded whole by Pillow).

    Args:
        model: network (already wrapped in :class:`~ctseg.inference.tta.TTA` when augmenting).
        input_path: image (PNG / JPEG / TIFF) or GeoTIFF scene.
        output_dir: folder for the outputs (created; must be writable).
        settings: sliding-window settings.
        num_classes: K, the number of logits channels.
        normalization, input_max, bands, device, progress: see :func:`~ctseg.inference.sliding.predict_large`.
        colors: class colours for the colour PNG (default: :func:`default_palette`).
        class_names: band descriptions of the probability GeoTIFF.
        probs: also write class probabilities.
        mask_nodata: where the scene has nodata pixels (a nodata value, an alpha band or a mask), label
            them :data:`NODATA_LABEL` and give them NaN probabilities. The network still sees them (as
            their raw values; NaN as 0), so predictions next to them are made as without the mask.
        nodata: a pixel value that marks nodata in every band (e.g. 0 for the black border of a
            scene without a nodata tag), in addition to the scene's own mask.
        overviews: build internal overviews in the output GeoTIFFs (labels by nearest neighbour,
            probabilities by average) when they are finished, for GIS viewers; costs a read-back of
            each file at the end (GeoTIFF input only; PNG has none).
    """
    if num_classes > 256:
        raise ValueError("label maps are uint8: at most 256 classes")
    settings = settings or SlidingWindow()
    out_dir = check_output_dir(output_dir)
    palette = [tuple(int(v) for v in c) for c in (colors or default_palette(num_classes))]
    with gdal_env(), open_scene(input_path, input_max=input_max, bands=bands, nodata=nodata) as reader:
        h, w = reader.height, reader.width
        geo = reader.georef is not None
        masked = mask_nodata and reader.has_mask
        if masked:
            check_nodata_label_free(input_path, num_classes)
        names = output_names(Path(input_path).stem, geo, probs)
        result = PredictedFile(Path(input_path), h, w, georeferenced=geo)
        gy, _ = settings.grids(h, w)
        final_start = max(gy.starts[-1], gy.pad_before) - gy.pad_before  # scene row of the last strip's rows
        with OutputSet(out_dir) as out:
            paths = {k: out.path(v) for k, v in names.items()}  # temporary files, created here (cheap)
            spec = _WriterSpec(
                paths, w, h, num_classes, reader.georef, palette, class_names, masked, overviews
            )
            # The writers (GDAL creates the GeoTIFFs) open in the background: the first strip is read
            # and its forward queued meanwhile, and they are only needed for the first finished block.
            with _opened_in_background(spec) as opening:
                lanes = {k: ThreadPoolExecutor(1, thread_name_prefix=f"ctseg-write-{k}") for k in names}
                # The nodata mask of each block is read beside the writes, from a file handle of its own.
                valid_mask = reader.open_valid_mask() if masked else None
                mask_lane = (
                    None if valid_mask is None else ThreadPoolExecutor(1, thread_name_prefix="ctseg-mask")
                )
                in_flight: deque[tuple[int, list[Future[None]]]] = deque()  # (host bytes, writes)
                pending_bytes = 0
                items: dict[str, RowWriter] | None = None
                try:
                    # Write-behind, one thread per file: a block is compressed and written while the
                    # next ones are computed (zlib and GDAL release the GIL).
                    for y0, block in iter_blended_rows(
                        model,
                        reader,
                        settings,
                        normalization=normalization,
                        device=device,
                        progress=progress,
                        # Not with probabilities: softmax rounds its last bits differently by block
                        # shape (vector / scalar tails), and the files must not depend on the split.
                        final_block_rows=None if probs else FINAL_BLOCK_ROWS,
                    ):
                        if block.shape[0] != num_classes:
                            raise RuntimeError(f"model gives {block.shape[0]} logits, expected {num_classes}")
                        rows = block.shape[1]
                        host = _start_copy(block, probs)
                        del block
                        if mask_lane is not None:
                            assert valid_mask is not None
                            host.valid = mask_lane.submit(valid_mask.read, y0, y0 + rows)
                        if items is None:
                            items = opening.result()
                        final = y0 >= final_start
                        # Blocks of the last strip are not held back: together they are at most one
                        # window of rows, and after the last forward nothing else needs the host.
                        size = host.nbytes
                        while (
                            not final
                            and len(in_flight) >= WRITE_BEHIND
                            and pending_bytes + size > WRITE_BEHIND_BYTES
                        ):
                            done_bytes, writes = in_flight.popleft()
                            for f in writes:
                                f.result()
                            pending_bytes -= done_bytes
                        more = final and y0 + rows < h  # the next block continues this one's strip
                        in_flight.append(
                            (
                                size,
                                [
                                    lanes[k].submit(_write, items[k], host, k, out_dir / names[k], more)
                                    for k in items
                                ],
                            )
                        )
                        pending_bytes += size
                    # The last blocks and the closing (final tiles, PNG trailer, fsync) of all files run
                    # in parallel, one lane per file; waiting for them in any order takes the longest.
                    assert items is not None
                    closing = {k: lanes[k].submit(_close, items[k], out_dir / names[k]) for k in items}
                    for f in [f for _, fs in in_flight for f in fs]:
                        f.result()
                    for k, f in closing.items():
                        if f.result():
                            out.synced(paths[k])
                finally:
                    # No writer may be closed (after an error, by `_opened_in_background`) while a lane
                    # writes to it.
                    for lane in lanes.values():
                        lane.shutdown(wait=True, cancel_futures=True)
                    if mask_lane is not None:
                        mask_lane.shutdown(wait=True, cancel_futures=True)
                    if valid_mask is not None:
                        valid_mask.close()
            result.outputs = {k: out_dir / v for k, v in names.items()}
    return result


@dataclass
class _WriterSpec:
    """What the writers of one input need; ``open()`` creates them, ``{key: writer}``."""

    paths: dict[str, Path]
    width: int
    height: int
    num_classes: int
    georef: dict | None
    palette: list[tuple[int, ...]]
    class_names: Sequence[str] | None
    nodata: bool = False  # some pixels are nodata: NODATA_LABEL / NaN
    overviews: bool = False  # internal overviews in the GeoTIFFs

    def open(self) -> dict[str, RowWriter]:
        w, h, geo, paths = self.width, self.height, self.georef is not None, self.paths
        label_nodata = NODATA_LABEL if self.nodata else None
        # With nodata the colour PNG's palette reaches index NODATA_LABEL, which is transparent.
        palette: list[tuple[int, ...]] = list(self.palette)
        alpha = None
        if self.nodata:
            palette += [(0, 0, 0)] * (NODATA_LABEL + 1 - len(palette))
            alpha = [255] * NODATA_LABEL + [0]
        items: dict[str, RowWriter] = {}
        try:
            with gdal_env():  # rasterio's GDAL settings are per thread
                if geo:
                    items["labels"] = GeoTIFFWriter(
                        paths["labels"],
                        w,
                        h,
                        1,
                        np.uint8,
                        self.georef,
                        self.palette,
                        nodata=label_nodata,
                        overviews="nearest" if self.overviews else None,
                    )
                else:
                    items["labels"] = PNGStreamWriter(paths["labels"], w, h, channels=1)
                items["color"] = PNGStreamWriter(
                    paths["color"], w, h, channels=1, palette=palette, alpha=alpha
                )
                if "probs" in paths and geo:
                    items["probs"] = GeoTIFFWriter(
                        paths["probs"],
                        w,
                        h,
                        self.num_classes,
                        np.float32,
                        self.georef,
                        band_names=self.class_names,
                        nodata=float("nan") if self.nodata else None,
                        overviews="average" if self.overviews else None,
                    )
                elif "probs" in paths:
                    items["probs"] = NpyStreamWriter(paths["probs"], w, h, self.num_classes)
        except BaseException:
            close_quietly(items.values())
            raise
        return items


@contextlib.contextmanager
def _opened_in_background(spec: _WriterSpec) -> Iterator[Future[dict[str, RowWriter]]]:
    """``spec.open()`` in a background thread; yields its future.

    On an error in the block the writers are closed quietly (whether or not anybody took them from the
    future yet), so that the first error is the one raised and :class:`OutputSet` can delete the files.
    On success the caller has closed them (``_close``, with its fsync, in the write lanes).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="ctseg-open") as pool:
        opening = pool.submit(spec.open)
        try:
            yield opening
        except BaseException:
            with contextlib.suppress(BaseException):
                close_quietly(opening.result().values())
            raise
