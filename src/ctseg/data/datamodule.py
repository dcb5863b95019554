"""Lightning DataModule over a prepared folder, configured by its protocol.

Train: shuffled with :class:`~ctseg.data.datasets.SeededRandomSampler` (per-sample seeds, so a ``seed``
gives the same batches whatever ``num_workers``), the augmentation of :class:`AugmentConfig`, ``drop_last``.
Validation/test/predict: whole tiles in manifest order, no random ops, resized only when the protocol
says so; batches of tiles of different sizes are padded by :class:`~ctseg.data.datasets.PadCollate`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from ctseg.data.datasets import (
    PadCollate,
    SeededRandomSampler,
    SegmentationDataset,
    TileDataError,
)
from ctseg.data.layout import MANIFEST_NAME, Manifest, read_manifest
from ctseg.data.protocols import Protocol, get_protocol
from ctseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    TransformContext,
    build_eval_transform,
    build_train_transform,
)
from ctseg.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_protocol(
    manifest: Manifest, override: str | dict[str, Any] | Protocol | None, where: Path
) -> Protocol:
    """The manifest's protocol, or ``override`` if it encodes labels the same way (classes, ignore id)."""
    recorded = get_protocol(manifest.protocol)
    if override is None:
        return recorded
    proto = get_protocol(override)
    if proto.classes != recorded.classes or proto.ignore_index != recorded.ignore_index:
        raise ConfigError(
            f"protocol {proto.name!r} (classes {list(proto.classes)}, ignore {proto.ignore_index}) does not match "
            f"the data in {where} prepared with {recorded.name!r} (classes {list(recorded.classes)}, "
            f"ignore {recorded.ignore_index})"
        )
    return proto


class SegmentationDataModule(pl.LightningDataModule):
    """Loaders for one prepared folder.

    Args:
        root: prepared folder (``manifest.json`` + ``<split>/{images,masks}``).
        protocol: ``None`` = the protocol recorded in ``manifest.json``; a preset name or a protocol dict
            overrides it if its label encoding (classes, ignore id) is the same.
        batch_size: training batch size (``drop_last``).
        num_workers: loader processes (0 = load in the main process).
        crop_size: side of training crops fed to the model.
        augment: training augmentation; ``None`` = the defaults (the paper's recipe).
        val_batch_size: validation/test batch size; tiles of different sizes are padded per batch.
        seed: drives shuffling and augmentation; the same seed gives the same batches.
        train_split / val_split / test_split: split names in the manifest. A protocol with
            ``val_is_test`` validates on ``test_split``.
        pin_memory: pin batches for faster host→GPU copies.
        mean / std: image normalisation (after scaling to [0, 1]); ImageNet by default.
        image_interp: image interpolation for every resize (masks: nearest, or the protocol's ``mask_interp``).
    """

    def __init__(
        self,
        root: str | Path,
        protocol: str | dict[str, Any] | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        crop_size: int = 512,
        augment: AugmentConfig | dict[str, Any] | None = None,
        val_batch_size: int = 1,
        seed: int = 0,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        pin_memory: bool = False,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        image_interp: Literal["bilinear", "bicubic"] = "bicubic",
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("val_batch_size", val_batch_size),
            ("crop_size", crop_size),
        ):
            if int(value) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        if int(num_workers) < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"data.mean/std must be 3 values each, std > 0; got mean={mean}, std={std}")
        if image_interp not in ("bilinear", "bicubic"):
            raise ConfigError(f"data.image_interp must be 'bilinear' or 'bicubic', got {image_interp!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.protocol_override = protocol
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.crop_size = int(crop_size)
        self.augment = AugmentConfig.from_any(augment)
        # Record the resolved augmentation (plain dict) so checkpoints and reports show what ran.
        self.hparams["augment"] = asdict(self.augment)
        self.val_batch_size = int(val_batch_size)
        self.seed = int(seed)
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.pin_memory = bool(pin_memory)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.image_interp = image_interp
        self._manifest: Manifest | None = None
        self._protocol: Protocol | None = None
        self.datasets: dict[str, SegmentationDataset] = {}

    # -- protocol, resolved lazily so that prepare_data may create the folder first -------------------

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = read_manifest(self.root)
        return self._manifest

    @property
    def protocol(self) -> Protocol:
        if self._protocol is None:
            proto = resolve_protocol(self.manifest, self.protocol_override, self.root / MANIFEST_NAME)
            if not 0 <= proto.ignore_index <= 255:
                raise ConfigError(
                    f"protocol {proto.name!r}: ignore_index {proto.ignore_index} cannot be stored in uint8 masks"
                )
            self._protocol = proto
        return self._protocol

    @property
    def num_classes(self) -> int:
        return self.protocol.num_classes

    @property
    def ignore_index(self) -> int:
        return self.protocol.ignore_index

    @property
    def normalization(self) -> dict[str, list[float]]:
        """What inference must apply to raw RGB in [0, 1]: ``(x − mean) / std``."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @property
    def context(self) -> TransformContext:
        proto = self.protocol
        return TransformContext(
            num_classes=proto.num_classes,
            ignore_index=proto.ignore_index,
            crop_size=self.crop_size,
            crop_window=self.augment.crop_window or self.crop_size,
            mask_interp=proto.mask_interp,
            image_interp=self.image_interp,
            mean=self.mean,  # type: ignore[arg-type]
            std=self.std,  # type: ignore[arg-type]
        )

    def _eval_split(self, stage_split: str) -> str:
        if stage_split == self.val_split and self.protocol.val_is_test:
            log.warning(
                "protocol %s validates on the test split %r (val_is_test)",
                self.protocol.name,
                self.test_split,
            )
            return self.test_split
        return stage_split

    # -- Lightning hooks ------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        ctx = self.context
        wanted: list[str] = []
        if stage in (None, "fit"):
            wanted += ["train", "val"]
        if stage in (None, "validate"):
            wanted.append("val")
        if stage in (None, "test", "predict"):
            wanted.append("test")
        for role in dict.fromkeys(wanted):
            if role in self.datasets:
                continue
            if role == "train":
                self.datasets[role] = SegmentationDataset(
                    self.root,
                    self.train_split,
                    self.protocol,
                    build_train_transform(self.augment, ctx),
                    manifest=self.manifest,
                    require_masks=True,
                )
            else:
                split = self._eval_split(self.val_split) if role == "val" else self.test_split
                self.datasets[role] = SegmentationDataset(
                    self.root,
                    split,
                    self.protocol,
                    build_eval_transform(ctx, self.protocol.resize),
                    manifest=self.manifest,
                )

    def _dataset(self, role: str) -> SegmentationDataset:
        if role not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(role, "test"))
        ds = self.datasets[role]
        if len(ds) == 0:
            raise TileDataError(self.root / MANIFEST_NAME, f"split {ds.split!r} has no tiles")
        return ds

    def _loader(self, dataset: SegmentationDataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=SeededRandomSampler(len(dataset), self.seed) if train else None,
            shuffle=False,
            drop_last=train,
            num_workers=workers,
            collate_fn=PadCollate(self.ignore_index),
            pin_memory=self.pin_memory,
            # Torch seeds each worker's torch, numpy and ``random`` from this generator (base_seed +
            # worker id), so workers differ from each other and a run repeats with the same seed.
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        if len(ds) < self.batch_size:
            raise TileDataError(
                self.root / MANIFEST_NAME,
                f"split {ds.split!r} has {len(ds)} tile(s), fewer than batch_size {self.batch_size} (drop_last)",
            )
        return self._loader(ds, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), self.val_batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), self.val_batch_size, train=False)
