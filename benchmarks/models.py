"""Forward and training-step time and peak memory of the paper presets on CPU.

Command (the figures in docs/benchmarks.md, section "Models")::

    .venv/bin/python benchmarks/models.py --batch 2 --size 512 --repeats 3

Each (preset, mode) runs in its own fresh process so that memory peaks do not mix:

* ``forward``: ``model.eval()`` under ``torch.no_grad()``, ``(B, 3, S, S)`` -> logits.
* ``train``: ``model.train()``, forward, cross-entropy on random labels, backward, AdamW step
  (no CT heads: this measures the network; the CT loss has its own benchmark).

Time: one warm-up, then ``--repeats`` timed runs; the median is reported (the machine is shared, so
medians of a few repeats, not single runs). Both wall time and process CPU time (all threads summed;
what the run costs when the cores are not shared) are recorded. Memory: peak resident set size of the process
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, Linux KiB) after the runs minus the RSS measured after
the model was built and one tiny forward: the extra memory the activations (and, for ``train``,
gradients and AdamW state) need on top of the weights. It is a process-level figure, so it includes
allocator slack.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAPER_PRESETS = ["dcswin-paper", "unetformer-paper", "dcpoolformer-paper"]


def _rss_kib() -> int:
    # Current RSS from /proc (ru_maxrss is the peak, we also need the level before the runs).
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _child(preset: str, mode: str, batch: int, size: int, repeats: int, num_classes: int) -> dict:
    import torch
    import torch.nn.functional as F

    from ctseg.models import create

    torch.manual_seed(0)
    model = create(preset, num_classes=num_classes)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))  # lazy allocations out of the way
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, num_classes, (batch, size, size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=8e-5) if mode == "train" else None
    base_kib = _rss_kib()

    def run() -> None:
        if mode == "forward":
            model.eval()
            with torch.no_grad():
                model(x)
        else:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    run()  # warm-up (also creates the AdamW state)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "preset": preset,
        "mode": mode,
        "batch": batch,
        "size": size,
        "params_m": round(params / 1e6, 2),
        "median_s": round(statistics.median(times), 3),
        "times_s": [round(t, 3) for t in times],
        "median_cpu_s": round(statistics.median(cpu), 3),
        "peak_rss_delta_mib": round(max(peak_kib - base_kib, 0) / 1024, 1),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=PAPER_PRESETS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=6)
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        row = _child(args.child[0], args.child[1], args.batch, args.size, args.repeats, args.num_classes)
        print(json.dumps(row))
        return 0

    rows = []
    for preset in args.presets:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", preset, mode, "--batch", str(args.batch)]
            cmd += ["--size", str(args.size), "--repeats", str(args.repeats)]
            cmd += ["--num-classes", str(args.num_classes)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"{preset} {mode}: {row}", file=sys.stderr, flush=True)

    print(f"\nCPU, batch {args.batch}, {args.size}x{args.size}, median of {args.repeats} after 1 warm-up\n")
    print(
        "| preset | params (M) | forward (s) | train step (s) | forward peak RSS Δ (MiB) | train peak RSS Δ (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        by_mode = {r["mode"]: r for r in rows if r["preset"] == preset}
        fwd, trn = by_mode.get("forward", {}), by_mode.get("train", {})
        params = (fwd or trn)["params_m"]
        print(
            f"| {preset} | {params} | {fwd.get('median_s', '-')} / {fwd.get('median_cpu_s', '-')} "
            f"| {trn.get('median_s', '-')} / {trn.get('median_cpu_s', '-')} | "
            f"{fwd.get('peak_rss_delta_mib', '-')} | {trn.get('peak_rss_delta_mib', '-')} |"
        )
    if args.json:
        from ctseg.utils.io import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
