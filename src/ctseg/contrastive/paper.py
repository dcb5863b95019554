"""``mode="paper"``: the method as the paper describes it, vectorised, fixed-shape, no host syncs.

Per stage: sample a fixed budget of positives / negatives for every class at once, project only
those rows, mine hard pairs, compute the loss term of every class in one batched pass.
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
    total, rows = None, []
    for i, (s, feat, cnt, grid) in enumerate(zip(cfg.stages, features, counts, grids, strict=True)):
        conf = None if confidence is None else confidence[i]
        smp = sampler(cnt, grid.patch_pixels, cfg.num_positives, n_neg, confidence=conf)
        P = smp.pos_rows.shape[1]
        z = project_rows(heads[s], feat, torch.cat([smp.pos_rows, smp.neg_rows], dim=1))
        zp, zn = z[:, :P], z[:, P:]
        neg_count = smp.neg_count
        if cfg.gather_negatives:
            zn, neg_count = gather_negatives(zn, neg_count, process_group)
        out = kind.paper_stage(zp, zn, smp.pos_count, neg_count, cfg)
        stage_sum = out.loss.sum()
        total = stage_sum if total is None else total + stage_sum
        rows.append((out, smp.pos_count * out.active, neg_count * out.active))
    present = counts[0].sum(dim=(0, 2, 3)) > 0
    n_present = present.sum().clamp(min=1).to(torch.float32)
    return GroupResult(
        loss=total / len(cfg.stages) / n_present,
        positives=torch.stack([r[1] for r in rows]).to(torch.float32),
        negatives=torch.stack([r[2] for r in rows]).to(torch.float32),
        pairs=torch.stack([r[0].pairs for r in rows]),
        terms=torch.stack([r[0].terms for r in rows]).detach(),
        term_active=torch.stack([r[0].term_active for r in rows]),
        active=torch.stack([r[0].active for r in rows]),
        present=present,
    )
