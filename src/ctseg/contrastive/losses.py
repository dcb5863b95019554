"""Pair losses of CT: the paper's CL (soft cross-entropy on a [0, 1] similarity) and InfoNCE.

Everything here is batched over a leading class dimension ``K`` and works on fixed-size, masked
tensors, so the paper mode needs neither Python loops over classes nor host synchronisations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctseg.contrastive.constants import device_constant

# Per-pair CL value range with smoothing 0.1: label 1 at cos = 1 / 0 / -1 → 0.3633 / 0.6931 / 1.2633.
CL_MIN, CL_MAX = 0.3633, 1.2633


def cl_pair_loss(cos: torch.Tensor, same: bool | torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """CL value of every pair, elementwise over ``cos`` (any shape).

    ``same`` is the label: one for all pairs, or a bool tensor of ``cos``'s shape (pairs of several
    terms evaluated at once).

    The reference maps ``s = (cos + 1) / 2`` and feeds ``[1 − s, s]`` to a 2-way soft cross-entropy
    *as logits*; their difference is ``2s − 1 = cos``, so ``log p(same) = logsigmoid(cos)`` and
    ``log p(different) = logsigmoid(−cos)``. The loss ``(1 − ε)·(−log p[label]) + (ε / 2)·(−log p(same)
    − log p(different))`` is then, with ``x = cos`` for label 0 and ``x = −cos`` for label 1,
    ``softplus(x) − (ε / 2)·x`` (as ``logsigmoid(x) − logsigmoid(−x) = x``): two operators instead of
    eight, and a backward of three. A label-1 pair at ``cos`` has exactly the value of a label-0 pair
    at ``−cos``.
    """
    if isinstance(same, torch.Tensor):
        x = torch.where(same, -cos, cos)
    else:
        x = -cos if same else cos
    return torch.sub(F.softplus(x), x, alpha=smoothing / 2.0)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int = -1, count: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` along ``dim``; 0 (not NaN) where nothing is selected.
    ``count``: ``mask.sum(dim)``, when the caller needs it too and has made it already."""
    total = torch.where(mask, values, 0.0).sum(dim)
    return total / (mask.sum(dim) if count is None else count).clamp(min=1)


def keep_counts(n_valid: torch.Tensor, take_top: float, width: int) -> torch.Tensor:
    """How many of ``n_valid`` pairs hard mining keeps: ``floor(n · take_top)``, at least one when any
    pair exists. ``n_valid`` holds integers in ``[0, width]``; looked up in a table of the ``width +
    1`` answers, built once per device (five operators fewer per call than computing them)."""
    table = device_constant(
        ("hard-pair-keep-counts", float(take_top), int(width)),
        n_valid.device,
        lambda: _keep_count_table(take_top, width, n_valid.device),
    )
    return table[n_valid]


def _keep_count_table(take_top: float, width: int, device: torch.device) -> torch.Tensor:
    n = torch.arange(width + 1, device=device)
    kept = torch.floor(n.to(torch.float64) * take_top).to(torch.long)
    return torch.where(n > 0, kept.clamp(min=1), kept)


def hard_pairs(
    sim: torch.Tensor,
    valid: torch.Tensor,
    take_top: float,
    most_similar: bool,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive hard-pair mining: keep the ``take_top`` fraction of the most (or least) similar valid pairs.

    Args:
        sim: ``(K, n)`` pair similarities.
        valid: ``(K, n)`` bool, which pairs exist.
        take_top: fraction kept; at least one pair is kept when any exists.
        most_similar: True for hard negatives (descending), False for hard positives (ascending).
        n_valid: ``(K,)`` long, ``valid.sum(-1)`` when the caller knows it already.

    Returns:
        ``keep`` ``(K, n)`` bool, in the pairs' own order: the pair is among the hardest. The loss is
        then a masked mean over all pairs: no gather in sorted order, hence no scatter in the backward
        (atomics on CUDA, and not recordable in a CUDA graph under deterministic algorithms).
    """
    fill = float("-inf") if most_similar else float("inf")
    key = torch.where(valid, sim.detach(), fill)
    order = torch.sort(key, dim=-1, descending=most_similar, stable=True).indices  # hardest first
    rank = torch.argsort(order, dim=-1)  # position of every pair in that order (sort: deterministic)
    if n_valid is None:
        n_valid = valid.sum(-1)
    return rank < keep_counts(n_valid, take_top, sim.shape[-1])[:, None]


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    query_valid: torch.Tensor,
    negatives: torch.Tensor,
    negatives_valid: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """InfoNCE with one positive key per query and a shared ("unpaired") negative set, per class.

    Args:
        query, key: ``(K, Q, d)`` unit vectors; row i of ``key`` is the positive of row i of ``query``.
        query_valid: ``(K, Q)`` bool.
        negatives: ``(K, M, d)`` unit vectors, shared by all queries of a class.
        negatives_valid: ``(K, M)`` bool.

    Returns:
        ``(K,)`` mean cross-entropy over the valid queries (target = the positive key); 0 where a
        class has no valid query.
    """
    query = query / temperature  # (K, Q, d): scaled before the products, not the (K, Q, M) logits
    pos = (query * key).sum(-1)  # (K, Q)
    neg = torch.bmm(query, negatives.transpose(1, 2))  # (K, Q, M)
    # In place: bmm saves its inputs, not its output. Cross-entropy with the positive as target is
    # log(e^pos + Σ e^neg) − pos = softplus(logsumexp(neg) − pos), with no (K, Q, 1 + M) logits tensor
    # (the reference mode's padded terms make these the loss's largest tensors).
    neg.masked_fill_(~negatives_valid[:, None, :], float("-inf"))
    per_query = F.softplus(torch.logsumexp(neg, dim=-1) - pos)
    return masked_mean(per_query, query_valid)
