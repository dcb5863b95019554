"""Callbacks of ``ctseg fit``: exact data sampling, the per-epoch log line, the run report.

Callbacks that want the module's per-epoch summary implement
``on_ctseg_epoch_record(trainer, module, record)`` (see :mod:`ctseg.engine.module`); this is where
later policies (non-finite loss handling, SIGINT checkpointing) plug in without touching the module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from ctseg.engine import sampling
from ctseg.engine.report import hardware_info, write_report


def run_dir(trainer: pl.Trainer) -> Path:
    """Folder of this run's checkpoints and reports (``trainer.default_root_dir``)."""
    return Path(trainer.default_root_dir)


class ExactSampling(Callback):
    """Exact resume and exact distributed evaluation (:mod:`ctseg.engine.sampling`).

    * before every training batch, seeds the global RNGs from ``(seed, batch count, rank)``;
    * a training loader with a global-RNG ``RandomSampler`` is re-built on an epoch-seeded sampler;
    * validation / test loaders are sharded without padding when several processes run, so that the
      synced confusion matrix counts every sample exactly once.

    Args:
        seed: base seed; ``None`` = the run's ``seed_everything`` seed (``PL_GLOBAL_SEED``), else 0.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def _seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or getattr(dm, "_ctseg_exact_sampling", False):
            return
        seed, world, rank = self._seed(), trainer.world_size, trainer.global_rank
        for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
            original = getattr(dm, name, None)
            if original is None:
                continue
            if name == "train_dataloader":

                def wrapped(original=original):
                    return sampling.train_loader(original(), seed, world, rank)
            else:

                def wrapped(original=original):
                    return _map_loaders(original(), lambda dl: sampling.eval_loader(dl, world, rank))

            setattr(dm, name, wrapped)
        dm._ctseg_exact_sampling = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The running batch count (restored on resume), not global_step: with gradient accumulation
        # several batches share one optimizer step and must still draw different CT samples.
        batches = getattr(trainer.fit_loop.epoch_loop, "total_batch_idx", trainer.global_step)
        sampling.seed_all(sampling.step_seed(self._seed(), int(batches), trainer.global_rank))


def _map_loaders(loaders: Any, fn: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return type(loaders)(fn(dl) for dl in loaders)
    return fn(loaders)


class EpochLogLine(Callback):
    """One concise line per epoch: loss, val mIoU, CT activity, time."""

    def on_ctseg_epoch_record(
        self, trainer: pl.Trainer, module: pl.LightningModule, record: dict[str, Any]
    ) -> None:
        if trainer.sanity_checking:
            return
        self._print(trainer, format_epoch_line(record, trainer.max_epochs))

    @rank_zero_only
    def _print(self, trainer: pl.Trainer, line: str) -> None:
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "progress") and getattr(bar, "progress", None) is not None:
            bar.progress.console.print(line, markup=False, highlight=False)  # keep the rich bar intact
        else:
            print(line, flush=True)


def format_epoch_line(record: dict[str, Any], max_epochs: int | None = None) -> str:
    total = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    parts = [f"epoch {record['epoch'] + 1}{total}", f"loss {record['train_loss']:.4f}"]
    val = record.get("val")
    if val is not None and val.get("mIoU") is not None:
        parts.append(f"val mIoU {val['mIoU']:.4f}")
        if val.get("OA") is not None:
            parts.append(f"OA {val['OA']:.4f}")
    ct = record.get("ct")
    if ct:
        parts.append(
            f"CT active {ct.get('active', float('nan')):.0%} clipped {ct.get('clipped', float('nan')):.0%}"
        )
    parts.append(f"{record['seconds']:.1f}s")
    return "ctseg | " + " | ".join(parts)


class RunReport(Callback):
    """Writes ``metrics.json`` + ``report.md`` (+ ``curves.png``) into the run folder at the end of fit,
    and ``test_*`` / ``validate_*`` files at the end of test / validate (rank 0 only; metrics are synced).

    Args:
        dirpath: output folder; ``None`` = the run folder (logger version folder).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._t0 = time.perf_counter()
        self.paths: dict[str, dict[str, Path]] = {}

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_dir(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    on_test_start = on_fit_start

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._t0 = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, "fit", None, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scores = getattr(pl_module, "test_scores", None)
        self._write(trainer, pl_module, "test", None if scores is None else scores.to_dict(), "test")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "validate" or trainer.sanity_checking:
            return
        scores = getattr(pl_module, "val_scores", None)
        self._write(trainer, pl_module, "validate", None if scores is None else scores.to_dict(), "val")

    def _write(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        stage: str,
        scores: dict[str, Any] | None,
        split: str,
    ) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or getattr(module, "protocol", None) is None:
            return
        out = self._dir(trainer)
        cfg_file = Path(log_dir or out) / "config.yaml"
        config_text = cfg_file.read_text(encoding="utf-8") if cfg_file.is_file() else None
        config = {"model": dict(module.hparams)}
        dm = trainer.datamodule
        if dm is not None and getattr(dm, "hparams", None):
            config["data"] = dict(dm.hparams)
        proto = module.protocol
        hw = hardware_info()
        hw.update({"world_size": trainer.world_size, "precision": str(trainer.precision)})
        self.paths[stage] = write_report(
            out,
            stage=stage,
            protocol=proto.to_dict(),
            protocol_summary=proto.summary(),
            model={"name": module.model_name, "kwargs": module.model_kwargs, "ct": module.ct_config},
            scores=scores,
            history=module.history if stage == "fit" else [],
            config=config,
            config_text=config_text,
            hardware=hw,
            seconds=time.perf_counter() - self._t0,
            split=split,
        )
