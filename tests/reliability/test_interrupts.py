"""Interrupted training: Ctrl-C (SIGINT) saves a checkpoint, says how to resume and exits 130.

``kill -9`` then ``--ckpt_path last`` is tested by the engine (``tests/engine/test_training.py``:
``test_resume_after_a_crash_gives_the_same_weights`` in the default suite, the real-process
``test_sigkill_after_an_epoch_then_resume_matches_uninterrupted`` marked slow); not duplicated here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctseg.engine.guards import INTERRUPTED_NAME, resume_command
from tests.fit import fit_args


def loadable(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not there yet, or still being written
        return None


def fit_process(data: Path, run: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "ctseg", "fit", *fit_args(data, run, "--trainer.max_epochs", "40", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CTSEG_DEBUG": "0"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_after_first_epoch(proc: subprocess.Popen, run: Path) -> tuple[str, str]:
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and loadable(last) is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=120)
    finally:
        proc.kill()


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(synth: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = fit_process(synth, run, "--trainer.deterministic", "true")
    _, err = interrupt_after_first_epoch(proc, run)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    saved = run / "checkpoints" / INTERRUPTED_NAME
    ckpt = loadable(saved)
    assert ckpt is not None and ckpt["epoch"] >= 1 and "ctseg" in ckpt
    assert f"saved {saved}" in err
    assert "--ckpt_path last" in err and f"--ckpt_path {saved}" in err
    assert "ctseg fit: interrupted" in err.splitlines()[-1]


@pytest.mark.slow
def test_sigint_then_resume_with_last_matches_an_uninterrupted_run(synth: Path, tmp_path: Path) -> None:
    """The printed exact resume (``--ckpt_path last``) ends with the weights of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CTSEG_DEBUG": "0"}
    # Five epochs: the interrupt comes after the first, and the run must not end before it arrives. With
    # three, a test process starved by a loaded machine once saw the run finish first (exit 0).
    det = ("--trainer.max_epochs", "5", "--trainer.deterministic", "true")

    def fit(run: Path, *extra: str) -> None:
        argv = [sys.executable, "-m", "ctseg", "fit", *fit_args(synth, run, *det), *extra]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    fit(tmp_path / "a")
    run = tmp_path / "b"
    proc = fit_process(synth, run, *det)
    interrupt_after_first_epoch(proc, run)
    assert proc.returncode == 130
    fit(run, "--ckpt_path", "last")
    a = loadable(tmp_path / "a" / "checkpoints" / "last.ckpt")
    b = loadable(run / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"]
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not diff, f"{len(diff)} tensors differ after the resume, e.g. {diff[:3]}"


def test_resume_command_replaces_the_checkpoint_option() -> None:
    argv = ["fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt", "--ckpt_path=older.ckpt"]
    assert resume_command("last", argv) == "ctseg fit --config 'a b.yaml' --ckpt_path last"
    assert resume_command("x.ckpt", ["validate"]) == "ctseg fit <same arguments> --ckpt_path x.ckpt"
