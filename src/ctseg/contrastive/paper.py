"""``mode="paper"``: the method as the paper describes it, vectorised, fixed-shape, no host syncs.

Three steps, each usable on its own (the CUDA-graph path of ``graphs.py`` captures the first and the
last and runs the gather between them eagerly):

1. :func:`sample_rows` — from the ground-truth patch counts only: a fixed budget of positive and
   negative patches per (group, stage, class), as flat indices into the feature maps;
2. :func:`gather_sampled_rows` — the sampled rows of every stage's feature map (one indexing op per stage,
   no copy of the maps; their gradient joins the maps' gradients late, ``heads.take_rows``);
3. :func:`paper_results` — projection heads, hard-pair mining and the loss terms of every
   (group, stage, class) in one batch.

Combination as in the authors' code: ``Σ_s Σ_c L_sc / S / (classes present)`` per group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ctseg.contrastive.config import CTConfig, GroupResult
from ctseg.contrastive.constants import device_constant
from ctseg.contrastive.distributed import gather_negatives, local_negative_budget
from ctseg.contrastive.heads import project_stages, split_rows, take_rows
from ctseg.contrastive.patches import StageGrid
from ctseg.contrastive.sampling import SAMPLERS, Sample, spread_rows, stage_candidates
from ctseg.contrastive.terms import PAPER_TERMS


@dataclass
class PaperSamples:
    """Sampled patch rows of G groups and S stages (fixed shapes: they depend on budgets only).

    Attributes:
        batch_index: per stage ``(G, K, P + M)`` long, the image (index in the whole batch) of every
            sampled row: the ``P`` positive slots of class c first, then its ``M`` negative slots.
        patch_index: per stage ``(G, K, P + M)`` long, the patch ``i·w + j`` within that image.
        pos_count: ``(G, S, K)`` long, valid positive slots (valid slots come first).
        neg_count: ``(G, S, K)`` long, valid negative slots.
        present: ``(G, K)`` bool, the class occurs in the group's mask.
        num_positive_slots: P.
    """

    batch_index: list[torch.Tensor]
    patch_index: list[torch.Tensor]
    pos_count: torch.Tensor
    neg_count: torch.Tensor
    present: torch.Tensor
    num_positive_slots: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Flat tuple ``(*batch_index, *patch_index, pos_count, neg_count, present)``."""
        return (*self.batch_index, *self.patch_index, self.pos_count, self.neg_count, self.present)

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], num_positive_slots: int) -> PaperSamples:
        S = (len(tensors) - 3) // 2
        return cls(
            list(tensors[:S]),
            list(tensors[S : 2 * S]),
            *tensors[2 * S :],
            num_positive_slots=num_positive_slots,
        )


def group_bounds(batch_size: int, group_size: int | None) -> list[tuple[int, int]]:
    """``[(b0, b1), ...]``: images of every group (the last one may be smaller)."""
    g = batch_size if group_size is None else group_size
    return [(b0, min(b0 + g, batch_size)) for b0 in range(0, batch_size, g)]


def stage_batches(grids: Sequence[StageGrid]) -> list[list[int]]:
    """Consecutive stages sampled together (indices into ``grids``).

    Stages sampled together are padded to the widest one's patches (:class:`~ctseg.contrastive.
    sampling.Candidates`). A stage joins the previous ones while the padded batch stays no larger
    than the largest stage alone, so the sampling's peak memory is that of sampling stage by stage.
    For a pyramid of strides 4, 8, 16, 32: {4} and {8, 16, 32}, half the launches of one batch per
    stage (one batch of all four would hold 4× the stride-4 map).
    """
    capacity = max(gr.h * gr.w for gr in grids)
    batches: list[list[int]] = []
    for s in range(len(grids)):
        if batches:
            members = [*batches[-1], s]
            if len(members) * max(grids[i].h * grids[i].w for i in members) <= capacity:
                batches[-1].append(s)
                continue
        batches.append([s])
    return batches


def _sample_batch(
    cfg: CTConfig,
    counts: Sequence[torch.Tensor],
    grids: Sequence[StageGrid],
    confidence: Sequence[torch.Tensor] | None,
    bounds: Sequence[tuple[int, int]],
    num_negatives: int,
) -> tuple[torch.Tensor, torch.Tensor, Sample]:
    """One draw for the given stages: image and patch indices ``(G, S_b, K, P + M)`` and the sample
    (rows in (group, stage, class) order)."""
    B, K = counts[0].shape[:2]
    G, S = len(bounds), len(grids)
    cand = stage_candidates(counts, grids, bounds)
    conf = None if confidence is None else spread_rows(confidence, grids, bounds, 0.0)
    smp = SAMPLERS[cfg.sampling](cand, cfg.num_positives, num_negatives, confidence=conf)
    columns = torch.cat([smp.pos_rows, smp.neg_rows], dim=1)  # (G·S·K, P + M): b·n + p
    image, patch = split_rows(columns, cand.columns_per_image)
    image, patch = image.reshape(G, S, K, -1), patch.reshape(G, S, K, -1)
    if G > 1:  # image within the group → image within the batch
        g, device = bounds[1][0], image.device
        offsets = device_constant(
            ("group-offsets", G, g), device, lambda: g * torch.arange(G, device=device).reshape(G, 1, 1, 1)
        )
        image = image + offsets
    # Where a (group, stage) has fewer patches than a budget, slots beyond the valid count hold
    # padding columns; point them at a real row (they are never read as valid).
    smallest = min(b1 - b0 for b0, b1 in bounds)
    budget = max(smp.pos_rows.shape[1], num_negatives)
    short = [s for s, gr in enumerate(grids) if smallest * gr.h * gr.w < budget]
    if short:
        image = image.clamp(max=B - 1)
        for s in short:
            patch[:, s].clamp_(max=grids[s].h * grids[s].w - 1)
    return image, patch, smp


def _present(smp: Sample, grid: StageGrid, bounds: Sequence[tuple[int, int]], S: int, K: int) -> torch.Tensor:
    """``(G, K)`` bool: the class occurs in the group. That is, some real patch of the batch's first
    stage has a share of it: not all of its real patches are negatives. Read from the counts the
    sampler made anyway, instead of a second pass over the ``(R, N)`` fractions."""
    neg_available = smp.neg_available.reshape(len(bounds), S, K)[:, 0]  # (G, K)
    real = [(b1 - b0) * grid.h * grid.w for b0, b1 in bounds]  # real patches of each group
    if len(set(real)) == 1:
        return neg_available < real[0]
    device = neg_available.device
    per_group = device_constant(("group-patches", tuple(real)), device, lambda: _group_column(real, device))
    return neg_available < per_group


def _group_column(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(G, 1)`` long from at most two distinct values, the first G − 1 equal (group sizes), made
    by device operators only (a host-to-device copy from pageable memory would synchronise)."""
    column = torch.full((len(values), 1), values[0], dtype=torch.long, device=device)
    column[-1] = values[-1]
    return column


def sample_rows(
    cfg: CTConfig,
    counts: Sequence[torch.Tensor],
    grids: Sequence[StageGrid],
    confidence: Sequence[torch.Tensor] | None,
    group_size: int | None,
    process_group: object | None = None,
) -> PaperSamples:
    """Sample the rows of every group and stage: one draw and one selection per batch of stages
    (:func:`stage_batches`) for all groups and classes.

    Args:
        counts: per used stage ``(B, K, h_s, w_s)`` class pixel counts (``patches.py``).
        grids: per used stage geometry.
        confidence: per used stage ``(B, K, h_s, w_s)`` mean class probability, or None.
        group_size: images per group (None: one group).
    """
    n_neg = local_negative_budget(cfg.num_negatives, cfg.gather_negatives, process_group)
    B, K = counts[0].shape[:2]
    bounds = group_bounds(B, group_size)
    G = len(bounds)
    images, patches, pos_count, neg_count = [], [], [], []
    present = None
    for batch in stage_batches(grids):
        image, patch, smp = _sample_batch(
            cfg,
            [counts[s] for s in batch],
            [grids[s] for s in batch],
            None if confidence is None else [confidence[s] for s in batch],
            bounds,
            n_neg,
        )
        images += [image[:, i] for i in range(len(batch))]
        patches += [patch[:, i] for i in range(len(batch))]
        pos_count.append(smp.pos_count.reshape(G, len(batch), K))
        neg_count.append(smp.neg_count.reshape(G, len(batch), K))
        if present is None:
            present = _present(smp, grids[batch[0]], bounds, len(batch), K)
    return PaperSamples(
        images,
        patches,
        pos_count[0] if len(pos_count) == 1 else torch.cat(pos_count, 1),
        neg_count[0] if len(neg_count) == 1 else torch.cat(neg_count, 1),
        present,
        smp.pos_rows.shape[1],
    )


def gather_sampled_rows(features: Sequence[torch.Tensor], samples: PaperSamples) -> list[torch.Tensor]:
    """Sampled rows of every stage: ``(B, C_s, h_s, w_s)`` maps → ``(G, K, P + M, C_s)`` rows
    (:func:`~ctseg.contrastive.heads.take_rows`: one indexing op per stage)."""
    return [
        take_rows(f, bi, pi)
        for f, bi, pi in zip(features, samples.batch_index, samples.patch_index, strict=True)
    ]


def split_samples(z: torch.Tensor, num_positives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, P + M, d)`` projected samples → positives ``(R, P, d)`` and negatives ``(R, M, d)``.

    With ``P == M`` as one ``unbind``, whose backward is one stack: a slice's backward is a zero fill
    and a copy, and the two slices' gradients are then added (on a GPU, launches are the loss's cost).
    """
    R, N, d = z.shape
    if 2 * num_positives == N:
        zp, zn = z.reshape(R, 2, num_positives, d).unbind(1)
        return zp, zn
    return z[:, :num_positives], z[:, num_positives:]


def paper_results(
    cfg: CTConfig,
    heads: nn.ModuleList,
    rows: Sequence[torch.Tensor],
    samples: PaperSamples,
    process_group: object | None = None,
    head_params: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> GroupResult:
    """Projection, hard mining and loss terms of every (group, stage, class) in one batch.

    Args:
        rows: per used stage ``(G, K, P + M, C_s)`` feature rows (:func:`gather_sampled_rows`).
        head_params: per used stage the head's parameters by name, used instead of the modules' own
            (:func:`~ctseg.contrastive.heads.project_stages`); None: the modules' parameters.

    Returns:
        a :class:`GroupResult` with a leading group dimension G on every field.
    """
    kind = PAPER_TERMS[cfg.loss]
    S, K, P = len(cfg.stages), cfg.num_classes, samples.num_positive_slots
    z = project_stages([heads[s] for s in cfg.stages], rows, head_params).transpose(0, 1)  # (G, S, K, P+M, d)
    G = z.shape[0]
    # Every (group, stage, class) shares the sample widths: the terms run as one batch of G·S·K rows.
    zp, zn = split_samples(z.reshape(G * S * K, z.shape[3], -1), P)
    pos_all, neg_all = samples.pos_count.reshape(-1), samples.neg_count.reshape(-1)
    if cfg.gather_negatives:
        zn, neg_all = gather_negatives(zn, neg_all, process_group)
    out = kind.paper_stage(zp, zn, pos_all, neg_all, cfg)
    divisor = samples.present.sum(-1).clamp(min=1) * S  # (G,): S × classes present
    counts = torch.stack([pos_all, neg_all, out.pairs]) * out.active  # (3, G·S·K): used by active terms
    return GroupResult(
        loss=out.loss.reshape(G, S * K).sum(-1) / divisor,
        counts=counts.to(torch.float32).reshape(3, G, S, K),
        terms=out.terms.reshape(G, S, K, -1).detach(),
        term_active=out.term_active.reshape(G, S, K, -1),
        active=out.active.reshape(G, S, K),
        present=samples.present,
    )
