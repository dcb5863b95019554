"""CUDA-graph replay of the paper-mode CT loss (``PatchContrastiveLoss(cuda_graph=True)``).

On a GPU the eager paper-mode loss is bound by kernel launches: a few hundred small kernels whose
launch costs more host time than they take on the device (docs/benchmarks.md, CT loss). A CUDA graph
records them once and replays them with one launch. The loss is recorded as two graphs around an eager
gather, so that the graphs never hold a copy of the feature maps:

1. **sampling** (no gradient): mask (and class probabilities) → patch class counts → sampled rows;
2. eager: ``gather_sampled_rows`` reads the sampled rows of every stage's feature map (one indexing op per
   stage; its gradient joins the maps' gradients once those are complete, ``heads.take_rows``);
3. **tail** (forward and backward graphs, recorded by :func:`graphed`): projection
   heads, hard-pair mining, loss terms, clip, weight and packed stats.

With ``compile`` also set, both parts are ``torch.compile``'d before they are recorded (fewer, fused
kernels in the graphs: less device time).

Both graphs share one private memory pool. Memory (DCPoolFormer B = 8 on an H100,
docs/benchmarks.md): the graphs' own buffers are small (≈ 28 MiB of static inputs, mostly the mask
copy and the sampled rows, and 11 MiB live in the pool). What costs more is the stream a graph is
recorded on: cuBLAS keeps a workspace per (thread handle, stream) for the life of the process, 32 MiB
each on Hopper, and both the forward (this thread) and the backward (autograd's device thread) run
GEMMs. ``torch.cuda.make_graphed_callables`` warms up (and, in torch 2.14, also records) on a fresh
stream at every call, so every recording left another 65 MiB of workspaces behind. :func:`graphed`
warms up and records on one side stream per device (:func:`capture_stream`), shared by every
recording of the process, so those workspaces exist once.

A graph is recorded per input signature (shapes, dtypes, ``requires_grad``); random draws come from
the CUDA generator's graph-safe Philox state, so every replay draws afresh and a seeded run is
reproducible. Outputs live in the graphs' static buffers and are cloned before they are returned
(the next replay overwrites them).
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ctseg.contrastive.distributed import local_negative_budget
from ctseg.contrastive.paper import PaperSamples, gather_sampled_rows, paper_results, sample_rows
from ctseg.contrastive.patches import StageGrid, patch_class_counts

if TYPE_CHECKING:
    from ctseg.contrastive.loss import PatchContrastiveLoss

# Recording costs a few warm-up iterations and keeps a private memory pool per signature; a loop whose
# shapes keep changing is better served by the eager loss.
MAX_GRAPHS = 4

Signature = tuple[object, ...]


def signature(used: Sequence[torch.Tensor], mask: torch.Tensor, probs: torch.Tensor | None) -> Signature:
    """What a recorded graph is specific to: shapes, dtypes, devices and ``requires_grad``."""
    parts: list[object] = [(tuple(f.shape), f.dtype, f.device, f.requires_grad) for f in used]
    parts.append((tuple(mask.shape), mask.dtype, mask.device))
    parts.append(None if probs is None else (tuple(probs.shape), probs.dtype))
    return tuple(parts)


class _GradCopy(torch.autograd.Function):
    """Identity on the head parameters whose backward hands out fresh gradient tensors.

    The tail graph's parameter gradients are static buffers that the next replay overwrites. Handed
    to autograd as they are, ``AccumulateGrad`` may adopt a buffer as ``param.grad`` (it does when
    the gradient is None), and a later replay would then change ``.grad`` behind the optimizer's back
    (e.g. with gradient accumulation). One fused copy of all of them prevents that.
    """

    @staticmethod
    def forward(ctx, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        present = [g for g in grads if g is not None]
        copies = iter(torch._foreach_mul(present, 1.0)) if present else iter(())
        return tuple(None if g is None else next(copies) for g in grads)


class _ReplayGuard(torch.autograd.Function):
    """Copy of the loss that tells its :class:`SplitPaperLoss` whether a backward is still pending.

    A recorded call leaves state in the graphs' static buffers that its backward reads (the tail's
    saved activations, the sampled indices the gather's backward scatters to). A second replay before
    that backward would overwrite them and corrupt its gradients silently. The context object lives as
    long as the autograd graph of the result: it dies when the backward has run (or the result is
    dropped), and the backward also clears the mark explicitly.
    """

    @staticmethod
    def forward(ctx, loss: torch.Tensor, owner: SplitPaperLoss) -> torch.Tensor:  # type: ignore[override]
        ctx.owner = owner
        owner._pending = weakref.ref(ctx)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.owner._pending = None
        return grad, None


def _head_parameters(loss_fn: PatchContrastiveLoss) -> list[tuple[int, str, nn.Parameter]]:
    return [(s, name, p) for s in loss_fn.cfg.stages for name, p in loss_fn.heads[s].named_parameters()]


def _negative_slots(loss_fn: PatchContrastiveLoss) -> int:
    cfg = loss_fn.cfg
    return local_negative_budget(cfg.num_negatives, cfg.gather_negatives, loss_fn.process_group)


def _tail_fn(loss_fn: PatchContrastiveLoss) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``(*rows, *params, *sample tensors)`` → ``(loss,)`` or ``(loss, packed stats)``."""
    S = len(loss_fn.cfg.stages)
    negative_slots = _negative_slots(loss_fn)
    names = [(s, name) for s, name, _ in _head_parameters(loss_fn)]

    def tail(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows, params, rest = tensors[:S], tensors[S : S + len(names)], tensors[S + len(names) :]
        by_stage: dict[int, dict[str, torch.Tensor]] = {s: {} for s in loss_fn.cfg.stages}
        for (s, name), p in zip(names, params, strict=True):
            by_stage[s][name] = p
        samples = PaperSamples.from_tensors(rest, rows[0].shape[-2] - negative_slots)
        head_params = [by_stage[s] for s in loss_fn.cfg.stages]
        results = paper_results(loss_fn.cfg, loss_fn.heads, rows, samples, loss_fn.process_group, head_params)
        loss, packed = loss_fn._finish(results)
        return (loss,) if packed is None else (loss, packed)

    return tail


@dataclass
class SplitPaperLoss:
    """The paper-mode loss as sampling → eager gather → tail (recorded or not).

    Call with the used stage features, the mask and the probabilities (or None); returns
    ``(loss, packed stats or None)``, both fresh tensors.

    Attributes:
        sample: ``(mask[, probs])`` → the :meth:`PaperSamples.tensors` of the sampled rows.
        tail: ``(*rows, *params, *sample tensors)`` → ``(loss,)`` or ``(loss, packed stats)``.
        params: the head parameters, in the order ``tail`` takes them.
    """

    sample: Callable[..., tuple[torch.Tensor, ...]]
    tail: Callable[..., tuple[torch.Tensor, ...]]
    params: list[nn.Parameter]
    negative_slots: int
    with_probs: bool
    _pending: weakref.ReferenceType | None = dataclasses.field(default=None, repr=False, compare=False)

    def busy(self) -> bool:
        """A result of an earlier call still awaits its backward (replaying now would corrupt it)."""
        return self._pending is not None and self._pending() is not None

    def __call__(
        self, used: Sequence[torch.Tensor], mask: torch.Tensor, probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        sample_out = self.sample(mask, *([probs] if self.with_probs else []))
        rows = gather_sampled_rows(used, self.samples(sample_out))
        out = self.tail(*rows, *_GradCopy.apply(*self.params), *sample_out)
        # Static buffers when recorded: the next replay overwrites them, so both outputs are copies.
        loss = _ReplayGuard.apply(out[0], self) if out[0].requires_grad else out[0].clone()
        return loss, (out[1].clone() if len(out) > 1 else None)

    def samples(self, sample_out: Sequence[torch.Tensor]) -> PaperSamples:
        return PaperSamples.from_tensors(sample_out, sample_out[0].shape[-1] - self.negative_slots)


def _sample_fn(
    loss_fn: PatchContrastiveLoss, grids: Sequence[StageGrid]
) -> Callable[..., tuple[torch.Tensor, ...]]:
    cfg = loss_fn.cfg

    def sample(mask: torch.Tensor, *probs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(device_type=mask.device.type, enabled=False):
            counts = patch_class_counts(mask, cfg.num_classes, grids)
            conf = loss_fn._patch_confidence(probs[0] if probs else None, grids)
            return sample_rows(cfg, counts, grids, conf, loss_fn.group_size, loss_fn.process_group).tensors()

    return sample


def split_loss(loss_fn: PatchContrastiveLoss, grids: Sequence[StageGrid]) -> SplitPaperLoss:
    """The loss in the three parts that :func:`record` records (plain functions, any device).

    With ``loss_fn.compile`` set, the sampling and the tail are ``torch.compile``'d first: the graphs
    then replay a few fused kernels instead of ≈ 600 small ones, which lowers the loss's device time
    (the replay already removed its launch cost on the host).
    """
    params = [p for _, _, p in _head_parameters(loss_fn)]
    sample, tail = _sample_fn(loss_fn, grids), _tail_fn(loss_fn)
    if loss_fn.compile is not None:
        sample, tail = loss_fn._torch_compile(sample), loss_fn._torch_compile(tail)
    # Only confidence sampling reads the probabilities (the loss's input check makes them present then).
    with_probs = loss_fn.cfg.sampling == "confidence"
    return SplitPaperLoss(sample, tail, params, _negative_slots(loss_fn), with_probs)


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream on which every graph of this process is warmed up and recorded, one per device.

    cuBLAS's workspaces are per (thread handle, stream) and are never freed: one stream for all
    recordings means they are paid once, not once per recording.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _CAPTURE_STREAMS[index]


@dataclass
class _Recording:
    """A function's forward graph (and, where it has differentiable outputs, backward graph) with the
    static buffers they read and write."""

    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph | None
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    grad_outputs: tuple[torch.Tensor | None, ...]  # None where an output is not differentiable
    grad_inputs: tuple[torch.Tensor | None, ...]  # None where an input needs no (or gets no) gradient

    def load(self, tensors: Sequence[torch.Tensor], into: Sequence[torch.Tensor | None]) -> None:
        # A caller that passes the static buffer itself (the tail reads the sampling's outputs) costs
        # no copy.
        for x, static in zip(tensors, into, strict=True):
            if static is not None and x.data_ptr() != static.data_ptr():
                static.copy_(x)

    def run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Replay the forward graph on ``inputs``: its static outputs, detached."""
        self.load(inputs, self.inputs)
        self.forward.replay()
        return tuple(o.detach() for o in self.outputs)


class _Replay(torch.autograd.Function):
    """Autograd node of a recorded function: the forward replays its forward graph, the backward its
    backward graph. Outputs and input gradients are the recording's static buffers (views of them)."""

    @staticmethod
    def forward(ctx, rec: _Recording, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        outputs = rec.run(inputs)
        ctx.rec = rec
        ctx.mark_non_differentiable(*(o for o, g in zip(outputs, rec.grad_outputs, strict=True) if g is None))
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        rec: _Recording = ctx.rec
        assert rec.backward is not None
        for grad, static in zip(grads, rec.grad_outputs, strict=True):
            if static is not None:
                if grad is None:
                    static.zero_()
                elif grad.data_ptr() != static.data_ptr():
                    static.copy_(grad)
        rec.backward.replay()
        return (None, *(None if g is None else g.detach() for g in rec.grad_inputs))


def graphed(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    args: Sequence[torch.Tensor],
    pool: tuple[int, int],
    stream: torch.cuda.Stream,
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``fn`` recorded for these example inputs, as a callable with ``fn``'s signature that replays it.

    What :func:`torch.cuda.make_graphed_callables` does for one function, on a given stream: one eager
    warm-up (lazy initialisation, compilation, cuBLAS workspaces) and the recordings all run on
    ``stream``. ``args`` become the static inputs (later calls copy into them unless they pass those
    very tensors); inputs that require grad get gradients, unused ones None.
    """
    args = tuple(args)
    wants_grad = [a for a in args if a.requires_grad]
    torch.cuda.synchronize()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn(*args)
        differentiable = [o for o in out if o.requires_grad]
        if differentiable and wants_grad:
            torch.autograd.grad(
                differentiable, wants_grad, [torch.zeros_like(o) for o in differentiable], allow_unused=True
            )
        del out, differentiable
    torch.cuda.synchronize()

    forward = torch.cuda.CUDAGraph()
    with torch.cuda.graph(forward, pool=pool, stream=stream):
        outputs = tuple(fn(*args))
    grad_outputs = tuple(torch.empty_like(o) if o.requires_grad else None for o in outputs)
    backward, grad_inputs = None, tuple(None for _ in args)
    if wants_grad and any(g is not None for g in grad_outputs):
        backward = torch.cuda.CUDAGraph()
        with torch.cuda.graph(backward, pool=pool, stream=stream):
            grads = iter(
                torch.autograd.grad(
                    [o for o in outputs if o.requires_grad],
                    wants_grad,
                    [g for g in grad_outputs if g is not None],
                    allow_unused=True,
                )
            )
            grad_inputs = tuple(next(grads) if a.requires_grad else None for a in args)
    rec = _Recording(forward, backward, args, tuple(o.detach() for o in outputs), grad_outputs, grad_inputs)

    def replay(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if rec.backward is not None and torch.is_grad_enabled():
            return _Replay.apply(rec, *inputs)
        return rec.run(inputs)

    return replay


def record(
    loss_fn: PatchContrastiveLoss,
    used: Sequence[torch.Tensor],
    mask: torch.Tensor,
    probs: torch.Tensor | None,
    grids: Sequence[StageGrid],
) -> SplitPaperLoss:
    """Record the sampling and tail graphs for the signature of these CUDA inputs.

    The inputs serve as examples only: the graphs read copies of them, which the replays overwrite.
    """
    parts = split_loss(loss_fn, grids)
    pool, stream = torch.cuda.graph_pool_handle(), capture_stream(mask.device)
    sample_args = (mask.clone(), *([probs.detach().clone()] if parts.with_probs else []))
    # Autocast's weight cache cannot be recorded; the loss computes in fp32 with autocast off anyway.
    with torch.autocast(device_type="cuda", enabled=False):
        sample = graphed(parts.sample, sample_args, pool, stream)
        sample_out = sample(*sample_args)  # static outputs: the tail reads them in place (no copy)
        rows = [
            r.detach().clone().requires_grad_(f.requires_grad)
            for r, f in zip(gather_sampled_rows(used, parts.samples(sample_out)), used, strict=True)
        ]
        # The parameters' own storage is the graph's input (same address on every call: no copy).
        param_args = [p.detach().requires_grad_(p.requires_grad) for p in parts.params]
        tail = graphed(parts.tail, (*rows, *param_args, *sample_out), pool, stream)
    return dataclasses.replace(parts, sample=sample, tail=tail)


class GraphCache:
    """Recorded graphs per input signature, at most :data:`MAX_GRAPHS`; beyond that, or when recording
    fails, the caller runs the eager loss (with one warning)."""

    def __init__(self) -> None:
        self.graphs: dict[Signature, SplitPaperLoss | None] = {}
        self._warned: set[str] = set()

    def get(
        self,
        loss_fn: PatchContrastiveLoss,
        used: Sequence[torch.Tensor],
        mask: torch.Tensor,
        probs: torch.Tensor | None,
        grids: Sequence[StageGrid],
    ) -> SplitPaperLoss | None:
        key = signature(used, mask, probs)
        if key in self.graphs:
            return self.graphs[key]
        if len(self.graphs) >= MAX_GRAPHS:
            self.warn("cap", f"more than {MAX_GRAPHS} input shapes; new shapes run the eager loss")
            return None
        try:
            graphed = record(loss_fn, used, mask, probs, grids)
        except RuntimeError as err:  # an op that cannot be captured (e.g. a debugging mode): stay correct
            self.warn(
                "failed",
                f"recording failed ({type(err).__name__}: {err}); this input shape runs the eager loss",
            )
            graphed = None
        self.graphs[key] = graphed
        return graphed

    def warn(self, kind: str, message: str) -> None:
        """Warn once per kind (a training loop would otherwise warn at every step)."""
        if kind not in self._warned:
            warnings.warn(f"CT loss, cuda_graph: {message}", RuntimeWarning, stacklevel=4)
            self._warned.add(kind)
