"""Predict one image or GeoTIFF scene into files, streaming rows from the sliding window to the writers.

Outputs for an input ``<stem>.<ext>`` in the output folder:

* ``<stem>_labels.tif`` (GeoTIFF input: same CRS, transform and size, uint8, with a colour table) or
  ``<stem>_labels.png`` (other inputs: 8-bit greyscale, value = class index);
* ``<stem>_color.png``: the label map as a palette PNG in the protocol's class colours;
* with ``probs``: ``<stem>_probs.tif`` (GeoTIFF input: K float32 bands, one per class) or
  ``<stem>_probs.npy`` (float32 ``(H, W, K)``).

All of them are written to temporary files and renamed into place together at the end.
"""

from __future__ import annotations

import colorsys
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import OutputError
from ctseg.inference.io import (
    GeoTIFFWriter,
    NpyStreamWriter,
    OutputSet,
    PNGStreamWriter,
    RowWriter,
    check_output_dir,
    gdal_env,
    open_scene,
    writers,
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


# Finished row blocks whose writes may still be in flight. The host runs at most this many blocks ahead
# of the writers (and so, on CUDA, of the device), which bounds host memory to a few label blocks while
# one slow write (a loaded disk) does not yet hold up the device.
WRITE_BEHIND = 2


@dataclass
class _HostBlock:
    """Outputs of one finished row block on their way to the host.

    ``rows`` maps output keys to ``(h, W)`` / ``(h, W, K)`` host tensors; on CUDA they are pinned and
    filled by asynchronous copies, which are complete once ``ready`` (an event recorded after them) is.
    """

    rows: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None = None

    def get(self, key: str) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()  # waits for this block only; the device goes on with later strips
        return self.rows[key].numpy()


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


def _write(writer: RowWriter, block: _HostBlock, key: str, target: Path) -> None:
    rows = block.get("labels" if key == "color" else key)
    try:
        writer.write(rows)
    except OSError as exc:  # disk full, quota, I/O error: the user's output location, not a bug
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc


def _close(writer: RowWriter, target: Path) -> None:
    """Close ``writer`` and flush its file to disk, in its write thread: files are finished in parallel,
    and the fsync that :class:`OutputSet` does before renaming then finds nothing left to write."""
    try:
        writer.close()
        path = getattr(writer, "path", None)
        if path is not None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
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
    """
    if num_classes > 256:
        raise ValueError("label maps are uint8: at most 256 classes")
    settings = settings or SlidingWindow()
    out_dir = check_output_dir(output_dir)
    palette = [tuple(int(v) for v in c) for c in (colors or default_palette(num_classes))]
    with gdal_env(), open_scene(input_path, input_max=input_max, bands=bands) as reader:
        h, w = reader.height, reader.width
        geo = reader.georef is not None
        names = output_names(Path(input_path).stem, geo, probs)
        result = PredictedFile(Path(input_path), h, w, georeferenced=geo)
        with OutputSet(out_dir) as out:
            items: dict[str, RowWriter] = {}
            if geo:
                items["labels"] = GeoTIFFWriter(
                    out.path(names["labels"]), w, h, 1, np.uint8, reader.georef, palette
                )
            else:
                items["labels"] = PNGStreamWriter(out.path(names["labels"]), w, h, channels=1)
            items["color"] = PNGStreamWriter(out.path(names["color"]), w, h, channels=1, palette=palette)
            if probs and geo:
                items["probs"] = GeoTIFFWriter(
                    out.path(names["probs"]),
                    w,
                    h,
                    num_classes,
                    np.float32,
                    reader.georef,
                    band_names=class_names,
                )
            elif probs:
                items["probs"] = NpyStreamWriter(out.path(names["probs"]), w, h, num_classes)
            lanes = {k: ThreadPoolExecutor(1, thread_name_prefix=f"ctseg-write-{k}") for k in items}
            in_flight: deque[list[Future[None]]] = deque()
            with writers(*items.values()):
                try:
                    # Write-behind, one thread per file: a block is compressed and written while the
                    # next ones are computed (zlib and GDAL release the GIL).
                    for _, block in iter_blended_rows(
                        model, reader, settings, normalization=normalization, device=device, progress=progress
                    ):
                        if block.shape[0] != num_classes:
                            raise RuntimeError(f"model gives {block.shape[0]} logits, expected {num_classes}")
                        host = _start_copy(block, "probs" in items)
                        del block
                        if len(in_flight) >= WRITE_BEHIND:
                            for f in in_flight.popleft():
                                f.result()
                        in_flight.append(
                            [lanes[k].submit(_write, items[k], host, k, out_dir / names[k]) for k in items]
                        )
                    # The last blocks and the closing (final tiles, PNG trailer) of all files in parallel.
                    closing = [lanes[k].submit(_close, items[k], out_dir / names[k]) for k in items]
                    for f in [f for fs in in_flight for f in fs] + closing:
                        f.result()
                finally:
                    # No writer may be closed (by `writers`, also after an error) while a lane writes to it.
                    for lane in lanes.values():
                        lane.shutdown(wait=True, cancel_futures=True)
            result.outputs = {k: out_dir / v for k, v in names.items()}
    return result
