"""Time to generate one synthetic scene (``ctseg.data.synthetic.generate_scene``) at several sizes.

    .venv/bin/python benchmarks/synthetic.py                      # 256², 512², 1024²; median of 5 / 5 / 3
    .venv/bin/python benchmarks/synthetic.py --sizes 512 --repeats 9 --json out.json

For each size: the median wall time and the median CPU time (``time.process_time``, all threads of this
process) per scene over different seeds, after one warm-up scene, and the time to encode the scene as the
two PNG files ``write_synthetic_dataset`` writes. The generator is single-threaded numpy / scipy / Pillow;
on a busy machine wall time exceeds CPU time, which is why both are printed. Protocol of the numbers:
protocol "synthetic", default ``gsd_m`` (0.15 m), seeds 100, 101, ...
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from ctseg.data.synthetic import DEFAULT_GSD_M, _png_bytes, generate_scene
from ctseg.utils.io import atomic_write_json


def time_size(size: int, repeats: int) -> dict[str, float]:
    generate_scene(size, size, seed=99)  # warm-up: imports, allocator
    wall, cpu, encode = [], [], []
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        image, mask = generate_scene(size, size, seed=100 + i)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        t0 = time.perf_counter()
        _png_bytes(image)
        _png_bytes(mask)
        encode.append(time.perf_counter() - t0)
    return {
        "size": size,
        "repeats": repeats,
        "wall_s": statistics.median(wall),
        "cpu_s": statistics.median(cpu),
        "png_s": statistics.median(encode),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=None, help="scenes per size (default 5, 3 for > 512)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}, Python {platform.python_version()}"
    )
    print(f"generate_scene, gsd {DEFAULT_GSD_M} m; {machine}")
    print("| size | scenes | wall s/scene (median) | CPU s/scene (median) | PNG encode s |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for size in args.sizes:
        repeats = args.repeats or (3 if size > 512 else 5)
        row = time_size(size, repeats)
        rows.append(row)
        print(
            f"| {size}² | {repeats} | {row['wall_s']:.3f} | {row['cpu_s']:.3f} | {row['png_s']:.3f} |",
            flush=True,
        )
    if args.json is not None:
        atomic_write_json(args.json, {"machine": machine, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
