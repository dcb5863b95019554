"""Run the cells of a grid, each as an ordinary ``ctseg fit`` in its own folder and its own process.

State lives in the run folders, so the runner can be killed and restarted at any time, run cell by
cell from a job scheduler (``--only``), or on several machines sharing the output folder:

* ``<cell>/cell.yaml``: the cell's complete config (the one ``--config`` of its ``ctseg fit``);
* ``<cell>/cell.json``: the runner's record, written atomically: ``status`` (``running`` → ``finished``,
  or ``failed`` / ``interrupted``), attempts, wall time summed over attempts, command, commit, host,
  the config hash; a cell is *finished* only when this says so, which the runner writes after
  ``ctseg fit`` exited 0 and left a ``metrics.json`` (and after the test evaluation, when it applies);
* ``<cell>/.cell.lock``: held while a runner works on the cell (host + pid); a lock of a dead process on
  this host is taken over, a lock from another host is respected unless ``force``;
* ``<cell>/logs/``: the output of every attempt.

A cell that is not finished but has ``checkpoints/last.ckpt`` is resumed with ``--ckpt_path`` (exact,
see ``docs/training.md``). When the prepared data has test labels, the checkpoint with the best
*validation* mIoU is evaluated on the test split by ``ctseg test`` into ``<cell>/test/`` (the test split
never takes part in the selection).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from ctseg.errors import ConfigError, DataError
from ctseg.experiments.grid import Cell, GridSpec
from ctseg.utils.io import atomic_write_json, atomic_write_text

CELL_CONFIG = "cell.yaml"
CELL_RECORD = "cell.json"
CELL_LOCK = ".cell.lock"
GRID_RECORD = "grid.json"
TEST_DIR = "test"
DEVICES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "mps": "mps", "auto": "auto"}
_BEST = re.compile(r"^best-epoch(\d+)-miou([0-9.]+)\.ckpt$")

Echo = Callable[[str], None]

# Cell processes alive right now, so an interrupt of the runner reaches every one of them (with
# --jobs > 1 they run in worker threads, which a KeyboardInterrupt in the main thread does not stop).
_LIVE: set[subprocess.Popen[str]] = set()
_LIVE_LOCK = threading.Lock()
_INTERRUPTED = threading.Event()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """``git describe --always --dirty`` of the source tree ctseg runs from, or ``None`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# ----------------------------------------------------------------------------------- data


def has_test_labels(data_root: Path) -> bool:
    """Whether the prepared folder has test tiles with masks."""
    from ctseg.data.layout import read_manifest

    manifest = read_manifest(data_root, check_files=False)
    return any(t.mask is not None for t in manifest.split("test"))


def _make_synthetic(grid: GridSpec, root: Path) -> str:
    from ctseg.data.synthetic import write_synthetic_dataset

    assert grid.prepare is not None
    manifest = write_synthetic_dataset(root, **grid.prepare.options)
    return f"generated {len(manifest.tiles)} synthetic tiles into {root}"


def _prepare_official(grid: GridSpec, root: Path) -> str:
    from ctseg.data.prepare import prepare

    assert grid.prepare is not None
    hint = (
        f"ctseg prepare {grid.prepare.dataset} "
        + " ".join(f'--src "{s}"' for s in grid.prepare.src)
        + (f" --protocol {grid.protocol}" if grid.protocol else "")
        + f" --out {root}"
    )
    missing = [s for s in grid.prepare.src if not Path(s).exists()]
    if missing:
        raise DataError(
            root,
            f"prepared data missing and the source {', '.join(missing)} named by {grid.path} data.prepare.src "
            f"does not exist (relative to {Path.cwd()}); get the dataset and run: {hint}",
        )
    result = prepare(
        grid.prepare.dataset, list(grid.prepare.src), root, grid.protocol, **grid.prepare.options
    )
    return f"prepared {len(result.manifest.tiles)} tiles into {root}"


#: How a missing data folder is made, by ``data.prepare.dataset`` (anything else: ``ctseg prepare``).
DATA_MAKERS: dict[str, Callable[[GridSpec, Path], str]] = {"synthetic": _make_synthetic}


def ensure_data(grid: GridSpec, echo: Echo = print) -> None:
    """Make sure the grid's prepared folder exists: make it from ``data.prepare`` when missing."""
    root = grid.data_root
    if (root / "manifest.json").is_file():
        return
    if grid.prepare is None:
        raise DataError(
            root,
            f"prepared data missing (no manifest.json) and {grid.path} has no data.prepare; run "
            f"`ctseg prepare <dataset> --src <official files> --out {root}` first",
        )
    echo(f"data folder {root} missing: making it ({grid.prepare.dataset}) ...")
    maker = DATA_MAKERS.get(grid.prepare.dataset, _prepare_official)
    echo(maker(grid, root))


# ----------------------------------------------------------------------------------- records


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The cell's ``cell.json`` or ``None`` (absent or unreadable: the cell is treated as not finished)."""
    path = run_dir / CELL_RECORD
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / CELL_LOCK).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def lock_holder(run_dir: Path) -> str | None:
    """``host:pid`` of a live lock on the cell, or ``None`` (no lock, or a dead process on this host)."""
    lock = _read_lock(run_dir)
    if not lock:
        return None
    host, pid = lock.get("host"), int(lock.get("pid", -1))
    if host == socket.gethostname() and not _pid_alive(pid):
        return None
    return f"{host}:{pid}"


def _acquire(run_dir: Path, force: bool) -> bool:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CELL_LOCK
    holder = lock_holder(run_dir)
    if holder is not None and not force:
        return False
    path.unlink(missing_ok=True)  # stale, or taken over with force
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # another runner won the race
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}, fh)
    return True


def _release(run_dir: Path) -> None:
    lock = _read_lock(run_dir)
    if lock and lock.get("host") == socket.gethostname() and lock.get("pid") == os.getpid():
        (run_dir / CELL_LOCK).unlink(missing_ok=True)


def cell_status(cell: Cell) -> str:
    """``pending`` | ``running`` | ``partial`` (checkpoint to resume) | ``failed`` | ``interrupted`` |
    ``finished`` | ``changed`` (finished, but the grid now gives this cell another config)."""
    rec = read_record(cell.run_dir)
    if rec and rec.get("status") == "finished":
        return "finished" if rec.get("config_hash") == cell.config_hash else "changed"
    if lock_holder(cell.run_dir) is not None:
        return "running"
    if (cell.run_dir / "checkpoints" / "last.ckpt").is_file():
        return "partial"
    if rec and rec.get("status") in ("failed", "interrupted"):
        return str(rec["status"])
    return "pending"


def best_checkpoint(run_dir: Path) -> tuple[Path, int | None]:
    """The checkpoint of the epoch with the best validation mIoU (the one ``metrics.json`` reports)."""
    ckpts = run_dir / "checkpoints"
    found = {}
    for p in ckpts.glob("best-*.ckpt") if ckpts.is_dir() else []:
        m = _BEST.match(p.name)
        if m:
            found[p] = (int(m.group(1)), float(m.group(2).rstrip(".")))
    if not found:
        raise DataError(ckpts, "no best-epoch*.ckpt checkpoint (was the run validated at least once?)")
    best_epoch = None
    with contextlib.suppress(OSError, json.JSONDecodeError):
        best_epoch = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")).get("best_epoch")
    for p, (epoch, _) in found.items():
        if epoch == best_epoch:
            return p, epoch
    p = max(found, key=lambda q: found[q][1])
    return p, found[p][0]


# ----------------------------------------------------------------------------------- running


@dataclass
class RunOptions:
    """How to run cells.

    Attributes:
        device: ``cpu`` | ``gpu`` (``cuda``) | ``mps`` | ``auto`` → ``trainer.accelerator``; ``None`` = the config's.
        devices: ``trainer.devices`` (e.g. ``1``, ``4``, ``"0,1"``); ``None`` = the config's.
        fit_args: extra ``ctseg fit`` arguments appended to every cell (e.g. ``--data.num_workers 8``).
        jobs: cells run at the same time (separate processes).
        force: take over locks held by other hosts (or live processes) and re-run ``changed`` cells.
        rerun_failed: run cells whose last attempt failed (default True; a resume is attempted first).
        verbose: echo every line of the cells' output (default: the one-line epoch summaries).
        python: interpreter for the cell processes.
        command: the command line recorded in ``cell.json`` (default: this process's arguments).
    """

    device: str | None = None
    devices: str | None = None
    fit_args: Sequence[str] = ()
    jobs: int = 1
    force: bool = False
    rerun_failed: bool = True
    verbose: bool = False
    python: str = sys.executable
    command: str | None = None

    def trainer_args(self) -> list[str]:
        args = []
        if self.device is not None:
            if self.device not in DEVICES:
                raise ConfigError(f"--device {self.device!r}: expected one of {', '.join(DEVICES)}")
            args += ["--trainer.accelerator", DEVICES[self.device]]
        if self.devices is not None:
            args += ["--trainer.devices", str(self.devices)]
        return args


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # finished | skipped | failed | interrupted | busy
    message: str = ""
    seconds: float = 0.0


def _stream(cmd: list[str], log: Path, prefix: str, echo: Echo, verbose: bool) -> int:
    """Run ``cmd``, copy its output to ``log``; echo ``ctseg |`` lines (all lines when verbose)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                if verbose or line.startswith("ctseg |") or line.startswith("ctseg fit: error"):
                    echo(f"{prefix} {line.rstrip()}")
            return proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGINT first (Lightning shuts down cleanly), then terminate, then kill."""
    if proc.poll() is not None:
        return
    for action, wait in (
        (proc.send_signal, 60),
        (lambda _s: proc.terminate(), 20),
        (lambda _s: proc.kill(), 5),
    ):
        action(signal.SIGINT)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_all() -> None:
    """Interrupt every running cell process (called when the runner itself is interrupted)."""
    _INTERRUPTED.set()
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _stop(proc)


def _tail(log: Path, n: int = 5) -> str:
    try:
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def fit_command(cell: Cell, options: RunOptions, resume: Path | None) -> list[str]:
    cmd = [options.python, "-m", "ctseg", "fit", "--config", str(cell.run_dir / CELL_CONFIG)]
    cmd += options.trainer_args() + list(options.fit_args)
    if resume is not None:
        cmd += ["--ckpt_path", str(resume)]
    return cmd


def evaluation_command(cell: Cell, options: RunOptions, ckpt: Path) -> list[str]:
    out = cell.run_dir / TEST_DIR
    cmd = [options.python, "-m", "ctseg", "test", "--config", str(cell.run_dir / CELL_CONFIG)]
    cmd += options.trainer_args()
    # A subfolder without loggers: the fit's metrics.csv and config.yaml stay untouched.
    cmd += ["--trainer.default_root_dir", str(out), "--trainer.logger", "false", "--ckpt_path", str(ckpt)]
    return cmd


def run_cell(
    cell: Cell, grid: GridSpec, options: RunOptions, echo: Echo = print, *, test: bool = False
) -> CellOutcome:
    """Run (or resume, or skip) one cell; see the module docstring for the files it keeps."""
    status = cell_status(cell)
    if status == "finished" or (status == "changed" and not options.force):
        msg = "finished" if status == "finished" else "finished with an older config (use --force to re-run)"
        return CellOutcome(cell, "skipped", msg)
    if status in ("failed", "interrupted") and not options.rerun_failed:
        return CellOutcome(cell, "skipped", f"last attempt {status} (not retried)")
    if not _acquire(cell.run_dir, options.force):
        return CellOutcome(cell, "busy", f"locked by {lock_holder(cell.run_dir)}")
    try:
        return _run_locked(cell, grid, options, echo, test, status)
    finally:
        _release(cell.run_dir)


def _run_locked(
    cell: Cell, grid: GridSpec, options: RunOptions, echo: Echo, test: bool, status: str
) -> CellOutcome:
    run_dir = cell.run_dir
    prev = read_record(run_dir) or {}
    if status == "changed":  # forced re-run from scratch with the new config
        prev = {}
        (run_dir / "checkpoints" / "last.ckpt").unlink(missing_ok=True)
    atomic_write_text(
        run_dir / CELL_CONFIG,
        f"# ctseg experiment cell {cell.id} of grid {grid.name} ({grid.path}); written by the runner\n"
        + yaml.safe_dump(cell.config, sort_keys=False),
    )
    attempts = int(prev.get("attempts", 0)) + 1
    record: dict[str, Any] = {
        "grid": grid.name,
        "grid_file": str(grid.path),
        "cell": cell.id,
        "model": cell.model,
        "setting": cell.setting,
        "seed": cell.seed,
        "baseline": grid.baseline,
        "config_hash": cell.config_hash,
        "status": "running",
        "fit_done": bool(prev.get("fit_done")) and status != "changed",
        "attempts": attempts,
        "wall_seconds": float(prev.get("wall_seconds", 0.0)),
        "started": prev.get("started", _now()),
        "host": socket.gethostname(),
        "commit": git_commit(),
        "command": options.command or " ".join(sys.argv),
        "device": options.device,
        "fit_args": list(options.fit_args),
        "history": list(prev.get("history", [])),
    }
    atomic_write_json(run_dir / CELL_RECORD, record)
    t0 = time.perf_counter()
    prefix = f"[{cell.id}]"

    def finish(state: str, message: str) -> CellOutcome:
        spent = time.perf_counter() - t0
        record["wall_seconds"] += spent
        record["status"] = state
        record["history"].append(
            {"attempt": attempts, "ended": _now(), "status": state, "seconds": spent, "message": message}
        )
        if state == "finished":
            record["finished"] = _now()
        atomic_write_json(run_dir / CELL_RECORD, record)
        return CellOutcome(cell, state, message, spent)

    try:
        if not record["fit_done"]:
            last = run_dir / "checkpoints" / "last.ckpt"
            resume = last if last.is_file() else None
            echo(f"{prefix} fit" + (f" (resuming {last})" if resume else "") + f", attempt {attempts}")
            log = run_dir / "logs" / f"fit-{attempts}.log"
            rc = _stream(fit_command(cell, options, resume), log, prefix, echo, options.verbose)
            if rc != 0:
                state = "interrupted" if _INTERRUPTED.is_set() else "failed"
                return finish(state, f"ctseg fit exited {rc}; see {log}: {_tail(log)}")
            metrics = run_dir / "metrics.json"
            if (
                not metrics.is_file()
                or metrics.stat().st_mtime < time.time() - (time.perf_counter() - t0) - 5
            ):
                return finish("failed", f"ctseg fit exited 0 but wrote no fresh {metrics}")
            record["fit_done"] = True
            atomic_write_json(run_dir / CELL_RECORD, record)
        if test:
            ckpt, epoch = best_checkpoint(run_dir)
            echo(f"{prefix} test split with {ckpt.name} (best validation epoch {epoch})")
            log = run_dir / "logs" / f"test-{attempts}.log"
            rc = _stream(evaluation_command(cell, options, ckpt), log, prefix, echo, options.verbose)
            if rc != 0 or not (run_dir / TEST_DIR / "test_metrics.json").is_file():
                return finish("failed", f"ctseg test exited {rc}; see {log}: {_tail(log)}")
            record["test"] = {
                "checkpoint": str(ckpt),
                "selected_epoch": epoch,
                "metrics": f"{TEST_DIR}/test_metrics.json",
            }
        return finish("finished", "")
    except KeyboardInterrupt:
        finish("interrupted", "interrupted by the user")
        raise
    except DataError as exc:
        return finish("failed", str(exc))


def run_grid(
    grid: GridSpec,
    only: Sequence[str] | None = None,
    options: RunOptions | None = None,
    echo: Echo = print,
) -> list[CellOutcome]:
    """Run every (selected) cell that is not finished; returns one outcome per selected cell."""
    options = options or RunOptions()
    options.trainer_args()  # validate before any work
    if options.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {options.jobs}")
    cells = grid.select(only)
    ensure_data(grid, echo)
    test = grid.test == "auto" and has_test_labels(grid.data_root)
    grid.output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(grid.output / GRID_RECORD, {**grid.to_dict(), "test_evaluation": test})
    lock = threading.Lock()

    def safe_echo(line: str) -> None:
        with lock:
            echo(line)

    todo = [c for c in cells if cell_status(c) != "finished"]
    safe_echo(
        f"grid {grid.name}: {len(cells)} cell(s) selected, {len(cells) - len(todo)} already finished, "
        f"{len(todo)} to run; output {grid.output}; test split: {'yes' if test else 'no test labels'}"
    )
    outcomes: dict[str, CellOutcome] = {}
    for c in cells:
        if c not in todo:
            outcomes[c.id] = CellOutcome(c, "skipped", "finished")

    def one(c: Cell) -> CellOutcome:
        out = run_cell(c, grid, options, safe_echo, test=test)
        tail = f" ({out.message})" if out.message else ""
        safe_echo(f"[{c.id}] {out.status} in {out.seconds:.0f}s{tail}")
        return out

    _INTERRUPTED.clear()
    try:
        if options.jobs == 1:
            for c in todo:
                outcomes[c.id] = one(c)
        else:
            with ThreadPoolExecutor(max_workers=options.jobs) as pool:
                futures = [(c, pool.submit(one, c)) for c in todo]
                try:
                    for c, fut in futures:
                        outcomes[c.id] = fut.result()
                except KeyboardInterrupt:
                    for _, fut in futures:
                        fut.cancel()
                    raise
    except KeyboardInterrupt:
        stop_all()
        raise
    return [outcomes[c.id] for c in cells]
