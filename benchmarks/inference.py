"""Benchmark of scene prediction: sliding window + blending + GeoTIFF/PNG I/O against the raw model forward.

Usage (figures in docs/benchmarks.md, section "Inference"):

    .venv/bin/python benchmarks/inference.py                                   # 3000² and 6000², paper preset
    .venv/bin/python benchmarks/inference.py --sizes 1024,2048 --device cpu    # what fits a 2-core CPU
    .venv/bin/python benchmarks/inference.py --device cuda --batch-size 16 --json runs/infer_bench.json
    .venv/bin/python benchmarks/inference.py --compress deflate --read-threads 1   # a compressed scene, one decoding thread

For every scene size a random-texture RGB uint8 GeoTIFF (UTM CRS, 0.5 m, 256² tiles, uncompressed unless
``--compress``) is generated strip by strip in ``--workdir``; then a fresh subprocess per size (so that its peak RSS is its own) builds the model
(``ctseg.models.create(--model)``, random init, ``for_inference()``), warms it up and measures, side by
side:

* ``raw``: the model forward alone over exactly the batches the sliding window runs (same number of
  windows, same batch sizes), on inputs already on the device — no reading, padding, blending,
  argmax, transfer or writing.
* ``full``: :func:`ctseg.inference.predict_file` on the GeoTIFF: windowed reads, reflect padding,
  normalisation, forward, blending into the strip buffer, argmax, label GeoTIFF (deflate, tiled) and
  colour PNG written by rows, atomic rename.

Both are run ``--repeat`` times (default 3), alternating with the ``compute`` runs below so that load
changes of the machine hit all alike; medians are reported (every run in the JSON). Before them, one
cold full run (pinned host buffers allocated, thread pools and GDAL started: what a job over many
scenes pays once) gives the peak memory and is reported apart (``cold_full_s``); the timed full runs
are warm, as the raw forward is after its warm-up passes. (Until 2026-11-26 the cold run was one of
the three whose median was reported.)

Reported: throughput in Mpx/s (scene pixels / wall time), ``overhead = full / raw - 1`` (stitching and
I/O; of the medians, and ``overhead_paired``: the median over repeats of each full run over the raw run
right after it, which a drift of the machine between repeats does not move), the peak RSS (``VmHWM``, reset before each part; Linux) of the raw forward and of the full
prediction — the difference is what stitching and I/O hold — and on CUDA the peak allocated GPU
memory of the full run. Peak RSS must not grow with the scene beyond the O(K · window · W) strip.
``--model conv-tiny`` (three 3x3 convs, not a paper preset) is a quick smoke run of this script.
``--nodata``: the scene has nodata value 0 over its left eighth, so the full run also reads the
nodata mask (beside the writes, from a handle of its own) and marks those pixels; compare with a run
without it for the cost of the masking.

Also measured, to show where the time goes (second table): ``compute`` = the same model through the
sliding window, blending and argmax with the scene already in memory and nothing written (what the
device does), ``read`` = reading and padding all strips alone, ``write`` = writing the label GeoTIFF and
colour PNG alone, one after the other (and each file alone: ``write_each_s``; ``predict_file`` writes
them in parallel, one thread per file, so the slower one bounds it). A pipeline that overlaps its host work with the device takes ``full ≈ max(compute,
read, write)``; a serial one ``≈ compute + read + write``.

``--simulate-forward-ms MS`` is a SIMULATION for machines without a GPU, never a GPU figure: the model
is replaced by a stand-in whose forward takes ``MS`` ms per batch of wall time, asleep (it returns
fixed logits; a sleep releases the GIL as a thread waiting for CUDA kernels does). ``--simulate-forward-ms 23`` is an H100's forward of
``dcpoolformer-paper`` (0.37 s for the 256 windows of 512² of a 6000² scene in batches of 16). On a
CPU the normalisation, blending and argmax still run on the CPU (on a GPU they are device kernels), so
``compute`` rather than ``raw`` is the baseline that shows whether the file I/O is hidden.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 6


def generate_scene(
    path: Path, size: int, seed: int = 0, strip: int = 512, compress: str = "none", nodata: bool = False
) -> None:
    """A ``size x size`` RGB uint8 GeoTIFF of blocky random texture, written strip by strip.

    ``nodata``: with nodata value 0 and a nodata margin (0 in every band) over the left eighth of the
    scene, as outside an orthomosaic's footprint; other pixels are at least 1.
    """
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (math.ceil(size / 16) + 1, math.ceil(size / 16) + 1, 3), dtype=np.uint8)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32632",
        "transform": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5800000.0),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    if compress != "none":
        profile.update(compress=compress, num_threads="ALL_CPUS")
    if nodata:
        profile["nodata"] = 0
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, strip):
            h = min(strip, size - y0)
            rows = np.arange(y0, y0 + h) // 16
            block = coarse[rows][:, np.arange(size) // 16]
            block = np.clip(
                block.astype(np.int16) + rng.integers(-20, 21, block.shape), 1 if nodata else 0, 255
            ).astype(np.uint8)
            if nodata:
                block[:, : size // 8] = 0
            ds.write(np.moveaxis(block, -1, 0), window=Window(0, y0, size, h))


def build_model(name: str, device: str) -> nn.Module:
    if name == "conv-tiny":
        torch.manual_seed(0)
        net: nn.Module = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1), nn.GELU(),
            nn.Conv2d(16, NUM_CLASSES, 3, padding=1),
        )  # fmt: skip
    else:
        import ctseg.models

        net = ctseg.models.create(name, num_classes=NUM_CLASSES, ct=None, pretrained=False)
        net = net.for_inference() if hasattr(net, "for_inference") else net
    return net.to(device).eval()


class SimulatedForward(nn.Module):
    """Not a network: a stand-in for a device that is busy ``ms`` milliseconds per forward.

    ``(B, 3, h, w)`` -> ``(B, 6, h, w)`` fixed logits (a smooth random field: class regions of some
    30 px, so the label outputs compress like real ones; the same for every window), returned ``ms``
    after the call began. The wait is a sleep, which releases the GIL like a host thread waiting for
    CUDA kernels, so the host's other threads run meanwhile; the logits cost no computation.
    """

    def __init__(self, ms: float, size: int = 512) -> None:
        super().__init__()
        self.seconds = ms / 1000.0
        gen = torch.Generator().manual_seed(0)
        coarse = torch.randn(1, NUM_CLASSES, size // 32 + 1, size // 32 + 1, generator=gen)
        self.logits = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.logits.shape[-2:] != x.shape[-2:] or self.logits.device != x.device:
            self.logits = F.interpolate(self.logits.to(x.device), size=x.shape[-2:], mode="bilinear")
        logits = self.logits.expand(x.shape[0], -1, -1, -1)
        left = self.seconds - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return logits


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> dict:
    from ctseg.inference.io import open_scene
    from ctseg.inference.predict import predict_file
    from ctseg.inference.sliding import SlidingWindow

    if args.read_threads is not None:
        import ctseg.inference.io

        ctseg.inference.io.READ_THREADS = args.read_threads
    device = args.device
    settings = SlidingWindow(
        window=args.window, overlap=args.overlap, blend=args.blend, batch_size=args.batch_size
    )
    if args.simulate_forward_ms is not None:
        net: nn.Module = SimulatedForward(args.simulate_forward_ms, args.window)
    else:
        net = build_model(args.model, device)
    with open_scene(args.scene) as r:
        height, width = r.height, r.width
    gy, gx = settings.grids(height, width)
    per_row = [min(args.batch_size, len(gx.starts) - b0) for b0 in range(0, len(gx.starts), args.batch_size)]
    batches = per_row * len(gy.starts)
    # Same value range as the scene after normalisation (pixels / 255), so activations are alike.
    x = torch.rand(args.batch_size, 3, args.window, args.window, device=device)

    @torch.inference_mode()
    def raw() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            net(x[:b])
        _sync(device)
        return time.perf_counter() - t0

    with torch.inference_mode():
        for _ in range(2):
            net(x)
    if device.startswith("cuda"):
        raw()  # a whole pass of warm-up: cuDNN picks its algorithms, the allocator fills its cache
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    raw_before = raw()
    peak_raw = _status_kb("VmHWM")  # the model's own activations at this batch size
    _reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = Path(args.scene).parent / f"out-{height}"

    def full_run() -> float:
        _sync(device)
        t0 = time.perf_counter()
        predict_file(
            net,
            args.scene,
            out,
            settings,
            num_classes=NUM_CLASSES,
            device=device,
            probs=args.probs,
            overviews=args.overviews,
        )
        _sync(device)
        return time.perf_counter() - t0

    # The first full run is cold (pinned host buffers allocated, thread pools and GDAL started: costs a
    # job over many scenes pays once) and gives the peak memory; it is reported apart, and the timed runs
    # are warm, like the raw forward after its warm-up passes. Then side by side, alternating, so that
    # load changes of the machine hit all three alike.
    cold_full = full_run()
    peak = _status_kb("VmHWM")
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    fulls = [full_run()]
    raws = [raw_before, raw()]
    reader_mem = in_memory_scene(args.scene)
    computes = [compute_run(net, reader_mem, settings, device)]
    for _ in range(args.repeat - 1):
        fulls.append(full_run())
        raws.append(raw())
        computes.append(compute_run(net, reader_mem, settings, device))
    del reader_mem
    read, write, write_each = io_split(args.scene, out, settings)
    # On CUDA the forward spans are launch times (kernels run asynchronously): head, waits and the
    # tail after the last block are still host time the device may not hide.
    timed = args.simulate_forward_ms is not None or device.startswith("cuda")
    waits = timeline(net, full_run) if timed else {}
    raw_t, full, compute = (statistics.median(v) for v in (raws, fulls, computes))
    mpx = height * width / 1e6
    return {
        "size": f"{height}x{width}",
        "windows": len(gy.starts) * len(gx.starts),
        "batches": len(batches),
        "raw_s": round(raw_t, 3),
        "full_s": round(full, 3),
        "raw_mpx_s": round(mpx / raw_t, 3),
        "full_mpx_s": round(mpx / full, 3),
        "overhead": round(full / raw_t - 1, 4),
        # Each full run over the raw run right after it (raws[0] is the one before the first full run):
        # drift of the machine between repeats cancels.
        "overhead_paired": round(
            statistics.median(f / r - 1 for f, r in zip(fulls, raws[1:], strict=True)), 4
        ),
        "compute_s": round(compute, 3),
        "read_s": round(read, 3),
        "write_s": round(write, 3),
        "write_each_s": {k: round(v, 4) for k, v in write_each.items()},
        "full_over_compute": round(full / compute - 1, 4),
        "cold_full_s": round(cold_full, 3),
        "runs": {
            "raw_s": [round(v, 3) for v in raws],
            "full_s": [round(v, 3) for v in fulls],
            "compute_s": [round(v, 3) for v in computes],
        },
        "rss_before_mb": round(rss_before / 1024, 1),
        "peak_rss_mb": round(peak / 1024, 1),
        "peak_rss_growth_mb": round((peak - rss_before) / 1024, 1) if reset else None,
        "peak_rss_raw_mb": round(peak_raw / 1024, 1) if reset else None,
        "gpu_peak_mb": None if gpu_peak is None else round(gpu_peak, 1),
        "outputs_mb": round(sum(p.stat().st_size for p in out.iterdir()) / 2**20, 1),
        "simulated_forward_ms": args.simulate_forward_ms,
        **waits,
    }


def timeline(net: nn.Module, run: Any) -> dict[str, float]:
    """One more full run, instrumented: where the prediction thread waits instead of running the model.

    ``head_s``: from the call until the first forward starts (opening files, the first strip read and
    normalised); ``wait_read_s`` / ``wait_write_s``: time the prediction thread spends, between the
    first and the last forward, waiting for the reader thread / for the write threads (host I/O that
    was not hidden behind the forward); ``tail_s``: from the end of the last forward until the call
    returns (last strip blended, its argmax, last blocks written, files closed and synced), of which
    ``tail_after_last_block_s`` after the last block was handed to the writers (host I/O only; since
    ``predict_file`` hands the last strip over in blocks of ``FINAL_BLOCK_ROWS`` rows, that is the last
    of these small blocks: compare ``tail_s`` across versions);
    ``tail_after_last_write_s``: from the start of the last block's write (its rows are on the host) to
    the return; ``tail_lanes_s``: per output file (write lane), when its last write ended after the
    last block was handed over (a lane that lags behind the device ends late) and its busy time; ``close_s`` / ``fsync_s``: the longest closing of a file (last tiles, trailer, fsync) /
    the longest fsync in it, which run in parallel, one write lane per file;
    ``head_open_s`` / ``head_read_s``: from the call until the scene is open / until the last part
    of the first strip is read (what remains of ``head_s`` after that is its upload, normalisation and
    the batch copy); ``head_load_spans_s``: start and end of each part's load (read, padding, pinned
    buffer), from the call: a late start is set-up before the read, a long span the read itself;
    ``head_setup_span_s``: from the sliding window's first step to the first part handed to the
    reader thread (its set-up: blending weights, device buffers; a load that starts later than this
    waited for the reader thread);
    ``head_writers_open_span_s``: the same for the creation of the output files, which runs in a
    background thread during the head; ``forward_s``: time inside the forwards. Meaningful with ``--simulate-forward-ms``, where the forward
    is the device's time; the rest of ``full`` is the CPU standing in for the device (blending, argmax).
    """
    main = threading.get_ident()
    # (start, end) of every call, by kind; "read" / "write": the prediction thread waiting for the
    # reader thread / for the write lanes.
    spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    original_result = Future.result

    def result(self: Future, timeout: float | None = None) -> Any:
        if threading.get_ident() != main or self.done():
            return original_result(self, timeout)
        # Which pool's future: the reader thread's are named ctseg-read, the write lanes ctseg-write-*.
        kind = "read" if getattr(self, "_ctseg_kind", None) == "read" else "write"
        t0 = time.perf_counter()
        try:
            return original_result(self, timeout)
        finally:
            spans[kind].append((t0, time.perf_counter()))

    original_submit = ThreadPoolExecutor.submit

    def submit(self: ThreadPoolExecutor, fn: Any, /, *a: Any, **k: Any) -> Future:
        t = time.perf_counter()
        fut = original_submit(self, fn, *a, **k)
        reading = self._thread_name_prefix.startswith("ctseg-read")
        fut._ctseg_kind = "read" if reading else "other"  # type: ignore[attr-defined]
        if reading:
            spans["read_submit"].append((t, t))
        return fut

    import ctseg.inference.predict as cpredict
    import ctseg.inference.sliding as csliding

    start_copy, forward = cpredict._start_copy, net.forward
    write_fn, close_fn, fsync_fn = cpredict._write, cpredict._close, os.fsync
    open_fn, load_fn = cpredict.open_scene, csliding._load_strip
    blended_rows_fn = cpredict.iter_blended_rows
    writers_open_fn = cpredict._WriterSpec.open

    def spanned(kind: str, fn: Any) -> Any:
        """``fn``, recording the span of every call under ``spans[kind]``."""

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans[kind].append((t0, time.perf_counter()))

        return timed

    def blended_rows(*a: Any, **k: Any) -> Any:
        # When the prediction loop first asks for rows: the sliding window's own set-up starts here.
        spans["rows_start"].append((time.perf_counter(),) * 2)
        yield from blended_rows_fn(*a, **k)

    Future.result, ThreadPoolExecutor.submit = result, submit  # type: ignore[method-assign]
    cpredict.iter_blended_rows = blended_rows
    net.forward = spanned("forward", forward)  # type: ignore[method-assign]
    # Block handed to the writers (its copy queued); in the write lanes: each block's write, each
    # file's closing (last tiles, trailer, fsync) and its fsync; for the head, the opening of the scene
    # and the strip loads (reader threads).
    cpredict._start_copy = spanned("handed", start_copy)

    def lane_write(writer: Any, block: Any, key: str, *a: Any, **k: Any) -> Any:
        # Every write under "lane_write", and under its file's own kind too.
        timed = spanned(f"lane_write:{key}", spanned("lane_write", write_fn))
        return timed(writer, block, key, *a, **k)

    cpredict._write, cpredict._close = lane_write, spanned("close", close_fn)
    os.fsync = spanned("fsync", fsync_fn)
    cpredict.open_scene, csliding._load_strip = spanned("open", open_fn), spanned("load", load_fn)
    cpredict._WriterSpec.open = spanned("writers_open", writers_open_fn)  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
    finally:
        Future.result, ThreadPoolExecutor.submit = original_result, original_submit  # type: ignore[method-assign]
        del net.forward
        cpredict._start_copy = start_copy
        cpredict._write, cpredict._close, os.fsync = write_fn, close_fn, fsync_fn
        cpredict.open_scene, csliding._load_strip = open_fn, load_fn
        cpredict._WriterSpec.open = writers_open_fn  # type: ignore[method-assign]
        cpredict.iter_blended_rows = blended_rows_fn
    f = spans["forward"]
    # The first strip is loaded in two row halves, the first two loads; the read-ahead follows.
    head_spans = sorted(spans["load"])[:2]
    head_loads = [b for _, b in head_spans]
    last_write = max(a for a, _ in spans["lane_write"])
    return {
        "head_s": round(f[0][0] - t0, 3),
        # Within the head: until the scene is open, and until the first strip's last part is read.
        "head_open_s": round(spans["open"][0][1] - t0, 3),
        "head_read_s": round(max(head_loads) - t0, 3),
        # Each part of the first strip: (submitted to the reader thread's load start, end), from the call.
        "head_load_spans_s": [[round(a - t0, 4), round(b - t0, 4)] for a, b in head_spans],
        # Between the scene's opening and the first load: the sliding window's set-up (blending
        # weights, device buffers), from its first step to the first strip part handed to the reader.
        "head_setup_span_s": [
            round(spans["rows_start"][0][0] - t0, 4),
            round(spans["read_submit"][0][0] - t0, 4),
        ],
        # The output files are created in a background thread meanwhile (start, end).
        "head_writers_open_span_s": [round(x - t0, 4) for x in spans["writers_open"][0]],
        "wait_read_s": round(sum(b - a for a, b in spans["read"] if a >= f[0][0]), 3),
        "wait_write_s": round(sum(b - a for a, b in spans["write"] if b <= f[-1][1]), 3),
        "tail_s": round(t1 - f[-1][1], 3),
        "tail_after_last_block_s": round(t1 - spans["handed"][-1][1], 3),
        # From the start of the last block's write (its rows are on the host) to the return: the
        # host's own tail (with the write of that block, the closing and the fsync of every file).
        "tail_after_last_write_s": round(t1 - last_write, 3),
        # Per write lane (output file): how long after the last block was handed over its last write
        # ended (its backlog at the end), and its busy time over the whole run (all its writes).
        "tail_lanes_s": {
            kind.split(":", 1)[1]: {
                "last_write_end_after_last_block": round(max(b for _, b in v) - spans["handed"][-1][1], 4),
                "busy": round(sum(b - a for a, b in v), 4),
            }
            for kind, v in sorted(spans.items())
            if kind.startswith("lane_write:")
        },
        "close_s": round(max(b - a for a, b in spans["close"]), 3),
        "fsync_s": round(max(b - a for a, b in spans["fsync"]), 3),
        "forward_s": round(sum(b - a for a, b in f), 3),
        "timeline_full_s": round(t1 - t0, 3),
    }


def in_memory_scene(scene: Path) -> Any:
    """The whole scene as an :class:`~ctseg.inference.io.ArrayReader` (for runs without file reads)."""
    from ctseg.inference.io import ArrayReader, gdal_env, open_scene

    with gdal_env(), open_scene(scene) as r:
        return ArrayReader(r.read_rows(0, r.height).transpose(1, 2, 0))


def compute_run(net: nn.Module, reader: Any, settings: Any, device: str) -> float:
    """Seconds of what the device does, with no file I/O: normalisation, forward, blending, argmax and
    the label blocks copied back (on CUDA without waiting, pinned; one wait at the end)."""
    from ctseg.inference.sliding import iter_blended_rows

    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        blocks = [
            b.max(0).indices.to(torch.uint8).to("cpu", non_blocking=True)
            for _, b in iter_blended_rows(net, reader, settings, device=device)
        ]
    _sync(device)
    del blocks
    return time.perf_counter() - t0


def io_split(scene: Path, out: Path, settings: Any) -> tuple[float, float, dict[str, float]]:
    """Seconds of the file I/O alone: reading and padding all strips (one thread); writing the label
    GeoTIFF and colour PNG of the full run again from memory by blocks of ``stride`` rows, both files
    in turn per block; and per file, each written alone (``{"labels": s, "color": s}``)."""
    import rasterio

    from ctseg.inference.io import GeoTIFFWriter, PNGStreamWriter, gdal_env, open_scene
    from ctseg.inference.predict import default_palette
    from ctseg.inference.sliding import _load_strip

    with gdal_env(), open_scene(scene) as r:
        gy, gx = settings.grids(r.height, r.width)
        t0 = time.perf_counter()
        for y in gy.starts:
            _load_strip(r, gy, gx, y)
        read = time.perf_counter() - t0
        georef = r.georef
        with rasterio.open(next(out.glob("*_labels.tif"))) as ds:
            labels = ds.read(1)
        h, w = labels.shape
        tmp = out.parent / f"split-{h}"
        tmp.mkdir(exist_ok=True)
        palette = default_palette(NUM_CLASSES)
        t0 = time.perf_counter()
        with (
            GeoTIFFWriter(tmp / "l.tif", w, h, 1, np.uint8, georef, palette) as a,
            PNGStreamWriter(tmp / "c.png", w, h, palette=palette) as b,
        ):
            for y in range(0, h, settings.stride):
                a.write(labels[y : y + settings.stride])
                b.write(labels[y : y + settings.stride])
        write = time.perf_counter() - t0
        # Each file alone (predict_file writes them in parallel, one lane each: the slower one bounds it).
        each = {}
        for key, make in (
            ("labels", lambda: GeoTIFFWriter(tmp / "l.tif", w, h, 1, np.uint8, georef, palette)),
            ("color", lambda: PNGStreamWriter(tmp / "c.png", w, h, palette=palette)),
        ):
            t0 = time.perf_counter()
            with make() as writer:
                for y in range(0, h, settings.stride):
                    writer.write(labels[y : y + settings.stride])
            each[key] = time.perf_counter() - t0
    return read, write, each


def lanes(tail_lanes: dict[str, dict[str, float]]) -> str:
    """``labels 0.012 / 0.150 s, color …``: per write lane, its last write's end after the last block
    was handed over and its busy time (the timeline's ``tail_lanes_s``)."""
    return ", ".join(
        f"{k} {v['last_write_end_after_last_block']:.3f} / {v['busy']:.3f}" for k, v in tail_lanes.items()
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="3000,6000", help="scene sides, comma-separated (default 3000,6000)")
    p.add_argument("--model", default="dcpoolformer-paper", help="model preset (default dcpoolformer-paper)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--blend", default="spline")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--probs", action="store_true", help="also write the probability GeoTIFF")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where scenes and outputs go (default: a temp dir)"
    )
    p.add_argument(
        "--simulate-forward-ms",
        type=float,
        default=None,
        help="SIMULATION without a GPU: replace the model by one that is busy this many ms per batch "
        "(mostly asleep); e.g. 23 = an H100's dcpoolformer-paper forward of 16 windows of 512²",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="full, raw and compute runs per size, alternating; medians reported (default 3)",
    )
    p.add_argument(
        "--compress",
        choices=["none", "deflate", "lzw"],
        default="none",
        help="compression of the generated scene's tiles (default none)",
    )
    p.add_argument(
        "--nodata",
        action="store_true",
        help="the generated scene has nodata value 0 and a nodata margin (its left eighth): the full run "
        "reads its mask beside the writes and marks those pixels",
    )
    p.add_argument(
        "--overviews",
        action="store_true",
        help="the full run also builds the output GeoTIFFs' overviews (predict_file(overviews=True))",
    )
    p.add_argument(
        "--read-threads",
        default=None,
        help="GDAL decoding threads of the scene reader (default: ctseg's, ALL_CPUS); 1 for one thread",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scene", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="ctseg-infer-bench-", dir=args.workdir)
    results = []
    with tmp:
        for size in sizes:
            scene = Path(tmp.name) / f"scene-{size}.tif"
            t0 = time.perf_counter()
            generate_scene(scene, size, compress=args.compress, nodata=args.nodata)
            print(
                f"generated {scene.name} ({size}x{size}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr
            )
            cmd = [sys.executable, __file__, "--worker", "--scene", str(scene)]
            for k in (
                "model", "window", "overlap", "blend", "batch_size", "device", "threads", "simulate_forward_ms", "repeat",
                "read_threads",
            ):  # fmt: skip
                v = getattr(args, k)
                if v is not None:
                    cmd += [f"--{k.replace('_', '-')}", str(v)]
            cmd += ["--probs"] if args.probs else []
            cmd += ["--overviews"] if args.overviews else []
            env = dict(
                os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
            )
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                return run.returncode
            res = json.loads(run.stdout.strip().splitlines()[-1])
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    sim = args.simulate_forward_ms
    meta = {
        "model": f"SIMULATED forward, {sim:g} ms per batch (not a network)"
        if sim is not None
        else args.model,
        "simulated_forward_ms": sim,
        "window": args.window,
        "overlap": args.overlap,
        "blend": args.blend,
        "batch_size": args.batch_size,
        "compress": args.compress,
        "nodata": args.nodata,
        "overviews": args.overviews,
        "read_threads": args.read_threads,
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    if sim is not None:
        print(f"\nSIMULATION (no GPU involved): the model is a stand-in busy {sim:g} ms per batch")
    print(
        f"\nmodel {meta['model']}, window {args.window}/{args.overlap} ({args.blend}), batch {args.batch_size}, {meta['device']}"
        + (", scene with a nodata margin (masked)" if args.nodata else "")
        + (", overviews built" if args.overviews else "")
    )
    print(
        "| scene | windows | raw forward Mpx/s | full Mpx/s | overhead | peak RSS MB raw | peak RSS MB full | GPU peak MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['size']} | {r['windows']} | {r['raw_mpx_s']} | {r['full_mpx_s']} | {100 * r['overhead']:.1f}% "
            f"({100 * r['overhead_paired']:.1f}% paired) "
            f"| {r.get('peak_rss_raw_mb')} | {r['peak_rss_mb']} | {r['gpu_peak_mb'] or '—'} |"
        )
    print("\nTime split, seconds, medians (each part alone; overlapped: full ≈ max(compute, read, write)):")
    print(
        "| scene | raw forward | compute (no files) | read | write | write labels / colour alone | full "
        "| full / compute − 1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        each = r["write_each_s"]
        print(
            f"| {r['size']} | {r['raw_s']} | {r['compute_s']} | {r['read_s']} | {r['write_s']} "
            f"| {each['labels']} / {each['color']} | {r['full_s']} | {100 * r['full_over_compute']:.1f}% |"
        )
    if any("head_s" in r for r in results):
        what = "(simulated) forward" if sim is not None else "forward (CUDA: its launch; kernels run async)"
        print(f"\nWhere the prediction thread waits instead of running the {what}, seconds:")
        print(
            "| scene | full | forward | head (to 1st forward) | waits for reads | waits for writes | tail "
            "| of which after the last block | after its write began | longest close | longest fsync "
            "| head: scene open at | head: window set-up (start-end) | head: first strip read at "
            "| head: loads (start-end) | head: outputs created (start-end) "
            "| per file: last write ended after the last block / busy |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|")
        for r in results:
            print(
                f"| {r['size']} | {r['timeline_full_s']} | {r['forward_s']} | {r['head_s']} | {r['wait_read_s']} "
                f"| {r['wait_write_s']} | {r['tail_s']} | {r['tail_after_last_block_s']} "
                f"| {r['tail_after_last_write_s']} | {r['close_s']} | {r['fsync_s']} "
                f"| {r['head_open_s']} | {'-'.join(f'{x:.3f}' for x in r['head_setup_span_s'])} "
                f"| {r['head_read_s']} | {', '.join(f'{a:.3f}-{b:.3f}' for a, b in r['head_load_spans_s'])} "
                f"| {'-'.join(f'{x:.3f}' for x in r['head_writers_open_span_s'])} "
                f"| {lanes(r['tail_lanes_s'])} |"
            )
    if args.json:
        from ctseg.utils.io import atomic_write_json

        atomic_write_json(args.json, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
