"""``mode="paper"``: the method as the paper describes it, vectorised, fixed-shape, no host syncs.

Per stage: sample a fixed budget of positives / negatives for every class at once and project only
those rows; then mine hard pairs and compute the loss terms of every (stage, class) in one batch.
Combination as in the authors' code: ``Σ_s Σ_c L_sc / S / (classes present)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ctseg.contrastive.config import CTConfig, GroupResult
from ctseg.contrastive.distributed import gather_negatives, local_negative_budget
from ctseg.contrastive.heads import project_rows
from ctseg.contrastive.patches import StageGrid
from ctseg.contrastive.sampling import SAMPLERS
from ctseg.contrastive.terms import PAPER_TERMS


def paper_group(
    cfg: CTConfig,
    heads: nn.ModuleList,
    features: Sequence[torch.Tensor],
    counts: Sequence[torch.Tensor],
    grids: Sequence[StageGrid],
    confidence: Sequence[torch.Tensor] | None,
    process_group: object | None = None,
) -> GroupResult:
    """CT loss of one group of G images.

    Args:
        features: per used stage ``(G, C_s, h_s, w_s)``.
        counts: per used stage ``(G, K, h_s, w_s)`` class pixel counts (``patches.py``).
        grids: per used stage geometry.
        confidence: per used stage ``(G, K, h_s, w_s)`` mean class probability, or None.
    """
    kind = PAPER_TERMS[cfg.loss]
    sampler = SAMPLERS[cfg.sampling]
    n_neg = local_negative_budget(cfg.num_negatives, cfg.gather_negatives, process_group)
    zp, zn, pos_count, neg_count = [], [], [], []
    for i, (s, feat, cnt, grid) in enumerate(zip(cfg.stages, features, counts, grids, strict=True)):
        conf = None if confidence is None else confidence[i]
        smp = sampler(cnt, grid.patch_pixels, cfg.num_positives, n_neg, confidence=conf)
        P = smp.pos_rows.shape[1]
        z = project_rows(heads[s], feat, torch.cat([smp.pos_rows, smp.neg_rows], dim=1))
        zp.append(z[:, :P])
        zn.append(z[:, P:])
        pos_count.append(smp.pos_count)
        neg_count.append(smp.neg_count)
    # All stages share the sample widths: the loss terms of every (stage, class) run as one batch
    # of S·K rows (a quarter of the kernel launches of a per-stage loop).
    S, K = len(cfg.stages), cfg.num_classes
    zp_all, zn_all = torch.cat(zp), torch.cat(zn)
    pos_all, neg_all = torch.cat(pos_count), torch.cat(neg_count)
    if cfg.gather_negatives:
        zn_all, neg_all = gather_negatives(zn_all, neg_all, process_group)
    out = kind.paper_stage(zp_all, zn_all, pos_all, neg_all, cfg)
    present = counts[0].sum(dim=(0, 2, 3)) > 0
    n_present = present.sum().clamp(min=1).to(torch.float32)
    return GroupResult(
        loss=out.loss.sum() / S / n_present,
        positives=(pos_all * out.active).reshape(S, K).to(torch.float32),
        negatives=(neg_all * out.active).reshape(S, K).to(torch.float32),
        pairs=out.pairs.reshape(S, K),
        terms=out.terms.reshape(S, K, -1).detach(),
        term_active=out.term_active.reshape(S, K, -1),
        active=out.active.reshape(S, K),
        present=present,
    )
