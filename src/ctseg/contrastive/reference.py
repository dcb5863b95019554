"""``mode="reference"``: the authors' paper-era code (commit ``71f35b9``, spec §1.3), reproduced exactly.

Same class set (classes present in the group's mask), same minimum counts, same pair counts, the CL
"sort" that is a no-op (so CL keeps the first ``take_top`` share of *randomly* permuted pairs), the
InfoNCE sort that is real, the division by stages and classes, and the same global CPU RNG draws
(two ``torch.randperm`` per (stage, class) with ≥ ``min_positives`` / ``min_negatives`` samples,
positives first, stages outer, classes ascending). After ``torch.manual_seed(k)`` the value equals a
loop implementation of §1.3.

What differs from the authors' code is only the cost: GT patches come from one pooling, and the
projection runs once on each distinct row that some loss term actually reads (same values, same
gradients; on Dubai 512² crops ≈ 80% of the stage-0 rows, 65% at stage 2).
Host synchronisation is inherent here (the permutation sizes are data-dependent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ctseg.contrastive.config import CTConfig, GroupResult
from ctseg.contrastive.heads import project_rows
from ctseg.contrastive.losses import cl_pair_loss, info_nce
from ctseg.contrastive.patches import StageGrid
from ctseg.utils.registry import Registry


@dataclass
class _Plan:
    """Rows one (stage, class) term reads, as index slices into one projected batch."""

    c: int
    segments: list[torch.Tensor]  # CPU long tensors of flat patch rows
    n_pos: int
    n_neg: int


def _cl_plan(c: int, pos: torch.Tensor, neg: torch.Tensor, cfg: CTConfig) -> _Plan:
    """Reference CL: negative pairs ``(P[:kn], N[:kn])``, kn = int(min(n_pos, n_neg)·take_top);
    positive pairs ``(P[:kh], P[h:h+kh])``, h = n_pos // 2, kh = int(h·take_top), if n_pos ≥ 10."""
    P = pos[torch.randperm(len(pos))]
    N = neg[torch.randperm(len(neg))]
    kn = int(min(len(P), len(N)) * cfg.take_top)
    segs = [P[:kn], N[:kn]]
    if len(P) >= cfg.min_pair_positives:
        h = len(P) // 2
        kh = int(h * cfg.take_top)
        segs += [P[:kh], P[h : h + kh]]
    return _Plan(c, segs, len(P), len(N))


def _cl_loss(
    z: Sequence[torch.Tensor], cfg: CTConfig
) -> tuple[torch.Tensor, list[torch.Tensor], list[bool], int]:
    def term(a: torch.Tensor, b: torch.Tensor, same: bool) -> torch.Tensor:
        if len(a) == 0:  # only with take_top < 2/min_negatives; the reference would give NaN here
            return torch.zeros((), device=a.device)
        return cl_pair_loss((a * b).sum(-1), same, cfg.smoothing).mean()

    l_neg = term(z[0], z[1], False)
    if len(z) == 2:
        return l_neg, [l_neg, torch.zeros_like(l_neg)], [True, False], len(z[0])
    l_pos = term(z[2], z[3], True)
    return l_neg + l_pos, [l_neg, l_pos], [True, True], len(z[0]) + len(z[2])


def _infonce_plan(c: int, pos: torch.Tensor, neg: torch.Tensor, cfg: CTConfig) -> _Plan:
    """Reference InfoNCE: m = min(n_pos, n_neg, 2000) zipped pairs (drawn even when one side has
    fewer than ``min_infonce`` rows, in which case the term is 0)."""
    P = pos[torch.randperm(len(pos))]
    N = neg[torch.randperm(len(neg))]
    if min(len(P), len(N)) < cfg.min_infonce:
        return _Plan(c, [], len(P), len(N))
    m = min(len(P), len(N), cfg.infonce_max_pairs)
    return _Plan(c, [P[:m], N[:m]], len(P), len(N))


def _infonce_loss(
    z: Sequence[torch.Tensor], cfg: CTConfig
) -> tuple[torch.Tensor, list[torch.Tensor], list[bool], int]:
    P, N = z
    order = torch.argsort((P * N).sum(-1), descending=True)
    keep = order[: int(len(P) * cfg.take_top)]
    P, N = P[keep], N[keep]
    q = len(keep) // 2
    ones = torch.ones(1, q, dtype=torch.bool, device=P.device)
    loss = info_nce(
        P[None, :q],
        P[None, q : 2 * q],
        ones,
        N[None],
        torch.ones(1, len(N), dtype=torch.bool, device=P.device),
        cfg.temperature,
    )[0]
    return loss, [loss], [True], q * (1 + len(N))


_PlanFn = Callable[[int, torch.Tensor, torch.Tensor, CTConfig], _Plan]
_LossFn = Callable[
    [Sequence[torch.Tensor], CTConfig], tuple[torch.Tensor, list[torch.Tensor], list[bool], int]
]
REFERENCE_TERMS: Registry[tuple[_PlanFn, _LossFn, int]] = Registry("CT reference loss")
REFERENCE_TERMS.add("cl", (_cl_plan, _cl_loss, 2))
REFERENCE_TERMS.add("infonce", (_infonce_plan, _infonce_loss, 1))


def reference_group(
    cfg: CTConfig,
    heads: nn.ModuleList,
    features: Sequence[torch.Tensor],
    counts: Sequence[torch.Tensor],
    grids: Sequence[StageGrid],
) -> GroupResult:
    """CT loss of one group (one data-parallel replica of the reference). Shapes as ``paper_group``."""
    plan_fn, loss_fn, T = REFERENCE_TERMS[cfg.loss]
    K, S = cfg.num_classes, len(cfg.stages)
    device = features[0].device
    counts_cpu = [c.cpu() for c in counts]  # one transfer per stage; sizes drive the CPU randperms
    present = counts_cpu[0].sum(dim=(0, 2, 3)) > 0
    classes = [int(c) for c in torch.nonzero(present).flatten()]
    stat = torch.zeros(3, S, K)  # positives, negatives, pairs
    terms = [[[torch.zeros((), device=device)] * T for _ in range(K)] for _ in range(S)]
    term_active = torch.zeros(S, K, T, dtype=torch.bool)
    active = torch.zeros(S, K, dtype=torch.bool)
    total = None
    for i, (s, feat, cnt, grid) in enumerate(zip(cfg.stages, features, counts_cpu, grids, strict=True)):
        flat = cnt.transpose(0, 1).reshape(K, -1)
        plans = []
        for c in classes:
            pos = torch.nonzero(flat[c] == grid.patch_pixels).flatten()
            neg = torch.nonzero(flat[c] == 0).flatten()
            if len(pos) < cfg.min_positives or len(neg) < cfg.min_negatives:
                continue
            plans.append(plan_fn(c, pos, neg, cfg))
        segments = [seg for p in plans for seg in p.segments]
        if not segments:
            continue
        # Terms share rows (CL's two prefixes of P, negatives of one class that are another's
        # positives): project each distinct row once, then spread the results to the segments.
        rows, inverse = torch.unique(torch.cat(segments), return_inverse=True)
        z_rows = project_rows(heads[s], feat, rows.to(device))
        z = torch.split(z_rows[inverse.to(device)], [len(seg) for seg in segments])
        at = 0
        for p in plans:
            if not p.segments:
                continue
            loss, vals, act, n_pairs = loss_fn(z[at : at + len(p.segments)], cfg)
            at += len(p.segments)
            total = loss if total is None else total + loss
            terms[i][p.c] = vals
            term_active[i, p.c] = torch.tensor(act)
            active[i, p.c] = True
            stat[:, i, p.c] = torch.tensor([p.n_pos, p.n_neg, n_pairs], dtype=torch.float32)
    # An exact zero that depends on every head (DDP then sees no unused parameter) and, when no term
    # was active, on the features (the loss stays attached to the graph). Paper mode needs none: its
    # fixed-shape sampling always projects rows of every stage.
    anchor = [p.reshape(-1)[:1].sum() for s in cfg.stages for p in heads[s].parameters()]
    if total is None:
        anchor += [f.reshape(-1)[:1].sum().float() for f in features]
        total = torch.zeros((), device=device)
    loss = (total + torch.stack(anchor).sum() * 0.0) / S / max(len(classes), 1)
    return GroupResult(
        loss=loss,
        positives=stat[0].to(device),
        negatives=stat[1].to(device),
        pairs=stat[2].to(device),
        terms=torch.stack([torch.stack([torch.stack(t) for t in row]) for row in terms]).detach(),
        term_active=term_active.to(device),
        active=active.to(device),
        present=present.to(device),
    )
