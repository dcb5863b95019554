"""Training throughput of the paper presets without CT and with each CT setting, side by side.

One process builds every (model, CT) combination (each its own module and AdamW, the same batch),
warms each up, then times round-robin: one step of each combination per round, ``--steps`` rounds,
medians per combination. Interleaving makes drift of the machine and the process's first-use costs hit
every row alike, so the ratios "with CT / without CT" (to the no-CT row of the same model) compare like
with like. A step is what ``ctseg fit`` does per batch: forward (with features when CT is on),
SoftCE+Dice, CT loss, backward, global grad-norm clip 1.0, AdamW step. Peak memory (``--memory``, on by
default) comes after the timing, one combination at a time, each in a fresh process: CUDA
``max_memory_allocated``, CPU the peak of live tensor bytes from the CPU allocator (``cpu_memory.py``).

    .venv/bin/python benchmarks/training.py                              # CPU, 512², B = 8 (docs/benchmarks.md)
    .venv/bin/python benchmarks/training.py --size 128 --batch 2 --steps 1 --no-memory   # quick look
    .venv/bin/python benchmarks/training.py --device cuda --precision bf16 --batch 16 --steps 10 --json out.json

Reports images/s, seconds/step, CPU seconds/step (process time: what the step costs, even when other
processes share the cores) and peak memory per combination, and the ratios to the model's no-CT row.
Protocol of the numbers: random inputs, random-init weights, "potsdam-paper" class set (6 classes),
masks of 32-px blocks of random classes so that every class has full patches.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

MODELS = ("dcswin-paper", "unetformer-paper", "dcpoolformer-paper")
CT_SETTINGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "cl": {"loss": "cl", "mode": "paper", "smoothing": 0.1, "clip": 1.0},
    "infonce": {"loss": "infonce", "mode": "paper", "temperature": 0.1, "clip": 1.0},
}
# The same losses recorded as CUDA graphs (ctseg.contrastive.graphs; eager on CPU): --ct none cl cl+graph
CT_SETTINGS.update({f"{name}+graph": {**CT_SETTINGS[name], "cuda_graph": True} for name in ("cl", "infonce")})
DEFAULT_CT = ("none", "cl", "infonce")


def blocky_mask(batch: int, size: int, classes: int, seed: int = 0) -> torch.Tensor:
    """``(B, H, W)`` labels made of 32-px blocks with random classes (full patches at every stage)."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, classes, (batch, max(1, size // 32), max(1, size // 32)), generator=g)
    mask = cells.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :size, :size]
    return mask.contiguous()


class Combo:
    """One (model, CT setting): its own module (seed 0: the same weights for every CT setting of a
    preset) and AdamW, stepping on the shared batch exactly as ``ctseg fit`` does per batch."""

    def __init__(
        self,
        model_name: str,
        ct_name: str,
        data: dict[str, Any],
        device: str,
        precision: str,
    ) -> None:
        from ctseg.engine.module import SegmentationModule

        self.model_name, self.ct_name = model_name, ct_name
        torch.manual_seed(0)
        self.module = SegmentationModule(
            model=model_name, protocol="potsdam-paper", ct=CT_SETTINGS[ct_name]
        ).to(device)
        self.module.train()
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=8e-5, weight_decay=0.01)
        self.data = data
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
        self.autocast_args = (device.split(":")[0], dtype) if dtype else None
        self.i = 0

    def step(self) -> None:
        autocast = (
            torch.autocast(device_type=self.autocast_args[0], dtype=self.autocast_args[1])
            if self.autocast_args
            else contextlib.nullcontext()
        )
        with autocast:
            loss = self.module.training_step(self.data, self.i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.i += 1


def make_batch(batch: int, size: int, device: str) -> dict[str, Any]:
    """The one batch every combination trains on (its own generator: independent of the builds)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = blocky_mask(batch, size, 6).to(device)
    return {"image": x, "mask": y, "id": [str(i) for i in range(batch)]}


def time_round_robin(
    names: list[tuple[str, str]], size: int, batch: int, steps: int, warmup: int, device: str, precision: str
) -> list[dict[str, Any]]:
    """Build every combination, warm each up, then time ``steps`` rounds of one step per combination.

    Interleaving spreads the machine's drift (other processes, thermal state) and the process's
    first-use costs (allocator, thread pool) over all rows alike instead of charging them to whichever
    row comes first; each row reports medians over its rounds.
    """
    cuda = device.startswith("cuda")
    data = make_batch(batch, size, device)
    combos: dict[tuple[str, str], Combo] = {}
    errors: dict[tuple[str, str], str] = {}
    wall: dict[tuple[str, str], list[float]] = {n: [] for n in names}
    cpu: dict[tuple[str, str], list[float]] = {n: [] for n in names}

    def guarded(n: tuple[str, str], fn: Callable[[], None]) -> None:
        try:
            fn()
        except torch.OutOfMemoryError:
            errors[n] = "out of memory"
            combos.pop(n, None)
            torch.cuda.empty_cache()

    def build(n: tuple[str, str]) -> None:
        combos[n] = Combo(*n, data, device, precision)

    for n in names:
        guarded(n, lambda n=n: build(n))
    for _ in range(warmup):
        for n in names:
            if n in combos:
                guarded(n, combos[n].step)
    for _ in range(steps):
        for n in names:
            if n not in combos:
                continue
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            guarded(n, combos[n].step)
            if cuda:
                torch.cuda.synchronize()
            if n in combos:
                wall[n].append(time.perf_counter() - t0)
                # CPU time of this process: on a shared machine the wall time mostly measures the neighbours.
                cpu[n].append(time.process_time() - c0)
    rows = []
    for n in names:
        if n in errors:
            rows.append({"model": n[0], "ct": n[1], "error": errors[n]})
            continue
        dt = statistics.median(wall[n])
        rows.append(
            {
                "model": n[0],
                "ct": n[1],
                "s_per_step": dt,
                "images_per_s": batch / dt,
                "cpu_s_per_step": statistics.median(cpu[n]),
                "steps": len(wall[n]),
            }
        )
    return rows


def peak_memory(name: tuple[str, str], size: int, batch: int, device: str, precision: str) -> float:
    """Peak memory (GiB) of one training step of a fresh build of ``name``, after one warm-up step.

    Run in a fresh process per combination (:func:`memory_in_child`), so the figure is that
    combination's own: CUDA ``max_memory_allocated`` (reset after the warm-up), CPU the peak of
    live tensor bytes from the CPU allocator's events (``cpu_memory.py``; build included in the profile
    so every block is accounted for). The warm-up step creates AdamW's state, which a training step
    holds at its peak.
    """
    if device.startswith("cuda"):
        combo = Combo(*name, make_batch(batch, size, device), device, precision)
        combo.step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        combo.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del combo
        torch.cuda.empty_cache()
        return peak / 2**30
    from cpu_memory import LiveTensorBytes

    with LiveTensorBytes() as live:
        combo = Combo(*name, make_batch(batch, size, device), device, precision)
        combo.step()
        with live.window():
            combo.step()
        del combo
        gc.collect()
    return live.peak_bytes / 2**30


def memory_in_child(model: str, ct: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`peak_memory` of one combination in a fresh process of this script: a recorded CT loss
    leaves process-wide state behind (the capture stream's cuBLAS workspaces, 65 MiB on an H100), which
    in one process would count in every later combination's figure, the no-CT rows included."""
    cmd = [sys.executable, __file__, "--memory-child", model, ct, "--size", str(args.size)]
    cmd += ["--batch", str(args.batch), "--device", args.device, "--precision", args.precision]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return {"peak_mem_error": f"memory child exited with {res.returncode}: {res.stderr[-300:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--ct", nargs="+", default=list(DEFAULT_CT), choices=list(CT_SETTINGS))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed rounds (one step of each combination)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="peak memory per combination (a fresh process, build + 2 steps each, after the timing)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:  # one combination's peak memory, in this fresh process (see memory_in_child)
        try:
            res = {
                "peak_mem_gib": peak_memory(
                    tuple(args.memory_child), args.size, args.batch, args.device, args.precision
                )
            }
        except torch.OutOfMemoryError:
            res = {"peak_mem_error": "out of memory"}
        print(json.dumps(res))
        return 0

    import lightning.pytorch as pl  # noqa: F401  (imported before timing)

    names = [(m, c) for m in args.models for c in args.ct]
    rows = time_round_robin(
        names, args.size, args.batch, args.steps, args.warmup, args.device, args.precision
    )
    gc.collect()  # the timed combinations are gone: their device memory is free for the children
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    for r in rows:
        if "error" not in r and args.memory:
            r.update(memory_in_child(r["model"], r["ct"], args))
        print(json.dumps(r), file=sys.stderr, flush=True)
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
        f"precision {args.precision}, medians of {args.steps} timed round-robin rounds after {args.warmup} "
        f"warm-up round(s); peak memory: "
        + (
            "none"
            if not args.memory
            else "max_memory_allocated"
            if args.device.startswith("cuda")
            else "peak live tensor bytes (CPU allocator events)"
        )
    )
    print(f"\nTraining throughput: {env}\n")
    hdr = "| model | CT | images/s | s/step | time ratio vs no CT | CPU s/step | CPU-time ratio |" + (
        " peak GiB | mem ratio |" if args.memory else ""
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
            line += f" {r['peak_mem_gib']:.3f} | {r.get('mem_ratio', float('nan')):.3f} |"
        elif args.memory:
            line += f" {r.get('peak_mem_error', '')} | |"
        print(line)
    if args.json:
        from ctseg.utils.io import atomic_write_json

        atomic_write_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
