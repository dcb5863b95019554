"""End-to-end training on tiny synthetic data: the CLI run folder, checkpoints, exact resume.

The synthetic set is generated once per module (64² scenes); models are the real presets, random init.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ctseg.data.datamodule import SegmentationDataModule
from ctseg.data.synthetic import write_synthetic_dataset
from ctseg.engine.callbacks import ExactSampling
from ctseg.engine.checkpoint import load_inference_model
from ctseg.engine.cli import run_cli
from ctseg.engine.module import SegmentationModule
from ctseg.errors import CheckpointError, ConfigError
from tests.contrastive.helpers import RecordingStandIn
from tests.fit import FAST, REPO, TINY, fit_args

CT_CL = {"loss": "cl", "mode": "paper", "clip": 1.0, "smoothing": 0.1}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, n_train=4, n_val=3, n_test=2, size=64, seed=0)
    return root


def test_cli_fit_then_test_writes_the_run_folder(synth, tmp_path):
    run = tmp_path / "run"
    run_cli("fit", fit_args(synth, run))
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.json",
        "report.md",
        "curves.png",
        "checkpoints/last.ckpt",
    ):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "synthetic" and metrics["epochs"] == 1
    assert metrics["history"][0]["ct"]["active"] is not None
    assert set(metrics["scores"]["per_class"]) == {
        "impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter"
    }  # fmt: skip
    assert "ct:" in (run / "config.yaml").read_text()

    bundle = load_inference_model(
        run / "checkpoints/last.ckpt", expect_model=FAST, expect_protocol="synthetic"
    )
    assert not hasattr(bundle.model, "ct_loss") or bundle.model.ct_loss is None
    assert bundle.protocol.name == "synthetic" and len(bundle.normalization["mean"]) == 3
    with torch.no_grad():
        assert bundle.model(torch.zeros(1, 3, 40, 48)).shape == (1, 6, 40, 48)
    with pytest.raises(CheckpointError, match="expected 'dcswin-paper'"):
        load_inference_model(run / "checkpoints/last.ckpt", expect_model="dcswin-paper")
    with pytest.raises(CheckpointError, match="expected 'dubai'"):
        load_inference_model(run / "checkpoints/last.ckpt", expect_protocol="dubai")

    run_cli("test", fit_args(synth, run, "--ckpt_path", str(run / "checkpoints/last.ckpt")))
    assert (run / "metrics.csv").is_file() and (
        run / "logs" / "test-0" / "metrics.csv"
    ).is_file()  # fit log kept
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["split"] == "test" and test["scores"]["pixels"] == 2 * 64 * 64


def _fit(root: Path, out: Path, epochs: int, ckpt_path: str | None = None, crash_at: int | None = None):
    pl.seed_everything(0, verbose=False)
    module = SegmentationModule(model=FAST, model_kwargs=TINY, ct=CT_CL)
    dm = SegmentationDataModule(
        str(root), batch_size=2, num_workers=0, crop_size=64, val_batch_size=2, seed=0
    )
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True)
    callbacks: list[pl.Callback] = [ExactSampling(), ckpt]
    if crash_at is not None:
        callbacks.append(_CrashAtEpoch(crash_at))
    trainer = pl.Trainer(
        max_epochs=epochs, deterministic=True, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out, callbacks=callbacks,
        gradient_clip_val=1.0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module


class _Crash(RuntimeError):
    pass


class _CrashAtEpoch(pl.Callback):
    """Dies at the start of epoch ``n`` (after epoch ``n-1``'s checkpoint), like a killed job."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.n:
            raise _Crash(f"simulated kill at epoch {self.n}")


def test_resume_after_a_crash_gives_the_same_weights(synth, tmp_path):
    straight = _fit(synth, tmp_path / "a", epochs=2)
    with pytest.raises(_Crash):
        _fit(synth, tmp_path / "b", epochs=2, crash_at=1)
    torch.manual_seed(1234)  # the resumed process starts from another RNG state
    resumed = _fit(synth, tmp_path / "b", epochs=2, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    assert [r["epoch"] for r in resumed.history] == [0, 1]  # history travels in the checkpoint


def test_bf16_mixed_with_ct_and_a_cosine_schedule(synth, tmp_path):
    pl.seed_everything(0, verbose=False)
    module = SegmentationModule(
        model=FAST, model_kwargs=TINY, ct=CT_CL, scheduler="cosine", warmup_steps=1, lr=1e-3, min_lr_ratio=0.1
    )
    dm = SegmentationDataModule(str(synth), batch_size=2, num_workers=0, crop_size=64, val_batch_size=2)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, dm)
    rec = module.history[-1]
    assert torch.isfinite(torch.tensor(rec["train_loss"])) and rec["ct"]["active"] == 1.0
    # 2 steps of a 2-step cosine run with 1 warm-up step: the LR ends at min_lr_ratio · lr
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())


def test_sigkill_after_an_epoch_then_resume_matches_uninterrupted(tmp_path):
    # In the default suite (about 35 s on 2 idle cores): the reliability issue wants a real kill -9 in CI.
    """`ctseg fit` killed with SIGKILL after its first epoch, resumed with `--ckpt_path last`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "data"
    write_synthetic_dataset(root, n_train=8, n_val=1, n_test=1, size=64, seed=0)

    def args(run: Path) -> list[str]:
        return [
            sys.executable, "-m", "ctseg", "fit", *fit_args(root, run, "--trainer.max_epochs", "3",
            "--trainer.deterministic", "true", "--data.batch_size", "1", "--model.ct_group_size", "1"),
        ]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(args(tmp_path / "a"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    run_b = tmp_path / "b"
    proc = subprocess.Popen(args(run_b), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_b / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                torch.load(last, map_location="cpu", weights_only=True)  # fully written
                break
            except Exception:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert killed_at < 2

    resumed = subprocess.run(
        [*args(run_b), "--ckpt_path", "last"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU (inductor) needs a C++ compiler",
)
def test_cli_fit_with_a_compiled_ct_loss_trains_and_resumes(synth, tmp_path):
    """``ct: {compile: true}`` through the CLI: trains, reports CT statistics, resumes from ``last``
    (the compiled code is not part of the checkpoint; it is rebuilt on the first step)."""
    run = tmp_path / "run"
    ct = json.dumps({**CT_CL, "clip_mode": "scale", "compile": True})
    run_cli("fit", fit_args(synth, run, "--model.ct", ct))
    first = json.loads((run / "metrics.json").read_text())
    assert first["history"][0]["ct"]["active"] == 1.0
    assert "compile: true" in (run / "config.yaml").read_text()
    run_cli("fit", fit_args(synth, run, "--model.ct", ct, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    resumed = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    assert torch.isfinite(torch.tensor(resumed["history"][-1]["train_loss"]))


def test_cli_fit_accepts_cuda_graph_and_runs_the_eager_loss_on_cpu(synth, tmp_path):
    """``ct: {cuda_graph: true}`` is a valid config everywhere: on CPU the eager loss runs (the CUDA
    path is tested in tests/reliability/test_determinism.py on a GPU)."""
    run = tmp_path / "run"
    ct = json.dumps({**CT_CL, "cuda_graph": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli("fit", fit_args(synth, run, "--model.ct", ct))
    assert not [w for w in caught if str(w.message).startswith("CT loss, cuda_graph")]  # nothing recorded
    record = json.loads((run / "metrics.json").read_text())["history"][0]
    assert record["ct"]["active"] == 1.0 and torch.isfinite(torch.tensor(record["train_loss"]))
    assert "cuda_graph: true" in (run / "config.yaml").read_text()


def test_paper_ct_configs_record_on_cuda_and_say_what_to_switch_off(synth, tmp_path):
    """The paper's CT configs turn ``cuda_graph`` on; a run that changes the mode to ``reference`` (which
    cannot be recorded) fails before training with an error that names the option to switch off, and
    runs once it is switched off."""
    import yaml

    for name in ("ct-cl.yaml", "ct-infonce.yaml"):
        ct = yaml.safe_load((REPO / "configs/potsdam-paper" / name).read_text())["model"]["ct"]
        assert ct["cuda_graph"] is True and ct["mode"] == "paper", name
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="set cuda_graph to false for mode='reference'"):
        run_cli("fit", fit_args(synth, run, "--model.ct.mode", "reference"))
    assert not run.exists()  # checked before the run folder is made
    run_cli("fit", fit_args(synth, run, "--model.ct.mode", "reference", "--model.ct.cuda_graph", "false"))
    assert "mode: reference" in (run / "config.yaml").read_text()


def test_ctseg_fit_backpropagates_every_recorded_ct_call_before_the_next(synth, tmp_path, monkeypatch):
    """The training loop must never call the CT loss again while an earlier result awaits its backward
    (a replay would overwrite that backward's saved state; the loss then falls back to eager with a
    warning). CUDA recording is mocked (no GPU here): the recorded path runs the same parts on CPU."""
    from ctseg.contrastive import graphs, loss

    stand_in = RecordingStandIn()
    monkeypatch.setattr(graphs, "record", stand_in)
    monkeypatch.setattr(loss, "_recordable", lambda mask: True)
    run = tmp_path / "run"
    ct = json.dumps({**CT_CL, "cuda_graph": True, "check_inputs": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli("fit", fit_args(synth, run, "--model.ct", ct))
    assert not [str(w.message) for w in caught if str(w.message).startswith("CT loss, cuda_graph")]
    record = json.loads((run / "metrics.json").read_text())["history"][0]
    assert stand_in.replays == record["step"] > 0 and record["ct"]["active"] == 1.0  # one replay per step
