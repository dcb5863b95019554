"""GT patches: pooling equals the rearrange formulation; patch sizes, padding and shape errors."""

from __future__ import annotations

import pytest
import torch

from ctseg.contrastive.patches import infer_patch_size, patch_class_counts, patch_class_means, stage_grids
from ctseg.errors import ConfigError
from tests.contrastive.helpers import blocky_mask
from tests.contrastive.oracle import gt_patches


def test_counts_equal_rearrange_formulation():
    mask = blocky_mask(3, 64, 96, 6, 6, block=8, seed=0, ignore_frac=0.1)
    shapes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    grids = stage_grids((64, 96), shapes, [0, 1, 2, 3])
    assert [g.p for g in grids] == [4, 8, 16, 32]
    counts = patch_class_counts(mask, 6, grids)
    for grid, cnt in zip(grids, counts):
        gt = gt_patches(mask, grid.p)  # (N, p²)
        for c in range(6):
            expected = (gt == c).sum(1)
            assert torch.equal(cnt[:, c].reshape(-1), expected.to(cnt.dtype))
            # positive ⇔ homogeneous c (an ignore pixel excludes it); negative ⇔ no pixel of c
            assert torch.equal(cnt[:, c].reshape(-1) == grid.patch_pixels, (gt == c).all(1))
            assert torch.equal(cnt[:, c].reshape(-1) == 0, ~(gt == c).any(1))


def test_non_divisible_sizes_pad_with_ignore():
    """500² input, maps 125/63/32/16: the mask is padded bottom/right; padded patches are not positive."""
    mask = torch.zeros(1, 500, 500, dtype=torch.long)
    grids = stage_grids((500, 500), [(125, 125), (63, 63), (32, 32), (16, 16)], [0, 1, 2, 3])
    assert [g.p for g in grids] == [4, 8, 16, 32]
    counts = patch_class_counts(mask, 2, grids)
    c1 = counts[1][0, 0]  # p = 8: rows 0..61 full, row 62 covers pixels 496..503 (4 of them real)
    assert c1[:62, :62].eq(64).all() and c1[62, 0] == 32 and c1[62, 62] == 16
    assert counts[3][0, 0, 15, 15] == (500 - 480) ** 2
    for cnt in counts:  # every real pixel is counted once per stage
        assert int(cnt.sum()) == 500 * 500


def test_means_of_probabilities():
    probs = torch.rand(2, 3, 40, 40)
    grids = stage_grids((40, 40), [(10, 10), (5, 5)], [0, 1])
    means = patch_class_means(probs, grids)
    torch.testing.assert_close(means[1], torch.nn.functional.avg_pool2d(probs, 8))


@pytest.mark.parametrize(
    "mask_hw, feat_hw",
    [
        ((512, 512), (128, 64)),
        ((512, 512), (200, 200)),
        ((100, 100), (20, 30)),
        ((64, 64), (0, 4)),
        ((64, 64), (9, 8)),
    ],
)
def test_inconsistent_shapes_are_rejected(mask_hw, feat_hw):
    with pytest.raises(ConfigError, match="stage 2"):
        infer_patch_size(mask_hw, feat_hw, stage=2)


def test_patch_size_from_shapes():
    assert infer_patch_size((512, 512), (128, 128), 0) == 4
    assert infer_patch_size((500, 380), (63, 48), 1) == 8
    assert infer_patch_size((32, 32), (32, 32), 0) == 1
    assert infer_patch_size((8, 17), (1, 3), 3) == 8  # a 1-row map fits any p ≥ 8; W pins it to 6..8
    assert infer_patch_size((8, 8), (1, 1), 3, stride=32) == 32
    with pytest.raises(ConfigError, match="stride 16"):
        infer_patch_size((64, 64), (8, 8), 1, stride=16)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_every_label_outside_the_classes_counts_for_none(dtype):
    """Negative labels (-1 indexes the class-word table's last entry), the ignore index and labels far
    above the classes count for no class; the cached table serves later calls unchanged."""
    g = torch.Generator().manual_seed(3)
    mask = torch.randint(-3, 5, (2, 32, 32), generator=g).to(dtype)
    mask[0, :4, :4] = 1000
    grids = stage_grids((32, 32), [(8, 8), (4, 4)], [0, 1])
    for _ in range(2):
        counts = patch_class_counts(mask, 3, grids)
        for grid, cnt in zip(grids, counts, strict=True):
            gt = gt_patches(mask.long(), grid.p)
            for c in range(3):
                assert torch.equal(cnt[:, c].reshape(-1), (gt == c).sum(1).to(cnt.dtype))
