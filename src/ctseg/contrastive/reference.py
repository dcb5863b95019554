"""``mode="reference"``: the authors' paper-era code (commit ``71f35b9``, spec §1.3), reproduced exactly.

Same class set (classes present in the group's mask), same minimum counts, same pair counts, the CL
"sort" that is a no-op (so CL keeps the first ``take_top`` share of *randomly* permuted pairs), the
InfoNCE sort that is real, the division by stages and classes, and the same global CPU RNG draws
(two ``torch.randperm`` per (stage, class) with ≥ ``min_positives`` / ``min_negatives`` samples,
positives first, groups outer, then stages, classes ascending). After ``torch.manual_seed(k)`` the
value equals a loop implementation of §1.3.

What differs from the authors' code is only the cost. The draws need the candidate counts on the host
(one transfer of all stages' class counts, :class:`HostCounts`), so the work is split in two:

* a host plan (:func:`plan_reference`: :func:`_draw_terms`, :func:`_place_rows` and the kind's
  ``plan``): per (group, stage, class) term, the rows it reads, as positions into one projected batch;
  the lengths, pair counts and stats all follow from the sizes; packed for one copy per dtype
  (:class:`_Upload`). Host work only, so ``PatchContrastiveLoss.prefetch`` makes it on a background
  thread while the model's forward is queued (with a copy of the global CPU generator);
* one device pass over all terms of all groups and stages (:func:`evaluate_reference`,
  :data:`REFERENCE_TERMS`): the projection runs once on each distinct row some term reads (same
  values, same gradients; on Dubai 512² crops ≈ 80 % of the stage-0 rows, 65 % at stage 2), then each
  loss kind evaluates every term at once: CL as segment means over the concatenated pairs, InfoNCE on
  terms padded to the longest.

So the device work does not grow with the number of terms: ≈ 200 operators on float tensors per
forward + backward at B = 8 (≈ 1200 when each term had its own, which on a GPU cost more than the
model's step; docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import torch
from torch import nn

from ctseg.contrastive.config import CTConfig, GroupResult
from ctseg.contrastive.heads import project_taken, unit_rows
from ctseg.contrastive.losses import cl_pair_loss, info_nce
from ctseg.contrastive.patches import StageGrid
from ctseg.contrastive.stats import count_stats, term_weights
from ctseg.utils.registry import Registry


@dataclass
class _Term:
    """Host plan of one (group, stage, class) term.

    ``segments`` are int64 arrays of flat patch rows of the stage's map (whole batch); ``positions``
    the same rows as positions into the projected rows of all stages. The host plan indexes with
    NumPy: 3–4× faster than torch's CPU indexing for these 1-D index arrays (docs/benchmarks.md), and
    the plan is on the reference mode's critical path on a GPU.
    """

    group: int
    stage: int  # index into cfg.stages
    c: int
    segments: list[np.ndarray]
    n_pos: int
    n_neg: int
    positions: list[np.ndarray] = field(default_factory=list)


class HostCounts:
    """The stages' class counts, copied to the host for the draws: one copy of all stages.

    On CUDA the copy goes to pinned memory asynchronously and :meth:`get` waits for it alone (an
    event), so with a copy queued before the model's forward (:meth:`PatchContrastiveLoss.prefetch`)
    the draws wait for the counts, not for the forward.

    Args:
        counts: per stage ``(B, K, h_s, w_s)`` integer counts (values ≤ the stage's patch pixels).
        max_count: the largest value they can hold (int16 on the wire when it fits).
    """

    def __init__(self, counts: Sequence[torch.Tensor], max_count: int) -> None:
        self._ready: torch.cuda.Event | None = None
        if not counts[0].is_cuda:  # CPU: the counts themselves; another device: a plain copy
            self._counts = [c.cpu() for c in counts]
            return
        dtype = self.wire_dtype(max_count)
        flat = torch.cat([c.reshape(-1) for c in counts]).to(dtype)
        pinned = torch.empty(flat.shape, dtype=dtype, pin_memory=True)
        pinned.copy_(flat, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()
        parts = pinned.split([c.numel() for c in counts])
        self._counts = [part.view(c.shape) for part, c in zip(parts, counts, strict=True)]

    @staticmethod
    def wire_dtype(max_count: int) -> torch.dtype:
        """The narrowest integer type the copy can use for counts up to ``max_count``."""
        return torch.int16 if max_count <= torch.iinfo(torch.int16).max else torch.int32

    def get(self) -> list[torch.Tensor]:
        """Per stage the counts on the host ``(B, K, h_s, w_s)`` (waits for the copy on CUDA)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._counts


class _Upload:
    """Host tensors the device pass reads, sent in one copy per dtype (pinned and asynchronous on
    CUDA), so that the device work is queued behind one transfer instead of waiting on one per tensor.

    :meth:`pack` (host work: it can run where the plan is made, e.g. beside the model's forward) lays
    them out in one buffer per dtype; :meth:`send` copies those to the device.
    """

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._packed: list[tuple[torch.Tensor, list[int]]] | None = None  # per dtype: buffer, indices

    def add(self, tensor: torch.Tensor) -> int:
        """Register a CPU tensor; returns its index into :meth:`send`'s list."""
        self._tensors.append(tensor)
        self._packed = None
        return len(self._tensors) - 1

    def pack(self, pin: bool) -> None:
        """Lay the registered tensors out in one flat host buffer per dtype (``pin``: in pinned memory,
        for an asynchronous copy to a CUDA device)."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k, t in enumerate(self._tensors):
            by_dtype.setdefault(t.dtype, []).append(k)
        self._packed = []
        for dtype, ks in by_dtype.items():
            flat = torch.empty(sum(self._tensors[k].numel() for k in ks), dtype=dtype, pin_memory=pin)
            torch.cat([self._tensors[k].reshape(-1) for k in ks], out=flat)
            self._packed.append((flat, ks))

    def send(self, device: torch.device) -> list[torch.Tensor]:
        """All registered tensors on ``device``, same shapes and order (views of one buffer per dtype;
        on the CPU the tensors themselves)."""
        if device.type == "cpu":  # already there
            return list(self._tensors)
        if self._packed is None:
            self.pack(pin=device.type == "cuda")
        assert self._packed is not None
        return self._views([flat.to(device, non_blocking=True) for flat, _ in self._packed])

    def packed_views(self) -> list[torch.Tensor]:
        """The registered tensors as views of the packed host buffers (what :meth:`send` copies)."""
        assert self._packed is not None, "pack() first"
        return self._views([flat for flat, _ in self._packed])

    def _views(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The registered tensors as views of ``flats``, the packed buffers (one per dtype) wherever."""
        assert self._packed is not None
        out: list[torch.Tensor] = list(self._tensors)
        for flat, (_, ks) in zip(flats, self._packed, strict=True):
            for k, part in zip(ks, flat.split([self._tensors[k].numel() for k in ks]), strict=True):
                out[k] = part.view(self._tensors[k].shape)
        return out


@dataclass
class _KindPlan:
    """What a loss kind planned on the host for its terms.

    Attributes:
        slots: per value the kind computes, ``(term index, sub-term t)``.
        term_active: per term, which of its T sub-terms are active.
        pairs: per term, the pairs it uses.
        tensors: name → index into the :class:`_Upload` of what its device pass reads.
        sizes: name → host-known sizes that device pass needs.
    """

    slots: list[tuple[int, int]]
    term_active: list[list[bool]]
    pairs: list[int]
    tensors: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def _permutations(
    pos: np.ndarray, neg: np.ndarray, generator: torch.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's two draws, positives first: permutations of the candidates' positions
    (``generator``: None for the global CPU generator, as the reference draws).

    A term reads only prefixes of the permuted candidates, so the caller gathers those prefixes
    (``pos[perm[:k]]``) rather than permuting all candidates (up to ~10⁵ negatives at stage 0).
    """
    # torch's draws (the reference's), read as NumPy arrays without a copy.
    p = torch.randperm(len(pos), generator=generator).numpy()
    return p, torch.randperm(len(neg), generator=generator).numpy()


# ----------------------------------------------------------------------------------------------- CL
def _cl_segments(
    pos: np.ndarray, neg: np.ndarray, cfg: CTConfig, generator: torch.Generator | None
) -> list[np.ndarray]:
    """Reference CL: negative pairs ``(P[:kn], N[:kn])``, kn = int(min(n_pos, n_neg)·take_top);
    positive pairs ``(P[:kh], P[h:h+kh])``, h = n_pos // 2, kh = int(h·take_top), if n_pos ≥ 10."""
    p, n = _permutations(pos, neg, generator)
    kn = int(min(len(pos), len(neg)) * cfg.take_top)
    segs = [pos[p[:kn]], neg[n[:kn]]]
    if len(pos) >= cfg.min_pair_positives:
        h = len(pos) // 2
        kh = int(h * cfg.take_top)
        segs += [segs[0][:kh] if kh <= kn else pos[p[:kh]], pos[p[h : h + kh]]]
    return segs


def _cl_plan(terms: Sequence[_Term], cfg: CTConfig, upload: _Upload) -> _KindPlan:
    """All pairs of all sub-terms (negative pairs; positive pairs where there are ≥
    ``min_pair_positives`` positives) concatenated, with each sub-term's bounds."""
    first, second, sign, lengths, plan = [], [], [], [], _KindPlan([], [], [])
    for j, term in enumerate(terms):
        pos = term.positions
        subterms = [(pos[0], pos[1])] + ([(pos[2], pos[3])] if len(pos) == 4 else [])
        for t, (a, b) in enumerate(subterms):
            first.append(a)
            second.append(b)
            # Sub-term 1 pairs two positives (label 1): its CL is that of label 0 at −cos.
            sign.append(np.full(len(a), -1.0 if t == 1 else 1.0, dtype=np.float32))
            lengths.append(len(a))
            plan.slots.append((j, t))
        plan.term_active.append([True, len(subterms) == 2])
        plan.pairs.append(sum(len(a) for a, _ in subterms))
    pairs = np.stack([np.concatenate(first), np.concatenate(second)])
    plan.tensors = {
        "pairs": upload.add(torch.from_numpy(pairs)),
        "sign": upload.add(torch.from_numpy(np.concatenate(sign))),
        "bounds": upload.add(torch.tensor([0, *accumulate(lengths)])),
        "inverse_lengths": upload.add(1.0 / torch.tensor(lengths, dtype=torch.float32).clamp(min=1)),
    }
    return plan


def _cl_evaluate(
    handoff: list[torch.Tensor], plan: _KindPlan, sent: Sequence[torch.Tensor], cfg: CTConfig
) -> torch.Tensor:
    """Mean CL of every sub-term ``(V,)``: each pair's CL, then segment means as differences of one
    float64 prefix sum (deterministic on every device, unlike a scatter with atomics; relative error
    ~1e-16·n, exact enough for segments of any length). An empty sub-term gives 0."""
    pairs = sent[plan.tensors["pairs"]]
    z = handoff.pop()
    # One gather for both sides of the pairs (its backward is one indexed accumulation, several kernels
    # on CUDA), split by an unbind (whose backward is one stack).
    first, second = z[pairs].unbind(0)
    del z  # the projections are not needed once gathered (the gather saves only its indices)
    # Product and sum, not einsum: einsum makes it a batched matrix product of 1×d by d×1, which cuBLAS
    # runs as a slow GEMV (0.9 ms of the loss's 4.7 ms of kernels on an H100, B = 8). The plan's signs
    # turn each positive pair's cosine into the label-0 argument of the same CL value (one product
    # instead of a label test and a selection, forward and backward).
    cos = (first * second).sum(-1)
    per_pair = cl_pair_loss(cos * sent[plan.tensors["sign"]], False, cfg.smoothing)
    prefix = torch.nn.functional.pad(per_pair.double().cumsum(0), (1, 0))
    sums = torch.diff(prefix[sent[plan.tensors["bounds"]]])
    return sums.float() * sent[plan.tensors["inverse_lengths"]]


# ------------------------------------------------------------------------------------------ InfoNCE
def _infonce_segments(
    pos: np.ndarray, neg: np.ndarray, cfg: CTConfig, generator: torch.Generator | None
) -> list[np.ndarray]:
    """Reference InfoNCE: m = min(n_pos, n_neg, 2000) zipped pairs ``(P[:m], N[:m])``; drawn even when
    one side has fewer than ``min_infonce`` rows, in which case there is no term (value 0)."""
    p, n = _permutations(pos, neg, generator)
    if min(len(pos), len(neg)) < cfg.min_infonce:
        return []
    m = min(len(pos), len(neg), cfg.infonce_max_pairs)
    return [pos[p[:m]], neg[n[:m]]]


def _infonce_plan(terms: Sequence[_Term], cfg: CTConfig, upload: _Upload) -> _KindPlan:
    """Every term's zipped pairs padded to the longest ``M``, with its sizes: m pairs, ``kept`` =
    int(m·take_top) after the sort, q = kept // 2 queries."""
    m = [len(t.positions[0]) for t in terms]
    kept = [int(n * cfg.take_top) for n in m]
    q = [k // 2 for k in kept]
    seqs = [t.positions[0] for t in terms] + [t.positions[1] for t in terms]
    lengths = np.array([len(s) for s in seqs])
    # Padding reads distinct rows (masked out, so zero gradient): with one padding index every padded
    # slot would add its zero into one row in the backward, which CUDA's index backward serialises
    # (4.8 ms of the loss's 7.4 ms of kernels on an H100, B = 8).
    padding = np.arange(int(lengths.max())) >= lengths[:, None]
    rows = np.empty(padding.shape, dtype=np.int64)
    rows[~padding] = np.concatenate(seqs)  # row-major: each sequence fills its row's first slots
    rows[padding] = np.arange(int(padding.sum())) % (1 + max(int(s.max()) for s in seqs))
    return _KindPlan(
        slots=[(j, 0) for j in range(len(terms))],
        term_active=[[True] for _ in terms],
        pairs=[qj * (1 + kj) for qj, kj in zip(q, kept, strict=True)],
        tensors={"rows": upload.add(torch.from_numpy(rows)), "sizes": upload.add(torch.tensor([m, kept, q]))},
        sizes={"queries": max(q), "negatives": max(kept)},
    )


def _infonce_evaluate(
    handoff: list[torch.Tensor], plan: _KindPlan, sent: Sequence[torch.Tensor], cfg: CTConfig
) -> torch.Tensor:
    """InfoNCE of every term ``(R,)``, padded: the zipped pairs sorted by similarity (descending), the
    first ``kept`` remain; queries and keys are their first two quarters, the negatives all of them."""
    rows, sizes = sent[plan.tensors["rows"]], sent[plan.tensors["sizes"]]
    z = handoff.pop()
    R, M = rows.shape[0] // 2, rows.shape[1]
    P, N = rows[:R], rows[R:]  # (R, M) positions into z
    with torch.no_grad():
        sim = (z[P] * z[N]).sum(-1)  # as the reference computes it: the sort is sensitive to rounding
        sim = sim.masked_fill(torch.arange(M, device=z.device) >= sizes[0, :, None], float("-inf"))
        order = torch.argsort(sim, dim=1, descending=True)
    P, N = P.gather(1, order), N.gather(1, order)
    Q, K = plan.sizes["queries"], plan.sizes["negatives"]
    i_q = torch.arange(Q, device=z.device)
    keys = P.gather(1, (sizes[2, :, None] + i_q) % M)  # past q: distinct slots (masked), not one
    # One gather for queries, keys and negatives, as in _cl_evaluate.
    queries, keys, negatives = z[torch.cat([P[:, :Q], keys, N[:, :K]], dim=1)].split([Q, Q, K], dim=1)
    del z  # as in _cl_evaluate
    q_valid, n_valid = i_q < sizes[2, :, None], torch.arange(K, device=queries.device) < sizes[1, :, None]
    return info_nce(queries, keys, q_valid, negatives, n_valid, cfg.temperature)


@dataclass(frozen=True)
class ReferenceKind:
    """A registered reference loss: the rows one term draws, the host plan and the device pass over
    all terms, and the number of sub-terms ``T`` per (stage, class)."""

    segments: Callable[[np.ndarray, np.ndarray, CTConfig, torch.Generator | None], list[np.ndarray]]
    plan: Callable[[Sequence[_Term], CTConfig, _Upload], _KindPlan]
    # Takes the projected rows of all stages ``(R, d)`` out of a one-element list, so that it holds the
    # only reference and can free them once it has gathered the rows it reads.
    evaluate: Callable[[list[torch.Tensor], _KindPlan, Sequence[torch.Tensor], CTConfig], torch.Tensor]
    num_terms: int


REFERENCE_TERMS: Registry[ReferenceKind] = Registry("CT reference loss")
REFERENCE_TERMS.add("cl", ReferenceKind(_cl_segments, _cl_plan, _cl_evaluate, 2))
REFERENCE_TERMS.add("infonce", ReferenceKind(_infonce_segments, _infonce_plan, _infonce_evaluate, 1))


# ------------------------------------------------------------------------------------- host planning
def _draw_terms(
    cfg: CTConfig,
    counts: Sequence[torch.Tensor],
    grids: Sequence[StageGrid],
    bounds: Sequence[tuple[int, int]],
    kind: ReferenceKind,
    generator: torch.Generator | None,
) -> tuple[list[_Term], torch.Tensor]:
    """Every term with rows, drawn in the reference's order; and ``present`` ``(G, K)`` bool.

    ``counts``: the stages' class counts on the host, ``(B, K, h_s, w_s)``; ``generator``: where the
    draws come from (None: the global CPU generator).
    """
    candidates = []  # per stage: pure (K, n) and free (K, n) patches of every class, n = B·h·w
    for cnt, grid in zip(counts, grids, strict=True):
        K = cnt.shape[1]
        # Compare first, then lay the (1-byte) flags out class-major: no copy of the counts themselves.
        pure = (cnt == grid.patch_pixels).transpose(0, 1).reshape(K, -1).numpy()
        free = (cnt == 0).transpose(0, 1).reshape(K, -1).numpy()
        candidates.append((pure, free, cnt.shape[2] * cnt.shape[3]))
    free0, per_image0 = candidates[0][1], candidates[0][2]
    # A class is present where some stage-0 patch has a pixel of it.
    present = np.stack([~free0[:, b0 * per_image0 : b1 * per_image0].all(1) for b0, b1 in bounds])
    terms = []
    for g, (b0, b1) in enumerate(bounds):
        classes = [int(c) for c in np.flatnonzero(present[g])]
        for i, (pure, free, per_image) in enumerate(candidates):
            lo, hi = b0 * per_image, b1 * per_image
            for c in classes:
                # np.flatnonzero: 0.07 ms for a 131 072-entry stage-0 row, torch.nonzero 0.46 ms.
                pos = np.flatnonzero(pure[c, lo:hi])
                neg = np.flatnonzero(free[c, lo:hi])
                if len(pos) < cfg.min_positives or len(neg) < cfg.min_negatives:
                    continue
                segments = kind.segments(pos, neg, cfg, generator)
                if segments:
                    terms.append(_Term(g, i, c, [seg + lo for seg in segments], len(pos), len(neg)))
    return terms, torch.from_numpy(present)


def _place_rows(terms: Sequence[_Term], grids: Sequence[StageGrid], batch: int) -> list[np.ndarray | None]:
    """The distinct rows each stage must project (None: none), and every term's ``positions`` into
    their concatenation over stages.

    Terms share rows (CL's two prefixes of P, one class's negatives that are another's positives):
    each distinct row is projected once. Rows are flat patch indices below B·h·w, so the distinct ones
    come from a mark per patch and their ranks from its running count (linear; a sort-based
    ``torch.unique`` took several ms of host time at stage 0).
    """
    stage_rows: list[np.ndarray | None] = []
    offset = 0
    for i, grid in enumerate(grids):
        own = [t for t in terms if t.stage == i]
        if not own:
            stage_rows.append(None)
            continue
        read = np.concatenate([seg for t in own for seg in t.segments])
        marked = np.zeros(batch * grid.h * grid.w, dtype=bool)
        marked[read] = True
        rows = np.flatnonzero(marked)
        inverse = (np.cumsum(marked, dtype=np.int64) - 1 + offset)[read]
        at = 0
        for t in own:
            t.positions = []
            for seg in t.segments:
                t.positions.append(inverse[at : at + len(seg)])
                at += len(seg)
        stage_rows.append(rows)
        offset += len(rows)
    return stage_rows


# --------------------------------------------------------------------------------------------- plan
# ReferencePlan.stage_rows: the stage projects every patch of its map, in row-major (b, i, j) order.
EVERY_ROW = -1


def _stage_rows(upload: _Upload, rows: np.ndarray | None, grid: StageGrid, batch: int) -> int | None:
    """Register the distinct flat rows a stage projects as ``(2, n)`` image and patch indices (split
    here, not by two device operators per stage in the forward); :data:`EVERY_ROW` when they are all
    the map's patches, which the device pass then projects without an index."""
    if rows is None:
        return None
    per_image = grid.h * grid.w
    if len(rows) == batch * per_image:  # distinct and sorted: exactly 0 … B·h·w − 1
        return EVERY_ROW
    return upload.add(torch.from_numpy(np.stack(np.divmod(rows, per_image))))


@dataclass
class ReferencePlan:
    """Everything the host decides for one call (draws included), ready to be sent to the device.

    Made by :func:`plan_reference` (host work only, so it can run on another thread while the model's
    forward is queued), evaluated by :func:`evaluate_reference`. ``stats``, ``present``, ``scale``,
    ``slot``, ``count_stats`` and ``term_weights`` are indices into ``upload``; so is ``stage_rows[i]``,
    the ``(2, n)`` image and patch of the rows stage i projects, unless it is None (no row) or
    :data:`EVERY_ROW`.
    """

    num_groups: int
    upload: _Upload
    stage_rows: list[int | None]
    plan: _KindPlan
    stats: int
    present: int
    scale: int
    slot: int | None
    count_stats: int
    term_weights: int


def plan_reference(
    cfg: CTConfig,
    counts: Sequence[torch.Tensor],
    grids: Sequence[StageGrid],
    bounds: Sequence[tuple[int, int]],
    generator: torch.Generator | None = None,
    pin: bool = False,
) -> ReferencePlan:
    """The host plan of every group (images ``b0:b1`` of ``bounds``): the reference's draws, the rows
    each stage projects, the pairs, the stats; packed for one copy per dtype.

    Args:
        counts: the stages' class counts on the host, ``(B, K, h_s, w_s)``.
        grids: the stages' patch grids.
        generator: where the draws come from (None: the global CPU generator, as the reference).
        pin: pack into pinned memory (for a CUDA device).
    """
    kind = REFERENCE_TERMS[cfg.loss]
    G, S, K, T = len(bounds), len(cfg.stages), cfg.num_classes, kind.num_terms
    terms, present = _draw_terms(cfg, counts, grids, bounds, kind, generator)
    upload = _Upload()
    B = counts[0].shape[0]
    stage_rows = [
        _stage_rows(upload, rows, grid, B)
        for rows, grid in zip(_place_rows(terms, grids, B), grids, strict=True)
    ]
    plan = kind.plan(terms, cfg, upload) if terms else _KindPlan([], [], [])
    stats = torch.zeros(3 + T, G, S, K)  # positives, negatives, pairs, then term_active per sub-term
    if terms:
        at = torch.tensor([[t.group, t.stage, t.c] for t in terms]).T
        rows = zip(terms, plan.term_active, plan.pairs, strict=True)
        per_term = torch.tensor([[t.n_pos, t.n_neg, n, *act] for t, act, n in rows], dtype=torch.float32)
        stats[:, at[0], at[1], at[2]] = per_term.T
    per_group = 1.0 / (S * present.sum(-1).clamp(min=1).float())  # the reference's / S / classes
    h_stats, h_present, h_scale = (upload.add(t) for t in (stats, present.float(), per_group))
    # The statistics that need no loss value, made here rather than as device operators in the forward.
    term_active = stats[3:].permute(1, 2, 3, 0) > 0  # (G, S, K, T)
    h_counts = upload.add(count_stats(stats[:3], term_active.any(-1), present))
    h_weights = upload.add(term_weights(term_active))
    slot = [((terms[j].group * S + terms[j].stage) * K + terms[j].c) * T + t for j, t in plan.slots]
    h_slot = upload.add(torch.tensor(slot, dtype=torch.long)) if slot else None
    if pin:
        upload.pack(pin=True)
    return ReferencePlan(
        G, upload, stage_rows, plan, h_stats, h_present, h_scale, h_slot, h_counts, h_weights
    )


# --------------------------------------------------------------------------------------------- loss
def evaluate_reference(
    cfg: CTConfig, heads: nn.ModuleList, features: Sequence[torch.Tensor], plan: ReferencePlan
) -> GroupResult:
    """CT loss of every group of ``plan`` (each a data-parallel replica of the reference), with a
    leading group dimension G on every field of the result: one device pass over all terms.

    Args:
        features: the used stage maps ``(B, C_s, h_s, w_s)``.
    """
    kind = REFERENCE_TERMS[cfg.loss]
    G, S, K, T = plan.num_groups, len(cfg.stages), cfg.num_classes, kind.num_terms
    device = features[0].device
    sent = plan.upload.send(device)
    projected = [
        (heads[s], f, None if h == EVERY_ROW else sent[h])
        for s, f, h in zip(cfg.stages, features, plan.stage_rows, strict=True)
        if h is not None
    ]
    values = torch.zeros(G * S * K * T, device=device)
    if projected:
        # No list of the stages' projections survives the concatenation (it would double them), the
        # unnormalised rows do not outlive their normalisation (its backward reads its outputs), and
        # the normalised rows are handed over to the loss kind, which frees them after its gathers.
        # Normalised once for all stages: 3 operators instead of 3 per stage.
        handoff = [
            unit_rows(
                torch.cat([project_taken(head, f, taken, normalized=False) for head, f, taken in projected])
            )
        ]
        values = values.index_put((sent[plan.slot],), kind.evaluate(handoff, plan.plan, sent, cfg))
    loss = values.view(G, S * K * T).sum(-1) * sent[plan.scale]
    # An exact zero that depends on every head no term used (DDP then sees no unused parameter) and,
    # without any term, on the features (the loss stays attached to the graph). Paper mode needs none:
    # its fixed-shape sampling always projects rows of every stage.
    anchor = [
        p.reshape(-1)[:1].sum()
        for s, h in zip(cfg.stages, plan.stage_rows, strict=True)
        if h is None
        for p in heads[s].parameters()
    ]
    if not projected:
        anchor += [f.reshape(-1)[:1].sum().float() for f in features]
    if anchor:
        loss = loss + torch.stack(anchor).sum() * 0.0
    stats_dev = sent[plan.stats]
    term_active = stats_dev[3:].permute(1, 2, 3, 0) > 0  # (G, S, K, T)
    return GroupResult(
        loss=loss,
        counts=stats_dev[:3],
        terms=values.detach().view(G, S, K, T),
        term_active=term_active,
        active=term_active.any(-1),
        present=sent[plan.present] > 0,
        count_stats=sent[plan.count_stats],
        term_weights=sent[plan.term_weights],
    )
