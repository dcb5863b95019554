"""The grid runner: cell states, locks, resume and test-split commands, data preparation, real cells.

The default tests run one real ``ctseg fit`` subprocess (a cell that fails fast); the real grid on
synthetic data (fit, test split, skip on re-run, resume after a kill, report) is ``slow``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctseg.errors import ConfigError, DataError
from ctseg.experiments.grid import load_grid
from ctseg.experiments.runner import (
    CELL_LOCK,
    CELL_RECORD,
    RunOptions,
    best_checkpoint,
    cell_status,
    ensure_data,
    evaluation_command,
    fit_command,
    has_test_labels,
    run_cell,
    run_grid,
)

REPO = Path(__file__).resolve().parents[2]


def _grid(
    tmp_path: Path, *, prepare: str = "", models: str = "{m: {model: {model: unetformer-paper}}}"
) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(
        f"""
name: t
protocol: synthetic
data:
  root: {tmp_path / "data"}
{prepare}
configs: [{REPO / "configs/synthetic/base.yaml"}]
overrides:
  tensorboard: false
  trainer: {{max_epochs: 1, limit_train_batches: 1, limit_val_batches: 1}}
  data: {{crop_size: 32, batch_size: 2, val_batch_size: 2, num_workers: 0}}
models: {models}
settings:
  baseline: {{model: {{ct: null}}}}
  cl: {{config: {REPO / "configs/potsdam-paper/ct-cl.yaml"}}}
baseline: baseline
seeds: [0, 1]
output: {tmp_path / "out"}
"""
    )
    return path


SYNTH = "  prepare: {dataset: synthetic, options: {n_train: 2, n_val: 1, n_test: 1, size: 32, seed: 0}}"


def _record(run: Path, **fields) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / CELL_RECORD).write_text(json.dumps(fields))


def test_cell_status_follows_the_run_folder(tmp_path: Path):
    cell = load_grid(_grid(tmp_path)).cells()[0]
    assert cell_status(cell) == "pending"
    _record(cell.run_dir, status="failed")
    assert cell_status(cell) == "failed"
    (cell.run_dir / "checkpoints").mkdir()
    (cell.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert cell_status(cell) == "partial"  # resumable beats failed
    _record(cell.run_dir, status="finished", config_hash=cell.config_hash)
    assert cell_status(cell) == "finished"
    _record(cell.run_dir, status="finished", config_hash="0" * 16)
    assert cell_status(cell) == "changed"


def test_finished_and_changed_cells_are_skipped(tmp_path: Path):
    g = load_grid(_grid(tmp_path))
    cell = g.cells()[0]
    _record(cell.run_dir, status="finished", config_hash=cell.config_hash)
    assert run_cell(cell, g, RunOptions()).status == "skipped"
    _record(cell.run_dir, status="finished", config_hash="old")
    out = run_cell(cell, g, RunOptions())
    assert out.status == "skipped" and "--force" in out.message


def test_locks_of_live_or_remote_runners_are_respected(tmp_path: Path):
    g = load_grid(_grid(tmp_path))
    cell = g.cells()[0]
    cell.run_dir.mkdir(parents=True)
    lock = cell.run_dir / CELL_LOCK
    lock.write_text(json.dumps({"host": "other-machine", "pid": 1}))
    assert cell_status(cell) == "running"
    out = run_cell(cell, g, RunOptions())
    assert out.status == "busy" and "other-machine:1" in out.message
    # A lock of a dead process on this host is stale.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert cell_status(cell) == "pending"


def test_best_checkpoint_is_the_best_validation_epoch(tmp_path: Path):
    ck = tmp_path / "checkpoints"
    ck.mkdir(parents=True)
    with pytest.raises(DataError, match="no best-epoch"):
        best_checkpoint(tmp_path)
    for name in ("best-epoch003-miou0.4000.ckpt", "best-epoch007-miou0.5000.ckpt", "last.ckpt"):
        (ck / name).write_bytes(b"x")
    assert best_checkpoint(tmp_path) == (ck / "best-epoch007-miou0.5000.ckpt", 7)
    (tmp_path / "metrics.json").write_text(json.dumps({"best_epoch": 3}))
    assert best_checkpoint(tmp_path) == (ck / "best-epoch003-miou0.4000.ckpt", 3)


def test_commands(tmp_path: Path):
    cell = load_grid(_grid(tmp_path)).cells()[1]
    opts = RunOptions(device="cuda", devices="2", fit_args=["--data.num_workers", "8"], python="py")
    cmd = fit_command(cell, opts, resume=cell.run_dir / "checkpoints" / "last.ckpt")
    assert cmd[:5] == ["py", "-m", "ctseg", "fit", "--config"] and cmd[5].endswith("cell.yaml")
    assert "--trainer.accelerator" in cmd and cmd[cmd.index("--trainer.accelerator") + 1] == "gpu"
    assert cmd[cmd.index("--trainer.devices") + 1] == "2" and "--data.num_workers" in cmd
    assert cmd[-2:] == ["--ckpt_path", str(cell.run_dir / "checkpoints" / "last.ckpt")]
    t = evaluation_command(cell, opts, Path("best.ckpt"))
    assert t[3] == "test" and t[t.index("--trainer.default_root_dir") + 1] == str(cell.run_dir / "test")
    assert t[t.index("--trainer.logger") + 1] == "false" and t[-1] == "best.ckpt"
    assert "--data.num_workers" not in t
    with pytest.raises(ConfigError, match="--device 'tpu'"):
        RunOptions(device="tpu").trainer_args()


def test_missing_data_says_how_to_prepare(tmp_path: Path):
    g = load_grid(_grid(tmp_path))
    with pytest.raises(DataError, match="ctseg prepare"):
        ensure_data(g)
    g = load_grid(_grid(tmp_path, prepare="  prepare: {dataset: dubai, src: nowhere/dubai}"))
    with pytest.raises(
        DataError, match=r"nowhere/dubai.*ctseg prepare dubai --src \"nowhere/dubai\" --protocol synthetic"
    ):
        ensure_data(g)


def test_synthetic_data_is_made_when_missing(tmp_path: Path):
    g = load_grid(_grid(tmp_path, prepare=SYNTH))
    lines: list[str] = []
    ensure_data(g, lines.append)
    assert (tmp_path / "data" / "manifest.json").is_file() and has_test_labels(tmp_path / "data")
    assert any("synthetic" in ln for ln in lines)
    ensure_data(g, lines.append)  # present: nothing to do
    assert len(lines) == 2


def test_a_failing_cell_is_recorded_with_its_log(tmp_path: Path):
    g = load_grid(_grid(tmp_path, prepare=SYNTH, models="{m: {model: {model: no-such-preset}}}"))
    lines: list[str] = []
    [out] = run_grid(g, ["m/baseline/seed0"], RunOptions(), lines.append)
    assert out.status == "failed" and "exited" in out.message
    rec = json.loads((out.cell.run_dir / CELL_RECORD).read_text())
    assert rec["status"] == "failed" and rec["attempts"] == 1 and rec["history"][0]["status"] == "failed"
    log = (out.cell.run_dir / "logs" / "fit-1.log").read_text()
    assert "no-such-preset" in log
    assert not (out.cell.run_dir / CELL_LOCK).exists()  # released
    assert json.loads((tmp_path / "out" / "grid.json").read_text())["test_evaluation"] is True
    [again] = run_grid(g, ["m/baseline/seed0"], RunOptions(rerun_failed=False), lines.append)
    assert again.status == "skipped"


def _ctseg(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctseg", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_real_grid_fit_test_skip_and_report(tmp_path: Path):
    grid = _grid(tmp_path, prepare=SYNTH)
    res = _ctseg(
        "experiment", "run", str(grid), "--only", "m/*/seed0", "--only", "m/baseline/seed1", cwd=tmp_path
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 finished" in res.stdout
    for cid in ("m/baseline/seed0", "m/cl/seed0", "m/baseline/seed1"):
        run = tmp_path / "out" / cid
        rec = json.loads((run / CELL_RECORD).read_text())
        assert rec["status"] == "finished" and rec["command"].startswith("ctseg experiment run")
        test = json.loads((run / "test" / "test_metrics.json").read_text())
        assert test["split"] == "test" and rec["test"]["selected_epoch"] == 0
        assert (run / "metrics.csv").is_file()  # the fit's log is not overwritten by the test run
    listing = _ctseg("experiment", "list", str(grid), cwd=tmp_path).stdout
    assert "m/cl/seed1" in listing and "pending" in listing and listing.count("finished") == 3
    cmds = _ctseg("experiment", "list", str(grid), "--commands", cwd=tmp_path).stdout.splitlines()
    assert cmds == [f"ctseg experiment run {grid} --only m/cl/seed1"]
    again = _ctseg("experiment", "run", str(grid), "--only", "m/baseline/*", cwd=tmp_path)
    assert "2 already finished, 0 to run" in again.stdout
    rep = _ctseg("experiment", "report", str(tmp_path / "out"), cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## Test split" in md and "`m/cl/seed1`: not finished" in md


@pytest.mark.slow
def test_killed_grid_resumes_from_the_last_checkpoint(tmp_path: Path):
    grid = _grid(tmp_path, prepare=SYNTH)
    text = grid.read_text().replace("max_epochs: 1", "max_epochs: 3")
    grid.write_text(text)
    run = tmp_path / "out" / "m" / "baseline" / "seed0"
    cmd = [sys.executable, "-m", "ctseg", "experiment", "run", str(grid), "--only", "m/baseline/seed0"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while (
        not (run / "checkpoints" / "last.ckpt").is_file() and time.time() < deadline and proc.poll() is None
    ):
        time.sleep(0.5)
    assert proc.poll() is None, "the cell ended before it could be killed"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # runner and cell die at once: no clean-up of any kind
    proc.wait()
    assert json.loads((run / CELL_RECORD).read_text())["status"] == "running"
    res = _ctseg("experiment", "run", str(grid), "--only", "m/baseline/seed0", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming" in res.stdout
    rec = json.loads((run / CELL_RECORD).read_text())
    assert rec["status"] == "finished" and rec["attempts"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [0, 1, 2]
