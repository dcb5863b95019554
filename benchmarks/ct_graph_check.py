"""Diagnostics of the CUDA-graph CT loss (``cuda_graph=True``) on a GPU. Not a test: figures to read.

Usage (GPU machine; part of ``benchmarks/gpu_check.sh``):

    python3 benchmarks/ct_graph_check.py --json ct-graph.json
    python3 benchmarks/ct_graph_check.py --parts snapshot workspaces   # some of them

1. **Recording under deterministic algorithms** (``torch.use_deterministic_algorithms(True)``, as
   ``ctseg fit --trainer.deterministic true`` sets): recorded, or the fallback warning's text.
2. **Memory** of the loss alone (B = 8, 512², real Dubai label crops, stage maps 64/128/256/512):
   allocated and reserved bytes that recording adds, and the peak of a forward + backward, eager vs
   recorded.
3. **Kernels**: CUDA kernels per forward + backward and their summed GPU time (torch.profiler),
   eager vs recorded.
4. **Step**: a DCPoolFormer training step (B = 8, 512², fp32) without CT, with the eager and the
   recorded CL loss and with the reference CL loss (with ``prefetch``): wall time and summed GPU
   kernel time per step (wall − kernel time = time the GPU waits for the host); for the reference
   mode the forward's wait for the planner thread and the host time of queueing its device pass.
5. **Snapshot**: after three such steps with the recorded loss, the caching allocator's memory by
   (pool, stream) and the largest blocks outside the default pool with the line that allocated them
   (what the graphs keep: static inputs and outputs, their private pool, side-stream caches).
6. **Workspaces**: the step's peak memory without CT, with the eager and with the recorded CL loss, each
   in a fresh process, with the default cuBLAS/cuBLASLt workspaces, a unified one, and small ones.
7. **Host** (only when named in ``--parts``): where the host's time goes in that step, without CT and
   with the recorded and the eager CL loss: each phase (model forward, CT call, backward, optimizer)
   timed from an idle device to the end of its kernels, the ATen operators the step dispatches beyond
   the baseline's, and a Python profile (own time) of five steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import ct_loss
from ct_loss import (  # the script's folder
    CHANNELS,
    IGNORE,
    NUM_CLASSES,
    loss_inputs,
    measure_step_memory,
    step_setup,
    sync,
    timed,
)
from ctseg.contrastive import PatchContrastiveLoss

MiB = 2**20


def _loss(cuda_graph: bool, device: torch.device, **kw) -> PatchContrastiveLoss:
    return PatchContrastiveLoss(CHANNELS, NUM_CLASSES, IGNORE, cuda_graph=cuda_graph, clip=None, **kw).to(
        device
    )


def deterministic_recording(device: torch.device) -> dict:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    feats, mask = loss_inputs(2, device)
    out = {}
    for loss in ("cl", "infonce"):
        fn = _loss(True, device, loss=loss)
        torch.use_deterministic_algorithms(True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(2):
                    fn(feats, mask)[0].backward()
        finally:
            torch.use_deterministic_algorithms(False)
        msgs = [str(w.message) for w in caught if "cuda_graph" in str(w.message)]
        out[loss] = {"recorded": None not in fn._graphs.graphs.values(), "warnings": msgs}
    return out


def memory(device: torch.device, batch: int = 8) -> dict:
    out = {}
    for name, graph in (("eager", False), ("graph", True)):
        feats, mask = loss_inputs(batch, device)
        fn = _loss(graph, device)
        torch.cuda.synchronize()
        a0, r0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        fn(feats, mask)[0].backward()  # first call: records
        torch.cuda.synchronize()
        a1, r1 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        fn(feats, mask)[0].backward()
        torch.cuda.synchronize()
        out[name] = {
            "after_first_call_allocated_mib": (a1 - a0) / MiB,
            "after_first_call_reserved_mib": (r1 - r0) / MiB,
            "peak_over_start_allocated_mib": (torch.cuda.max_memory_allocated() - a0) / MiB,
            "peak_over_start_reserved_mib": (torch.cuda.max_memory_reserved() - r0) / MiB,
        }
        del fn, feats, mask
        torch.cuda.empty_cache()
    return out


def _kernel_stats(fn, steps: int, top: dict | None = None) -> tuple[float, float]:
    """Kernels per call and summed kernel time per call (ms) of ``fn``, from torch.profiler; with
    ``top`` a dict, fill it with the 12 kernel names of most time: {name: [ms per call, per call]}."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels)
    if top is not None:
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            acc = by_name.setdefault(e.name[:90], [0.0, 0.0])
            acc[0] += e.device_time / 1000 / steps
            acc[1] += 1 / steps
        for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]:
            top[name] = [round(ms, 4), round(n, 1)]
    return len(kernels) / steps, busy_us / 1000 / steps


def kernels(device: torch.device, batch: int = 8, compiled: bool = False) -> dict:
    """Kernels of the loss's forward + backward, their GPU time, and the kernels of most time: eager
    and recorded, CL and InfoNCE, and the reference mode (eager); with ``compiled`` also the compiled +
    recorded CL loss (``compile=True, cuda_graph=True``: ≈ 3 min of compiling on an H100)."""
    feats, mask = loss_inputs(batch, device)
    variants = [
        (f"{name}-{loss}", graph, loss, {})
        for name, graph in (("eager", False), ("graph", True))
        for loss in ("cl", "infonce")
    ]
    # The reference mode's device pass (its host plan is timed by ct_loss.py --part plan).
    variants += [(f"reference-{loss}", False, loss, {"mode": "reference"}) for loss in ("cl", "infonce")]
    if compiled:
        variants.append(("compiled-graph-cl", True, "cl", {"compile": True}))
    out = {}
    for key, graph, loss, extra in variants:
        fn = _loss(graph, device, loss=loss, **extra)
        top: dict = {}
        n, busy = _kernel_stats(lambda fn=fn: fn(feats, mask)[0].backward(), 5, top)
        out[key] = {"kernels_per_call": n, "kernel_ms_per_call": busy, "top_kernels": top}
    return out


class _HostSpans:
    """Host time per step the reference mode spends in the forward waiting for its plan
    (``_Prefetched.take``: the planner thread's result) and queueing its device pass
    (``evaluate_reference``), summed over the calls inside ``with``."""

    def __init__(self) -> None:
        self.ms = {"wait_for_plan": 0.0, "queue_device_pass": 0.0}

    def _timed(self, key: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[key] += (time.perf_counter() - t0) * 1000

        return wrapper

    def __enter__(self) -> _HostSpans:
        import ctseg.contrastive.loss as loss_module

        self._saved = (loss_module._Prefetched.take, loss_module.evaluate_reference)
        loss_module._Prefetched.take = self._timed("wait_for_plan", self._saved[0])
        loss_module.evaluate_reference = self._timed("queue_device_pass", self._saved[1])
        return self

    def __exit__(self, *exc) -> None:
        import ctseg.contrastive.loss as loss_module

        loss_module._Prefetched.take, loss_module.evaluate_reference = self._saved


def step(device: torch.device, batch: int = 8, repeats: int = 10) -> dict:
    """Wall and GPU-kernel time per step (wall − kernels: the GPU waits for the host); for the reference
    mode also its host spans (:class:`_HostSpans`)."""
    out = {}
    for config in ("baseline", "paper-cl+graph", "paper-cl", "reference-cl"):
        fn = step_setup(config, device, batch)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with _HostSpans() as spans:
            times = [timed(fn, device) for _ in range(repeats)]
        n, busy = _kernel_stats(fn, 3)
        out[config] = {"wall_ms": statistics.median(times) * 1000, "kernel_ms": busy, "kernels": n}
        if config.startswith("reference"):
            out[config].update({f"{k}_ms": v / repeats for k, v in spans.ms.items()})
        del fn
        torch.cuda.empty_cache()
    return out


def _frame(block: dict) -> str:
    """The innermost ctseg/torch.nn frame of a block's allocation stack (where it was made)."""
    frames = block.get("frames") or []
    for f in frames:
        name = f.get("filename", "")
        if "ctseg" in name or "benchmarks" in name:
            return f"{Path(name).name}:{f.get('line')} {f.get('name')}"
    return f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def snapshot(device: torch.device, batch: int = 8) -> dict:
    """After 3 DCPoolFormer steps with the recorded CL loss: memory by (pool, stream) and the largest
    live blocks outside the default pool with where they were allocated."""
    torch.cuda.memory._record_memory_history(max_entries=200000)
    fn = step_setup("paper-cl+graph", device, batch)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    groups: dict[str, dict[str, float]] = {}
    private_blocks = []
    for seg in snap["segments"]:
        pool = seg.get("segment_pool_id", (0, 0))
        key = f"pool={tuple(pool)} stream={seg.get('stream')}"
        g = groups.setdefault(key, {"reserved_mib": 0.0, "allocated_mib": 0.0})
        g["reserved_mib"] += seg["total_size"] / MiB
        g["allocated_mib"] += seg["allocated_size"] / MiB
        if tuple(pool) != (0, 0) or seg.get("stream") != 0:
            private_blocks += [(b["size"], b["state"], _frame(b)) for b in seg["blocks"]]
    private_blocks.sort(reverse=True)
    del fn
    torch.cuda.empty_cache()
    return {
        "by_pool_and_stream": groups,
        "largest_blocks_outside_default_pool": [
            {"mib": round(sz / MiB, 2), "state": st, "where": where} for sz, st, where in private_blocks[:25]
        ],
    }


WORKSPACE_ENVS = {
    "default": {},
    # cuBLASLt shares the cuBLAS workspace (default on newer open-source builds)
    "unified": {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "1"},
    # small workspaces for every stream (the loss's GEMMs are small; the model's may slow down)
    "small": {"CUBLAS_WORKSPACE_CONFIG": ":512:2", "CUBLASLT_WORKSPACE_SIZE": "1024"},
}


def workspaces(device: torch.device, batch: int = 8) -> dict:
    """Step peak memory (fresh process each) with the cuBLAS workspace settings of :data:`WORKSPACE_ENVS`:
    how much of the recorded loss's extra memory is the recording stream's workspaces."""
    out: dict[str, dict] = {}
    for name, env in WORKSPACE_ENVS.items():
        configs = ("baseline", "paper-cl", "paper-cl+graph")
        results = measure_step_memory(configs, device, batch, warmup=2, steps=1, env={**os.environ, **env})
        for config, res in results.items():
            out[f"{name}/{config}"] = {"error": str(res)[-500:]} if isinstance(res, Exception) else res
    return out


def _phased_step(config: str, device: torch.device, batch: int) -> Callable[..., None]:
    """The step of ``ct_loss.step_setup``; called with a dict, it also times each phase (the model's
    forward, the CT call, the backward, the optimizer step, :func:`ct_loss.make_step`'s marks) from an
    idle device to the end of the phase's kernels (a sync at each mark: the longer of the phase's
    launch work and its device work), in ms, appended under the phase's name."""
    times: dict[str, list[float]] | None = None
    last = 0.0

    def mark(phase: str) -> None:
        nonlocal last
        if times is None:
            return
        sync(device)
        now = time.perf_counter()
        times.setdefault(phase, []).append((now - last) * 1000)
        last = now

    step = step_setup(config, device, batch, mark)

    def run(out: dict[str, list[float]] | None = None) -> None:
        nonlocal times, last
        times, last = out, time.perf_counter()
        step()

    return run


def host(device: torch.device, batch: int = 8, repeats: int = 10) -> dict:
    """Where the host's time goes in a training step (B = 8, 512², fp32), without CT and with the
    recorded and the eager CL loss: the median time of each phase (model forward, CT call, backward,
    optimizer) from an idle device to the end of its kernels (:func:`_phased_step`: the longer of the
    phase's launch work and its device work); the ATen operators and runtime calls per step, by name,
    beyond the baseline's (torch.profiler, CPU); and a Python profile (``cProfile``, own time) of five
    unsynced steps."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    out: dict[str, object] = {}
    base_ops: dict[str, int] = {}
    for config in ("baseline", "paper-cl+graph", "paper-cl"):
        step = _phased_step(config, device, batch)
        for _ in range(3):
            step()
        sync(device)
        times: dict[str, list[float]] = {}
        for _ in range(repeats):
            sync(device)
            step(times)
        res: dict[str, object] = {k: round(statistics.median(v), 3) for k, v in times.items()}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
            sync(device)
        ops: dict[str, int] = {}
        for e in prof.key_averages():
            ops[e.key] = e.count // 3
        if config == "baseline":
            base_ops = ops
        else:
            more = {k: n - base_ops.get(k, 0) for k, n in ops.items() if n != base_ops.get(k, 0)}
            res["ops_beyond_baseline"] = dict(sorted(more.items(), key=lambda kv: -abs(kv[1]))[:40])
            res["ops_beyond_baseline_total"] = sum(more.values())
            prof_py = cProfile.Profile()
            prof_py.enable()
            for _ in range(5):
                step()
            prof_py.disable()
            sync(device)
            buf = io.StringIO()
            pstats.Stats(prof_py, stream=buf).sort_stats("tottime").print_stats(35)
            res["cprofile_step_tottime_5_steps"] = buf.getvalue()[-7000:]
        out[config] = res
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


PARTS = {
    "deterministic": deterministic_recording,
    "memory": memory,
    "kernels": kernels,
    "step": step,
    "snapshot": snapshot,
    "workspaces": workspaces,
    "host": host,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--parts",
        nargs="+",
        default=[p for p in PARTS if p != "host"],
        choices=list(PARTS),
        help="which diagnostics to run (default: all but host, in this order)",
    )
    ap.add_argument(
        "--compiled", action="store_true", help="kernels part: also the compiled + recorded CL loss (minutes)"
    )
    ap.add_argument(
        "--device", default="cuda", help="cuda (default); the host part also runs on the CPU (a smoke test)"
    )
    ap.add_argument("--size", type=int, default=512, help="crop size in pixels (default 512)")
    args = ap.parse_args()
    parts = {**PARTS, "kernels": functools.partial(kernels, compiled=args.compiled)}
    device = torch.device(args.device)
    ct_loss.SIZE = args.size
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    res: dict[str, object] = {"gpu": gpu, "torch": torch.__version__, "size": args.size}
    for name, part in parts.items():
        if name not in args.parts:
            continue
        try:
            res[name] = part(device)
        except Exception as exc:  # report and go on: every part is a separate question
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(name, json.dumps(res[name], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
