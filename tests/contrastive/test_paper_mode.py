"""``mode="paper"``: sampling budgets, hard mining, determinism, groups, precision, stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctseg.contrastive import PatchContrastiveLoss, paper
from ctseg.contrastive.heads import project_stages
from ctseg.contrastive.patches import patch_class_counts, stage_grids
from ctseg.contrastive.sampling import SAMPLERS, spread_rows, stage_candidates
from ctseg.errors import ConfigError
from tests.contrastive.helpers import CHANNELS, STRIDES, blocky_mask, stage_features


def separating_features(mask, num_classes, seed, noise=0.05):
    """Features that encode each patch's class fractions through a fixed random map (+ small noise):
    homogeneous patches of one class share a prototype, different classes differ."""
    g = torch.Generator().manual_seed(seed)
    B, H, W = mask.shape
    onehot = torch.stack([(mask == c).float() for c in range(num_classes)], 1)
    out = []
    for c, p in zip(CHANNELS, STRIDES):
        frac = F.avg_pool2d(onehot, p, p)
        proto = torch.randn(c, num_classes, generator=g)
        f = torch.einsum("ck,bkhw->bchw", proto, frac) + noise * torch.randn(
            B, c, H // p, W // p, generator=g
        )
        out.append(f.requires_grad_(True))
    return out


def make(loss="cl", **kw):
    kw.setdefault("clip", None)
    return PatchContrastiveLoss(CHANNELS, num_classes=6, ignore_index=6, loss=loss, **kw)


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_separating_features_give_lower_loss_than_random(loss):
    torch.manual_seed(0)
    fn = make(loss)
    mask = blocky_mask(4, 128, 128, 6, 6, block=32, seed=1)
    good, _ = fn(separating_features(mask, 6, seed=2), mask)
    rand, _ = fn(stage_features(4, 128, 128, seed=3), mask)
    assert good.item() < rand.item() - 0.05


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_deterministic_given_seed(loss):
    fn = make(loss)
    mask = blocky_mask(2, 64, 64, 6, 6, block=16, seed=0)
    feats = stage_features(2, 64, 64, seed=0)
    torch.manual_seed(3)
    a, sa = fn(feats, mask)
    torch.manual_seed(3)
    b, sb = fn(feats, mask)
    torch.manual_seed(4)
    c, _ = fn(feats, mask)
    assert a.item() == b.item() and sa == sb
    assert c.item() != a.item()


def test_budgets_and_pair_counts():
    """Many candidates: each (stage 0, class) uses exactly the budgets and keeps take_top of the pairs."""
    torch.manual_seed(0)
    fn = make("cl", num_positives=64, num_negatives=32, stages=[0])
    mask = blocky_mask(4, 128, 128, 3, 6, block=32, seed=0, ignore_frac=0.0)
    _, st = fn(stage_features(4, 128, 128, 0), mask)
    for c in range(3):
        assert st[f"stage0/class{c}/positives"] == 64 and st[f"stage0/class{c}/negatives"] == 32
        assert st[f"stage0/class{c}/pairs"] == 32 // 2 + 64 // 2 // 2  # hard negatives + hard positives
    assert st["stage0/class3/pairs"] == 0 and st["skipped_fraction"] == 0.0


def test_only_sampled_rows_are_projected(monkeypatch):
    fn = make("cl", num_positives=16, num_negatives=16)
    seen = []

    def recording(heads, rows, params=None):
        seen.extend(r.numel() // r.shape[-1] for r in rows)
        return project_stages(heads, rows, params)

    monkeypatch.setattr(paper, "project_stages", recording)
    mask = blocky_mask(2, 128, 128, 6, 6, block=16, seed=0)
    fn(stage_features(2, 128, 128, 0), mask)
    assert len(seen) == 4
    assert seen[0] == 6 * (16 + 16) < 2 * 32 * 32  # stage 0: K·(P+M) rows, not the 2048-row map


def _stage0_call_and_its_sample():
    """A stage-0 CL call (2 classes, budgets 32/32) and, redrawn with the same seed, its sample: the
    stats, the positive and negative rows' projections per class, for checking the terms by hand."""
    torch.manual_seed(0)
    fn = make("cl", stages=[0], num_positives=32, num_negatives=32)
    mask = blocky_mask(2, 64, 64, 2, 6, block=16, seed=0, ignore_frac=0.0)
    feats = stage_features(2, 64, 64, 0)
    torch.manual_seed(1)
    _, st = fn(feats, mask)
    torch.manual_seed(1)
    grids = stage_grids((64, 64), [tuple(feats[0].shape[2:])], [0])
    counts = patch_class_counts(mask, 6, grids)
    smp = SAMPLERS["random"](stage_candidates(counts, grids, [(0, 2)]), 32, 32)
    rows = feats[0].permute(0, 2, 3, 1).reshape(-1, 64)
    projected = [(fn.heads[0](rows[smp.pos_rows[c]]), fn.heads[0](rows[smp.neg_rows[c]])) for c in range(2)]
    return st, projected


def _mean_cl(cos: torch.Tensor, label: int) -> float:
    """The paper's CL (cosine mapped to [0, 1], soft cross-entropy, smoothing 0.1), mean over pairs."""
    s = (cos + 1) / 2
    lp = torch.log_softmax(torch.stack([1 - s, s], 1), 1)
    return (0.9 * -lp[:, label] - 0.05 * lp.sum(1)).mean().item()


def test_hard_negatives_are_the_most_similar_pairs():
    """The kept negative pairs are exactly the most similar half (paper text, not the no-op sort)."""
    st, projected = _stage0_call_and_its_sample()
    for c, (zp, zn) in enumerate(projected):
        hard = (zp * zn).sum(-1).sort(descending=True).values[:16]
        assert st[f"stage0/class{c}/loss_neg"] == pytest.approx(_mean_cl(hard, 0), abs=1e-5)


def test_hard_positives_are_the_least_similar_pairs():
    """The kept positive pairs (2i, 2i+1) are exactly the least similar half, with CL label 1."""
    st, projected = _stage0_call_and_its_sample()
    for c, (zp, _zn) in enumerate(projected):
        hard = (zp[0::2] * zp[1::2]).sum(-1).sort().values[:8]  # 16 positive pairs, the least similar half
        assert st[f"stage0/class{c}/loss_pos"] == pytest.approx(_mean_cl(hard, 1), abs=1e-5)


def test_groups_equal_separate_calls():
    torch.manual_seed(0)
    fn = make("infonce", clip=1.0, group_size=2, clip_mode="scale")
    mask = blocky_mask(4, 64, 64, 6, 6, block=16, seed=2)
    feats = stage_features(4, 64, 64, 2)
    torch.manual_seed(5)
    grouped, _ = fn(feats, mask)
    fn.group_size = None
    torch.manual_seed(5)
    first, _ = fn([f[:2] for f in feats], mask[:2])
    second, _ = fn([f[2:] for f in feats], mask[2:])
    assert grouped.item() == pytest.approx((first.item() + second.item()) / 2, abs=1e-6)


def test_gather_negatives_is_noop_without_distributed():
    mask = blocky_mask(2, 64, 64, 6, 6, block=16, seed=0)
    feats = stage_features(2, 64, 64, 0)
    torch.manual_seed(0)
    a = make("cl")
    b = make("cl", gather_negatives=True)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    la, _ = a(feats, mask)
    torch.manual_seed(1)
    lb, _ = b(feats, mask)
    assert la.item() == lb.item()


@pytest.mark.parametrize("loss", ["cl", "infonce"])
def test_bf16_autocast_runs_in_fp32(loss):
    torch.manual_seed(0)
    fn = make(loss)
    mask = blocky_mask(2, 64, 64, 6, 6, block=16, seed=0)
    feats = [f.detach().bfloat16().requires_grad_() for f in stage_features(2, 64, 64, 0)]
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp, _ = fn(feats, mask)
    torch.manual_seed(1)
    full, _ = fn([f.float() for f in feats], mask)
    assert amp.dtype == torch.float32
    assert amp.item() == pytest.approx(full.item(), abs=1e-6)
    amp.backward()
    assert feats[0].grad is not None and torch.isfinite(feats[0].grad.float()).all()


def test_confidence_sampling():
    torch.manual_seed(0)
    mask = blocky_mask(2, 64, 64, 3, 6, block=8, seed=0, ignore_frac=0.0)
    grids = stage_grids((64, 64), [(16, 16)], [0])
    counts = patch_class_counts(mask, 3, grids)[0]
    conf = torch.rand(2, 3, 16, 16)
    cand = stage_candidates([counts], grids, [(0, 2)])
    smp = SAMPLERS["confidence"](cand, 20, 10, confidence=spread_rows([conf], grids, [(0, 2)], 0.0))
    flat_conf = conf.transpose(0, 1).reshape(3, -1)
    for c in range(3):
        pos_c = torch.nonzero(counts[:, c].reshape(-1) == 16).flatten()
        n = int(smp.pos_count[c])
        low, high = smp.pos_rows[c, 0:n:2], smp.pos_rows[c, 1:n:2]
        ranked = pos_c[flat_conf[c, pos_c].argsort()]
        assert set(low.tolist()) == set(ranked[: n // 2].tolist())
        assert set(high.tolist()) == set(ranked[-(n // 2) :].tolist())
        neg_c = torch.nonzero(counts[:, c].reshape(-1) == 0).flatten()
        top_neg = neg_c[flat_conf[c, neg_c].argsort(descending=True)[:10]]
        assert set(smp.neg_rows[c].tolist()) == set(top_neg.tolist())
    fn = PatchContrastiveLoss(CHANNELS, 3, 6, sampling="confidence")
    feats = stage_features(2, 64, 64, 0)
    with pytest.raises(ConfigError, match="probs"):
        fn(feats, mask)
    loss, st = fn(feats, mask, probs=torch.softmax(torch.randn(2, 3, 64, 64), 1))
    assert torch.isfinite(loss) and st["active"] == 1.0


def test_clamp_gives_zero_gradient_above_clip_scale_keeps_it():
    mask = blocky_mask(2, 64, 64, 6, 6, block=16, seed=0)
    feats = stage_features(2, 64, 64, 0)
    torch.manual_seed(0)
    fn = make("infonce", clip=1.0, clip_mode="clamp")  # InfoNCE at random init ≫ 1
    loss, st = fn(feats, mask)
    assert st["loss_raw"] > 1.0 and st["clipped"] == 1.0 and loss.item() == 1.0
    loss.backward()
    assert all(f.grad.abs().sum() == 0 for f in feats)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in fn.heads.parameters())
    fn.clip_mode = "scale"
    loss, st = fn(feats, mask)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert feats[0].grad.abs().sum() > 0


def test_weight_and_stats_keys():
    torch.manual_seed(0)
    fn = make("cl", weight=0.5, clip=None)
    mask = blocky_mask(2, 64, 64, 6, 6, block=16, seed=0)
    loss, st = fn(stage_features(2, 64, 64, 0), mask)
    assert loss.item() == pytest.approx(0.5 * st["loss_raw"], abs=1e-6) and st["loss"] == pytest.approx(
        loss.item()
    )
    for key in ("loss_raw", "loss", "clipped", "active", "skipped_fraction"):
        assert isinstance(st[key], float)
    for s in range(4):
        assert {f"stage{s}/positives", f"stage{s}/negatives", f"stage{s}/pairs"} <= st.keys()
        for c in range(6):
            assert {
                f"stage{s}/class{c}/{k}" for k in ("positives", "negatives", "pairs", "loss_neg", "loss_pos")
            } <= st.keys()
    assert st["stage0/pairs"] == sum(st[f"stage0/class{c}/pairs"] for c in range(6))
    fn.compute_stats = False
    loss2, st2 = fn(stage_features(2, 64, 64, 0), mask)
    assert st2 == {} and torch.isfinite(loss2)


def test_ct_gradient_through_a_model_equals_the_plain_gather(monkeypatch):
    """The rows' gradient joins the backbone's feature gradients late (``heads.take_rows``): through a
    real model, beside the decoder's gradient, every parameter gets what a plain index gives."""
    import ctseg.models

    def plain(feature, image, patch):
        return feature.flatten(2)[image, :, patch]

    grads = []
    for take in (paper.take_rows, plain):
        monkeypatch.setattr(paper, "take_rows", take)
        torch.manual_seed(0)
        model = ctseg.models.create("unetformer-paper", num_classes=6, pretrained=False)
        x = torch.randn(2, 3, 64, 64)
        y = torch.randint(0, 6, (2, 4, 4)).repeat_interleave(16, 1).repeat_interleave(16, 2)
        logits, feats = model(x, return_features=True)
        ct = PatchContrastiveLoss(
            [f.shape[1] for f in feats], 6, 255, clip=None, num_positives=16, num_negatives=16
        )
        torch.manual_seed(1)
        ct_loss, stats = ct(feats, y)
        assert stats["active"] == 1.0
        (F.cross_entropy(logits, y) + 10 * ct_loss).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-5
