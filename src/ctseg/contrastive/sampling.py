"""Paper-mode sampling: a fixed budget of positive and negative patch rows per (stage, class).

Samplers are batched over all classes of a stage and return fixed-shape index tensors plus per-class
counts of valid entries (valid entries first), so nothing depends on data-dependent shapes and no
host synchronisation is needed. Registry: :data:`SAMPLERS` (``"random"``, ``"confidence"``).

Pairing convention used by the paper-mode loss (see ``paper.py``):

* positive pairs: ``(pos[:, 2i], pos[:, 2i+1])``, valid while ``2i + 1 < pos_count`` — the positive
  sample split into two halves;
* negative pairs: ``(pos[:, j], neg[:, j])``, valid while ``j < min(pos_count, neg_count)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ctseg.utils.registry import Registry


@dataclass
class StageSample:
    """Sampled rows of one stage (flat patch indices ``b·h·w + i·w + j`` within the group).

    Widths depend on the budgets only (not on the map size), so stages can be concatenated.

    Attributes:
        pos_rows: ``(K, P)`` long; the first ``pos_count[c]`` entries of row c are valid.
        pos_count: ``(K,)`` long.
        neg_rows: ``(K, M)`` long; the first ``neg_count[c]`` entries of row c are valid.
        neg_count: ``(K,)`` long.
        pos_available, neg_available: ``(K,)`` long, how many positives / negatives the stage had.
    """

    pos_rows: torch.Tensor
    pos_count: torch.Tensor
    neg_rows: torch.Tensor
    neg_count: torch.Tensor
    pos_available: torch.Tensor
    neg_available: torch.Tensor


Sampler = Callable[..., StageSample]
SAMPLERS: Registry[Sampler] = Registry("CT sampling")


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    return SAMPLERS.register(name)


def candidate_masks(counts: torch.Tensor, patch_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, K, h, w)`` class counts → positive and negative masks ``(K, N)`` with N = G·h·w rows in
    (b, i, j) row-major order. Positive: every pixel is the class; negative: no pixel is."""
    K = counts.shape[1]
    flat = counts.transpose(0, 1).reshape(K, -1)
    return flat == patch_pixels, flat == 0


def _pad_columns(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Pad ``(K, k)`` row indices to ``(K, width)`` with row 0 (beyond the valid count, never read as
    valid), so that every stage has the same sample width and stages can be batched."""
    return rows if rows.shape[1] == width else torch.nn.functional.pad(rows, (0, width - rows.shape[1]))


def _top_rows(
    keys: torch.Tensor, eligible: torch.Tensor, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the ``budget`` largest keys among eligible ones, eligible first: ``(K, budget)``, and
    per class the valid count ``(K,)`` and the number of eligible rows ``(K,)``."""
    k = min(budget, keys.shape[-1])
    masked = torch.where(eligible, keys, -1.0)
    rows = torch.topk(masked, k, dim=-1, largest=True, sorted=True).indices
    available = eligible.sum(-1)
    return _pad_columns(rows, budget), torch.clamp(available, max=k), available


@register_sampler("random")
def random_sample(
    counts: torch.Tensor,
    patch_pixels: int,
    num_positives: int,
    num_negatives: int,
    confidence: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StageSample:
    """Uniform sampling without replacement: each class keeps the rows with the largest i.i.d.
    uniform keys among its candidates (a random permutation truncated to the budget).

    One ``rand(K, N)`` serves both sets: positives and negatives of a class are disjoint, so their keys
    are independent. ``confidence`` is ignored.
    """
    pos_mask, neg_mask = candidate_masks(counts, patch_pixels)
    keys = torch.rand(pos_mask.shape, device=counts.device, generator=generator)
    pos_rows, pos_count, pos_available = _top_rows(keys, pos_mask, num_positives)
    neg_rows, neg_count, neg_available = _top_rows(keys, neg_mask, num_negatives)
    return StageSample(pos_rows, pos_count, neg_rows, neg_count, pos_available, neg_available)


@register_sampler("confidence")
def confidence_sample(
    counts: torch.Tensor,
    patch_pixels: int,
    num_positives: int,
    num_negatives: int,
    confidence: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StageSample:
    """Sampling by predicted confidence (spec §1.4, the HEAD variant), per class c:

    * positives: the ``h = num_positives // 2`` least confident and the ``h`` most confident positives
      (at most half of the candidates each, so the two halves never overlap), interleaved so that
      positive pair i is (i-th least confident, i-th most confident);
    * negatives: the ``num_negatives`` negatives with the highest predicted probability of c
      (confidently wrong).

    ``confidence``: ``(G, K, h, w)`` mean predicted probability of each class over each patch.
    """
    if confidence is None:
        raise ValueError("confidence sampling needs the per-patch class probabilities")
    pos_mask, neg_mask = candidate_masks(counts, patch_pixels)
    K, N = pos_mask.shape
    conf = confidence.detach().transpose(0, 1).reshape(K, N).to(torch.float32)
    inf = torch.full((), float("inf"), device=conf.device)
    order = torch.sort(
        torch.where(pos_mask, conf, inf), dim=-1, stable=True
    ).indices  # ascending, eligible first
    pos_available = pos_mask.sum(-1)
    h = min(num_positives // 2, N // 2)
    half = torch.minimum(pos_available // 2, torch.full_like(pos_available, h))
    i = torch.arange(h, device=conf.device)
    low = order[:, :h]
    high = order.gather(1, (pos_available[:, None] - 1 - i[None, :]).clamp(min=0))
    pos_rows = _pad_columns(torch.stack([low, high], dim=-1).reshape(K, 2 * h), 2 * (num_positives // 2))
    neg_rows, neg_count, neg_available = _top_rows(conf, neg_mask, num_negatives)
    return StageSample(pos_rows, 2 * half, neg_rows, neg_count, pos_available, neg_available)
