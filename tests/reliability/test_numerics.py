"""Numerical safety: non-finite losses / gradients are detected and handled by policy; CT never returns NaN.

The policy tests use a 5-parameter LightningModule (the guard only sees losses and gradients, so a real
network adds time, not coverage); the CLI test drives a real preset into divergence.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ctseg.cli import main
from ctseg.engine.guards import NONFINITE_NAME, NonFiniteGuard, NonFiniteLossError
from ctseg.errors import ConfigError
from tests.contrastive.test_fuzz import build, cases, loss_for_case
from tests.fit import fit_args


class Tiny(pl.LightningModule):
    """Linear regression whose loss is made NaN (``bad="loss"``) or whose gradient is made Inf with a
    finite loss (``bad="grad"``) on the listed batch indices of every epoch."""

    def __init__(self, bad_batches: tuple[int, ...] = (), bad: str = "loss") -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.bad_batches, self.bad = set(bad_batches), bad

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if batch_idx in self.bad_batches:
            if self.bad == "loss":
                loss = loss * float("nan")
            else:  # d/db sqrt(b - b) = Inf at a finite value 0
                loss = loss + torch.sqrt(self.net.bias - self.net.bias.detach()).sum()
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


class Snapshots(pl.Callback):
    """Weights (and AdamW step counts) after every training batch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.steps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(copy.deepcopy(pl_module.state_dict()))
        state = trainer.optimizers[0].state
        self.steps.append(float(next(iter(state.values()))["step"]) if state else 0.0)


def train(tmp_path: Path, module: Tiny, guard: NonFiniteGuard, epochs: int = 1) -> Snapshots:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 4, generator=g), torch.randn(12, 1, generator=g))
    snaps = Snapshots()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[guard, snaps, ckpt],
        gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=2))
    return snaps


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_skip_policy_leaves_weights_and_optimizer_untouched(tmp_path: Path, bad: str) -> None:
    guard = NonFiniteGuard("skip")
    snaps = train(tmp_path, Tiny(bad_batches=(2,), bad=bad), guard)
    w = snaps.weights
    assert same(w[1], w[2]), "the bad step changed the weights"
    assert snaps.steps[2] == snaps.steps[1], "the bad step advanced AdamW"
    assert not same(w[2], w[3]) and snaps.steps[3] == snaps.steps[2] + 1, "training goes on after it"
    assert guard.skipped == 1 and guard.consecutive == 0
    assert all(torch.isfinite(v).all() for v in w[-1].values())


def test_skip_policy_stops_after_too_many_in_a_row(tmp_path: Path) -> None:
    guard = NonFiniteGuard("skip", max_consecutive=2)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train(tmp_path, Tiny(bad_batches=(1, 2, 3, 4)), guard)
    assert guard.skipped == 2


def test_stop_policy_saves_the_last_good_weights(tmp_path: Path) -> None:
    guard = NonFiniteGuard("stop")
    module = Tiny(bad_batches=(2,))
    with pytest.raises(NonFiniteLossError) as info:
        train(tmp_path, module, guard, epochs=2)
    saved = tmp_path / "checkpoints" / NONFINITE_NAME
    msg = str(info.value)
    assert "non-finite loss (nan) at epoch 0, step 2" in msg and str(saved) in msg
    assert "no epoch-end checkpoint yet" in msg
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert same(state, module.state_dict())  # the weights before the bad step: nothing was applied


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="known: skip, stop"):
        NonFiniteGuard("ignore")


def test_cli_stop_on_divergence_names_the_checkpoints(synth: Path, tmp_path: Path, capsys) -> None:
    """A learning rate of 1e30 makes the weights explode within a step or two: the run must end with one
    line, exit 2, and leave the pre-step weights for inspection."""
    run = tmp_path / "run"
    argv = [
        "fit",
        *fit_args(synth, run, "--model.lr", "1e30", "--trainer.max_epochs", "3", "--nonfinite", "stop"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("ctseg fit: error:"))
    assert "training stopped: non-finite" in line and NONFINITE_NAME in line and "Traceback" not in err
    assert (run / "checkpoints" / NONFINITE_NAME).is_file()


MAGNITUDES = (0.0, 1e-30, 1e-6, 1.0, 1e6, 1e20)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), scale=st.sampled_from(MAGNITUDES), constant=st.booleans(), bf16=st.booleans())
def test_ct_is_finite_for_extreme_feature_values(case, scale: float, constant: bool, bf16: bool) -> None:
    """Beside the shape/label fuzzing of tests/contrastive: features that are all zero, tiny, huge,
    identical across pixels, or bf16 must still give a finite loss and finite gradients."""
    feats, mask, ignore = build(case)
    with torch.no_grad():
        raw = [f.detach() * scale for f in feats]
        if constant:
            raw = [r[:, :, :1, :1].expand_as(r).clone() for r in raw]
        if bf16:
            raw = [r.bfloat16() for r in raw]
    feats = [r.requires_grad_() for r in raw]
    fn = loss_for_case(case, ignore)
    if bf16:
        fn = fn.bfloat16()
    torch.manual_seed(case["seed"])
    loss, _ = fn(feats, mask)
    assert torch.isfinite(loss), (scale, constant, bf16)
    loss.float().backward()
    assert all(f.grad is None or torch.isfinite(f.grad).all() for f in feats)
