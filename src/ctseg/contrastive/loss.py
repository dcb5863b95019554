"""``PatchContrastiveLoss``: the CT loss as one ``nn.Module`` that drops into any training loop."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from ctseg.contrastive.clip import CLIP_MODES
from ctseg.contrastive.config import CTConfig, GroupResult, as_stage_tuple
from ctseg.contrastive.graphs import GraphCache
from ctseg.contrastive.heads import build_heads
from ctseg.contrastive.paper import gather_sampled_rows, group_bounds, paper_results, sample_rows
from ctseg.contrastive.patches import StageGrid, patch_class_counts, patch_class_means, stage_grids
from ctseg.contrastive.reference import HostCounts, ReferencePlan, evaluate_reference, plan_reference
from ctseg.contrastive.sampling import SAMPLERS
from ctseg.contrastive.stats import CTStats, count_stats, term_weights
from ctseg.contrastive.terms import PAPER_TERMS
from ctseg.errors import ConfigError, CtsegError, DataError
from ctseg.utils.registry import Registry


class NonFiniteFeaturesError(CtsegError, FloatingPointError):
    """The backbone features given to the CT loss contain NaN or Inf (a diverged model or bad input)."""


def _run_paper(loss_fn: PatchContrastiveLoss, feats, counts, grids, conf, prefetched) -> GroupResult:
    samples = sample_rows(loss_fn.cfg, counts, grids, conf, loss_fn.group_size, loss_fn.process_group)
    rows = gather_sampled_rows(feats, samples)
    return paper_results(loss_fn.cfg, loss_fn.heads, rows, samples, loss_fn.process_group)


def _run_reference(loss_fn: PatchContrastiveLoss, feats, counts, grids, conf, prefetched) -> GroupResult:
    if prefetched is not None:
        plan = prefetched.take(loss_fn.cfg)
    else:
        bounds = group_bounds(feats[0].shape[0], loss_fn.group_size)
        host = _host_counts(counts, grids).get()
        plan = plan_reference(loss_fn.cfg, host, grids, bounds, pin=feats[0].is_cuda)
    return evaluate_reference(loss_fn.cfg, loss_fn.heads, feats, plan)


def _host_counts(counts: Sequence[torch.Tensor], grids: Sequence[StageGrid]) -> HostCounts:
    return HostCounts(counts, max(g.patch_pixels for g in grids))


# The thread that makes the reference mode's host plans (draws included) while the caller queues the
# model's forward; one per process (a forked child makes its own: threads do not survive a fork).
_PLANNER: tuple[int, ThreadPoolExecutor] | None = None


def _planner() -> ThreadPoolExecutor:
    global _PLANNER
    if _PLANNER is None or _PLANNER[0] != os.getpid():
        _PLANNER = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctseg-ct-plan"))
    return _PLANNER[1]


def _plan_on_copy(
    cfg: CTConfig,
    host_counts: Callable[[], list[torch.Tensor]],
    grids: list[StageGrid],
    bounds: list[tuple[int, int]],
    rng_state: torch.Tensor,
    pin: bool,
) -> tuple[list[torch.Tensor], ReferencePlan, torch.Tensor]:
    """The planner thread's job: the host counts, the plan drawn from a generator in ``rng_state``,
    and that generator's state after the draws."""
    counts = host_counts()
    generator = torch.Generator()
    generator.set_state(rng_state)
    plan = plan_reference(cfg, counts, grids, bounds, generator, pin)
    return counts, plan, generator.get_state()


@dataclasses.dataclass
class _Prefetched:
    """What :meth:`PatchContrastiveLoss.prefetch` started for one mask before the model's forward.

    ``counts`` are the mask's class counts (on its device); ``planned`` is the planner thread's
    result: the counts on the host, the reference plan (draws made from a copy of the global CPU
    generator in ``rng_state``) and that copy's state after the draws.
    """

    mask: torch.Tensor
    grids: list[StageGrid]
    bounds: list[tuple[int, int]]
    rng_state: torch.Tensor
    planned: Future[tuple[list[torch.Tensor], ReferencePlan, torch.Tensor]]
    counts: list[torch.Tensor]

    def take(self, cfg: CTConfig) -> ReferencePlan:
        """The plan, as if drawn now from the global CPU generator, which it then advances as those
        draws would have. If anything drew from that generator since the prefetch (e.g. dropout in a
        forward on the CPU), the thread's draws are not the ones due now: they are made again here."""
        counts, plan, rng_after = self.planned.result()
        if torch.equal(torch.get_rng_state(), self.rng_state):
            torch.set_rng_state(rng_after)
            return plan
        return plan_reference(cfg, counts, self.grids, self.bounds, pin=self.mask.is_cuda)


# A mode maps the used stage features, the class counts, the grids, the per-patch confidence and what
# a prefetch computed (or None) to the results of all groups (a GroupResult with a leading group
# dimension).
MODES: Registry[Callable[..., GroupResult]] = Registry("CT mode")
MODES.add("paper", _run_paper)
MODES.add("reference", _run_reference)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# torch.compile's CUDA-graph modes ("reduce-overhead", "max-autotune") are not offered: on an H100 the
# graphed loss raised "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent
# run" in backward (confidence sampling, even with cudagraph_mark_step_begin() before every step),
# although it ran in the step benchmark (+6.7 % instead of +11 %): docs/benchmarks.md, CT loss.


def _compile_mode(compile: bool | str | None, mode: str, gather_negatives: bool) -> str | None:
    if compile is None or compile is False:
        return None
    name = "default" if compile is True else compile
    if name in ("reduce-overhead", "max-autotune"):
        raise ConfigError(
            f"CT loss: compile={compile!r} (CUDA graphs) is not supported: its backward failed on a GPU "
            f"(see docs/benchmarks.md, CT loss); use one of {list(COMPILE_MODES)}"
        )
    if name not in COMPILE_MODES:
        raise ConfigError(f"CT loss: compile={compile!r} is not a bool or one of {list(COMPILE_MODES)}")
    _require_paper_mode("compile", mode, gather_negatives, "collectives with autograd")
    return name


def _require_paper_mode(option: str, mode: str, gather_negatives: bool, collectives: str) -> None:
    """``compile`` and ``cuda_graph`` need a loss with fixed shapes and no host reads or collectives."""
    # The paper configs turn cuda_graph on, so these errors also reach users who only changed the mode
    # or turned on gather_negatives: they say what to switch off.
    if mode != "paper":
        raise ConfigError(
            f"CT loss: {option} needs mode='paper' (the reference mode reads sizes on the host); "
            f"set {option} to false for mode={mode!r}"
        )
    if gather_negatives:
        raise ConfigError(
            f"CT loss: {option} does not support gather_negatives ({collectives}); "
            f"set {option} to false to gather negatives"
        )


def _recordable(mask: torch.Tensor) -> bool:
    """Inputs on a device where the loss can be recorded as CUDA graphs."""
    return mask.is_cuda


def _check_cuda_graph(cuda_graph: bool, mode: str, gather_negatives: bool) -> bool:
    if not isinstance(cuda_graph, bool):
        raise ConfigError(f"CT loss: cuda_graph must be true or false, got {cuda_graph!r}")
    if cuda_graph:
        _require_paper_mode("cuda_graph", mode, gather_negatives, "collectives in a graph")
    return cuda_graph


def _check_model_free_options(
    *,
    loss: str,
    mode: str,
    sampling: str,
    clip_mode: str,
    clip: float | None,
    group_size: int | None,
    gather_negatives: bool,
    compile: bool | str | None,
    cuda_graph: bool,
) -> tuple[str | None, bool]:
    """The checks of :class:`PatchContrastiveLoss`'s options that need neither the model nor the classes;
    returns the compile mode and ``cuda_graph``."""
    for name, value, options in (
        ("loss", loss, PAPER_TERMS),
        ("mode", mode, MODES),
        ("sampling", sampling, SAMPLERS),
        ("clip_mode", clip_mode, CLIP_MODES),
    ):
        if value not in options:
            raise ConfigError(f"CT loss: {name}={value!r} is not one of {sorted(options)}")
    if clip is not None and clip <= 0:
        raise ConfigError(f"CT loss: clip must be > 0 or None, got {clip}")
    if group_size is not None and group_size < 1:
        raise ConfigError(f"CT loss: group_size must be ≥ 1 or None, got {group_size}")
    return _compile_mode(compile, mode, gather_negatives), _check_cuda_graph(
        cuda_graph, mode, gather_negatives
    )


def check_ct_options(options: Mapping[str, Any]) -> None:
    """Check the keyword options of :class:`PatchContrastiveLoss` (without ``in_channels`` and
    ``num_classes``) as far as they do not depend on the model: names, choices and combinations.

    For configs: a training run calls it before anything is built or written, so that a wrong CT
    option fails at the start, not once the run folder exists. Raises :class:`~ctseg.errors.ConfigError`.
    """
    params = inspect.signature(PatchContrastiveLoss.__init__).parameters
    known = set(params) - {"self", "in_channels", "num_classes"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"CT loss: unknown option(s) {unknown}; known: {sorted(known)}")
    defaults = {name: params[name].default for name in known}
    kw = {**defaults, **options}
    _check_model_free_options(
        **{name: kw[name] for name in inspect.signature(_check_model_free_options).parameters}
    )


class PatchContrastiveLoss(nn.Module):
    """Contrastive Transformer (CT) loss: supervised patch-level contrast on backbone stage features.

    For every stage s, the feature map ``(B, C_s, H_s, W_s)`` is cut into patches of
    ``p_s = ceil(H / H_s)`` pixels (mask padded bottom/right with ``ignore_index``). For every class c
    present in the batch, positives are patches made only of c (no ignore pixel) and negatives
    patches with no pixel of c. A projection head per stage (``C_s → d → d``, GELU, L2-normalised)
    maps the used rows; a CL or InfoNCE term contrasts them. The result is
    ``Σ_s Σ_c L_sc / S / (classes present)`` per group of images, clipped, averaged over groups and
    multiplied by ``weight``: it is ready to be added to the segmentation loss.

    Args:
        in_channels: channels of every feature map the backbone returns, e.g. ``[64, 128, 256, 512]``.
        num_classes: K; labels ``0..K-1`` are classes.
        ignore_index: label of ignored pixels (never a class; ``None``: every label ≥ K is an error).
        loss: ``"cl"`` (paper's CL: cosine mapped to [0, 1], soft CE with ``smoothing``) or ``"infonce"``.
        mode: ``"paper"`` (the paper's text: fixed budgets, real hard-pair mining, vectorised, no host
            sync) or ``"reference"`` (the authors' code ``71f35b9`` exactly, incl. its RNG draws).
        stages: indices of the feature maps to use (default: all). Heads of unused maps are ``Identity``.
        strides: patch size of every feature map in pixels (e.g. ``[4, 8, 16, 32]``); default: inferred
            per call as ``ceil(H / H_s)`` (see ``patches.infer_patch_size``), ambiguous only for maps of
            one or two patches.
        proj_dim: d of the projection heads (hidden width = d).
        take_top: share of pairs kept by hard mining (reference: of the random pairs).
        smoothing: CL label smoothing. temperature: InfoNCE τ.
        num_positives, num_negatives: paper-mode budgets per (stage, class).
        infonce_max_pairs: reference-mode InfoNCE pair cap (2000).
        min_positives, min_negatives: a (stage, class) with fewer is skipped (still counted in the
            division, as in the reference).
        min_pair_positives: positives needed for the CL positive term.
        min_infonce: positives and negatives needed for InfoNCE.
        sampling: ``"random"`` or ``"confidence"`` (paper mode; needs ``probs`` in ``forward``).
        clip: bound of the raw loss of a group (``None``: no clip).
        clip_mode: ``"clamp"`` (reference; zero gradient above ``clip``), ``"scale"`` (value bounded,
            gradient kept, scaled) or ``"none"``.
        weight: multiplier applied after the clip.
        group_size: compute class sets, sampling, normalisation and clip per group of this many images
            and average the clipped group losses (``16`` reproduces the paper's per-GPU DP replicas).
        gather_negatives: paper mode under DDP: every rank samples ``ceil(num_negatives / world)``
            negatives and contrasts against the all-gathered pool (with gradients); a no-op without
            an initialised process group.
        process_group: group for ``gather_negatives`` (default: WORLD).
        compute_stats: return the stats as a :class:`~ctseg.contrastive.stats.CTStats` mapping, whose
            values stay on the device until first read (one host sync then, none if a loop only
            accumulates ``stats.tensor``); False returns ``{}``.
        check_inputs: raise on non-finite features or labels outside ``[0, K) ∪ {ignore_index}``. The
            check must read a value on the host, i.e. synchronise with the device every call. ``None``
            (default): check on CPU, where that is free, and not on CUDA, where a synchronisation in
            the middle of a training step costs more than the loss (a NaN then shows in the loss,
            which the trainer's non-finite guard handles). ``True``: always (one sync per call).
        compile: ``torch.compile`` the loss (paper mode, without ``gather_negatives``): ``True`` or
            ``"default"`` fuses its few hundred small operations into a few kernels (on a GPU the eager
            loss is bound by kernel launches, not by arithmetic: see docs/benchmarks.md);
            ``"max-autotune-no-cudagraphs"`` also tunes them. Compiled on the first call for each input
            shape (tens of seconds to a minute and a half). The random draws then come from the compiled
            kernels' generator: same seed, same result, but not the eager values.
        cuda_graph: on CUDA, record the loss as CUDA graphs at the first call for each input shape and
            replay them afterwards (paper mode, without ``gather_negatives``): one launch instead of a
            few hundred (see :mod:`ctseg.contrastive.graphs`). With ``compile`` too, the recorded parts
            are compiled first (fused kernels: less device time; compiling takes a minute or more). Takes effect when
            gradients are enabled and ``check_inputs`` is off (the default on CUDA); elsewhere, and
            on CPU, the eager loss runs. The random draws come from the CUDA generator as in the eager
            loss but in another order: same seed, same result, not the eager values.

    Forward:
        ``features``: list of ``(B, C_s, H_s, W_s)`` maps (any float dtype; computed in fp32).
        ``mask``: ``(B, H, W)`` integer labels. ``probs``: optional ``(B, K, H, W)`` class
        probabilities (for ``sampling="confidence"``; no gradient flows into them).

    Returns ``(loss, stats)``. ``loss`` is a scalar attached to the graph (0, never NaN, when no
    (stage, class) has enough samples). ``stats`` is a read-only mapping of plain floats (a
    :class:`~ctseg.contrastive.stats.CTStats`: fetched from the device on first read, ``stats.tensor``
    for sync-free accumulation; ``dict(stats)`` for a dict):

    * ``"loss_raw"``: mean over groups of the loss before clip and weight; ``"loss"``: returned value;
    * ``"clipped"``: 1.0 if the raw loss exceeded ``clip`` (mean over groups);
    * ``"active"``: 1.0 if any (stage, class) term contributed;
    * ``"skipped_fraction"``: share of (stage, present class) terms skipped for lack of samples;
    * ``"stage{s}/positives"``, ``"stage{s}/negatives"``, ``"stage{s}/pairs"`` and the same per class,
      ``"stage{s}/class{c}/positives"`` etc. (summed over groups): positives / negatives the active
      terms drew from (paper: the sampled budget; reference: all candidates, which it permutes) and
      pairs whose similarity entered a loss (InfoNCE: queries × (1 + negatives));
    * per-term losses ``"stage{s}/class{c}/loss_neg"`` and ``"…/loss_pos"`` (CL) or
      ``"…/loss_infonce"``, mean over the groups where the term was active (0 if never).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        ignore_index: int | None = None,
        loss: str = "cl",
        mode: str = "paper",
        stages: Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
        proj_dim: int = 128,
        take_top: float = 0.5,
        smoothing: float = 0.1,
        temperature: float = 0.1,
        num_positives: int = 256,
        num_negatives: int = 256,
        infonce_max_pairs: int = 2000,
        min_positives: int = 5,
        min_negatives: int = 5,
        min_pair_positives: int = 10,
        min_infonce: int = 10,
        sampling: str = "random",
        clip: float | None = 1.0,
        clip_mode: str = "clamp",
        weight: float = 1.0,
        group_size: int | None = None,
        gather_negatives: bool = False,
        process_group: object | None = None,
        compute_stats: bool = True,
        check_inputs: bool | None = None,
        compile: bool | str = False,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        compile_mode, cuda_graph = _check_model_free_options(
            loss=loss,
            mode=mode,
            sampling=sampling,
            clip_mode=clip_mode,
            clip=clip,
            group_size=group_size,
            gather_negatives=gather_negatives,
            compile=compile,
            cuda_graph=cuda_graph,
        )
        if not in_channels:
            raise ConfigError("CT loss: in_channels is empty")
        self.cfg = CTConfig(
            num_classes=num_classes,
            ignore_index=ignore_index,
            stages=as_stage_tuple(stages, len(in_channels)),
            loss=loss,
            mode=mode,
            sampling=sampling,
            take_top=take_top,
            smoothing=smoothing,
            temperature=temperature,
            num_positives=num_positives,
            num_negatives=num_negatives,
            infonce_max_pairs=infonce_max_pairs,
            min_positives=min_positives,
            min_negatives=min_negatives,
            min_pair_positives=min_pair_positives,
            min_infonce=min_infonce,
            gather_negatives=gather_negatives,
        )
        self.cfg.validate(len(in_channels))
        self.in_channels = tuple(int(c) for c in in_channels)
        if strides is not None and (len(strides) != len(in_channels) or any(int(p) < 1 for p in strides)):
            raise ConfigError(f"CT loss: strides {list(strides)} must be one positive int per feature map")
        self.strides = None if strides is None else tuple(int(p) for p in strides)
        self.heads = build_heads(self.in_channels, self.cfg.stages, proj_dim)
        self.clip = clip
        self.clip_mode = clip_mode if clip is not None else "none"
        self.weight = float(weight)
        self.group_size = group_size
        self.process_group = process_group
        self.compute_stats = compute_stats
        self.check_inputs = check_inputs
        self.compile = compile_mode
        self._compiled_compute: Callable[..., Any] | None = None
        self.cuda_graph = cuda_graph
        self._graphs = GraphCache()
        # Grids last seen per mask size (what prefetch needs before the features exist), and the
        # prefetched counts waiting for their forward.
        self._grids_by_size: dict[tuple[int, int], list[StageGrid]] = {}
        self._prefetched: _Prefetched | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_compiled_compute"] = None  # compiled code does not pickle; recompiled on first use
        state["_graphs"] = GraphCache()  # nor do CUDA graphs; recorded again on first use
        state["_prefetched"] = None  # holds a future of the planner thread and a batch's mask
        return state

    # ------------------------------------------------------------------ input checks
    def _check_shapes(
        self, features: Sequence[torch.Tensor], mask: torch.Tensor, probs: torch.Tensor | None
    ) -> None:
        if mask.dim() != 3 or mask.dtype.is_floating_point or mask.dtype == torch.bool:
            raise ConfigError(
                f"CT loss: mask must be a (B, H, W) integer tensor, got {tuple(mask.shape)} {mask.dtype}"
            )
        if len(features) != len(self.in_channels):
            raise ConfigError(
                f"CT loss: got {len(features)} feature maps, expected {len(self.in_channels)} (in_channels)"
            )
        for s in self.cfg.stages:
            f = features[s]
            if f.dim() != 4 or f.shape[0] != mask.shape[0] or f.shape[1] != self.in_channels[s]:
                raise ConfigError(
                    f"CT loss: stage {s} features {tuple(f.shape)} do not match (B={mask.shape[0]}, "
                    f"C={self.in_channels[s]}, H_s, W_s)"
                )
        if self.cfg.sampling == "confidence" and probs is None:
            raise ConfigError("CT loss: sampling='confidence' needs probs=(B, K, H, W) in forward")
        if probs is not None and tuple(probs.shape) != (mask.shape[0], self.cfg.num_classes, *mask.shape[1:]):
            raise ConfigError(
                f"CT loss: probs {tuple(probs.shape)} must be (B, K, H, W) = "
                f"{(mask.shape[0], self.cfg.num_classes, *mask.shape[1:])}"
            )

    def _input_flags(
        self, features: Sequence[torch.Tensor], mask: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """``(2,)`` float: [stages with non-finite features, labels outside the classes and ignore].

        Cheap on purpose: a NaN/Inf anywhere makes the map's fp32 sum non-finite (one read pass, no
        boolean map); invalid labels are the pixels neither counted in a class nor equal to ignore.
        """
        nonfinite = torch.stack(
            [~torch.isfinite(torch.sum(features[s].detach(), dtype=torch.float32)) for s in self.cfg.stages]
        ).sum()
        counted = counts.sum(dtype=torch.int64)
        if self.cfg.ignore_index is not None:
            counted = counted + (mask == self.cfg.ignore_index).sum()
        return torch.stack([nonfinite.float(), (mask.numel() - counted).float()])

    def _raise_on_flags(
        self, flags: Sequence[float], features: Sequence[torch.Tensor], mask: torch.Tensor
    ) -> None:
        if flags[0] > 0:
            which = [s for s in self.cfg.stages if not bool(torch.isfinite(features[s]).all())]
            raise NonFiniteFeaturesError(f"CT loss: features of stage(s) {which} contain NaN or Inf")
        if flags[1] > 0:
            values = sorted(
                set(torch.unique(mask).tolist()) - set(range(self.cfg.num_classes)) - {self.cfg.ignore_index}
            )
            raise DataError(
                None,
                f"CT loss: mask has {int(flags[1])} pixels with labels {values[:10]} outside the classes "
                f"0..{self.cfg.num_classes - 1} and ignore_index {self.cfg.ignore_index}",
            )

    # ------------------------------------------------------------------ forward
    def forward(
        self, features: Sequence[torch.Tensor], mask: torch.Tensor, probs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, CTStats | dict[str, float]]:
        self._check_shapes(features, mask, probs)
        check = self._checks_inputs(mask)
        if self.cuda_graph and not check and _recordable(mask) and torch.is_grad_enabled():
            used = [features[s] for s in self.cfg.stages]
            graphed = self._graphs.get(self, used, mask, probs, self._grids(used, mask))
            if graphed is not None and graphed.busy():
                self._graphs.warn(
                    "busy",
                    "called again before the backward of an earlier result (keep detached copies of "
                    "results that are not backpropagated); such calls run the eager loss",
                )
                graphed = None
            if graphed is not None:
                loss, packed = graphed(used, mask, probs)
                return loss, ({} if packed is None else CTStats(packed, self.stat_names))
        compute = self._compute if self.compile is None else self._compiled()
        loss, packed, flags = compute(list(features), mask, probs, check)
        if packed is None:
            if flags is not None:
                self._raise_on_flags(flags.tolist(), features, mask)
            return loss, {}
        names = self.stat_names
        if flags is None:
            return loss, CTStats(packed, names)  # read from the device when first looked at
        values = torch.cat([packed, flags]).tolist()  # the check syncs anyway: one fetch for both
        self._raise_on_flags(values[-2:], features, mask)
        return loss, CTStats(packed, names, fetched=values[: len(names)])

    def _grids(self, used: Sequence[torch.Tensor], mask: torch.Tensor) -> list[StageGrid]:
        strides = None if self.strides is None else [self.strides[s] for s in self.cfg.stages]
        return stage_grids(
            tuple(mask.shape[1:]), [tuple(f.shape[2:]) for f in used], self.cfg.stages, strides
        )

    def _patch_confidence(
        self, probs: torch.Tensor | None, grids: Sequence[StageGrid]
    ) -> list[torch.Tensor] | None:
        """Per stage the mean class probability of every patch, ``(B, K, h_s, w_s)``; None unless
        confidence sampling has probabilities to read."""
        if probs is None or self.cfg.sampling != "confidence":
            return None
        return patch_class_means(probs.detach(), grids)

    def _torch_compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` through ``torch.compile`` in this loss's compile mode (static shapes)."""
        return torch.compile(fn, mode=None if self.compile == "default" else self.compile, dynamic=False)

    def _compiled(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        if self._compiled_compute is None:
            self._compiled_compute = self._torch_compile(self._compute)
        return self._compiled_compute

    def _compute(
        self,
        features: list[torch.Tensor],
        mask: torch.Tensor,
        probs: torch.Tensor | None,
        check: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The loss as tensors only (what ``compile`` compiles; no host reads in paper mode).

        Returns the weighted, clipped loss, the packed stats ``(N,)`` (None without stats) and the
        input-check flags ``(2,)`` (None without the check, or when already checked here).
        """
        used = [features[s] for s in self.cfg.stages]
        grids = self._grids(used, mask)
        # Only the reference mode prefetches (and it is never compiled: no state to trace here).
        prefetched = self._take_prefetched(mask, grids) if self.cfg.mode == "reference" else None
        with torch.autocast(device_type=mask.device.type, enabled=False):
            if prefetched is not None:
                counts = prefetched.counts
            else:
                counts = patch_class_counts(mask, self.cfg.num_classes, grids)
            flags = self._input_flags(features, mask, counts[0]) if check else None
            if flags is not None and self.cfg.mode == "reference":  # it syncs anyway: fail before any work
                self._raise_on_flags(flags.tolist(), features, mask)
                flags = None
            conf = self._patch_confidence(probs, grids)
            results = MODES[self.cfg.mode](self, used, counts, grids, conf, prefetched)
            loss, packed = self._finish(results)
        return loss, packed, flags

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, mask: torch.Tensor) -> None:
        """Start, before the model's forward, the part of the loss that needs only ``mask`` ``(B, H, W)``.

        For ``mode="reference"``: its host plan, i.e. the patch class counts (computed where ``mask``
        is; on a GPU their copy to the host is queued before the forward), the reference's CPU draws
        (whose sizes are those counts) and the rows and pairs they select, made on a background thread
        while the caller queues the forward. The next ``forward`` with this very ``mask`` tensor uses
        it; any other call ignores it. Same values either way: the draws come from a copy of the global
        CPU generator, which the forward then advances as the draws would have (and if something else
        drew from it in between, such as dropout in a CPU forward, the forward draws again itself).
        ``ctseg fit`` calls it; in your own loop::

            loss_fn.prefetch(mask)                       # before the forward
            logits, features = model(images)
            ct, stats = loss_fn(features, mask)          # the very tensor given to prefetch

        Needs the feature sizes, so it takes effect from the second call with a mask of this size.
        A no-op in paper mode (which never waits for the device) and without gradients.
        """
        self._prefetched = None
        if self.cfg.mode != "reference" or not torch.is_grad_enabled():
            return
        if mask.dim() != 3 or mask.dtype.is_floating_point or mask.dtype == torch.bool:
            return  # the forward names what is wrong with it
        grids = self._grids_by_size.get(tuple(mask.shape[1:]))
        if grids is None:
            return
        with torch.autocast(device_type=mask.device.type, enabled=False):
            counts = patch_class_counts(mask, self.cfg.num_classes, grids)
        bounds = group_bounds(mask.shape[0], self.group_size)
        rng_state = torch.get_rng_state()
        host_counts = _host_counts(counts, grids).get
        planned = _planner().submit(
            _plan_on_copy, self.cfg, host_counts, grids, bounds, rng_state, mask.is_cuda
        )
        self._prefetched = _Prefetched(mask, grids, bounds, rng_state, planned, counts)

    def _take_prefetched(self, mask: torch.Tensor, grids: list[StageGrid]) -> _Prefetched | None:
        """The prefetch of this very mask with these grids (consumed), else None; remembers the grids."""
        prefetched, self._prefetched = self._prefetched, None
        size = tuple(mask.shape[1:])
        if size not in self._grids_by_size and len(self._grids_by_size) >= 8:
            self._grids_by_size.pop(next(iter(self._grids_by_size)))
        self._grids_by_size[size] = grids
        if prefetched is None or prefetched.mask is not mask or prefetched.grids != grids:
            return None
        return prefetched

    # ------------------------------------------------------------------ stats
    def _finish(self, results: GroupResult) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clip every group's raw loss, average over groups, weight; pack the stats (None without)."""
        raws = results.loss  # (G,)
        clipped = CLIP_MODES[self.clip_mode](raws, self.clip) if self.clip is not None else raws
        # The sum of one group is that group's loss exactly, with a backward of no operator.
        loss = clipped.sum() if clipped.shape[0] == 1 else clipped.mean()
        if self.weight != 1.0:
            loss = loss * self.weight
        return loss, (self._pack_stats(loss, raws, results) if self.compute_stats else None)

    def _pack_stats(self, loss: torch.Tensor, raws: torch.Tensor, res: GroupResult) -> torch.Tensor:
        """All stats packed in one ``(N,)`` float32 device tensor, in the order of :attr:`stat_names`.

        ``res`` has a leading group dimension G; counts are summed over groups, per-term losses averaged
        over the groups where the term was active. What depends on the counts only comes with ``res``
        when the mode made it on the host (reference mode): on a GPU each operator here costs more host
        time than device time.
        """
        clip = float("inf") if self.clip is None or self.clip_mode == "none" else self.clip
        raws = raws.detach()
        head = torch.stack([raws.mean(), loss.detach(), torch.mean(raws > clip, dtype=torch.float32)])
        counts = res.count_stats
        if counts is None:
            counts = count_stats(res.counts, res.active, res.present)
        if res.term_weights is None and res.terms.shape[0] == 1:
            # One group: a term's mean over the groups where it was active is its value, and the
            # modes computing their stats on the device give 0 for inactive terms.
            terms = res.terms[0]
        else:
            weights = term_weights(res.term_active) if res.term_weights is None else res.term_weights
            terms = (res.terms * weights).sum(0)
        # Every part is on the loss's device already (the reference mode sends its counts there).
        return torch.cat([head, counts, terms.flatten()])

    def _checks_inputs(self, mask: torch.Tensor) -> bool:
        if self.check_inputs is None:  # auto: only where reading a value costs no device sync
            return mask.device.type == "cpu"
        return bool(self.check_inputs)

    @functools.cached_property
    def stat_names(self) -> tuple[str, ...]:
        """Names of the stats, in their packed order (fixed by the frozen config: built once)."""
        names = ["loss_raw", "loss", "clipped", "active", "skipped_fraction"]
        stages, K = self.cfg.stages, self.cfg.num_classes
        for key in ("positives", "negatives", "pairs"):
            names += [f"stage{s}/{key}" for s in stages]
        for key in ("positives", "negatives", "pairs"):
            names += [f"stage{s}/class{c}/{key}" for s in stages for c in range(K)]
        term_names = PAPER_TERMS[self.cfg.loss].term_names
        names += [f"stage{s}/class{c}/{t}" for s in stages for c in range(K) for t in term_names]
        return tuple(names)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"loss={c.loss!r}, mode={c.mode!r}, stages={list(c.stages)}, num_classes={c.num_classes}, "
            f"ignore_index={c.ignore_index}, sampling={c.sampling!r}, clip={self.clip}, "
            f"clip_mode={self.clip_mode!r}, weight={self.weight}, group_size={self.group_size}, "
            f"compile={self.compile!r}, cuda_graph={self.cuda_graph}"
        )
