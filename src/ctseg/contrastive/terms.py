"""Paper-mode loss terms, batched over (stage, class) rows (registry :data:`PAPER_TERMS`).

Input: projected samples, ``zp`` ``(R, P, d)`` positives and ``zn`` ``(R, M, d)`` (R = stages × classes)
negatives (unit rows, valid rows first, counts ``(K,)``), paired as described in ``sampling.py``.
Hard mining follows the paper's text: negative pairs sorted by similarity descending, positive pairs
(the two halves of the positives) ascending, the ``take_top`` fraction kept.
"""

from __future__ import annotations

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


def _negative_pairs(zp, zn, pos_count, neg_count, take_top) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities ``(R, n)`` of the pairs (positive j, negative j) and which are hard (most similar)."""
    n = min(zp.shape[1], zn.shape[1])
    sim = (zp[:, :n] * zn[:, :n]).sum(-1)
    valid = torch.arange(n, device=zp.device)[None, :] < torch.minimum(pos_count, neg_count)[:, None]
    return sim, hard_pairs(sim, valid, take_top, most_similar=True)


def _positive_pairs(zp, pos_count, take_top) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities ``(R, h)`` of the pairs (positive 2i, positive 2i+1) and which are hard (least similar)."""
    h = zp.shape[1] // 2
    sim = (zp[:, 0 : 2 * h : 2] * zp[:, 1 : 2 * h : 2]).sum(-1)
    valid = torch.arange(h, device=zp.device)[None, :] < (pos_count // 2)[:, None]
    return sim, hard_pairs(sim, valid, take_top, most_similar=False)


def cl_stage(zp, zn, pos_count, neg_count, cfg: CTConfig) -> StageTerms:
    """CL: mean CL over the hardest negative pairs (label 0) + over the hardest positive pairs (label 1)."""
    neg_sim, neg_keep = _negative_pairs(zp, zn, pos_count, neg_count, cfg.take_top)
    pos_sim, pos_keep = _positive_pairs(zp, pos_count, cfg.take_top)
    active = (pos_count >= cfg.min_positives) & (neg_count >= cfg.min_negatives)
    pos_active = active & (pos_count >= cfg.min_pair_positives)
    l_neg = masked_mean(cl_pair_loss(neg_sim, False, cfg.smoothing), neg_keep)
    l_pos = masked_mean(cl_pair_loss(pos_sim, True, cfg.smoothing), pos_keep)
    l_neg, l_pos = torch.where(active, l_neg, 0.0), torch.where(pos_active, l_pos, 0.0)
    pairs = neg_keep.sum(-1) * active + pos_keep.sum(-1) * pos_active
    return StageTerms(
        loss=l_neg + l_pos,
        terms=torch.stack([l_neg, l_pos], -1),
        term_active=torch.stack([active, pos_active], -1),
        active=active,
        pairs=pairs.to(torch.float32),
    )


def infonce_stage(zp, zn, pos_count, neg_count, cfg: CTConfig) -> StageTerms:
    """InfoNCE: queries/keys = the hardest (least similar) positive pairs; shared negatives = the
    negatives of the hardest (most similar) negative pairs; temperature ``cfg.temperature``.

    All pairs enter the batched products and the masks select the hard ones (the products are
    ``(R, h, n)`` with h, n ≤ 128 by default: cheaper than gathering the kept rows).
    """
    _neg_sim, neg_keep = _negative_pairs(zp, zn, pos_count, neg_count, cfg.take_top)
    _pos_sim, pos_keep = _positive_pairs(zp, pos_count, cfg.take_top)
    h, n = pos_keep.shape[1], neg_keep.shape[1]
    loss = info_nce(
        zp[:, 0 : 2 * h : 2], zp[:, 1 : 2 * h : 2], pos_keep, zn[:, :n], neg_keep, cfg.temperature
    )
    need_pos = max(cfg.min_positives, cfg.min_infonce)
    need_neg = max(cfg.min_negatives, cfg.min_infonce)
    active = (pos_count >= need_pos) & (neg_count >= need_neg)
    loss = torch.where(active, loss, 0.0)
    pairs = pos_keep.sum(-1) * (1 + neg_keep.sum(-1)) * active
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
