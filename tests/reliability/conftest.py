"""Fixtures of the reliability tests: a tiny synthetic prepared set (64² scenes) and one real trained run
(``tests/fit.py`` arguments) shared by the tests that need a checkpoint. Everything runs on CPU with one
torch thread (see tests/engine/conftest.py for why).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from ctseg.cli import main
from ctseg.data.synthetic import write_synthetic_dataset
from tests.fit import fit_args


def files_under(folder: Path) -> set[str]:
    """Every file below ``folder`` (relative paths), ``set()`` when it does not exist."""
    if not folder.exists():
        return set()
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def temp_leftovers(folder: Path) -> list[str]:
    """Temporary files of the atomic writers (``.<name>.<random>.tmp``) left below ``folder``."""
    return sorted(str(p) for p in folder.rglob(".*.tmp")) if folder.exists() else []


@pytest.fixture(autouse=True)
def _quiet_log_handler_errors(monkeypatch: pytest.MonkeyPatch):
    """Lightning's log handler keeps the stderr of the test that first imported it, a closed capture in
    later tests; logging then prints "--- Logging error --- Traceback" into the captured stderr that the
    tests search for tracebacks. Outside pytest the stream is the real stderr, so silence only that."""
    monkeypatch.setattr(logging, "raiseExceptions", False)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_determinism():
    """Lightning's ``deterministic=True`` switches a process-wide flag; leave it as found."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture(scope="package")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic set: 4 train, 2 val, 2 test scenes of 64²; treat as read-only (copy to damage)."""
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, n_train=4, n_val=2, n_test=2, size=64, seed=0)
    return root


@pytest.fixture
def synth_copy(synth: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`synth` that a test may damage."""
    dest = tmp_path / "data"
    shutil.copytree(synth, dest)
    return dest


@pytest.fixture(scope="package")
def trained_run(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 1-epoch ``ctseg fit`` run folder (CT on, deterministic); its ``checkpoints/last.ckpt``."""
    run = tmp_path_factory.mktemp("trained") / "run"
    torch.set_num_threads(1)
    assert main(["fit", *fit_args(synth, run, "--trainer.deterministic", "true")]) == 0
    return run
