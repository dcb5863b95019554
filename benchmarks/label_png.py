"""Writing label maps as PNG: zlib's run-length strategy against its default, side by side.

    .venv/bin/python benchmarks/label_png.py                                  # 6000 wide, 1536 rows
    .venv/bin/python benchmarks/label_png.py --width 6000 --rows 6000 --repeats 5 --json out.json

``ctseg predict`` writes a label map (greyscale PNG for non-GeoTIFF input) and a colour PNG (palette)
with :class:`ctseg.inference.io.PNGStreamWriter`, block by block of ``--block`` rows, in parallel
1 MiB pieces. Its 1-channel default is ``zlib.Z_RLE``; this script times that against
``zlib.Z_DEFAULT_STRATEGY`` (level 1 both), alternating the two within each repeat so that machine
noise hits both alike, and reports medians of the wall time per map and the file sizes, per texture:

* ``dubai``: real ground-truth label maps of ``../shared/data/dubai`` (512² crops, seed 0, side by side;
  6 values: 5 classes and the ignore value), skipped with a message when the data are absent;
* ``field-S``: the argmax over 6 classes of random logits on a grid of ``S`` pixels, upsampled
  bilinearly (seed 0): region sizes of about S pixels, as a network's prediction (S = 64: large smooth
  regions; S = 4: a speckled map like an untrained network's).

``--threads`` is the writer's compression threads (default: its own choice, up to 8 CPUs); the
PNGs are written to a temporary folder (``--workdir``) and read back once, to check they decode to
the map.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ctseg.inference.io import PNGStreamWriter
from ctseg.inference.predict import default_palette
from ctseg.utils.io import atomic_write_json

STRATEGIES = {"rle": zlib.Z_RLE, "default": zlib.Z_DEFAULT_STRATEGY}
CLASSES = 6


def field_map(rows: int, width: int, scale: int, seed: int = 0) -> np.ndarray:
    """``(rows, width)`` uint8: argmax of bilinearly upsampled random logits on a ``scale``-pixel grid."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(1, CLASSES, rows // scale + 2, width // scale + 2, generator=g)
    logits = F.interpolate(small, size=(rows, width), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).to(torch.uint8).numpy()


def dubai_map(rows: int, width: int) -> np.ndarray | None:
    """``(rows, width)`` uint8 of real Dubai label crops laid side by side (None: data absent)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import ct_loss  # the script's folder: its Dubai crops and class decoding

    if not sorted(ct_loss.DUBAI.glob("Tile */masks/*.png")):
        return None
    size = ct_loss.SIZE
    per_row = -(-width // size)
    n = per_row * -(-rows // size)
    crops = ct_loss.dubai_masks(n, size=size).numpy().astype(np.uint8)  # (n, size, size)
    grid = crops.reshape(-1, per_row, size, size).transpose(0, 2, 1, 3).reshape(-1, per_row * size)
    return np.ascontiguousarray(grid[:rows, :width])


def write_png(labels: np.ndarray, path: Path, strategy: int, block: int, threads: int | None) -> float:
    h, w = labels.shape
    t0 = time.perf_counter()
    with PNGStreamWriter(
        path, w, h, palette=default_palette(CLASSES), threads=threads, strategy=strategy
    ) as wr:
        for y in range(0, h, block):
            wr.write(labels[y : y + block])
    return time.perf_counter() - t0


def bench_map(
    labels: np.ndarray, workdir: Path, repeats: int, block: int, threads: int | None
) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {k: [] for k in STRATEGIES}
    for name, strategy in STRATEGIES.items():  # warm-up (thread pool, page cache) and the check
        path = workdir / f"{name}.png"
        write_png(labels, path, strategy, block, threads)
        if not np.array_equal(np.asarray(Image.open(path)), labels):
            raise SystemExit(f"{path}: does not decode to the label map")
    for r in range(repeats):
        order = list(STRATEGIES) if r % 2 == 0 else list(reversed(STRATEGIES))
        for name in order:
            times[name].append(write_png(labels, workdir / f"{name}.png", STRATEGIES[name], block, threads))
    out = {
        name: {
            "time_s": statistics.median(t),
            "bytes": (workdir / f"{name}.png").stat().st_size,
            "times_s": [round(v, 4) for v in t],
        }
        for name, t in times.items()
    }
    out["rle"]["time_vs_default"] = out["rle"]["time_s"] / out["default"]["time_s"] - 1
    out["rle"]["bytes_vs_default"] = out["rle"]["bytes"] / out["default"]["bytes"] - 1
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=6000, help="map width (default 6000, a Potsdam tile)")
    p.add_argument("--rows", type=int, default=1536, help="map rows (default 1536; time scales with them)")
    p.add_argument(
        "--block", type=int, default=384, help="rows per write (default 384: the stride of 512/128)"
    )
    p.add_argument("--scales", type=int, nargs="+", default=[64, 16, 4], help="field textures (pixels)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="compression threads (default: the writer's)")
    p.add_argument("--workdir", type=Path, default=None, help="where the PNGs go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here (atomic write)")
    args = p.parse_args()

    maps: dict[str, np.ndarray] = {}
    dubai = dubai_map(args.rows, args.width)
    if dubai is None:
        print("dubai: skipped (no masks under ../shared/data/dubai)")
    else:
        maps["dubai"] = dubai
    for s in args.scales:
        maps[f"field-{s}"] = field_map(args.rows, args.width, s)

    results = {}
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name, labels in maps.items():
            results[name] = bench_map(labels, Path(tmp), args.repeats, args.block, args.threads)

    mpx = args.width * args.rows / 1e6
    threads = args.threads or "writer's default"
    print(
        f"\nPNG label maps {args.width}x{args.rows} ({mpx:.1f} Mpx), blocks of {args.block} rows, zlib level 1, "
        f"threads: {threads}, {os.cpu_count()} CPUs, medians of {args.repeats}"
    )
    print("| map | default strategy | Z_RLE | time | default bytes | Z_RLE bytes | size |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        d, e = r["default"], r["rle"]
        print(
            f"| {name} | {d['time_s'] * 1e3:.1f} ms | {e['time_s'] * 1e3:.1f} ms | {e['time_vs_default']:+.1%} "
            f"| {d['bytes'] / 2**20:.2f} MB | {e['bytes'] / 2**20:.2f} MB | {e['bytes_vs_default']:+.1%} |"
        )
    if args.json:
        atomic_write_json(
            args.json,
            {
                "width": args.width,
                "rows": args.rows,
                "block": args.block,
                "threads": args.threads,
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "results": results,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
