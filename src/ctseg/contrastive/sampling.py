"""Paper-mode sampling: a fixed budget of positive and negative patch rows per (group, stage, class).

The patches of every group, stage and class are laid out as the rows of one tensor
(:class:`Candidates`), so that one draw and one selection serve all of them: on a GPU the loss is
bound by kernel launches, and a draw and two selections per stage and group cost more launches than
the sampling costs device time (``paper.stage_batches`` says which stages share a layout). Samplers return
fixed-shape index tensors plus per-row counts of valid entries (valid entries first), so nothing
depends on data-dependent shapes and no host synchronisation is needed. Registry: :data:`SAMPLERS`
(``"random"``, ``"confidence"``).

Pairing convention used by the paper-mode loss (see ``paper.py``):

* positive pairs: ``(pos[:, 2i], pos[:, 2i+1])``, valid while ``2i + 1 < pos_count`` — the positive
  sample split into two halves;
* negative pairs: ``(pos[:, j], neg[:, j])``, valid while ``j < min(pos_count, neg_count)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ctseg.contrastive.constants import device_constant
from ctseg.contrastive.patches import StageGrid
from ctseg.utils.registry import Registry

# Value of the padding columns of Candidates.fraction (a real patch has a class fraction in [0, 1]).
PADDING = -1.0


def _eligible_fractions(device: torch.device) -> torch.Tensor:
    """``(2, 1, 1)`` float32: the class fraction of an eligible positive (1) and negative (0)."""
    return (1.0 - torch.arange(2, dtype=torch.float32, device=device)).reshape(2, 1, 1)


@dataclass
class Candidates:
    """Patches of G groups × S stages × K classes as R = G·S·K rows of N = g·n columns.

    Row ``(group, stage, class)``; column ``b·n + p`` is patch ``p`` (``i·w_s + j``) of image ``b`` of
    the group, with g the size of the largest group and n the largest ``h_s·w_s``. Columns beyond a
    stage's patches or a group's images are padding: never a candidate, and ranked below every real
    patch by the samplers, so that they are only drawn when a row has fewer patches than a budget
    (those slots lie beyond the valid count).

    Attributes:
        fraction: ``(R, N)`` float32, the share ``count / p_s²`` of the patch's pixels that are of the
            class (exactly 1 for a pure patch and 0 for one without the class: patch sizes stay far
            below 2²⁴ pixels), :data:`PADDING` in padding columns.
        eligible: ``(2, R, N)`` bool, ``[positive, negative]`` stacked, so that a sampler selects both
            sets in one operation (on a GPU each selection is a top-k of a dozen kernels).
        columns_per_image: n.
    """

    fraction: torch.Tensor
    eligible: torch.Tensor
    columns_per_image: int

    @classmethod
    def from_fractions(cls, fraction: torch.Tensor, columns_per_image: int) -> Candidates:
        # One comparison against (1, 0) broadcast over the set axis: an eq per set and a stack
        # would be three operators.
        targets = device_constant(
            "eligible-fractions", fraction.device, lambda: _eligible_fractions(fraction.device)
        )
        return cls(fraction, fraction == targets, columns_per_image)

    @property
    def positive(self) -> torch.Tensor:
        """``(R, N)`` bool, every pixel of the patch is the class."""
        return self.eligible[0]

    @property
    def negative(self) -> torch.Tensor:
        """``(R, N)`` bool, no pixel of the patch is the class."""
        return self.eligible[1]


def candidate_layout(grids: Sequence[StageGrid], bounds: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(g, n)`` of :class:`Candidates`: images of the largest group, patches of the largest stage."""
    return max(b1 - b0 for b0, b1 in bounds), max(gr.h * gr.w for gr in grids)


def spread_rows(
    maps: Sequence[torch.Tensor],
    grids: Sequence[StageGrid],
    bounds: Sequence[tuple[int, int]],
    fill: float,
    scale: Sequence[float] | None = None,
) -> torch.Tensor:
    """Per-stage ``(B, K, h_s, w_s)`` maps → the ``(G·S·K, g·n)`` row layout of :class:`Candidates`,
    float32, ``fill`` in the padding columns; the values of stage s are divided by ``scale[s]``."""
    g, n = candidate_layout(grids, bounds)
    K = maps[0].shape[1]
    shape, device = (len(bounds), len(maps), K, g, n), maps[0].device
    padded = any(gr.h * gr.w < n for gr in grids) or any(b1 - b0 < g for b0, b1 in bounds)
    # Without padding columns every entry is written below: no fill (one kernel fewer on a GPU).
    out = (
        torch.full(shape, fill, dtype=torch.float32, device=device)
        if padded
        else torch.empty(shape, dtype=torch.float32, device=device)
    )
    for s, (m, gr) in enumerate(zip(maps, grids, strict=True)):
        hw = gr.h * gr.w
        for j, (b0, b1) in enumerate(bounds):
            src = m[b0:b1].transpose(0, 1).reshape(K, b1 - b0, hw)
            dst = out[j, s, :, : b1 - b0, :hw]
            if scale is None:
                dst.copy_(src)
            elif torch.compiler.is_compiling():  # out= into a view breaks the graph; fused there anyway
                dst.copy_(src / scale[s])
            else:  # one kernel: the division writes into the layout
                torch.div(src, scale[s], out=dst)
    return out.reshape(-1, g * n)


def stage_candidates(
    counts: Sequence[torch.Tensor], grids: Sequence[StageGrid], bounds: Sequence[tuple[int, int]]
) -> Candidates:
    """The :class:`Candidates` of every group and stage from the per-stage ``(B, K, h_s, w_s)``
    class pixel counts (``patches.py``)."""
    fraction = spread_rows(counts, grids, bounds, PADDING, [gr.patch_pixels for gr in grids])
    return Candidates.from_fractions(fraction, candidate_layout(grids, bounds)[1])


@dataclass
class Sample:
    """Sampled columns of every row of :class:`Candidates` (widths depend on the budgets only).

    Attributes:
        pos_rows: ``(R, P)`` long; the first ``pos_count[r]`` entries of row r are valid.
        pos_count: ``(R,)`` long.
        neg_rows: ``(R, M)`` long; the first ``neg_count[r]`` entries of row r are valid.
        neg_count: ``(R,)`` long.
        pos_available, neg_available: ``(R,)`` long, how many positives / negatives the row had.
    """

    pos_rows: torch.Tensor
    pos_count: torch.Tensor
    neg_rows: torch.Tensor
    neg_count: torch.Tensor
    pos_available: torch.Tensor
    neg_available: torch.Tensor


Sampler = Callable[..., Sample]
SAMPLERS: Registry[Sampler] = Registry("CT sampling")


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    return SAMPLERS.register(name)


def _pad_columns(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Pad ``(R, k)`` column indices to ``(R, width)`` with column 0 (beyond the valid count, never
    read as valid) when a budget exceeds the columns."""
    return rows if rows.shape[1] == width else torch.nn.functional.pad(rows, (0, width - rows.shape[1]))


def _top_rows(
    keys: torch.Tensor, eligible: torch.Tensor, budgets: tuple[int, ...], fill: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per set j of ``eligible`` ``(J, R, N)``: the columns of the ``budgets[j]`` largest keys among
    its eligible ones, eligible first, ``(R, budgets[j])``, the valid count ``(R,)`` and the number
    of eligible columns ``(R,)``. One top-k serves all sets (each a row block of the same call).

    ``keys`` ``(R, N)`` must exceed every ``fill`` value where eligible; ineligible columns rank by
    ``fill`` (the class fraction: real patches before padding)."""
    ks = [min(b, keys.shape[-1]) for b in budgets]
    masked = torch.where(eligible, keys, fill)  # (J, R, N)
    rows = torch.topk(masked, max(ks), dim=-1, largest=True, sorted=True).indices
    available = eligible.sum(-1)  # (J, R)
    if len(set(ks)) == 1:
        valid = torch.clamp(available, max=ks[0])
        counts = [valid[j] for j in range(len(ks))]
    else:
        counts = [torch.clamp(available[j], max=k) for j, k in enumerate(ks)]
    return [
        (_pad_columns(rows[j, :, :k] if k < rows.shape[-1] else rows[j], b), counts[j], available[j])
        for j, (k, b) in enumerate(zip(ks, budgets, strict=True))
    ]


@register_sampler("random")
def random_sample(
    cand: Candidates,
    num_positives: int,
    num_negatives: int,
    confidence: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Sample:
    """Uniform sampling without replacement: each row keeps the columns with the largest i.i.d.
    uniform keys among its candidates (a random permutation truncated to the budget).

    One ``rand(R, N)`` serves both sets: positives and negatives of a row are disjoint, so their keys
    are independent. ``confidence`` is ignored.
    """
    # Keys in [2, 3]: above every fill (class fractions in [0, 1], padding below). The same draws
    # and values as rand() + 2 (uniform_ maps u to u·(3 − 2) + 2), in one operator instead of two.
    keys = torch.empty(cand.fraction.shape, device=cand.fraction.device).uniform_(
        2.0, 3.0, generator=generator
    )
    (pos_rows, pos_count, pos_available), (neg_rows, neg_count, neg_available) = _top_rows(
        keys, cand.eligible, (num_positives, num_negatives), cand.fraction
    )
    return Sample(pos_rows, pos_count, neg_rows, neg_count, pos_available, neg_available)


@register_sampler("confidence")
def confidence_sample(
    cand: Candidates,
    num_positives: int,
    num_negatives: int,
    confidence: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Sample:
    """Sampling by predicted confidence (spec §1.4, the HEAD variant), per row (group, stage, class c):

    * positives: the ``h = num_positives // 2`` least confident and the ``h`` most confident positives
      (at most half of the candidates each, so the two halves never overlap), interleaved so that
      positive pair i is (i-th least confident, i-th most confident);
    * negatives: the ``num_negatives`` negatives with the highest predicted probability of c
      (confidently wrong).

    ``confidence``: ``(R, N)`` mean predicted probability of the row's class over each patch, in the
    layout of ``cand`` (:func:`spread_rows`).
    """
    if confidence is None:
        raise ValueError("confidence sampling needs the per-patch class probabilities")
    R, N = cand.positive.shape
    conf = confidence.detach().to(torch.float32)
    # Ascending: eligible positives (confidence in [0, 1]) first, then the other real patches
    # (3 - fraction in [2, 3]), padding last (4).
    order = torch.sort(torch.where(cand.positive, conf, 3.0 - cand.fraction), dim=-1, stable=True).indices
    pos_available = cand.positive.sum(-1)
    h = min(num_positives // 2, N // 2)
    half = torch.minimum(pos_available // 2, torch.full_like(pos_available, h))
    i = torch.arange(h, device=conf.device)
    low = order[:, :h]
    high = order.gather(1, (pos_available[:, None] - 1 - i[None, :]).clamp(min=0))
    pos_rows = _pad_columns(torch.stack([low, high], dim=-1).reshape(R, 2 * h), 2 * (num_positives // 2))
    ((neg_rows, neg_count, neg_available),) = _top_rows(
        conf + 2.0, cand.negative[None], (num_negatives,), cand.fraction
    )
    return Sample(pos_rows, 2 * half, neg_rows, neg_count, pos_available, neg_available)
