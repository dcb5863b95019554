"""Atomic writes: a full disk (``OSError(ENOSPC)``) or a kill during a write leaves the previous good file.

Covered writers: checkpoints (:class:`ctseg.engine.guards.AtomicCheckpointIO`, wired into ``ctseg fit``
and :func:`ctseg.engine.runner.make_trainer`), manifests, reports and predictions.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from ctseg.cli import main
from ctseg.data.layout import read_manifest, write_manifest
from ctseg.engine.cli import run_cli
from ctseg.engine.guards import AtomicCheckpointIO
from ctseg.engine.runner import make_trainer
from ctseg.errors import OutputError
from ctseg.utils.io import atomic_write_json
from tests.fit import fit_args
from tests.reliability.conftest import temp_leftovers
from tests.reliability.test_numerics import Tiny


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_io_keeps_the_previous_file_on_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def half_then_full(obj, fh, *a, **k):  # a torch.save that dies midway, like a filling disk
        fh.write(b"PK\x03\x04 partial")
        full_disk()

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OutputError, match=r"last\.ckpt: cannot write"):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and temp_leftovers(tmp_path) == []
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_trainer_checkpoints_survive_a_full_disk_mid_run(tmp_path: Path, monkeypatch) -> None:
    """``make_trainer`` (the runner shared with ``ctseg demo``) writes through the atomic IO."""

    class FullDiskAtEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                monkeypatch.setattr(os, "fsync", full_disk)

    trainer = make_trainer(
        tmp_path, progress=False, extra_callbacks=[FullDiskAtEpoch()], max_epochs=2, accelerator="cpu",
        enable_model_summary=False,
    )  # fmt: skip
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
    with pytest.raises(OutputError, match="No space left"):
        trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    monkeypatch.undo()
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # epoch 0's file, whole
    assert temp_leftovers(tmp_path) == []


def test_ctseg_fit_uses_the_atomic_checkpoint_io(synth: Path, tmp_path: Path) -> None:
    cli = run_cli("fit", fit_args(synth, tmp_path / "run"), run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_manifest_and_report_keep_the_previous_file(synth: Path, tmp_path: Path, monkeypatch) -> None:
    manifest = read_manifest(synth)
    write_manifest(tmp_path, manifest)
    report = tmp_path / "metrics.json"
    atomic_write_json(report, {"mIoU": 0.5})
    before = {p: p.read_bytes() for p in (tmp_path / "manifest.json", report)}
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputError, match=r"manifest\.json: cannot write .*previous file is kept"):
        write_manifest(tmp_path, manifest)
    with pytest.raises(OutputError, match=r"metrics\.json"):
        atomic_write_json(report, {"mIoU": 0.9})
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before and temp_leftovers(tmp_path) == []


def test_predictions_keep_the_previous_files(trained_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    argv = [
        "predict", "--checkpoint", str(trained_run / "checkpoints" / "last.ckpt"), "--input", str(image),
        "--output", str(out), "--window", "64", "--overlap", "16", "--no-progress", "--device", "cpu", "--probs",
    ]  # fmt: skip
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"scene_labels.png", "scene_color.png"} <= set(before)
    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(argv) == 2
    err = capsys.readouterr().err  # the outputs are closed and synced by their write threads
    assert "scene_" in err and "cannot write (No space left on device)" in err
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_kill_during_a_write_leaves_the_previous_file(tmp_path: Path) -> None:
    """A real SIGKILL in the middle of ``atomic_open``: the target keeps its old content."""
    target = tmp_path / "metrics.json"
    target.write_text(json.dumps({"good": True}))
    script = textwrap.dedent(
        f"""
        import os, signal
        from ctseg.utils.io import atomic_open
        with atomic_open({str(target)!r}, "w") as fh:
            fh.write('{{"good": fal')
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"good": True}
