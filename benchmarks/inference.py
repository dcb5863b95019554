"""Benchmark of scene prediction: sliding window + blending + GeoTIFF/PNG I/O against the raw model forward.

Usage (figures in docs/benchmarks.md, section "Inference"):

    .venv/bin/python benchmarks/inference.py                                   # 3000² and 6000², paper preset
    .venv/bin/python benchmarks/inference.py --sizes 1024,2048 --device cpu    # what fits a 2-core CPU
    .venv/bin/python benchmarks/inference.py --device cuda --batch-size 16 --json runs/infer_bench.json

For every scene size a random-texture RGB uint8 GeoTIFF (UTM CRS, 0.5 m) is generated strip by strip
in ``--workdir``; then a fresh subprocess per size (so that its peak RSS is its own) builds the model
(``ctseg.models.create(--model)``, random init, ``for_inference()``), warms it up and measures, side by
side:

* ``raw``: the model forward alone over exactly the batches the sliding window runs (same number of
  windows, same batch sizes), on inputs already on the device — no reading, padding, blending,
  argmax, transfer or writing. Timed twice (before and after the full run); the mean is used.
* ``full``: :func:`ctseg.inference.predict_file` on the GeoTIFF: windowed reads, reflect padding,
  normalisation, forward, blending into the strip buffer, argmax, label GeoTIFF (deflate, tiled) and
  colour PNG written by rows, atomic rename.

Reported: throughput in Mpx/s (scene pixels / wall time), ``overhead = full / raw - 1`` (stitching and
I/O), the peak RSS (``VmHWM``, reset before each part; Linux) of the raw forward and of the full
prediction — the difference is what stitching and I/O hold — and on CUDA the peak allocated GPU
memory of the full run. Peak RSS must not grow with the scene beyond the O(K · window · W) strip.
``--model conv-tiny`` (three 3x3 convs, not a paper preset) is a quick smoke run of this script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 6


def generate_scene(path: Path, size: int, seed: int = 0, strip: int = 512) -> None:
    """A ``size x size`` RGB uint8 GeoTIFF of blocky random texture, written strip by strip."""
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
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, strip):
            h = min(strip, size - y0)
            rows = np.arange(y0, y0 + h) // 16
            block = coarse[rows][:, np.arange(size) // 16]
            block = np.clip(block.astype(np.int16) + rng.integers(-20, 21, block.shape), 0, 255).astype(
                np.uint8
            )
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

    device = args.device
    settings = SlidingWindow(
        window=args.window, overlap=args.overlap, blend=args.blend, batch_size=args.batch_size
    )
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
    _sync(device)
    t0 = time.perf_counter()
    predict_file(net, args.scene, out, settings, num_classes=NUM_CLASSES, device=device, probs=args.probs)
    _sync(device)
    full = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    raw_after = raw()
    raw_t = (raw_before + raw_after) / 2
    mpx = height * width / 1e6
    return {
        "size": f"{height}x{width}",
        "windows": len(gy.starts) * len(gx.starts),
        "batches": len(batches),
        "raw_s": round(raw_t, 3),
        "raw_s_before_after": [round(raw_before, 3), round(raw_after, 3)],
        "full_s": round(full, 3),
        "raw_mpx_s": round(mpx / raw_t, 3),
        "full_mpx_s": round(mpx / full, 3),
        "overhead": round(full / raw_t - 1, 4),
        "rss_before_mb": round(rss_before / 1024, 1),
        "peak_rss_mb": round(peak / 1024, 1),
        "peak_rss_growth_mb": round((peak - rss_before) / 1024, 1) if reset else None,
        "peak_rss_raw_mb": round(peak_raw / 1024, 1) if reset else None,
        "gpu_peak_mb": None if gpu_peak is None else round(gpu_peak, 1),
        "outputs_mb": round(sum(p.stat().st_size for p in out.iterdir()) / 2**20, 1),
    }


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
    tmp = tempfile.TemporaryDirectory(prefix="ctseg-infer-bench-", dir=args.workdir)
    results = []
    with tmp:
        for size in sizes:
            scene = Path(tmp.name) / f"scene-{size}.tif"
            t0 = time.perf_counter()
            generate_scene(scene, size)
            print(
                f"generated {scene.name} ({size}x{size}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr
            )
            cmd = [sys.executable, __file__, "--worker", "--scene", str(scene)]
            for k in ("model", "window", "overlap", "blend", "batch_size", "device", "threads"):
                v = getattr(args, k)
                if v is not None:
                    cmd += [f"--{k.replace('_', '-')}", str(v)]
            if args.probs:
                cmd.append("--probs")
            env = dict(
                os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
            )
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                return run.returncode
            res = json.loads(run.stdout.strip().splitlines()[-1])
            results.append(res)
            print(json.dumps(res), flush=True)
    meta = {
        "model": args.model,
        "window": args.window,
        "overlap": args.overlap,
        "blend": args.blend,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    print(
        f"\nmodel {args.model}, window {args.window}/{args.overlap} ({args.blend}), batch {args.batch_size}, {meta['device']}"
    )
    print(
        "| scene | windows | raw forward Mpx/s | full Mpx/s | overhead | peak RSS MB | RSS growth MB | GPU peak MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['size']} | {r['windows']} | {r['raw_mpx_s']} | {r['full_mpx_s']} | {100 * r['overhead']:.1f}% "
            f"| {r.get('peak_rss_raw_mb')} | {r['peak_rss_mb']} | {r['gpu_peak_mb'] or '—'} |"
        )
    if args.json:
        from ctseg.utils.io import atomic_write_json

        atomic_write_json(args.json, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
