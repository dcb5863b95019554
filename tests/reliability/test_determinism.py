"""Determinism: the same seed gives the same numbers; ``trainer.deterministic`` is honoured.

Protocol of the compared metrics: the ``synthetic`` protocol's validation split (2 scenes of 64²), one
confusion matrix over all pixels, mIoU over the 5 mean classes, as written to ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from ctseg.cli import main
from ctseg.engine.cli import run_cli
from tests.fit import fit_args


def numbers(run: Path) -> dict:
    """Everything ``metrics.json`` reports except wall time and hardware."""
    data = json.loads((run / "metrics.json").read_text())
    history = [{k: v for k, v in rec.items() if k != "seconds"} for rec in data["history"]]
    return {"scores": data["scores"], "history": history}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_same_seed_twice_on_cpu_gives_identical_metrics_and_weights(
    trained_run: Path, synth: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    assert main(["fit", *fit_args(synth, again, "--trainer.deterministic", "true")]) == 0
    assert numbers(again) == numbers(trained_run)
    a, b = weights(trained_run), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_seed_gives_other_numbers(trained_run: Path, synth: Path, tmp_path: Path) -> None:
    """The comparison above can fail: a different seed changes the training loss."""
    other = tmp_path / "other"
    assert (
        main(["fit", *fit_args(synth, other, "--trainer.deterministic", "true", "--seed_everything", "1")])
        == 0
    )
    assert numbers(other)["history"][0]["train_loss"] != numbers(trained_run)["history"][0]["train_loss"]


def test_deterministic_flag_reaches_torch(synth: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so the test leaves the env as found
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    torch.use_deterministic_algorithms(False)
    run_cli("fit", fit_args(synth, tmp_path / "run", "--trainer.deterministic", "true"), run=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")  # cuBLAS needs it on GPU


@pytest.mark.gpu
def test_same_seed_twice_on_gpu_with_deterministic(synth: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = ("--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.deterministic", "true")
    for name in ("a", "b"):
        assert main(["fit", *fit_args(synth, tmp_path / name, *gpu)]) == 0
    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # CT statistics were summed on the GPU (no per-step host read) and still reach the epoch record.
    ct = numbers(tmp_path / "a")["history"][0]["ct"]
    assert ct is not None and 0.0 <= ct["active"] <= 1.0 and "stage0/positives" in ct


@pytest.mark.gpu
def test_ct_recorded_as_cuda_graphs_trains_deterministically_on_gpu(synth: Path, tmp_path: Path) -> None:
    """``ct: {cuda_graph: true}`` through the CLI on a GPU: the loss is recorded (no fallback warning),
    two seeded runs give identical numbers and weights, and CT statistics reach the epoch record."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ct = json.dumps({"loss": "cl", "mode": "paper", "clip": 1.0, "clip_mode": "scale", "cuda_graph": True})
    gpu = ("--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.deterministic", "true")
    for name in ("a", "b"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["fit", *fit_args(synth, tmp_path / name, *gpu, "--model.ct", ct)]) == 0
        fallbacks = [str(w.message) for w in caught if str(w.message).startswith("CT loss, cuda_graph")]
        assert not fallbacks, fallbacks
    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ct_stats = numbers(tmp_path / "a")["history"][0]["ct"]
    assert ct_stats is not None and ct_stats["active"] > 0.0
    assert "cuda_graph: true" in (tmp_path / "a" / "config.yaml").read_text()
