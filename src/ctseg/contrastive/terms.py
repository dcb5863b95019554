"""Paper-mode loss terms, batched over (stage, class) rows (registry :data:`PAPER_TERMS`).

Input: projected samples, ``zp`` ``(R, P, d)`` positives and ``zn`` ``(R, M, d)`` (R = stages × classes)
negatives (unit rows, valid rows first, counts ``(K,)``), paired as described in ``sampling.py``.
Hard mining follows the paper's text: negative pairs sorted by similarity descending, positive pairs
(the two halves of the positives) ascending, the ``take_top`` fraction kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ctseg.contrastive.config import CTConfig
from ctseg.contrastive.losses import cl_pair_loss, hard_pairs, info_nce, masked_mean
from ctseg.utils.registry import Registry


@dataclass
class StageTerms:
    """Per-class outcome of one stage: ``loss`` ``(K,)``, ``terms`` ``(K, T)``, ``term_active``
    ``(K, T)`` bool, ``active`` ``(K,)`` bool, ``pairs`` ``(K,)`` float."""

    loss: torch.Tensor
    terms: torch.Tensor
    term_active: torch.Tensor
    active: torch.Tensor
    pairs: torch.Tensor


@dataclass
class _Pairs:
    sim: torch.Tensor  # (K, n)
    order: torch.Tensor  # (K, n) hardest first
    keep: torch.Tensor  # (K, n) bool, in sorted order


def _kept_bound(n: int, take_top: float) -> int:
    """Static upper bound of the number of pairs hard mining keeps out of ``n``."""
    return 0 if n == 0 else min(n, max(1, math.floor(n * take_top)))


def _negative_pairs(zp, zn, pos_count, neg_count, take_top) -> tuple[_Pairs, int]:
    n = min(zp.shape[1], zn.shape[1])
    sim = (zp[:, :n] * zn[:, :n]).sum(-1)
    valid = torch.arange(n, device=zp.device)[None, :] < torch.minimum(pos_count, neg_count)[:, None]
    order, keep = hard_pairs(sim, valid, take_top, most_similar=True)
    return _Pairs(sim, order, keep), n


def _positive_pairs(zp, pos_count, take_top) -> tuple[_Pairs, int]:
    h = zp.shape[1] // 2
    sim = (zp[:, 0 : 2 * h : 2] * zp[:, 1 : 2 * h : 2]).sum(-1)
    valid = torch.arange(h, device=zp.device)[None, :] < (pos_count // 2)[:, None]
    order, keep = hard_pairs(sim, valid, take_top, most_similar=False)
    return _Pairs(sim, order, keep), h


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(K, n, d)`` rows by ``index`` ``(K, q)`` → ``(K, q, d)``."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def cl_stage(zp, zn, pos_count, neg_count, cfg: CTConfig) -> StageTerms:
    """CL: mean CL over the hardest negative pairs (label 0) + over the hardest positive pairs (label 1)."""
    neg, _ = _negative_pairs(zp, zn, pos_count, neg_count, cfg.take_top)
    pos, _ = _positive_pairs(zp, pos_count, cfg.take_top)
    active = (pos_count >= cfg.min_positives) & (neg_count >= cfg.min_negatives)
    pos_active = active & (pos_count >= cfg.min_pair_positives)
    l_neg = masked_mean(cl_pair_loss(neg.sim.gather(1, neg.order), False, cfg.smoothing), neg.keep)
    l_pos = masked_mean(cl_pair_loss(pos.sim.gather(1, pos.order), True, cfg.smoothing), pos.keep)
    l_neg, l_pos = torch.where(active, l_neg, 0.0), torch.where(pos_active, l_pos, 0.0)
    pairs = neg.keep.sum(-1) * active + pos.keep.sum(-1) * pos_active
    return StageTerms(
        loss=l_neg + l_pos,
        terms=torch.stack([l_neg, l_pos], -1),
        term_active=torch.stack([active, pos_active], -1),
        active=active,
        pairs=pairs.to(torch.float32),
    )


def infonce_stage(zp, zn, pos_count, neg_count, cfg: CTConfig) -> StageTerms:
    """InfoNCE: queries/keys = the hardest (least similar) positive pairs; shared negatives = the
    negatives of the hardest (most similar) negative pairs; temperature ``cfg.temperature``."""
    neg, n = _negative_pairs(zp, zn, pos_count, neg_count, cfg.take_top)
    pos, h = _positive_pairs(zp, pos_count, cfg.take_top)
    q, m = _kept_bound(h, cfg.take_top), _kept_bound(n, cfg.take_top)
    pos_idx, neg_idx = pos.order[:, :q], neg.order[:, :m]
    query = _take(zp[:, 0 : 2 * h : 2], pos_idx)
    key = _take(zp[:, 1 : 2 * h : 2], pos_idx)
    negatives = _take(zn[:, :n], neg_idx)
    loss = info_nce(query, key, pos.keep[:, :q], negatives, neg.keep[:, :m], cfg.temperature)
    need_pos = max(cfg.min_positives, cfg.min_infonce)
    need_neg = max(cfg.min_negatives, cfg.min_infonce)
    active = (pos_count >= need_pos) & (neg_count >= need_neg)
    loss = torch.where(active, loss, 0.0)
    pairs = pos.keep[:, :q].sum(-1) * (1 + neg.keep[:, :m].sum(-1)) * active
    return StageTerms(loss, loss[:, None], active[:, None], active, pairs.to(torch.float32))


StageTermFn = Callable[..., StageTerms]


@dataclass(frozen=True)
class LossKind:
    """A registered loss: its per-term stat names and its paper-mode stage function."""

    term_names: tuple[str, ...]
    paper_stage: StageTermFn


PAPER_TERMS: Registry[LossKind] = Registry("CT loss")
PAPER_TERMS.add("cl", LossKind(("loss_neg", "loss_pos"), cl_stage))
PAPER_TERMS.add("infonce", LossKind(("loss_infonce",), infonce_stage))
