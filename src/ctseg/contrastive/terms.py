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
import torch.nn.functional as F

from ctseg.contrastive.config import CTConfig
from ctseg.contrastive.constants import device_constant
from ctseg.contrastive.losses import cl_pair_loss, hard_pairs, info_nce, masked_mean
from ctseg.utils.registry import Registry


@dataclass
class StageTerms:
    """Per-class outcome of one stage: ``loss`` ``(K,)``, ``terms`` ``(K, T)``, ``term_active``
    ``(K, T)`` bool, ``active`` ``(K,)`` bool, ``pairs`` ``(K,)`` long."""

    loss: torch.Tensor
    terms: torch.Tensor
    term_active: torch.Tensor
    active: torch.Tensor
    pairs: torch.Tensor


@dataclass
class PairSets:
    """Both pair sets of every row, stacked so that mining and the CL term run once for both.

    Set 0 holds the negative pairs (positive j, negative j), set 1 the positive pairs (positive 2i,
    positive 2i+1), each padded to the wider of the two, ``W = max(n, h)``.

    Attributes:
        sim: ``(2, R, W)`` float: set 0 the pairs' cosine, set 1 its *negation*. Negated, a positive
            pair is hard when most similar, as a negative pair is, and its CL value with label 1 is
            the CL value of label 0 (``cl_pair_loss(c, True) == cl_pair_loss(-c, False)``: the
            smoothing term is even in ``c``): one mining and one CL evaluation serve both sets.
            Padding slots hold 0.
        keep: ``(2, R, W)`` bool, the hard pairs (valid pairs only).
        n, h: widths of the negative and the positive pair sets.
    """

    sim: torch.Tensor
    keep: torch.Tensor
    n: int
    h: int

    @property
    def negative_keep(self) -> torch.Tensor:
        """``(R, n)`` bool."""
        return self.keep[0, :, : self.n]

    @property
    def positive_keep(self) -> torch.Tensor:
        """``(R, h)`` bool."""
        return self.keep[1, :, : self.h]


# The pairs' rows are views chosen for a short backward: a slice's backward is a zero fill and a
# copy, a whole-width slice is left out, and an unbind's backward is one stack.
def negative_pair_rows(zp, zn) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the negative pairs (positive j, negative j), ``(R, n, d)`` each, n = min(P, M)."""
    n = min(zp.shape[1], zn.shape[1])
    return (zp if n == zp.shape[1] else zp[:, :n]), (zn if n == zn.shape[1] else zn[:, :n])


def positive_pair_rows(zp) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the positive pairs (positive 2i, positive 2i+1), ``(R, h, d)`` each, h = P // 2."""
    R, P, d = zp.shape
    h = P // 2
    if P % 2 == 0:
        even, odd = zp.reshape(R, h, 2, d).unbind(2)
        return even, odd
    return zp[:, 0 : 2 * h : 2], zp[:, 1 : 2 * h : 2]


def pair_sets(zp, zn, pos_count, neg_count, take_top) -> PairSets:
    """The negative and positive pairs of every row and the hardest ``take_top`` of each (negative
    pairs most similar, positive pairs least similar); see :class:`PairSets`."""
    first, second = negative_pair_rows(zp, zn)
    even, odd = positive_pair_rows(zp)
    n, h = first.shape[1], even.shape[1]
    W = max(n, h)
    neg = (first * second).sum(-1)  # (R, n)
    pos = (even * odd).sum(-1)  # (R, h)
    if n < W:
        neg = F.pad(neg, (0, W - n))
    if h < W:
        pos = F.pad(pos, (0, W - h))
    sim = torch.stack([neg, pos.neg()])
    # Valid: negative pair j while j < min(counts), positive pair i while 2i + 1 < pos_count.
    limits = torch.stack([torch.minimum(pos_count, neg_count), pos_count // 2])  # (2, R), each ≤ W
    slots = device_constant(("pair-slots", W), zp.device, lambda: torch.arange(W, device=zp.device))
    valid = slots < limits[..., None]
    keep = hard_pairs(sim.reshape(-1, W), valid.reshape(-1, W), take_top, True, n_valid=limits.reshape(-1))
    return PairSets(sim, keep.reshape(sim.shape), n, h)


def cl_stage(zp, zn, pos_count, neg_count, cfg: CTConfig) -> StageTerms:
    """CL: mean CL over the hardest negative pairs (label 0) + over the hardest positive pairs (label 1)."""
    pairs = pair_sets(zp, zn, pos_count, neg_count, cfg.take_top)
    active = (pos_count >= cfg.min_positives) & (neg_count >= cfg.min_negatives)
    term_active = torch.stack([active, active & (pos_count >= cfg.min_pair_positives)], -1)  # (R, 2)
    kept = pairs.keep.sum(-1)  # (2, R), also the pair stats
    means = masked_mean(cl_pair_loss(pairs.sim, False, cfg.smoothing), pairs.keep, count=kept)
    terms = torch.where(term_active, means.T, 0.0)  # (R, 2): loss_neg, loss_pos
    used = (kept.T * term_active).sum(-1)
    return StageTerms(
        loss=terms.sum(-1),
        terms=terms,
        term_active=term_active,
        active=active,
        pairs=used,
    )


def infonce_stage(zp, zn, pos_count, neg_count, cfg: CTConfig) -> StageTerms:
    """InfoNCE: queries/keys = the hardest (least similar) positive pairs; shared negatives = the
    negatives of the hardest (most similar) negative pairs; temperature ``cfg.temperature``.

    All pairs enter the batched products and the masks select the hard ones (the products are
    ``(R, h, n)`` with h, n ≤ 128 by default: cheaper than gathering the kept rows).
    """
    with torch.no_grad():  # the similarities only select pairs here
        pairs = pair_sets(zp, zn, pos_count, neg_count, cfg.take_top)
    even, odd = positive_pair_rows(zp)
    loss = info_nce(
        even, odd, pairs.positive_keep, negative_pair_rows(zp, zn)[1], pairs.negative_keep, cfg.temperature
    )
    need_pos = max(cfg.min_positives, cfg.min_infonce)
    need_neg = max(cfg.min_negatives, cfg.min_infonce)
    active = (pos_count >= need_pos) & (neg_count >= need_neg)
    loss = torch.where(active, loss, 0.0)
    used = pairs.positive_keep.sum(-1) * (1 + pairs.negative_keep.sum(-1)) * active
    return StageTerms(loss, loss[:, None], active[:, None], active, used)


StageTermFn = Callable[..., StageTerms]


@dataclass(frozen=True)
class LossKind:
    """A registered loss: its per-term stat names and its paper-mode stage function."""

    term_names: tuple[str, ...]
    paper_stage: StageTermFn


PAPER_TERMS: Registry[LossKind] = Registry("CT loss")
PAPER_TERMS.add("cl", LossKind(("loss_neg", "loss_pos"), cl_stage))
PAPER_TERMS.add("infonce", LossKind(("loss_infonce",), infonce_stage))
