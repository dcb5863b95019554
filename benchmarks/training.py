"""Training throughput of the paper presets without CT and with each CT setting, side by side.

One process times every (model, CT) combination in the same run on the same random batch, so the
ratios "with CT / without CT" compare like with like. A step is what ``ctseg fit`` does per batch:
forward (with features when CT is on), SoftCE+Dice, CT loss, backward, global grad-norm clip 1.0,
AdamW step.

    .venv/bin/python benchmarks/training.py                              # CPU, 512², B = 8 (docs/benchmarks.md)
    .venv/bin/python benchmarks/training.py --size 128 --batch 2 --steps 1   # quick look
    .venv/bin/python benchmarks/training.py --device cuda --precision bf16 --batch 16 --steps 10 --json out.json

Reports images/s, seconds/step, CPU seconds/step (process time: what the step costs, even when other
processes share the cores) and (CUDA) peak memory per combination, and the ratios to the model's no-CT row. Protocol of the numbers: random inputs, random-init weights, "potsdam-paper"
class set (6 classes), masks of random rectangles so that every class has full patches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from typing import Any

import torch

MODELS = ("dcswin-paper", "unetformer-paper", "dcpoolformer-paper")
CT_SETTINGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "cl": {"loss": "cl", "mode": "paper", "smoothing": 0.1, "clip": 1.0},
    "infonce": {"loss": "infonce", "mode": "paper", "temperature": 0.1, "clip": 1.0},
}


def blocky_mask(batch: int, size: int, classes: int, seed: int = 0) -> torch.Tensor:
    """``(B, H, W)`` labels made of 32-px blocks with random classes (full patches at every stage)."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, classes, (batch, max(1, size // 32), max(1, size // 32)), generator=g)
    mask = cells.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :size, :size]
    return mask.contiguous()


def time_combo(
    model_name: str,
    ct: dict[str, Any] | None,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
) -> dict[str, Any]:
    from ctseg.engine.module import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule(model=model_name, protocol="potsdam-paper", ct=ct).to(device)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=8e-5, weight_decay=0.01)
    x = torch.randn(batch, 3, size, size, device=device)
    y = blocky_mask(batch, size, 6).to(device)
    data = {"image": x, "mask": y, "id": [str(i) for i in range(batch)]}
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    autocast = (
        torch.autocast(device_type=device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
    )

    def step(i: int) -> None:
        with autocast:
            loss = module.training_step(data, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(warmup + i)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    row = {
        "model": model_name,
        "ct": "none" if ct is None else ct["loss"],
        "s_per_step": dt,
        "images_per_s": batch / dt,
        # CPU time of this process: on a shared machine the wall time mostly measures the neighbours.
        "cpu_s_per_step": (time.process_time() - c0) / steps,
    }
    if cuda:
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--ct", nargs="+", default=list(CT_SETTINGS), choices=list(CT_SETTINGS))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per combination")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import lightning.pytorch as pl  # noqa: F401  (imported before timing)

    rows = []
    for m in args.models:
        for c in args.ct:
            try:
                row = time_combo(
                    m,
                    CT_SETTINGS[c],
                    args.size,
                    args.batch,
                    args.steps,
                    args.warmup,
                    args.device,
                    args.precision,
                )
            except torch.OutOfMemoryError:
                row = {"model": m, "ct": c, "error": "out of memory"}
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    base = {r["model"]: r for r in rows if r.get("ct") == "none" and "error" not in r}
    for r in rows:
        b = base.get(r["model"])
        if b is not None and "error" not in r:
            r["time_ratio"] = r["s_per_step"] / b["s_per_step"]
            r["cpu_ratio"] = r["cpu_s_per_step"] / b["cpu_s_per_step"]
            if "peak_mem_gib" in r:
                r["mem_ratio"] = r["peak_mem_gib"] / b["peak_mem_gib"]
    env = (
        f"{args.device} ({torch.cuda.get_device_name(0) if args.device.startswith('cuda') else platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.size}², B = {args.batch}, "
        f"precision {args.precision}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"\nTraining throughput: {env}\n")
    hdr = "| model | CT | images/s | s/step | time ratio vs no CT | CPU s/step | CPU-time ratio |" + (
        " peak GiB | mem ratio |" if args.device.startswith("cuda") else ""
    )
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['ct']} | {r['error']} | | | | |")
            continue
        line = (
            f"| {r['model']} | {r['ct']} | {r['images_per_s']:.2f} | {r['s_per_step']:.2f} | "
            f"{r.get('time_ratio', float('nan')):.2f} | {r['cpu_s_per_step']:.2f} | {r.get('cpu_ratio', float('nan')):.2f} |"
        )
        if "peak_mem_gib" in r:
            line += f" {r['peak_mem_gib']:.2f} | {r.get('mem_ratio', float('nan')):.2f} |"
        print(line)
    if args.json:
        from ctseg.utils.io import atomic_write_json

        atomic_write_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
