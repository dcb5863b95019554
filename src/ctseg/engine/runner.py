"""The run layout shared by ``ctseg fit`` (LightningCLI) and programmatic runs (``ctseg demo``).

A run folder holds ``checkpoints/`` (best by val mIoU + ``last.ckpt``), CSV (and TensorBoard) logs and
the reports; :func:`run_callbacks` and :func:`run_loggers` build what every ctseg run uses, and
:func:`make_trainer` a Trainer with them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from ctseg.engine.callbacks import EpochLogLine, ExactSampling, RunReport
from ctseg.engine.guards import guard_callbacks, with_atomic_checkpoint_io


def run_callbacks(
    root: str | Path,
    *,
    save_top_k: int = 1,
    progress: bool = True,
    nonfinite: str = "skip",
    nonfinite_max_skips: int = 10,
) -> list[Callback]:
    """Checkpoints (best by ``val/mIoU`` and last), exact sampling, the epoch line, the report, the
    non-finite and Ctrl-C guards (:mod:`ctseg.engine.guards`), a rich bar."""
    root = Path(root)
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=str(root / "checkpoints"),
            filename="best-epoch{epoch:03d}-miou{val/mIoU:.4f}",
            auto_insert_metric_name=False,
            monitor="val/mIoU",
            mode="max",
            save_top_k=save_top_k,
        ),
        # last.ckpt after every epoch. Lightning >= 2.5 writes a `save_last=True` file only when a top-k
        # checkpoint was saved in the same step, i.e. at the last *improved* epoch: a killed run would
        # resume from there and lose the epochs after it.
        ModelCheckpoint(
            dirpath=str(root / "checkpoints"),
            filename=ModelCheckpoint.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
        ),
        ExactSampling(),
        EpochLogLine(),
        RunReport(),
        *guard_callbacks(nonfinite, nonfinite_max_skips),
    ]
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    return callbacks


def next_version(folder: Path, command: str) -> str:
    """``<command>-<n>`` with the first ``n`` not yet used in ``folder``."""
    n = 0
    while (folder / f"{command}-{n}").exists():
        n += 1
    return f"{command}-{n}"


def run_loggers(
    root: str | Path, *, fresh_fit: bool, command: str = "fit", tensorboard: bool = True
) -> list[Logger]:
    """CSV (+ TensorBoard) loggers.

    A fresh fit logs (and LightningCLI saves ``config.yaml``) in the run folder itself; a resumed fit,
    ``validate`` and ``test`` log into ``logs/<command>-<n>/`` so they never replace the first fit's files.
    """
    root = Path(root)
    if fresh_fit:
        loggers: list[Logger] = [CSVLogger(save_dir=str(root), name="", version="")]
    else:
        loggers = [
            CSVLogger(save_dir=str(root / "logs"), name="", version=next_version(root / "logs", command))
        ]
    if tensorboard:
        with contextlib.suppress(ModuleNotFoundError):  # the tensorboard extra is optional
            loggers.append(TensorBoardLogger(save_dir=str(root / "tensorboard"), name="", version=""))
    return loggers


def make_trainer(
    root: str | Path,
    *,
    progress: bool = True,
    tensorboard: bool = False,
    save_top_k: int = 1,
    extra_callbacks: Sequence[Callback] = (),
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A Trainer writing the standard run folder ``root`` (fresh fit layout)."""
    return pl.Trainer(
        default_root_dir=str(root),
        logger=run_loggers(root, fresh_fit=True, tensorboard=tensorboard),
        callbacks=[*run_callbacks(root, save_top_k=save_top_k, progress=progress), *extra_callbacks],
        enable_progress_bar=progress,
        plugins=with_atomic_checkpoint_io(trainer_kwargs.pop("plugins", None)),
        **trainer_kwargs,
    )
