"""Benchmark of the CT loss: the loss alone, and its overhead on a DCPoolFormer training step.

Usage (CPU; figures in docs/benchmarks.md, section "CT loss"):

    .venv/bin/python benchmarks/ct_loss.py                        # both parts, B = 8 and 16 for the loss
    .venv/bin/python benchmarks/ct_loss.py --part loss --batch 8 16 --repeats 5
    .venv/bin/python benchmarks/ct_loss.py --part step --repeats 3 --json runs/ct_bench.json
    .venv/bin/python benchmarks/ct_loss.py --part launches --batch 8
    .venv/bin/python benchmarks/ct_loss.py --part plan --batch 8 16 --repeats 20
    .venv/bin/python benchmarks/ct_loss.py --device cuda          # on a GPU machine
    .venv/bin/python benchmarks/ct_loss.py --device cuda --part step --extra paper-cl+graph paper-cl+compile

Inputs: real Dubai label crops of 512² from ../shared/data (5 classes, Unlabeled/black → ignore 5;
random crops, seed 0), stage maps of 64/128/256/512 channels at strides 4/8/16/32.

* ``--part loss``: forward + backward of ``PatchContrastiveLoss`` alone on random features that require
  grad (``clip=None``, so the gradient always flows), for paper/reference × CL/InfoNCE: time, and the
  peak memory above what was allocated before (CUDA ``max_memory_allocated``; CPU live tensor bytes).
* ``--part launches``: what one forward + backward of the eager loss dispatches (B = first ``--batch``):
  top-level ATen operators (all, and those that compute: not views or metadata) and, on CUDA, the
  device kernels and copies. On a GPU the eager loss is bound by the host's launch cost, so these
  counts are the machine-independent measure of its time overhead there; they need no GPU to measure.
* ``--part plan``: the reference mode's host plan alone (``reference.plan_reference``: the draws, the
  rows and pairs, the packing), from the label crops' class counts on the host, B = each ``--batch``:
  median and minimum of ``--repeats`` calls after three untimed ones. On a GPU the forward waits for
  this plan when it takes longer than queueing the model's forward (``prefetch`` starts it there).
* ``--part step``: one training step of ``ctseg.models.create("dcpoolformer-paper")`` at B = 8, 512²
  (forward with features, cross-entropy, + CT, backward, AdamW step) without CT (baseline) and with
  each CT variant; the step calls ``ct.prefetch(masks)`` before the forward, as ``ctseg fit`` does
  (reference mode; ``reference-cl-prefetch`` on CUDA leaves it out). Times are medians of
  ``--repeats`` steps, configurations interleaved round-robin in one process (so machine noise hits
  all alike); also the *paired* ratio, the median over rounds of (config's step / baseline's step of
  the same round) − 1, with its quartiles, which a drift of the machine between rounds does not move.
  Peak memory, in a fresh subprocess per configuration (``--warmup`` then ``--memory-steps`` steps):
  on CUDA ``max_memory_allocated`` and ``max_memory_reserved``; on CPU the peak of live tensor bytes
  from the CPU allocator's events (``cpu_memory.py``), with that process's peak RSS (VmHWM, reset
  after the warm-up) as a secondary, noisy column.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cpu_memory import LiveTensorBytes
from ctseg.contrastive import PatchContrastiveLoss
from ctseg.utils.io import atomic_write_json
from ctseg.utils.opcount import VIEW_OPS as NO_KERNEL_OPS
from ctseg.utils.opcount import FloatOpCounter

REPO = Path(__file__).resolve().parents[1]
DUBAI = (
    Path(os.environ.get("CTSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
    / "dubai"
    / "Semantic segmentation dataset"
)
CHANNELS = (64, 128, 256, 512)
STRIDES = (4, 8, 16, 32)
NUM_CLASSES, IGNORE = 5, 5
SIZE = 512  # crop / input size in pixels (--size)
# Key of a benchmark-only variant setting: inductor's GEMM backends for the loss's compile.
GEMM_BACKENDS = "_gemm_backends"
# Key of a benchmark-only variant setting: the step does not call ``prefetch`` (reference mode).
NO_PREFETCH = "_no_prefetch"
COLOURS = [(60, 16, 152), (132, 41, 246), (110, 193, 228), (254, 221, 58), (226, 169, 41)]  # README order
VARIANTS = {
    "paper-cl": {"mode": "paper", "loss": "cl"},
    "paper-infonce": {"mode": "paper", "loss": "infonce"},
    "reference-cl": {"mode": "reference", "loss": "cl"},
    "reference-infonce": {"mode": "reference", "loss": "infonce"},
}
# Step part on CUDA only. "+sync": paper CL with the input check on, which reads values on the host
# between the loss and backward() (one device sync per step, as ctseg did before the stats were read
# lazily, and as any loop that logs the stats there does; on CPU the check is on anyway). "-stats":
# without the stats tensor (their share of the kernels).
CUDA_STEP_VARIANTS = {
    "paper-cl+sync": {"mode": "paper", "loss": "cl", "check_inputs": True},
    "paper-cl-stats": {"mode": "paper", "loss": "cl", "compute_stats": False},
    # The loss recorded as CUDA graphs and replayed (cuda_graph=True, ctseg.contrastive.graphs).
    "paper-cl+graph": {"mode": "paper", "loss": "cl", "cuda_graph": True},
    "paper-infonce+graph": {"mode": "paper", "loss": "infonce", "cuda_graph": True},
    # Reference CL without prefetch(mask) before the forward: its draws then wait for the forward.
    "reference-cl-prefetch": {"mode": "reference", "loss": "cl", NO_PREFETCH: True},
    # torch.compile'd loss (fused kernels; compiling takes a minute and a half per variant and process).
    # torch.compile's own CUDA-graph modes ("reduce-overhead") are not accepted by the loss: their
    # backward failed in a test (docs/benchmarks.md).
    "paper-cl+compile": {"mode": "paper", "loss": "cl", "compile": "default"},
    "paper-infonce+compile": {"mode": "paper", "loss": "infonce", "compile": "default"},
    # Both: the recorded parts are compiled first (fused kernels in the graphs: less device time).
    "paper-cl+compile+graph": {"mode": "paper", "loss": "cl", "compile": "default", "cuda_graph": True},
    # EXPERIMENT, benchmark only (not a loss option): recorded parts compiled with Triton GEMMs only
    # (inductor's max_autotune_gemm_backends="TRITON"), so that no cuBLAS call runs on the capture
    # stream and its two 32 MiB cuBLAS workspaces (most of what the recorded loss holds beyond the
    # eager one, docs/benchmarks.md) are never allocated. To be measured on a GPU: "held after" by stream
    # shows whether the side stream still holds workspaces; a GEMM Triton cannot do fails the variant.
    "paper-cl+compile-tritongemm+graph": {
        "mode": "paper",
        "loss": "cl",
        "compile": "max-autotune-no-cudagraphs",
        "cuda_graph": True,
        GEMM_BACKENDS: "TRITON",
    },
}
# Extra variants run on CUDA unless --extra names others (the compiled ones cost minutes of compiling).
DEFAULT_CUDA_EXTRA = ("paper-cl+sync", "paper-cl+graph", "paper-infonce+graph", "reference-cl-prefetch")
# Loss-alone part: the eager variants everywhere, the recorded ones on CUDA too.
CUDA_LOSS_EXTRA = ("paper-cl+graph", "paper-infonce+graph")


def dubai_masks(n: int, size: int | None = None, seed: int = 0) -> torch.Tensor:
    """``n`` random ``size``² crops of real Dubai masks, decoded to class ids: ``(n, size, size)``."""
    size = SIZE if size is None else size
    paths = sorted(DUBAI.glob("Tile */masks/*.png"))
    if not paths:
        raise SystemExit(f"benchmark needs the real Dubai data: no masks under {DUBAI}")
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        rgb = np.asarray(Image.open(paths[int(rng.integers(len(paths)))]).convert("RGB")).astype(np.int32)
        if min(rgb.shape[:2]) < size:
            continue
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        m = np.full(code.shape, IGNORE, dtype=np.int64)
        for cls, (r, g, b) in enumerate(COLOURS):
            m[code == ((r << 16) | (g << 8) | b)] = cls
        y, x = int(rng.integers(0, m.shape[0] - size + 1)), int(rng.integers(0, m.shape[1] - size + 1))
        out.append(torch.from_numpy(m[y : y + size, x : x + size].copy()))
    return torch.stack(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def make_ct(variant: str, device: torch.device, **kw) -> PatchContrastiveLoss:
    options = dict({**VARIANTS, **CUDA_STEP_VARIANTS}[variant])
    backends = options.pop(GEMM_BACKENDS, None)
    no_prefetch = options.pop(NO_PREFETCH, False)
    ct = PatchContrastiveLoss(CHANNELS, NUM_CLASSES, IGNORE, **options, **kw).to(device)
    if no_prefetch:
        ct.prefetch = lambda mask: None  # type: ignore[method-assign]
    if backends is not None:  # the experiment above: the loss's compile with inductor options instead
        from torch._inductor import list_mode_options

        inductor = {**list_mode_options(ct.compile), "max_autotune_gemm_backends": backends}
        ct._torch_compile = lambda fn: torch.compile(fn, dynamic=False, options=inductor)  # type: ignore[method-assign]
    return ct


# --------------------------------------------------------------------------- loss alone
def loss_inputs(batch: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stage maps ``(B, C_s, SIZE / p_s, SIZE / p_s)`` (random, seed 0, requiring grad) and real Dubai
    label crops ``(B, SIZE, SIZE)``: the inputs of the loss-alone measurements."""
    mask = dubai_masks(batch).to(device)
    g = torch.Generator().manual_seed(0)
    feats = [
        torch.randn(batch, c, SIZE // p, SIZE // p, generator=g).to(device).requires_grad_()
        for c, p in zip(CHANNELS, STRIDES, strict=True)
    ]
    return feats, mask


def bench_loss(batch: int, repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    feats, mask = loss_inputs(batch, device)
    variants = [*VARIANTS, *(CUDA_LOSS_EXTRA if device.type == "cuda" else ())]
    cts = {v: make_ct(v, device, clip=None) for v in variants}

    def step(v: str) -> None:
        loss, _ = cts[v](feats, mask)
        loss.backward()

    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up (and recording, for the CUDA-graph variants)
        step(v)
    for _ in range(repeats):
        for v in variants:
            times[v].append(timed(lambda v=v: step(v), device))
    out = {v: {"time_s": statistics.median(t)} for v, t in times.items()}
    if device.type == "cuda":
        for v in variants:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(v)
            torch.cuda.synchronize()
            out[v]["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:  # the CPU allocator's live tensor bytes (cpu_memory.py) above those before the call
        for v in variants:
            with LiveTensorBytes() as meter, meter.window():
                step(v)
            out[v]["peak_extra_gib"] = (meter.peak_bytes - meter.start_bytes) / 2**30
    return out


# --------------------------------------------------------------------------- host plan
def _tiny_ops(n: int, x: torch.Tensor) -> None:
    """``n`` operators on a tiny CPU tensor: host work like a launch-bound training step's (each
    operator releases the GIL and takes it back)."""
    for _ in range(n):
        x + 1  # the operator's dispatch is the work


def plan_gil_cost(plan: Callable[[], object], rounds: int = 15, chunk: int = 50) -> dict[str, float]:
    """How much one host plan, run on a second thread as ``prefetch`` runs it, slows a main thread that
    dispatches operators meanwhile (the plan's Python holds the GIL the dispatch needs).

    Per round: the main thread's dispatch rate alone (:func:`_tiny_ops`), then while one plan runs
    beside it (from the plan's start until it ends); ``main_lost_s`` = the time beside the plan minus
    what the same operators took alone, i.e. the main thread's delay per plan. Medians of ``rounds``.
    """
    x = torch.ones(4)
    alone_rate, plan_s, lost = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _tiny_ops(40 * chunk, x)
        alone_rate.append(40 * chunk / (time.perf_counter() - t0))
        planner = threading.Thread(target=plan)
        ops = 0
        t0 = time.perf_counter()
        planner.start()
        while True:  # at least one chunk: a plan that ends at once still shares the start
            _tiny_ops(chunk, x)
            ops += chunk
            if not planner.is_alive():
                break
        elapsed = time.perf_counter() - t0
        planner.join()
        plan_s.append(elapsed)
        lost.append(elapsed - ops / alone_rate[-1])
    return {"plan_beside_main_s": statistics.median(plan_s), "main_lost_s": statistics.median(lost)}


def bench_plan(batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median and minimum time (s) of the reference mode's host plan, per reference variant, and how
    much the plan slows a main thread that dispatches operators meanwhile (:func:`plan_gil_cost`: the
    plan's Python holds the GIL that the training step's launches need)."""
    from ctseg.contrastive.paper import group_bounds
    from ctseg.contrastive.patches import patch_class_counts
    from ctseg.contrastive.reference import plan_reference

    feats, mask = loss_inputs(batch, torch.device("cpu"))
    out = {}
    for v in (v for v in VARIANTS if VARIANTS[v]["mode"] == "reference"):
        ct = make_ct(v, torch.device("cpu"))
        grids = ct._grids(feats, mask)
        counts = patch_class_counts(mask, NUM_CLASSES, grids)
        bounds = group_bounds(batch, None)
        for _ in range(3):
            plan_reference(ct.cfg, counts, grids, bounds)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan_reference(ct.cfg, counts, grids, bounds)
            times.append(time.perf_counter() - t0)
        out[v] = {"median_s": statistics.median(times), "min_s": min(times)}
        out[v].update(plan_gil_cost(functools.partial(plan_reference, ct.cfg, counts, grids, bounds)))
    return out


# --------------------------------------------------------------------------- launches
# The profiler's names of the operators without a kernel (views, allocations, metadata).
VIEW_OPS = frozenset(f"aten::{name}" for name in NO_KERNEL_OPS)


def count_launches(batch: int, device: torch.device) -> dict[str, dict[str, int]]:
    """Per eager variant, what one forward + backward of the loss alone dispatches (after a warm-up):
    ``ops`` top-level ATen operators (called from Python or autograd, not from inside another
    operator), ``compute_ops`` those not in :data:`VIEW_OPS`, ``float_ops`` the operators on float
    tensors (the loss's math: on CUDA device work; the reference mode's index planning on host
    tensors is in ``compute_ops`` but not here), and on CUDA ``device_kernels``, the
    kernels, copies and fills the device ran. The input check is off, as by default on CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    feats, mask = loss_inputs(batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: dict[str, dict[str, int]] = {}
    for v in VARIANTS:
        # The input check off, as it is by default on CUDA (on CPU it is on and adds its reads).
        ct = make_ct(v, device, clip=None, check_inputs=False)
        loss, _ = ct(feats, mask)
        loss.backward()
        sync(device)
        with profile(activities=activities) as prof:
            loss, _ = ct(feats, mask)
            loss.backward()
            sync(device)
        ops = compute = kernels = 0
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                kernels += 1
                continue
            if not e.name.startswith("aten::"):
                continue
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            if parent is None:
                ops += 1
                compute += e.name not in VIEW_OPS
        with FloatOpCounter() as floats:  # the math alone (no host index planning)
            loss, _ = ct(feats, mask)
            loss.backward()
        out[v] = {"ops": ops, "compute_ops": compute, "float_ops": floats.count}
        if device.type == "cuda":
            out[v]["device_kernels"] = kernels
    return out


# --------------------------------------------------------------------------- training step
def build_model(device: torch.device) -> torch.nn.Module:
    try:
        from ctseg.models import create
    except ImportError as exc:
        raise SystemExit(f"step benchmark needs ctseg.models.create ('dcpoolformer-paper'): {exc}") from exc
    torch.manual_seed(0)
    return create("dcpoolformer-paper", num_classes=NUM_CLASSES).to(device).train()


def make_step(model, ct, opt, images, masks, mark: Callable[[str], None] | None = None) -> Callable[[], None]:
    """One training step; ``mark(phase)``, when given, is called at the end of each phase: "forward"
    (model and cross-entropy), "ct", "backward" (with the zeroing of the gradients), "optimizer"."""

    def step() -> None:
        if ct is not None:
            ct.prefetch(masks)  # as SegmentationModule.training_step does (a no-op in paper mode)
        logits, feats = model(images, return_features=True)
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE)
        if mark is not None:
            mark("forward")
        if ct is not None:
            loss = loss + ct(feats, masks)[0]
        if mark is not None:
            mark("ct")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mark is not None:
            mark("backward")
        opt.step()
        if mark is not None:
            mark("optimizer")

    return step


def bootstrap_median_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (seeded: the same data give the same
    interval)."""
    rng = random.Random(0)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    lo = medians[int((1 - level) / 2 * resamples)]
    hi = medians[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def _run_steps(step: Callable[[], None], n: int) -> None:
    for _ in range(n):
        step()


def step_setup(config: str, device: torch.device, batch: int, mark: Callable[[str], None] | None = None):
    model = build_model(device)
    ct = None if config == "baseline" else make_ct(config, device, clip=None)
    params = list(model.parameters()) + ([] if ct is None else list(ct.parameters()))
    opt = torch.optim.AdamW(params, lr=0.0)  # lr 0: same work as training, weights unchanged
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, SIZE, SIZE, generator=g).to(device)
    masks = dubai_masks(batch).to(device)
    return make_step(model, ct, opt, images, masks, mark)


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs``); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB → GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_memory_cuda(config: str, device: torch.device, batch: int, warmup: int = 1, steps: int = 2) -> dict:
    """CUDA memory of training steps of one configuration (run in a fresh process: ``--memory-child``).

    ``warmup`` steps first (incl. recording, for the CUDA-graph variants); then the peak marks are
    reset, so set-up does not hide the difference, and ``steps`` are measured. ``peak_gib``:
    ``max_memory_allocated`` (live tensors; a recorded graph's static inputs and outputs count, the
    blocks of its private pool that it reuses at every replay do not); ``reserved_gib``:
    ``max_memory_reserved`` (what the process holds from the device, incl. the graphs' pools and the
    caching allocator's slack).
    """
    step = step_setup(config, device, batch)
    for _ in range(warmup):
        step()
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step()
    sync(device)
    # What stays allocated after the steps, by (stream, pool): the default stream's share is the
    # model's state; a recorded loss adds its capture stream's cuBLAS workspaces and static buffers.
    held: dict[str, float] = {}
    main_stream = torch.cuda.current_stream(device).cuda_stream
    for seg in torch.cuda.memory_snapshot():
        where = "main" if seg["stream"] == main_stream else "side"
        where += "" if tuple(seg["segment_pool_id"]) == (0, 0) else "/graph-pool"
        held[where] = held.get(where, 0.0) + seg["allocated_size"] / 2**20
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "held_after_mib": {k: round(v, 1) for k, v in sorted(held.items())},
    }


def step_memory_cpu(config: str, batch: int, warmup: int = 1, steps: int = 2) -> dict[str, float]:
    """CPU memory of training steps of one configuration (run in a fresh process: ``--memory-child``).

    ``peak_gib``: peak of live tensor bytes during the ``steps`` measured steps, from the CPU
    allocator's events (exact; ``cpu_memory.py``). The model, heads, optimiser and inputs are built
    inside the profiled span, so every block is accounted for; ``persistent_gib`` is what is live when
    the measured steps start (weights, grads, AdamW state, inputs) and ``unfreed_gib`` what is still
    counted after everything is dropped (≈ 0: no event missed). ``rss_gib``: the process's peak RSS over
    the same steps (VmHWM reset after the warm-up): glibc-dependent and noisy, kept for reference only.
    """
    with LiveTensorBytes() as live:
        step = step_setup(config, torch.device("cpu"), batch)
        for _ in range(warmup):
            step()
        _peak_rss_reset()
        with live.window():
            for _ in range(steps):
                step()
        rss = _peak_rss_gib()
        del step  # the closure holds model, heads, optimiser and inputs
        gc.collect()
    return {
        "peak_gib": live.peak_bytes / 2**30,
        "persistent_gib": live.start_bytes / 2**30,
        "unfreed_gib": live.end_bytes / 2**30,
        "rss_gib": rss,
    }


def bench_step(
    repeats: int,
    device: torch.device,
    batch: int = 8,
    warmup: int = 1,
    memory_steps: int = 2,
    extra: Sequence[str] | None = None,
    steps_per_timing: int = 1,
    variants: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Round-robin step timings of the baseline, :data:`VARIANTS` and ``extra`` (optional variants,
    default: :data:`DEFAULT_CUDA_EXTRA` on CUDA; one that fails is reported and left out).

    ``steps_per_timing`` > 1 times that many consecutive steps between two device syncs (the time per
    step is their mean), as a training loop runs them: the host queues the next step while the device
    finishes the last one. With 1, every step starts on an idle device and ends with a sync.
    ``variants``: the :data:`VARIANTS` to time (default: all).

    Per configuration: the median time, and the median of the per-round ratios to the baseline's
    time with its quartiles and a 95 % bootstrap interval (what decides a target: a machine whose
    steps vary by ±15 % needs many rounds to tell +5 % from +10 %).
    """
    if extra is None:
        extra = list(DEFAULT_CUDA_EXTRA) if device.type == "cuda" else []
    configs = ["baseline", *(VARIANTS if variants is None else variants), *extra]
    model = build_model(device)
    opts, cts = {}, {}
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, SIZE, SIZE, generator=g).to(device)
    masks = dubai_masks(batch).to(device)
    steps = {}
    for c in configs:  # one model (same weights and work) for all; each config its own heads/optimizer
        cts[c] = None if c == "baseline" else make_ct(c, device, clip=None)
        params = list(model.parameters()) + ([] if cts[c] is None else list(cts[c].parameters()))
        opts[c] = torch.optim.AdamW(params, lr=0.0)  # lr 0: the weights, hence the work, stay identical
        steps[c] = make_step(model, cts[c], opts[c], images, masks)
    errors: dict[str, str] = {}
    for _ in range(warmup):
        for c in list(configs):
            try:
                t0 = time.perf_counter()
                steps[c]()
                sync(device)
                if _ == 0 and c in extra:
                    print(f"  (first step of {c}: {time.perf_counter() - t0:.1f} s, incl. compiling)")
            except Exception as exc:  # an optional variant that fails (a compiler) must not sink the rest
                if c not in extra:
                    raise
                errors[c] = f"{type(exc).__name__}: {exc}"[:500]
                configs.remove(c)
                print(f"  {c} failed and is left out: {errors[c]}")
    times: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(repeats):
        for c in configs:
            block = functools.partial(_run_steps, steps[c], steps_per_timing)
            times[c].append(timed(block, device) / steps_per_timing)
    out: dict[str, dict] = {c: {"time_s": statistics.median(t)} for c, t in times.items()}
    for c, t in times.items():
        # Paired within each round (the config's step over the baseline's step of the same round): a
        # drift of the machine between rounds cancels; the quartiles show the spread of the ratio.
        ratios = [tc / tb - 1.0 for tc, tb in zip(t, times["baseline"], strict=True)]
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        out[c]["paired_vs_baseline"] = statistics.median(ratios)
        out[c]["paired_q1_q3"] = [q[0], q[2]]
        out[c]["paired_ci95"] = list(bootstrap_median_ci(ratios))
    out.update({c: {"error": e} for c, e in errors.items()})
    base_t = out["baseline"]["time_s"]
    print(
        "step times (memory follows):",
        ", ".join(f"{c} {out[c]['time_s'] / base_t - 1:+.1%}" for c in configs),
    )
    if device.type == "cuda":  # measured alone: nothing of the timing loop stays allocated
        del steps, cts, opts, model
        gc.collect()
        torch.cuda.empty_cache()
    for c, res in measure_step_memory(configs, device, batch, warmup, memory_steps).items():
        if isinstance(res, Exception):
            if c not in extra:
                raise res
            out[c]["peak_gib"] = float("nan")
            out[c]["error"] = f"memory: {type(res).__name__}: {res}"[:500]
        else:
            out[c].update(res)
    base = out["baseline"]
    for c in configs:
        out[c]["time_vs_baseline"] = out[c]["time_s"] / base["time_s"] - 1.0
        out[c]["memory_vs_baseline"] = out[c]["peak_gib"] / base["peak_gib"] - 1.0
        for key in ("rss", "reserved"):
            if f"{key}_gib" in out[c]:
                out[c][f"{key}_vs_baseline"] = out[c][f"{key}_gib"] / base[f"{key}_gib"] - 1.0
    return out


def measure_step_memory(
    configs: Sequence[str],
    device: torch.device,
    batch: int,
    warmup: int,
    steps: int,
    env: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float] | Exception]:
    """Step memory of each configuration, each in a fresh process (its allocator, and on CUDA its graph
    pools and cuBLAS workspaces, are then its own), with ``env`` as its environment (default: ours).

    On CUDA the processes run side by side, as many as the free device memory holds: the figures are
    per-process allocator statistics (and cuDNN picks its algorithms by heuristics here, not by
    timing), so running them together changes nothing but the wall time, which a GPU machine's budget
    needs (one after the other they took over 70 s on the H100 machine). On the CPU one after the
    other (two cores; the peak RSS, kept for reference, would suffer)."""

    def command(config: str) -> list[str]:
        cmd = [sys.executable, __file__, "--memory-child", config, "--batch", str(batch), "--size", str(SIZE)]
        cmd += ["--device", str(device), "--warmup", str(warmup), "--memory-steps", str(steps)]
        return [*cmd, "--threads", str(torch.get_num_threads())]

    def result(config: str, proc: subprocess.Popen) -> dict[str, float] | Exception:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            return RuntimeError(f"memory child {config} exited with {proc.returncode}: {stderr[-500:]}")
        return json.loads(stdout.strip().splitlines()[-1])

    def start(config: str) -> subprocess.Popen:
        return subprocess.Popen(
            command(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    jobs = 1
    if device.type == "cuda":  # as many as fit: a child of the B = 8, 512² step holds < 6 GiB
        jobs = max(1, int(torch.cuda.mem_get_info(device)[0] / 2**30 // (6 * batch / 8 * (SIZE / 512) ** 2)))
    out: dict[str, dict[str, float] | Exception] = {}
    for i in range(0, len(configs), jobs):
        procs = {c: start(c) for c in configs[i : i + jobs]}
        out.update({c: result(c, p) for c, p in procs.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["loss", "launches", "plan", "step", "all"], default="all")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16], help="loss part; the step part uses B=8")
    ap.add_argument(
        "--step-batch", type=int, default=8, help="step part batch size (the target is stated at 8)"
    )
    ap.add_argument("--size", type=int, default=512, help="crop size in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--steps-per-timing",
        type=int,
        default=1,
        help="step part: consecutive steps per timing, no device sync between them (default 1)",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        help="step part: which CT variants to time beside the baseline (default: all four)",
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (step part)")
    ap.add_argument("--memory-steps", type=int, default=2, help="steps measured for peak memory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, help="also write the figures here (atomic write)")
    ap.add_argument(
        "--extra",
        nargs="*",
        choices=sorted(CUDA_STEP_VARIANTS),
        help=f"optional step variants (default on CUDA: {' '.join(DEFAULT_CUDA_EXTRA)}; none on CPU)",
    )
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    global SIZE
    SIZE = args.size
    if args.memory_child:
        if device.type == "cuda":
            res = step_memory_cuda(args.memory_child, device, args.batch[0], args.warmup, args.memory_steps)
        else:
            res = step_memory_cpu(args.memory_child, args.batch[0], args.warmup, args.memory_steps)
        print(json.dumps(res))
        return
    results: dict[str, object] = {"device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    if args.part in ("loss", "all"):
        for b in args.batch:
            res = bench_loss(b, args.repeats, device)
            results[f"loss_B{b}"] = res
            print(f"\nCT loss alone, forward + backward, B={b}, {SIZE}², {device}:")
            for v, r in res.items():
                extra = f"  peak +{r['peak_extra_gib']:.3f} GiB" if "peak_extra_gib" in r else ""
                print(f"  {v:18s} {r['time_s'] * 1000:9.1f} ms{extra}")
    if args.part in ("launches", "all"):
        res = count_launches(args.batch[0], device)
        results[f"launches_B{args.batch[0]}"] = res
        print(f"\nCT loss alone, one forward + backward, B={args.batch[0]}, {SIZE}², {device}: dispatched")
        for v, r in res.items():
            kernels = f"   device kernels {r['device_kernels']:5d}" if "device_kernels" in r else ""
            print(
                f"  {v:18s} ATen ops {r['ops']:5d}   of which compute {r['compute_ops']:5d}"
                f"   on float tensors {r['float_ops']:4d}{kernels}"
            )
    if args.part in ("plan", "all"):
        for b in args.batch:
            res = bench_plan(b, args.repeats)
            results[f"plan_B{b}"] = res
            print(f"\nReference host plan alone, B={b}, {SIZE}², {torch.get_num_threads()} thread(s):")
            for v, r in res.items():
                print(
                    f"  {v:18s} median {r['median_s'] * 1000:7.2f} ms   min {r['min_s'] * 1000:7.2f} ms   "
                    f"beside a dispatching main thread {r['plan_beside_main_s'] * 1000:.1f} ms, "
                    f"which it delays by {r['main_lost_s'] * 1000:.1f} ms"
                )
    if args.part in ("step", "all"):
        res = bench_step(
            args.repeats,
            device,
            args.step_batch,
            args.warmup,
            args.memory_steps,
            args.extra,
            args.steps_per_timing,
            args.variants,
        )
        results["steps_per_timing"] = args.steps_per_timing
        results[f"step_B{args.step_batch}"] = res
        per = f", {args.steps_per_timing} steps per timing" if args.steps_per_timing > 1 else ""
        print(f"\nDCPoolFormer training step, B={args.step_batch}, {SIZE}², {device}{per}:")
        for c, r in res.items():
            if "time_s" not in r:
                print(f"  {c:22s} failed: {r['error']}")
                continue
            print(
                f"  {c:22s} {r['time_s'] * 1000:9.1f} ms ({r['time_vs_baseline']:+6.1%}; paired "
                f"{r['paired_vs_baseline']:+6.1%}, q1–q3 {r['paired_q1_q3'][0]:+.1%}…{r['paired_q1_q3'][1]:+.1%}, "
                f"95 % CI {r['paired_ci95'][0]:+.1%}…{r['paired_ci95'][1]:+.1%})   "
                f"peak {r['peak_gib']:6.3f} GiB ({r['memory_vs_baseline']:+6.1%})"
                + (
                    f"   peak RSS (noisy) {r['rss_gib']:6.2f} GiB ({r['rss_vs_baseline']:+6.1%})"
                    if "rss_gib" in r
                    else ""
                )
                + (
                    f"   reserved {r['reserved_gib']:6.3f} GiB ({r['reserved_vs_baseline']:+6.1%})"
                    if "reserved_gib" in r
                    else ""
                )
                + (f"   held after (MiB) {r['held_after_mib']}" if "held_after_mib" in r else "")
            )
    if args.json:
        atomic_write_json(args.json, results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
