"""Pair losses and clip modes."""

from __future__ import annotations

import pytest
import torch

from ctseg.contrastive import CL_MAX, CL_MIN, cl_pair_loss, info_nce
from ctseg.contrastive.clip import CLIP_MODES
from ctseg.contrastive.losses import hard_pairs
from ctseg.contrastive.terms import pair_sets
from tests.contrastive.oracle import info_nce_pkg, soft_ce


def test_cl_reference_points():
    cos = torch.tensor([1.0, 0.0, -1.0])
    torch.testing.assert_close(
        cl_pair_loss(cos, True), torch.tensor([0.3633, 0.6931, 1.2633]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        cl_pair_loss(cos, False), torch.tensor([1.2633, 0.6931, 0.3633]), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("same", [True, False])
def test_cl_equals_soft_ce_on_stacked_logits(same):
    cos = torch.linspace(-1, 1, 101)
    s = ((cos + 1) / 2)[:, None]
    expected = torch.stack([soft_ce(torch.cat([1 - si, si])[None], int(same), 0.1) for si in s])
    torch.testing.assert_close(cl_pair_loss(cos, same), expected, atol=1e-6, rtol=0)


def test_cl_bounds():
    cos = torch.linspace(-1, 1, 10001)
    for same in (True, False):
        v = cl_pair_loss(cos, same)
        assert v.min() >= CL_MIN - 1e-4 and v.max() <= CL_MAX + 1e-4


def test_info_nce_matches_package_formula():
    g = torch.Generator().manual_seed(0)
    q, k, n = (torch.nn.functional.normalize(torch.randn(s, 16, generator=g), dim=-1) for s in (7, 7, 11))
    ours = info_nce(
        q[None], k[None], torch.ones(1, 7, dtype=torch.bool), n[None], torch.ones(1, 11, dtype=torch.bool)
    )
    torch.testing.assert_close(ours[0], info_nce_pkg(q, k, n, 0.1))
    # masked entries are ignored, and an empty class gives 0, not NaN
    valid_n = torch.zeros(1, 11, dtype=torch.bool)
    valid_n[0, :4] = True
    masked = info_nce(q[None], k[None], torch.ones(1, 7, dtype=torch.bool), n[None], valid_n)
    torch.testing.assert_close(masked[0], info_nce_pkg(q, k, n[:4], 0.1))
    none = info_nce(q[None], k[None], torch.zeros(1, 7, dtype=torch.bool), n[None], valid_n)
    assert none.item() == 0.0


def test_hard_pairs_keep_most_and_least_similar():
    sim = torch.tensor([[0.1, 0.9, -0.5, 0.7, 0.3, 0.0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    keep = hard_pairs(sim, valid, 0.5, most_similar=True)
    assert keep[0].nonzero().flatten().tolist() == [1, 3]  # floor(5·0.5) = 2 most similar valid pairs
    keep = hard_pairs(sim, valid, 0.5, most_similar=False)
    assert keep[0].nonzero().flatten().tolist() == [0, 2]
    ties = hard_pairs(torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), 0.5, most_similar=True)
    assert ties[0].tolist() == [True, True, False, False]  # stable: ties keep their order
    assert not hard_pairs(sim, torch.zeros_like(valid), 0.5, most_similar=True).any()


def test_cl_of_a_positive_pair_is_cl_of_label_zero_at_minus_cos():
    """What lets the paper mode evaluate both pair sets as one (``terms.PairSets``): exactly equal."""
    cos = torch.linspace(-1, 1, 101)
    assert torch.equal(cl_pair_loss(cos, True), cl_pair_loss(-cos, False))


@pytest.mark.parametrize(("P", "M"), [(8, 8), (9, 6), (6, 11), (2, 5), (3, 2)])
def test_pair_sets_mine_each_set_as_separate_calls(P, M):
    """Both sets mined at once equal each mined alone: negative pairs (j, j) most similar, positive
    pairs (2i, 2i+1) least similar; also for odd budgets and unequal widths."""
    g = torch.Generator().manual_seed(P * 100 + M)
    R, d = 5, 4
    zp = torch.nn.functional.normalize(torch.randn(R, P, d, generator=g), dim=-1)
    zn = torch.nn.functional.normalize(torch.randn(R, M, d, generator=g), dim=-1)
    pos_count = torch.randint(0, P + 1, (R,), generator=g)
    neg_count = torch.randint(0, M + 1, (R,), generator=g)
    sets = pair_sets(zp, zn, pos_count, neg_count, 0.5)
    n, h = min(P, M), P // 2
    neg_sim = (zp[:, :n] * zn[:, :n]).sum(-1)
    neg_valid = torch.arange(n) < torch.minimum(pos_count, neg_count)[:, None]
    pos_sim = (zp[:, 0 : 2 * h : 2] * zp[:, 1 : 2 * h : 2]).sum(-1)
    pos_valid = torch.arange(h) < (pos_count // 2)[:, None]
    assert torch.equal(sets.negative_keep, hard_pairs(neg_sim, neg_valid, 0.5, most_similar=True))
    assert torch.equal(sets.positive_keep, hard_pairs(pos_sim, pos_valid, 0.5, most_similar=False))
    torch.testing.assert_close(sets.sim[0, :, :n], neg_sim)
    torch.testing.assert_close(sets.sim[1, :, :h], -pos_sim)
    assert not sets.keep[0, :, n:].any() and not sets.keep[1, :, h:].any()


def test_clamp_zero_gradient_above_clip_and_scale_keeps_it():
    for raw, grad_clamp in ((1.3, 0.0), (0.7, 1.0)):
        x = torch.tensor(raw, requires_grad=True)
        CLIP_MODES["clamp"](x, 1.0).backward()
        assert x.grad.item() == grad_clamp
    x = torch.tensor(1.3, requires_grad=True)
    y = CLIP_MODES["scale"](x, 1.0)
    y.backward()
    assert y.item() == pytest.approx(1.0) and x.grad.item() == pytest.approx(1.0 / 1.3)


def test_info_nce_query_without_valid_negatives_has_finite_gradients():
    """info_nce takes softplus(logsumexp(negatives) − positive): a row whose negatives are all masked
    has logsumexp = −inf, whose backward is NaN at the masked entries; the in-place mask's backward
    zeroes exactly those, so such a query gives 0 and finite gradients (as the concatenated-logits
    form did)."""
    g = torch.Generator().manual_seed(0)
    q, k, n = (torch.randn(2, 3, 4, generator=g).requires_grad_() for _ in range(3))
    q_valid = torch.ones(2, 3, dtype=torch.bool)
    n_valid = torch.tensor([[True, False, True], [False, False, False]])
    out = info_nce(q, k, q_valid, n, n_valid)
    out.sum().backward()
    assert out[1].item() == 0.0 and torch.isfinite(out[0])
    for x in (q, k, n):
        assert torch.isfinite(x.grad).all()
