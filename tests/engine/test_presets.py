"""A few optimisation steps of every paper preset with each CT setting, on tiny inputs."""

from __future__ import annotations

import pytest
import torch

from ctseg.engine.module import SegmentationModule

CT = {
    "none": None,
    "cl": {"loss": "cl", "mode": "paper", "smoothing": 0.1, "clip": 1.0},
    "infonce": {"loss": "infonce", "mode": "paper", "temperature": 0.1, "clip": 1.0},
}


def _batch(b: int = 2, size: int = 64):
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 6, (b, size // 16, size // 16), generator=g)
    mask = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)
    mask[:, :4, :4] = 255  # some ignore pixels
    return {"image": torch.randn(b, 3, size, size, generator=g), "mask": mask, "id": ["a", "b"][:b]}


@pytest.mark.parametrize("ct", list(CT))
@pytest.mark.parametrize("model", ["dcswin-paper", "unetformer-paper", "dcpoolformer-paper"])
def test_paper_preset_trains(model, ct):
    torch.manual_seed(0)
    module = SegmentationModule(model=model, protocol="potsdam-paper", ct=CT[ct], ct_group_size=1)
    assert (getattr(module.model, "ct_loss", None) is not None) == (ct != "none")
    opt = torch.optim.AdamW(module.parameters(), lr=8e-5)
    before = [p.detach().clone() for p in module.model.parameters()]
    batch = _batch()
    for step in range(2):
        loss = module.training_step(batch, step)
        assert torch.isfinite(loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))
    assert changed > 0.9 * len(before)
    stats = module._reduce_ct_stats()
    if ct == "none":
        assert stats == {}
    else:
        assert stats["active"] == 1.0 and "stage0/positives" in stats and 0.0 <= stats["clipped"] <= 1.0
        assert not any("/class" in k for k in stats)  # epoch logs keep the per-stage view only
        assert module.model.ct_loss.group_size == 1  # ct_group_size reached the loss


def test_ct_stats_accumulate_on_the_device_equal_the_fetched_ones():
    """Unfetched stats (the CUDA default: no input check) are summed on the device without a host
    read per step; the epoch means equal those of stats fetched every step (the CPU default)."""
    means = {}
    for check in (True, False):
        torch.manual_seed(0)
        module = SegmentationModule(
            model="dcpoolformer-paper", protocol="potsdam-paper", ct={**CT["cl"], "check_inputs": check}
        )
        module.on_train_epoch_start()
        for step in range(2):
            torch.manual_seed(step)
            module.training_step(_batch(), step)
        if not check:
            assert module._ct_device_sum is not None and not module._ct_sums  # nothing read yet
        means[check] = module._reduce_ct_stats()
    assert means[True].keys() == means[False].keys() and means[True]["active"] == 1.0
    for key, value in means[True].items():
        assert means[False][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_reference_mode_training_step_prefetches_the_counts(monkeypatch):
    """The module starts the reference loss's counts before the model's forward; from the second step
    (mask size known) the loss uses them, and the step equals one without the prefetch."""
    from ctseg.contrastive import PatchContrastiveLoss

    losses = {}
    for prefetch in (True, False):
        torch.manual_seed(0)
        module = SegmentationModule(
            model="dcpoolformer-paper", protocol="potsdam-paper", ct={**CT["cl"], "mode": "reference"}
        )
        used = []
        take = PatchContrastiveLoss._take_prefetched

        def spy(self, mask, grids, take=take, used=used):
            got = take(self, mask, grids)
            used.append(got is not None)
            return got

        monkeypatch.setattr(PatchContrastiveLoss, "_take_prefetched", spy)
        if not prefetch:
            monkeypatch.setattr(PatchContrastiveLoss, "prefetch", lambda self, mask: None)
        steps = []
        for step in range(2):
            torch.manual_seed(10 + step)
            steps.append(module.training_step(_batch(), step).item())
        losses[prefetch] = steps
        assert used == [False, prefetch]
        monkeypatch.undo()
    assert losses[True] == losses[False]
