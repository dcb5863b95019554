"""Sliding-window prediction of scenes of any size with blended logits and bounded memory.

The scene is reflect-padded so that every window is full-size and so that the low-weight rim of each
blending window falls on padding rather than on scene pixels. Windows are processed one window-row at a
time: their logits, multiplied by the blending weight, accumulate in a ``(K, window, W_pad)`` buffer
together with a ``(window, W_pad)`` weight buffer. Once a window-row is done the rows above the next
window-row's start can receive no more contributions; they are normalised, handed to the caller and the
buffer shifts down by the stride. Peak memory is therefore ``O(K · window · W)``, not ``O(K · H · W)``.

The public entry points are :class:`SlidingWindow` (settings), :func:`iter_blended_rows` (the streaming
core over a :class:`~ctseg.inference.io.SceneReader`) and :func:`predict_large` (an in-memory API for
arrays and files that returns the label map and, optionally, class probabilities).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import ConfigError
from ctseg.utils.registry import Registry

if TYPE_CHECKING:
    from ctseg.inference.io import SceneReader

ProgressFn = Callable[[int, int], None]
"""``progress(done_windows, total_windows)``, called after every batch."""

# Strips read ahead of the one being computed: two absorb the jitter of a slow read (a cold disk
# block, a loaded machine) at the cost of one more uint8 strip (3 x window x W bytes) in memory.
PREFETCH_STRIPS = 2

# Weights below this are clamped: the normalisation divides by the summed weight, which must never be 0.
MIN_WEIGHT = 1e-3

# ---------------------------------------------------------------------------------------------------
# Blending windows (1-D profiles; the 2-D weight is their outer product)
# ---------------------------------------------------------------------------------------------------

BlendFn = Callable[[int, int], torch.Tensor]
BLEND_WINDOWS: Registry[BlendFn] = Registry("blend window")


def register_blend(name: str) -> Callable[[BlendFn], BlendFn]:
    """Register a 1-D blending profile ``fn(size, overlap) -> (size,) float64`` with maximum 1."""
    return BLEND_WINDOWS.register(name)


def _centres(size: int) -> torch.Tensor:
    return torch.arange(size, dtype=torch.float64) + 0.5


@register_blend("gaussian")
def _gaussian(size: int, overlap: int) -> torch.Tensor:
    # sigma = size/8 (as nnU-Net): the window's rim carries ~e^-8 of the centre weight, so
    # neighbouring windows hand over smoothly inside the overlap.
    sigma = size / 8.0
    return torch.exp(-((_centres(size) - size / 2.0) ** 2) / (2.0 * sigma**2))


@register_blend("spline")
def _spline(size: int, overlap: int) -> torch.Tensor:
    # Smoothstep ramp over the overlap, flat inside. s(u) + s(1-u) = 1, so two windows overlapping by
    # exactly `overlap` pixels form a partition of unity: C1-continuous hand-over and no reweighting
    # of the centre.
    ramp = max(int(overlap), 1)
    d = torch.minimum(_centres(size), size - _centres(size))
    u = torch.clamp(d / ramp, 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


@register_blend("flat")
def _flat(size: int, overlap: int) -> torch.Tensor:
    # Plain averaging of overlapping windows: shows seams, kept as the reference the others improve on.
    return torch.ones(size, dtype=torch.float64)


def blend_profile(window: int, overlap: int, kind: str = "spline") -> torch.Tensor:
    """The 1-D ``(window,)`` float32 blending profile, max 1, never below :data:`MIN_WEIGHT`."""
    w1 = BLEND_WINDOWS[kind](window, overlap)  # an unknown name is a ConfigError listing the known ones
    return (w1 / w1.max()).clamp_min(MIN_WEIGHT).to(torch.float32)


def blend_weights(window: int, overlap: int, kind: str = "spline") -> torch.Tensor:
    """The ``(window, window)`` float32 blending weight: the outer product of :func:`blend_profile` with itself.

    Separable on purpose: the summed weight of all windows at a pixel is then the product of a row sum
    and a column sum, computed once per scene instead of accumulated window by window. Its minimum is
    ``MIN_WEIGHT ** 2`` > 0, so no pixel's summed weight is ever 0.
    """
    w1 = blend_profile(window, overlap, kind)
    return torch.outer(w1, w1)


def _weight_sum(grid: AxisGrid, profile: torch.Tensor) -> torch.Tensor:
    """Summed profile of all windows along one axis, ``(padded,)`` float32."""
    total = torch.zeros(grid.padded, dtype=torch.float32)
    for s in grid.starts:
        total[s : s + grid.window] += profile
    return total


# ---------------------------------------------------------------------------------------------------
# The window grid
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisGrid:
    """Windows along one axis, in padded coordinates.

    ``pad_before`` padded pixels precede scene pixel 0; window ``i`` covers padded ``[starts[i],
    starts[i] + window)``; the padded axis has ``padded`` pixels.
    """

    length: int
    window: int
    stride: int
    pad_before: int
    starts: tuple[int, ...]

    @property
    def padded(self) -> int:
        return self.starts[-1] + self.window

    @property
    def pad_after(self) -> int:
        return self.padded - self.length - self.pad_before

    def source_index(self) -> np.ndarray:
        """Scene index of every padded position (reflection at the scene borders), ``(padded,)``."""
        return reflect_index(np.arange(self.padded) - self.pad_before, self.length)


def axis_grid(length: int, window: int, overlap: int) -> AxisGrid:
    """Windows covering ``length`` scene pixels plus an ``overlap // 2`` reflected margin on both sides.

    The margin puts the rim of the first and last windows (where blending weights are smallest) on
    padding, so that scene border pixels are predicted with the same context as interior ones.
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    stride = window - overlap
    margin = overlap // 2
    span = length + 2 * margin
    n = 1 if span <= window else math.ceil((span - window) / stride) + 1
    return AxisGrid(length, window, stride, margin, tuple(i * stride for i in range(n)))


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map indices (possibly outside ``[0, n)``) into it by mirror reflection without edge repeat.

    Same convention as ``numpy.pad(mode="reflect")``, and like it valid for any distance from the edge.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


# ---------------------------------------------------------------------------------------------------
# Settings and the streaming core
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlidingWindow:
    """Sliding-window settings.

    Attributes:
        window: window side in pixels (the network input is ``(B, 3, window, window)``).
        overlap: pixels shared by neighbouring windows (``0 <= overlap < window``).
        blend: blending profile name in :data:`BLEND_WINDOWS`: ``spline`` (default; smoothstep ramp over
            the overlap, a partition of unity), ``gaussian`` (sigma = window/8, as nnU-Net; meant for
            overlap >= window/2, with less overlap the hand-over between windows gets sharp), ``flat``.
        batch_size: windows per forward pass.
    """

    window: int = 512
    overlap: int = 128
    blend: str = "spline"
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"window must be positive, got {self.window}")
        if not 0 <= self.overlap < self.window:
            raise ConfigError(f"overlap must be in [0, window={self.window}), got {self.overlap}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.blend not in BLEND_WINDOWS:
            raise ConfigError(
                f"unknown blend window {self.blend!r}; known: {', '.join(sorted(BLEND_WINDOWS))}"
            )

    @property
    def stride(self) -> int:
        return self.window - self.overlap

    def grids(self, height: int, width: int) -> tuple[AxisGrid, AxisGrid]:
        return axis_grid(height, self.window, self.overlap), axis_grid(width, self.window, self.overlap)

    def num_windows(self, height: int, width: int) -> int:
        gy, gx = self.grids(height, width)
        return len(gy.starts) * len(gx.starts)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without waiting: a copy from pageable memory would synchronise the CUDA stream."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _normalizer(
    normalization: dict[str, Sequence[float]] | None, input_max: float, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``norm(x, out=None)``: ``(B, 3, h, w)`` raw pixels -> float32 network input ``(x / input_max - mean) / std``."""
    mean = _to_device(
        torch.tensor((normalization or {}).get("mean", (0.0, 0.0, 0.0)), dtype=torch.float32), device
    )
    std = _to_device(
        torch.tensor((normalization or {}).get("std", (1.0, 1.0, 1.0)), dtype=torch.float32), device
    )
    scale = (1.0 / (float(input_max) * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)

    def norm(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # The copy converts exactly as ``x.to(float32)``; then the same two roundings as
        # ``x * scale - shift``, in place: no temporaries, and ``out`` (float32, shaped like x) can be
        # reused strip after strip.
        out = x.to(torch.float32, copy=True) if out is None else out.copy_(x)
        return out.mul_(scale).sub_(shift)

    return norm


@torch.inference_mode()
def iter_blended_rows(
    model: nn.Module,
    reader: SceneReader,
    settings: SlidingWindow | None = None,
    *,
    normalization: dict[str, Sequence[float]] | None = None,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    final_block_rows: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Blend window logits over a scene, yielding finished row blocks top to bottom.

    Host work runs beside the model: a reader thread reads and reflect-pads the next
    :data:`PREFETCH_STRIPS` strips while the current one is computed. On CUDA the strips are read into
    pinned memory and copied as raw pixels (uint8 for most scenes, 4x fewer bytes than float32) with
    ``non_blocking=True``, queued on the compute stream; normalisation, blending and the division by
    the summed weight are kernels on the model's device. Nothing here waits for the device, so the host
    can queue the next strip's work while the device computes; a consumer that copies the blocks to the
    host asynchronously (as :func:`~ctseg.inference.predict.predict_file` does) keeps the device busy
    all the way.

    Args:
        model: maps ``(B, 3, window, window)`` normalised images to ``(B, K, window, window)`` logits
            (wrap it in :class:`~ctseg.inference.tta.TTA` for test-time augmentation).
        reader: the scene; ``reader.read_rows(y0, y1)`` gives ``(3, y1 - y0, W)`` raw pixels.
        settings: window, overlap, blending profile and batch size.
        normalization: ``{"mean", "std"}`` on the 0-1 scale; ``None`` = only divide by ``reader.input_max``.
        device: where the model runs (default: the model's device).
        progress: called with ``(windows_done, windows_total)``.
        final_block_rows: yield the last strip's rows (up to a whole window) in blocks of at most this
            many rows instead of one block. Everything after the last forward is on the critical path;
            smaller final blocks let a consumer write the first of them while the rest are still being
            divided and reduced (see :func:`~ctseg.inference.predict.predict_file`). Values are the same
            either way (every operation after the blending is per pixel).

    Yields:
        ``(y0, logits)``: scene row ``y0`` and the blended logits ``(K, h, W)`` float32 of rows
        ``[y0, y0 + h)``, on ``device``. Blocks are contiguous and cover the scene exactly once. On CUDA
        the values may still be being computed: read them through stream-ordered operations.
    """
    settings = settings or SlidingWindow()
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    height, width = reader.height, reader.width
    gy, gx = settings.grids(height, width)
    win, stride = settings.window, settings.stride
    total = len(gy.starts) * len(gx.starts)
    profile = blend_profile(win, settings.overlap, settings.blend)
    weight = _to_device(torch.outer(profile, profile), device)
    row_sum = _to_device(_weight_sum(gy, profile), device)  # (Hp,)
    col_sum = _to_device(_weight_sum(gx, profile)[gx.pad_before : gx.pad_before + width], device)  # (W,)
    norm = _normalizer(normalization, reader.input_max, device)
    # Pinned host memory makes the host-to-device copy asynchronous; from pageable memory CUDA first
    # waits for the stream to drain, which would stall the device once per strip. The copies are queued
    # on the compute stream: on a side stream (the copy engine) they measured slower on an H100
    # (dcpoolformer-paper, batch 16: 6000² +10.2 % over the raw forward against +8.4 %, 3000² +27 % / +20 %).
    pin = device.type == "cuda"
    acc: torch.Tensor | None = None  # (K, win, Wp): weighted logits, rows relative to the window-row start
    # The normalised strip and the window batch are rewritten in place, strip after strip and batch after
    # batch (the model has consumed a batch before the next one is stacked: in program order on the CPU,
    # in stream order on CUDA). Fresh tensors of this size (tens of MB) would cost page faults on every
    # strip on the CPU, where the allocator returns them to the OS.
    strip = torch.empty(3, win, gx.padded, dtype=torch.float32, device=device)
    stack_buf = torch.empty(
        min(settings.batch_size, len(gx.starts)), 3, win, win, dtype=torch.float32, device=device
    )
    n_cols = len(gx.starts)
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctseg-read") as pool:
        # Read ahead while strips are computed (GDAL and numpy release the GIL). One thread, because a
        # rasterio dataset must not be read from two threads at once.
        pending: deque[Future[torch.Tensor]] = deque()
        for r, y in enumerate(gy.starts):
            if r == 0:
                # Head: nothing runs before the first strip is in, so it is read in two row halves; the
                # first half is uploaded and normalised while the reader thread reads the second.
                halves = _first_strip_halves(win)
                parts = [pool.submit(_load_strip, reader, gy, gx, y, pin, a, b) for a, b in halves]
                for (a, b), part in zip(halves, parts, strict=True):
                    band = part.result()  # (3, b - a, Wp) raw pixels, reflect-padded
                    norm(band.to(device, non_blocking=True)[None], out=strip[None, :, a:b])
                    del band
                # The read-ahead starts only now: until the first forward is queued the host's cores
                # are better spent on the first strip than on strips that are not needed yet.
                pending.extend(
                    pool.submit(_load_strip, reader, gy, gx, ys, pin)
                    for ys in gy.starts[1 : 1 + PREFETCH_STRIPS]
                )
            else:
                band = pending.popleft().result()  # (3, win, Wp) raw pixels, reflect-padded
                if r + PREFETCH_STRIPS < len(gy.starts):
                    pending.append(
                        pool.submit(_load_strip, reader, gy, gx, gy.starts[r + PREFETCH_STRIPS], pin)
                    )
                norm(band.to(device, non_blocking=True)[None], out=strip[None])  # (3, win, Wp) float32
                del band  # the pinned block returns to torch's host cache once the copy is done
            # All windows of the strip as one strided view (n, 3, win, win): window i starts at column
            # i * stride, exactly gx.starts. Copying a batch of them is one kernel; stacking the slices
            # one by one costs a parallel region each, which on a busy CPU is several times slower.
            windows = strip.unfold(2, win, stride).permute(2, 0, 1, 3)
            for b0 in range(0, n_cols, settings.batch_size):
                n = min(settings.batch_size, n_cols - b0)
                batch = stack_buf[:n].copy_(windows[b0 : b0 + n])  # (B, 3, win, win)
                logits = model(batch)
                if logits.shape[-2:] != (win, win):
                    raise RuntimeError(
                        f"model returned logits of spatial size {tuple(logits.shape[-2:])} for a {win}x{win} window"
                    )
                logits = logits.to(torch.float32)
                if acc is None:
                    acc = torch.zeros(logits.shape[1], win, gx.padded, dtype=torch.float32, device=device)
                _accumulate(acc, logits, weight, gx.starts[b0], stride)
                done += n
                if progress is not None:
                    progress(done, total)
            assert acc is not None
            last = r == len(gy.starts) - 1
            finished = win if last else stride  # rows that no later window-row touches
            # Padded rows [y, y + finished) -> scene rows, cropped to the scene.
            p0 = max(y, gy.pad_before)
            p1 = min(y + finished, gy.pad_before + height)
            step = final_block_rows if last and final_block_rows else p1 - p0
            for q0 in range(p0, p1, max(step, 1)):
                q1 = min(q0 + step, p1)
                a, b = q0 - y, q1 - y
                wsum = row_sum[q0:q1, None] * col_sum[None, :]  # (h, W)
                yield q0 - gy.pad_before, acc[:, a:b, gx.pad_before : gx.pad_before + width] / wsum
            if not last:
                keep = win - stride
                # The rows still open move to the top; the source rows [stride, win) and the target rows
                # [0, keep) are disjoint when keep <= stride, so no temporary copy is needed then.
                src = acc[:, stride:]
                acc[:, :keep] = src if keep <= stride else src.clone()
                acc[:, keep:].zero_()


def _first_strip_halves(window: int) -> list[tuple[int, int]]:
    """Row ranges ``[(0, h), (h, window)]`` in which the first strip is read (one range for tiny windows)."""
    half = window // 2
    return [(0, half), (half, window)] if half > 0 else [(0, window)]


def _accumulate(acc: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, x0: int, stride: int) -> None:
    """``acc[:, :, x:x + win] += logits[i] * weight`` for the windows ``x = x0 + i * stride`` of one batch.

    ``acc`` is ``(K, win, Wp)``, ``logits`` ``(B, K, win, win)``, ``weight`` ``(win, win)``. Instead of one
    ``addcmul_`` per window (B kernel launches), each window is cut into column segments of ``stride``
    columns (the last one shorter), and segment ``s`` of all B windows is added by one ``addcmul_`` on a
    strided view of ``acc``: the segments ``s`` of consecutive windows are the consecutive, disjoint
    column tiles ``[x0 + (i + s) * stride, + stride)``, so each of these ops writes every element at
    most once. That is ``ceil(win / stride)`` launches per batch (2 for 512 / 128) whatever B is.

    Bit-identical to the per-window loop: every element gets the same ``acc + logit * weight`` in the
    same order. A column in tile ``t`` receives segment ``t - i`` of window ``i``, so windows in
    ascending order means segments in *descending* order, which is the order of the passes below.
    (Earlier batches are complete before this one starts, as before.)
    """
    k, win, _ = acc.shape
    b = logits.shape[0]
    row_stride, col_stride = acc.stride(1), acc.stride(2)
    assert col_stride == 1 and acc.stride(0) == win * row_stride, "acc must be contiguous"
    for c0 in reversed(range(0, win, stride)):
        c1 = min(c0 + stride, win)
        # (B, K, win, c1 - c0) view of acc: window i's columns [c0, c1), i.e. absolute x0 + i*stride + c0.
        view = acc.as_strided(
            (b, k, win, c1 - c0),
            (stride, acc.stride(0), row_stride, 1),
            acc.storage_offset() + x0 + c0,
        )
        view.addcmul_(logits[:, :, :, c0:c1], weight[:, c0:c1])


def _load_strip(
    reader: SceneReader,
    gy: AxisGrid,
    gx: AxisGrid,
    y: int,
    pin: bool = False,
    r0: int = 0,
    r1: int | None = None,
) -> torch.Tensor:
    """Raw pixels of padded rows ``[y + r0, y + r1)`` (default: the whole strip ``[y, y + window)``)
    over the padded width, ``(3, r1 - r0, W_pad)``.

    Reflect padding as :func:`reflect_index` (numpy's ``"reflect"``; one column: repeated). With
    ``pin`` the strip is assembled directly in page-locked memory, ready for an asynchronous copy.
    """
    r1 = gy.window if r1 is None else r1
    rows = reflect_index(np.arange(y + r0, y + r1) - gy.pad_before, gy.length)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    w, pb = gx.length, gx.pad_before
    dtype = torch.from_numpy(np.empty(0, dtype=reader.dtype)).dtype  # the torch twin of the raw pixel type
    out_t = torch.empty((3, len(rows), gx.padded), dtype=dtype, pin_memory=pin)
    out = out_t.numpy()  # (3, r1 - r0, Wp), sharing memory with out_t
    centre = out[:, :, pb : pb + w]  # the scene columns
    # Scene rows lo..hi-1 occur once, in order, somewhere in the strip (the rows reflected at the top
    # or bottom of the scene are around them): they are read straight into place, and the reflected
    # rows copied from them. Only a scene far shorter than the window breaks that run.
    p0 = int(np.argmax(rows == lo))
    if np.array_equal(rows[p0 : p0 + hi - lo], np.arange(lo, hi)):
        reader.read_rows_into(lo, hi, centre[:, p0 : p0 + hi - lo])
        others = np.r_[0:p0, p0 + hi - lo : len(rows)]
        if others.size:
            centre[:, others] = centre[:, p0 + rows[others] - lo]
    else:
        centre[...] = np.take(reader.read_rows(lo, hi), rows - lo, axis=1)
    # The column margins are reflected scene columns, copied from the centre.
    cols = gx.source_index()
    if pb:
        out[:, :, :pb] = out[:, :, pb + cols[:pb]]
    if gx.padded > pb + w:
        out[:, :, pb + w :] = out[:, :, pb + cols[pb + w :]]
    return out_t


# ---------------------------------------------------------------------------------------------------
# In-memory API
# ---------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """Result of :func:`predict_large`.

    Attributes:
        labels: ``(H, W)`` uint8 (int64 when K > 256) argmax of the blended logits;
            :data:`~ctseg.inference.io.NODATA_LABEL` (255) where the scene has nodata.
        probs: ``(K, H, W)`` float32 softmax of the blended logits, when requested (NaN at nodata).
        logits: ``(K, H, W)`` float32 blended logits, when requested (computed at nodata too).
        valid: ``(H, W)`` bool, False at the scene's nodata pixels; None when it has none (or when
            they were not masked).
    """

    labels: np.ndarray
    probs: np.ndarray | None = None
    logits: np.ndarray | None = None
    valid: np.ndarray | None = None


def predict_large(
    model: nn.Module,
    image: np.ndarray | str | Path | SceneReader,
    *,
    window: int = 512,
    overlap: int = 128,
    blend: str = "spline",
    batch_size: int = 4,
    tta: str | Sequence[str] | None = None,
    scales: Sequence[float] = (1.0,),
    normalization: dict[str, Sequence[float]] | None = None,
    input_max: float | None = None,
    bands: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    return_probs: bool = False,
    return_logits: bool = False,
    progress: ProgressFn | None = None,
    mask_nodata: bool = True,
    nodata: float | None = None,
) -> Prediction:
    """Predict a whole image or scene with sliding windows and blended logits, in memory.

    For scenes too large to hold their label map in memory use :func:`ctseg.inference.predict.predict_file`,
    which streams the same rows to GeoTIFF / PNG writers.

    Args:
        model: ``(B, 3, h, w)`` normalised images -> ``(B, K, h, w)`` logits, in eval mode.
        image: an ``(H, W, 3)`` array (uint8, or float/uint16 with ``input_max``), an image / GeoTIFF path,
            or an open :class:`~ctseg.inference.io.SceneReader`.
        window, overlap, blend, batch_size: see :class:`SlidingWindow`.
        tta: test-time augmentation views or presets (see :mod:`ctseg.inference.tta`), e.g. ``"flip"``.
        scales: multi-scale TTA factors.
        normalization: ``{"mean", "std"}`` on the 0-1 scale (an ``InferenceBundle``'s normalization).
        input_max: pixel value meaning full brightness (default 255 for uint8; required otherwise).
        bands: three 1-based band / channel numbers to use as RGB (e.g. ``(1, 2, 3)`` of an RGBIR scene).
        device: where the model runs (default: the model's device).
        return_probs / return_logits: also return softmax probabilities / blended logits ``(K, H, W)``.
        progress: ``progress(done, total)`` window counter.
        mask_nodata: where the scene has nodata pixels (a GeoTIFF's nodata value, alpha band or mask),
            label them :data:`~ctseg.inference.io.NODATA_LABEL` and give them NaN probabilities, as
            :func:`~ctseg.inference.predict.predict_file` does; ``Prediction.valid`` is the mask.
        nodata: a pixel value that marks nodata in every channel (e.g. 0 for black borders), in
            addition to the scene's own mask.
    """
    from ctseg.inference.io import NODATA_LABEL, ArrayReader, check_nodata_label_free, gdal_env, open_scene
    from ctseg.inference.tta import maybe_tta

    settings = SlidingWindow(window=window, overlap=overlap, blend=blend, batch_size=batch_size)
    if isinstance(image, np.ndarray):
        reader: SceneReader = ArrayReader(image, input_max=input_max, bands=bands, nodata=nodata)
    elif isinstance(image, str | Path):
        reader = open_scene(image, input_max=input_max, bands=bands, nodata=nodata)
    else:
        if nodata is not None:
            raise ValueError("nodata: pass it to the reader (open_scene(..., nodata=...)) instead")
        reader = image
    net = maybe_tta(model, tta, scales)
    labels: np.ndarray | None = None
    probs = logits_out = valid = None
    with gdal_env(), reader:
        masked = mask_nodata and reader.has_mask
        for y0, block in iter_blended_rows(
            net, reader, settings, normalization=normalization, device=device, progress=progress
        ):
            k, h, _ = block.shape
            if labels is None:
                if masked:  # K is known from the first block on
                    check_nodata_label_free(reader.path, k)
                labels = np.empty((reader.height, reader.width), dtype=np.uint8 if k <= 256 else np.int64)
                if return_probs:
                    probs = np.empty((k, reader.height, reader.width), dtype=np.float32)
                if return_logits:
                    logits_out = np.empty((k, reader.height, reader.width), dtype=np.float32)
            labels[y0 : y0 + h] = block.max(0).indices.cpu().numpy()
            if probs is not None:
                probs[:, y0 : y0 + h] = F.softmax(block, dim=0).cpu().numpy()
            if logits_out is not None:
                logits_out[:, y0 : y0 + h] = block.cpu().numpy()
        valid_mask = reader.open_valid_mask() if masked else None
        if valid_mask is not None:
            valid = np.empty((reader.height, reader.width), dtype=bool)
            try:  # by strips: a GeoTIFF's masks are read per band, several times the mask's bytes
                for r0 in range(0, reader.height, settings.window):
                    valid[r0 : r0 + settings.window] = valid_mask.read(
                        r0, min(r0 + settings.window, reader.height)
                    )
            finally:
                valid_mask.close()
    assert labels is not None
    if valid is not None:
        labels[~valid] = NODATA_LABEL
        if probs is not None:
            probs[:, ~valid] = np.nan
    return Prediction(labels=labels, probs=probs, logits=logits_out, valid=valid)
