"""Paper-mode sampling of all groups, stages and classes at once (``sample_rows``)."""

from __future__ import annotations

import pytest
import torch

from ctseg.contrastive import PatchContrastiveLoss
from ctseg.contrastive.paper import group_bounds, sample_rows
from ctseg.contrastive.patches import patch_class_counts, stage_grids
from tests.contrastive.helpers import blocky_mask

SIZE = 64
STAGE_HW = [(16, 16), (8, 8), (4, 4), (2, 2)]  # strides 4, 8, 16, 32: the last map has 4 patches


def _sample(sampling: str, batch: int, group_size: int | None, budgets: tuple[int, int], seed: int):
    K = 3
    mask = blocky_mask(batch, SIZE, SIZE, K, 6, block=8, seed=seed, ignore_frac=0.1)
    grids = stage_grids((SIZE, SIZE), STAGE_HW, range(4))
    counts = patch_class_counts(mask, K, grids)
    fn = PatchContrastiveLoss(
        [8] * 4, K, 6, sampling=sampling, num_positives=budgets[0], num_negatives=budgets[1]
    )
    conf = None
    if sampling == "confidence":
        g = torch.Generator().manual_seed(seed)
        conf = [torch.rand(batch, K, h, w, generator=g) for h, w in STAGE_HW]
    torch.manual_seed(seed)
    return sample_rows(fn.cfg, counts, grids, conf, group_size), counts, grids


@pytest.mark.parametrize("sampling", ["random", "confidence"])
@pytest.mark.parametrize(
    ("batch", "group_size", "budgets"),
    [(2, None, (16, 12)), (5, 2, (16, 12)), (3, None, (64, 300)), (4, 3, (40, 8))],
)
def test_every_row_draws_from_its_own_group_stage_and_class(sampling, batch, group_size, budgets):
    """Valid slots hold distinct eligible patches of the (group, stage, class), as many as the budget
    or the candidates allow; every slot, valid or not, indexes a real patch (budgets above the 4
    patches of the last stage and a last group smaller than the others included)."""
    smp, counts, grids = _sample(sampling, batch, group_size, budgets, seed=batch)
    n_pos = smp.num_positive_slots
    bounds = group_bounds(batch, group_size)
    # Confidence sampling pairs its positives (least with most confident): an even number of slots.
    slots = budgets[0] // 2 * 2 if sampling == "confidence" else budgets[0]
    assert n_pos == slots
    for s, (cnt, gr) in enumerate(zip(counts, grids, strict=True)):
        image, patch = smp.batch_index[s], smp.patch_index[s]
        assert image.shape == patch.shape == (len(bounds), 3, n_pos + budgets[1])
        assert int(image.min()) >= 0 and int(image.max()) < batch
        assert int(patch.min()) >= 0 and int(patch.max()) < gr.h * gr.w
        for j, (b0, b1) in enumerate(bounds):
            for c in range(3):
                flat = cnt[b0:b1, c].reshape(-1)
                for slots, count, want in (
                    (slice(0, n_pos), smp.pos_count[j, s, c], flat == gr.patch_pixels),
                    (slice(n_pos, None), smp.neg_count[j, s, c], flat == 0),
                ):
                    n = int(count)
                    budget = slots.stop - slots.start if slots.stop else budgets[1]
                    available = int(want.sum())
                    if sampling == "confidence" and slots.start == 0:
                        assert n == 2 * min(available // 2, budget // 2)
                    else:
                        assert n == min(available, budget)
                    taken = image[j, c, slots][:n], patch[j, c, slots][:n]
                    assert bool(((taken[0] >= b0) & (taken[0] < b1)).all())
                    rows = (taken[0] - b0) * gr.h * gr.w + taken[1]
                    assert len(set(rows.tolist())) == n and bool(want[rows].all())


def test_random_draws_are_uniform_over_the_candidates():
    """Over many draws every positive of a row is taken about equally often (a permutation
    truncated to the budget), in every stage, although the stages share one draw."""
    K, budget = 3, 4
    mask = blocky_mask(2, SIZE, SIZE, K, 6, block=16, seed=0, ignore_frac=0.0)
    grids = stage_grids((SIZE, SIZE), STAGE_HW, range(4))
    counts = patch_class_counts(mask, K, grids)
    fn = PatchContrastiveLoss([8] * 4, K, 6, num_positives=budget, num_negatives=budget)
    torch.manual_seed(0)
    stage = 1
    hw = grids[stage].h * grids[stage].w
    eligible = counts[stage][:, 0].reshape(-1) == grids[stage].patch_pixels
    hits = torch.zeros(2 * hw)
    draws = 600
    for _ in range(draws):
        smp = sample_rows(fn.cfg, counts, grids, None, None)
        rows = smp.batch_index[stage][0, 0, :budget] * hw + smp.patch_index[stage][0, 0, :budget]
        hits[rows] += 1
    n = int(eligible.sum())
    assert n > 2 * budget and hits[~eligible].sum() == 0
    expected = draws * budget / n
    # Pearson's statistic over the n candidates (n - 1 degrees of freedom, ≈ 47 here): uniform draws
    # exceed its 1e-4 quantile (≈ 92 for 47, Wilson-Hilferty) once in 10⁴; a sampler that favours
    # some candidates (e.g. the first rows, or the real patches before the padding ones) lands far above.
    chi2 = float(((hits[eligible] - expected) ** 2 / expected).sum())
    k = n - 1
    quantile = k * (1 - 2 / (9 * k) + 3.72 * (2 / (9 * k)) ** 0.5) ** 3
    assert chi2 < quantile, (chi2, quantile)


@pytest.mark.parametrize(("batch", "group_size"), [(5, 2), (4, None), (3, 3), (7, 3)])
def test_present_classes_are_those_with_a_pixel_in_the_group(batch, group_size):
    """``present`` (read from the negative counts) is: some pixel of the group has the class; also
    for a last group smaller than the others and a class that group lacks."""
    K = 4
    mask = blocky_mask(batch, SIZE, SIZE, 3, 6, block=8, seed=batch, ignore_frac=0.2)
    mask[0, 5, 7] = 3  # class 3: one pixel, first image only (absent from a smaller last group)
    grids = stage_grids((SIZE, SIZE), STAGE_HW, range(4))
    counts = patch_class_counts(mask, K, grids)
    fn = PatchContrastiveLoss([8] * 4, K, 6, num_positives=8, num_negatives=8)
    smp = sample_rows(fn.cfg, counts, grids, None, group_size)
    expected = torch.stack(
        [
            (mask[b0:b1, None] == torch.arange(K)[:, None, None]).flatten(2).any(-1).any(0)
            for b0, b1 in group_bounds(batch, group_size)
        ]
    )
    assert torch.equal(smp.present, expected)
    assert bool(expected[0, 3]) and not bool(expected[1:, 3].any())  # the case is there
