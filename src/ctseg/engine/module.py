"""The LightningModule: a model preset, the segmentation loss, the CT loss, AdamW, metrics, checkpoints.

Loss (reference-spec §3): ``seg_loss(logits, mask) + CT(features, mask)`` where CT is the model's
``ct_loss`` (weighted and clipped inside it, per ``ct_group_size`` group of images). Metrics come from
one confusion matrix per evaluation stage, synced across processes (:mod:`ctseg.engine.metrics`).

The network is built in ``__init__`` when the protocol is known, otherwise in :meth:`configure_model`
from the datamodule's protocol (``ctseg fit`` reads it from the prepared data). Every checkpoint
carries the ``ctseg`` block of :mod:`ctseg.engine.checkpoint`, so a checkpoint alone rebuilds the model.

At the end of every training epoch the module assembles one *epoch record* (losses, validation
scores, CT statistics, time) and hands it to every callback that defines
``on_ctseg_epoch_record(trainer, module, record)`` (the log line, the report, future policies).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ctseg.contrastive.loss import NonFiniteFeaturesError, check_ct_options
from ctseg.contrastive.stats import CTStats
from ctseg.data.protocols import Protocol, get_protocol
from ctseg.engine.checkpoint import CTSEG_KEY, make_ctseg_block, read_ctseg_block
from ctseg.engine.losses import create_seg_loss
from ctseg.engine.metrics import SegmentationMetrics, SegmentationScores, flat_metrics
from ctseg.engine.schedulers import list_schedules, lr_factor
from ctseg.errors import CheckpointError, ConfigError

IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class SegmentationModule(pl.LightningModule):
    """Train / validate / test one segmentation model, with or without CT.

    Args:
        model: model preset name in :mod:`ctseg.models` (``ctseg models`` lists them).
        model_kwargs: extra keyword arguments of the preset.
        protocol: protocol name or dict; ``None`` = take the datamodule's at set-up.
        normalization: ``{"mean": [3], "std": [3]}`` recorded in checkpoints; ``None`` = the datamodule's.
        ct: CT config passed to the model (``{"loss": "cl"|"infonce", "mode": "paper", "clip": 1.0, ...}``);
            ``None`` trains the baseline.
        ct_group_size: CT is sampled, normalised and clipped per group of this many images of a batch
            (16 reproduces the paper's two 16-image replicas in a batch of 32); ``None`` = the whole batch.
        ct_gather_negatives: in DDP, gather negatives across processes (with gradients) so that CT does
            not change with the number of GPUs at equal global batch.
        seg_loss: registered segmentation loss (``softce_dice`` = paper; ``ce`` = plain cross-entropy).
        seg_smoothing: label smoothing of the soft cross-entropy (paper 0.05).
        lr, weight_decay, betas: AdamW (paper: 8e-5, 0.01 on all parameters, (0.9, 0.999)).
        scheduler: ``constant`` (paper), ``cosine`` or ``poly``; with ``warmup_steps`` linear warm-up.
        min_lr_ratio: final LR as a fraction of ``lr`` for cosine / poly.
        poly_power: exponent of the poly schedule.
        pretrained: load pretrained backbone weights (needs them in the local cache).
    """

    def __init__(
        self,
        model: str = "unetformer-paper",
        model_kwargs: dict[str, Any] | None = None,
        protocol: str | dict[str, Any] | None = None,
        normalization: dict[str, list[float]] | None = None,
        ct: dict[str, Any] | None = None,
        ct_group_size: int | None = None,
        ct_gather_negatives: bool = False,
        seg_loss: str = "softce_dice",
        seg_smoothing: float = 0.05,
        lr: float = 8e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: str = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        poly_power: float = 0.9,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        if scheduler not in list_schedules():
            raise ConfigError(f"unknown scheduler {scheduler!r}; known: {', '.join(list_schedules())}")
        if ct_group_size is not None and ct_group_size < 1:
            raise ConfigError(f"ct_group_size must be >= 1, got {ct_group_size}")
        if lr <= 0:
            raise ConfigError(f"lr must be > 0, got {lr}")
        # protocol / normalization live in the checkpoint's ctseg block; as hparams they would clash with
        # the datamodule's hparams of the same name when loggers merge them.
        self.save_hyperparameters(ignore=["protocol", "normalization"])
        self.model_name = model
        self.model_kwargs = dict(model_kwargs or {})
        self.ct_config = None if ct is None else dict(ct)
        self.protocol: Protocol | None = None
        self.normalization = None if normalization is None else _check_normalization(normalization)
        self.model: nn.Module | None = None
        self.seg_loss: nn.Module | None = None
        self.train_loss = MeanMetric()
        self.train_seg_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_metrics: SegmentationMetrics | None = None
        self.test_metrics: SegmentationMetrics | None = None
        self.val_scores: SegmentationScores | None = None
        self.test_scores: SegmentationScores | None = None
        self.history: list[dict[str, Any]] = []
        self._ct_sums: dict[str, float] = {}
        self._ct_steps = 0
        self._ct_device_sum: Tensor | None = None
        self._ct_device_names: tuple[str, ...] = ()
        self._epoch_t0 = time.perf_counter()
        self._val_epoch: int | None = None
        if self.ct_config is not None:
            # Now, not when the model is built inside fit (after the run folder and its config exist).
            check_ct_options(self._model_ct_config())
        if protocol is not None:
            self._build(get_protocol(protocol))

    # ------------------------------------------------------------------ building
    def _build(self, protocol: Protocol) -> None:
        import ctseg.models

        self.protocol = protocol
        ct = self._model_ct_config()
        self.model = ctseg.models.create(
            self.model_name,
            num_classes=protocol.num_classes,
            ct=ct,
            pretrained=bool(self.hparams.pretrained),
            **self.model_kwargs,
        )
        if ct is not None and getattr(self.model, "ct_loss", None) is None:
            raise ConfigError(f"model {self.model_name!r} was given a CT config but has no ct_loss")
        self.seg_loss = create_seg_loss(
            self.hparams.seg_loss,
            num_classes=protocol.num_classes,
            ignore_index=protocol.ignore_index,
            smoothing=self.hparams.seg_smoothing,
        )
        kw = {"classes": protocol.classes, "ignore_index": protocol.ignore_index}
        self.val_metrics = SegmentationMetrics(mean_indices=protocol.mean_class_indices, **kw)
        self.test_metrics = SegmentationMetrics(mean_indices=protocol.mean_class_indices, **kw)

    def configure_model(self) -> None:
        if self.model is not None:
            self._check_datamodule_protocol()
            return
        dm = self._datamodule()
        proto = getattr(dm, "protocol", None) if dm is not None else None
        if proto is None:
            raise ConfigError("model.protocol is not set and the datamodule provides none")
        self._build(get_protocol(proto))
        if self.normalization is None and getattr(dm, "normalization", None) is not None:
            self.normalization = _check_normalization(dm.normalization)

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return None if trainer is None else getattr(trainer, "datamodule", None)

    def _check_datamodule_protocol(self) -> None:
        dm = self._datamodule()
        proto = getattr(dm, "protocol", None) if dm is not None else None
        if proto is None or self.protocol is None:
            return
        other = get_protocol(proto)
        if other.classes != self.protocol.classes or other.ignore_index != self.protocol.ignore_index:
            raise ConfigError(
                f"the model was built for protocol {self.protocol.name!r} ({list(self.protocol.classes)}) but the "
                f"data is {other.name!r} ({list(other.classes)})"
            )
        if self.normalization is None and getattr(dm, "normalization", None) is not None:
            self.normalization = _check_normalization(dm.normalization)

    def setup(self, stage: str) -> None:
        if self.model is not None:
            self._check_datamodule_protocol()

    # ------------------------------------------------------------------ forward / steps
    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` normalised images → ``(B, K, H, W)`` logits."""
        assert self.model is not None
        return self.model(x)

    def _model_ct_config(self) -> dict[str, Any] | None:
        """The CT config handed to the model: ``ct`` plus the module-level group / gather options."""
        if self.ct_config is None:
            return None
        ct = dict(self.ct_config)
        if self.protocol is not None:
            ct.setdefault("ignore_index", self.protocol.ignore_index)
        if self.hparams.ct_group_size is not None:
            ct["group_size"] = int(self.hparams.ct_group_size)
        if self.hparams.ct_gather_negatives:
            ct["gather_negatives"] = True
        return ct

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        assert self.model is not None and self.seg_loss is not None
        x, y = batch["image"], batch["mask"]
        if self.ct_config is not None:
            # Reference mode: plan the draws (on a background thread) while the forward is queued.
            self.model.ct_loss.prefetch(y)
            logits, feats = self.model(x, return_features=True)
        else:
            logits, feats = self.model(x), None
        seg = self.seg_loss(logits, y)
        loss = seg
        if feats is not None:
            probs = None
            if self.ct_config.get("sampling") == "confidence":
                probs = logits.detach().float().softmax(dim=1)
            try:
                ct_loss, stats = self.model.ct_loss(feats, y, probs=probs)
            except NonFiniteFeaturesError:
                if not self._has_nonfinite_guard():
                    raise
                # Diverged features: a NaN loss lets the run's non-finite policy skip or stop the step.
                ct_loss, stats = seg.new_tensor(float("nan")), {}
            loss = loss + ct_loss
            self._accumulate_ct(stats)
        n = x.shape[0]
        self.train_loss.update(loss.detach(), weight=n)
        self.train_seg_loss.update(seg.detach(), weight=n)
        if self._trainer is not None:  # also usable in plain loops (benchmarks)
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        return loss

    def _has_nonfinite_guard(self) -> bool:
        from ctseg.engine.guards import NonFiniteGuard

        trainer = self._trainer
        return trainer is not None and any(isinstance(cb, NonFiniteGuard) for cb in trainer.callbacks)

    def _evaluate(self, batch: dict[str, Any], metrics: SegmentationMetrics) -> Tensor:
        assert self.model is not None and self.seg_loss is not None
        x, y = batch["image"], batch["mask"]
        logits = self.model(x)
        metrics.update(logits.argmax(dim=1), y)
        return self.seg_loss(logits, y)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.val_metrics is not None
        loss = self._evaluate(batch, self.val_metrics)
        # No per-step sync_dist: ranks may hold different numbers of batches (unpadded sampler).
        self.val_loss.update(loss.detach(), weight=batch["image"].shape[0])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.test_metrics is not None
        self._evaluate(batch, self.test_metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Class map ``(B, H, W)`` of a batch."""
        return self(batch["image"]).argmax(dim=1)

    # ------------------------------------------------------------------ epoch ends
    def on_validation_epoch_end(self) -> None:
        assert self.val_metrics is not None
        scores = self.val_metrics.scores()
        self.val_metrics.reset()
        val_loss = _compute_mean(self.val_loss)
        self.val_loss.reset()
        if self.trainer.sanity_checking:
            return
        self.val_scores = scores
        self._val_epoch = self.current_epoch
        # Values are already reduced over processes by the metric; logging them unsynced is exact.
        self.log_dict({**flat_metrics(scores, "val"), "val/loss": val_loss}, sync_dist=False)

    def on_test_epoch_end(self) -> None:
        assert self.test_metrics is not None
        scores = self.test_metrics.scores()
        self.test_metrics.reset()
        self.test_scores = scores
        self.log_dict(flat_metrics(scores, "test"), sync_dist=False)

    def on_train_epoch_start(self) -> None:
        self._epoch_t0 = time.perf_counter()
        self._ct_sums, self._ct_steps = {}, 0
        self._ct_device_sum, self._ct_device_names = None, ()

    def on_train_epoch_end(self) -> None:
        train_loss = _compute_mean(self.train_loss)
        seg_loss = _compute_mean(self.train_seg_loss)
        self.train_loss.reset()
        self.train_seg_loss.reset()
        ct = self._reduce_ct_stats()
        logged = {"train/loss_epoch": train_loss, "train/seg_loss_epoch": seg_loss}
        logged.update({f"ct/{k}": v for k, v in ct.items()})
        self.log_dict(logged, sync_dist=False)
        scores = self.val_scores if self._val_epoch == self.current_epoch else None
        record: dict[str, Any] = {
            "epoch": self.current_epoch,
            "step": self.global_step,
            "seconds": time.perf_counter() - self._epoch_t0,
            "lr": self._current_lr(),
            "train_loss": train_loss,
            "train_seg_loss": seg_loss,
            "val_loss": _finite_or_none(self.trainer.callback_metrics.get("val/loss")) if scores else None,
            "val": None if scores is None else scores.to_dict(),
            "ct": ct or None,
        }
        self.history.append(record)
        for cb in self.trainer.callbacks:
            hook = getattr(cb, "on_ctseg_epoch_record", None)
            if hook is not None:
                hook(self.trainer, self, record)

    def _current_lr(self) -> float | None:
        try:
            return float(self.trainer.optimizers[0].param_groups[0]["lr"])
        except (IndexError, AttributeError, KeyError):
            return None

    # ------------------------------------------------------------------ CT statistics
    def _accumulate_ct(self, stats: Mapping[str, Any]) -> None:
        self._ct_steps += 1
        if isinstance(stats, CTStats) and not stats.fetched:
            # Summed on the device: reading the values now would make the host wait for the GPU in
            # the middle of every step (before the backward is queued). Fetched once per epoch.
            if stats.names != self._ct_device_names:
                self._flush_ct_device_sum()
                self._ct_device_names = stats.names
            t = stats.tensor
            finite = torch.where(torch.isfinite(t), t, 0.0)
            self._ct_device_sum = finite if self._ct_device_sum is None else self._ct_device_sum + finite
            return
        self._add_ct_sums(stats.items())

    def _add_ct_sums(self, items: Iterable[tuple[str, Any]]) -> None:
        for key, value in items:
            if "/class" in key:  # per-class detail: too fine for epoch logs
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                self._ct_sums[key] = self._ct_sums.get(key, 0.0) + v

    def _flush_ct_device_sum(self) -> None:
        """Add the device-side sums (one host sync) to ``_ct_sums``."""
        if self._ct_device_sum is None:
            return
        self._add_ct_sums(zip(self._ct_device_names, self._ct_device_sum.tolist(), strict=True))
        self._ct_device_sum = None

    def _reduce_ct_stats(self) -> dict[str, float]:
        """Epoch means of the per-step CT statistics, averaged over all steps of all processes."""
        self._flush_ct_device_sum()
        keys = sorted(self._ct_sums)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, keys)
            keys = sorted(set().union(*gathered))
            t = torch.tensor(
                [self._ct_sums.get(k, 0.0) for k in keys] + [float(self._ct_steps)], dtype=torch.float64
            )
            t = t.to(self.device)
            dist.all_reduce(t)
            values, steps = t[:-1].tolist(), float(t[-1])
        else:
            values, steps = [self._ct_sums[k] for k in keys], float(self._ct_steps)
        if steps == 0:
            return {}
        return {k: v / steps for k, v in zip(keys, values)}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        assert self.model is not None
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas)
        )
        if hp.scheduler == "constant" and hp.warmup_steps == 0:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        name, warmup, min_ratio, power = (
            hp.scheduler,
            int(hp.warmup_steps),
            float(hp.min_lr_ratio),
            float(hp.poly_power),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(name, step, total, warmup, min_ratio, power)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.protocol is None:
            raise CheckpointError("cannot save a checkpoint before the model is built (no protocol)")
        checkpoint[CTSEG_KEY] = make_ctseg_block(
            model_name=self.model_name,
            num_classes=self.protocol.num_classes,
            model_kwargs=self.model_kwargs,
            protocol=self.protocol,
            normalization=self.normalization or IMAGENET_NORMALIZATION,
            ct=self._model_ct_config(),
        )
        checkpoint["ctseg_history"] = list(self.history)
        # Keep the file loadable with torch.load(weights_only=True): no pathlib objects in hparams.
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = _plain(checkpoint[key])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        block = read_ctseg_block(checkpoint, "<checkpoint>")
        if block["model"]["name"] != self.model_name:
            raise CheckpointError(
                f"checkpoint holds model {block['model']['name']!r}, this run is configured for {self.model_name!r}"
            )
        stored = Protocol.from_dict(block["protocol"])
        if self.model is None:
            self._build(stored)
        elif self.protocol is not None and stored.classes != self.protocol.classes:
            raise CheckpointError(
                f"checkpoint protocol {stored.name!r} has classes {list(stored.classes)}, "
                f"this run has {list(self.protocol.classes)}"
            )
        if self.normalization is None:
            self.normalization = _check_normalization(block["normalization"])
        self.history = list(checkpoint.get("ctseg_history", []))


def _check_normalization(norm: Any) -> dict[str, list[float]]:
    try:
        mean = [float(v) for v in norm["mean"]]
        std = [float(v) for v in norm["std"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"normalization must be {{'mean': [3 floats], 'std': [3 floats]}}, got {norm!r}"
        ) from exc
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ConfigError(f"normalization needs 3 means and 3 positive stds, got {norm!r}")
    return {"mean": mean, "std": std}


def _plain(obj: Any) -> Any:
    """``obj`` with paths turned into strings (recursively through dicts, lists and tuples)."""
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}  # also turns AttributeDict into a plain dict
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _compute_mean(metric: MeanMetric) -> float:
    """Synced mean; every rank must call it (a rank with no updates still joins the sync)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "compute called before update" on a rank without batches
        return float(metric.compute())


def _finite_or_none(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None
