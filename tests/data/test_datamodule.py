"""SegmentationDataModule: the contract the training engine relies on, seeding, padding, protocols, YAML."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ctseg.data import transforms as T
from ctseg.data.datamodule import SegmentationDataModule
from ctseg.data.protocols import get_protocol
from ctseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from ctseg.errors import ConfigError, DataError
from tests.data.conftest import write_prepared


def _batches(dm: SegmentationDataModule, n: int = 2) -> list[dict]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_contract(prepared):
    dm = SegmentationDataModule(root=prepared, batch_size=4, num_workers=0, crop_size=32)
    assert dm.protocol.name == "synthetic" and dm.num_classes == 6 and dm.ignore_index == 255
    assert dm.normalization == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 32, 32)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (4, 32, 32)
    assert isinstance(batch["id"], list) and all(isinstance(i, str) for i in batch["id"])
    labels = set(batch["mask"].unique().tolist())
    assert labels <= {*range(6), 255}
    # Normalised: raw uint8 noise scaled to [0, 1] then standardised has roughly zero mean.
    assert -1.0 < batch["image"].mean().item() < 1.0 and batch["image"].min() < 0
    assert len(dm.train_dataloader()) == 2  # 8 tiles, batch 4, drop_last


def test_val_is_whole_tiles_in_order_without_random_ops(prepared):
    dm = SegmentationDataModule(root=prepared, num_workers=0, crop_size=32)
    dm.setup("validate")
    a = list(dm.val_dataloader())
    b = list(dm.val_dataloader())
    assert [x["id"] for x in a] == [["val_000"], ["val_001"]]
    assert a[0]["image"].shape == (1, 3, 48, 48)
    on_disk = np.array(Image.open(prepared / "val/masks/val_000.png"))
    assert torch.equal(a[0]["mask"][0], torch.from_numpy(on_disk).long())
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches(prepared, workers):
    def run(seed: int) -> list[dict]:
        dm = SegmentationDataModule(root=prepared, batch_size=4, num_workers=workers, crop_size=32, seed=seed)
        dm.setup("fit")
        return _batches(dm)

    first, again, other = run(7), run(7), run(8)
    for x, y in zip(first, again):
        assert x["id"] == y["id"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(first, other))


def test_batches_do_not_depend_on_worker_count(prepared):
    out = []
    for workers in (0, 2):
        dm = SegmentationDataModule(
            root=prepared, batch_size=2, num_workers=workers, crop_size=24, seed=3, augment={"mosaic_p": 1.0}
        )
        out.append(_batches(dm, 4))
    for x, y in zip(*out):
        assert (
            x["id"] == y["id"] and torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        )


def test_epochs_differ_and_set_epoch_replays(prepared):
    dm = SegmentationDataModule(root=prepared, batch_size=8, num_workers=0, crop_size=32, seed=1)
    loader = dm.train_dataloader()
    e0, e1 = next(iter(loader)), next(iter(loader))
    assert not torch.equal(e0["image"], e1["image"])
    loader.sampler.set_epoch(0)
    assert torch.equal(next(iter(loader))["image"], e0["image"])


def test_val_batches_of_different_sizes_are_padded(tmp_path):
    root = write_prepared(tmp_path / "d", splits={"train": 2, "val": 3}, size=[(20, 20), (30, 26), (16, 40)])
    dm = SegmentationDataModule(root=root, num_workers=0, crop_size=16, val_batch_size=3)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (3, 3, 30, 40) and batch["mask"].shape == (3, 30, 40)
    single = SegmentationDataModule(root=root, num_workers=0, crop_size=16, val_batch_size=1)
    for i, one in enumerate(single.val_dataloader()):
        h, w = one["mask"].shape[-2:]
        assert torch.equal(batch["image"][i, :, :h, :w], one["image"][0])
        assert torch.equal(batch["mask"][i, :h, :w], one["mask"][0])
        pad = torch.ones(30, 40, dtype=torch.bool)
        pad[:h, :w] = False
        assert (batch["mask"][i][pad] == 255).all() and (batch["image"][i][:, pad] == 0).all()


def test_train_tiles_smaller_than_crop_are_padded_with_ignore(tmp_path):
    root = write_prepared(tmp_path / "d", splits={"train": 2}, size=(12, 10), ignore_fraction=0.0)
    aug = {"ops": ["smart_crop"]}
    dm = SegmentationDataModule(root=root, batch_size=2, num_workers=0, crop_size=16, augment=aug)
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (2, 16, 16)
    assert (batch["mask"][:, 12:, :] == 255).all() and (batch["mask"][:, :, 10:] == 255).all()
    assert (batch["mask"][:, :12, :10] != 255).all()


def test_protocol_override_compatible_and_incompatible(prepared):
    proto = get_protocol("synthetic").to_dict()
    proto.update(name="synthetic-resized", resize=32)
    dm = SegmentationDataModule(root=prepared, protocol=proto, num_workers=0, crop_size=32)
    assert dm.protocol.name == "synthetic-resized"
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (1, 3, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {*range(6), 255}

    bad = get_protocol("synthetic").to_dict()
    bad.update(classes=bad["classes"][:5], colors=bad["colors"][:5], mean_classes=None)
    with pytest.raises(ConfigError, match="does not match the data"):
        SegmentationDataModule(root=prepared, protocol=bad).protocol
    with pytest.raises(ConfigError, match="unknown protocol"):
        SegmentationDataModule(root=prepared, protocol="no-such-protocol").protocol


def test_crop_window_is_resized_to_crop_size(prepared):
    """The paper's recipe: crop a smaller window (375 of 500 px) and enlarge it to the crop size."""
    dm = SegmentationDataModule(
        root=prepared, batch_size=2, num_workers=0, crop_size=32, augment={"crop_window": 24}
    )
    assert dm.context.crop_window == 24
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {*range(6), 255}
    assert SegmentationDataModule(root=prepared, crop_size=32).context.crop_window == 32


def test_bicubic_mask_protocol_warns_and_keeps_labels_legal(prepared, monkeypatch):
    monkeypatch.setattr(T, "_BICUBIC_WARNED", False)
    proto = get_protocol("synthetic").to_dict()
    proto.update(resize=61, mask_interp="bicubic")
    dm = SegmentationDataModule(root=prepared, protocol=proto, num_workers=0, crop_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = [b["mask"] for b in dm.val_dataloader()]
    assert sum("quirk" in str(w.message) for w in caught) == 1
    assert all(set(m.unique().tolist()) <= {*range(6), 255} for m in masks)


def test_val_is_test_protocol_validates_on_test_split(prepared):
    proto = get_protocol("synthetic").to_dict()
    proto.update(val_is_test=True)
    dm = SegmentationDataModule(root=prepared, protocol=proto, num_workers=0)
    assert [b["id"][0] for b in dm.val_dataloader()] == ["test_000", "test_001"]


def test_empty_split_and_too_few_tiles_are_data_errors(tmp_path):
    root = write_prepared(tmp_path / "d", splits={"train": 3})
    with pytest.raises(DataError, match="split 'val' has no tiles"):
        SegmentationDataModule(root=root, num_workers=0).val_dataloader()
    with pytest.raises(DataError, match="fewer than batch_size 8"):
        SegmentationDataModule(root=root, num_workers=0, batch_size=8).train_dataloader()


def test_missing_folder_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="no such data folder"):
        SegmentationDataModule(root=tmp_path / "nope").protocol
    with pytest.raises(ConfigError, match="batch_size"):
        SegmentationDataModule(root=tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="unknown keys"):
        SegmentationDataModule(root=tmp_path, augment={"bogus": 1})


def test_custom_normalisation_is_recorded_and_applied(prepared):
    dm = SegmentationDataModule(root=prepared, num_workers=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert dm.normalization == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    image = next(iter(dm.val_dataloader()))["image"][0]
    raw = np.array(Image.open(prepared / "val/images/val_000.png")).transpose(2, 0, 1) / 255.0
    assert torch.allclose(image, torch.from_numpy(raw).float(), atol=1e-6)


def test_lightning_cli_builds_datamodule_from_yaml(prepared, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    config = {
        "data": {
            "root": str(prepared),
            "protocol": "synthetic",
            "batch_size": 2,
            "num_workers": 0,
            "crop_size": 24,
            "seed": 4,
            "augment": {
                "mosaic_p": 0.5,
                "scales": [1.0, 1.25],
                "crop_window": 20,
                "color_jitter": [0.2, 0.2, 0.2, 0.0],
            },
        },
        "trainer": {"logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path)},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["ctseg"])
    cli = LightningCLI(
        BoringModel,
        SegmentationDataModule,
        run=False,
        args=["--config", str(path)],
        seed_everything_default=False,
    )
    dm = cli.datamodule
    assert isinstance(dm, SegmentationDataModule) and isinstance(dm.augment, AugmentConfig)
    assert dm.augment.mosaic_p == 0.5 and dm.augment.scales == (1.0, 1.25) and dm.augment.crop_window == 20
    assert dm.seed == 4 and dm.protocol.name == "synthetic"
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 24, 24)


def test_reads_the_synthetic_generator_output(tmp_path):
    from ctseg.data.synthetic import write_synthetic_dataset

    root = tmp_path / "synthetic"
    write_synthetic_dataset(root, n_train=2, n_val=1, n_test=1, size=64, seed=0)
    dm = SegmentationDataModule(root=root, batch_size=2, num_workers=0, crop_size=32)
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    test = next(iter(dm.test_dataloader()))
    assert train["image"].shape == (2, 3, 32, 32) and val["image"].shape == (1, 3, 64, 64)
    assert len(test["id"]) == 1
    assert set(val["mask"].unique().tolist()) <= {*range(6), 255}


def test_hparams_record_the_resolved_augmentation(prepared):
    dm = SegmentationDataModule(root=prepared, augment={"mosaic_p": 0.0})
    assert dm.hparams["augment"]["mosaic_p"] == 0.0
    assert dm.hparams["augment"]["scales"] == AugmentConfig().scales
    assert SegmentationDataModule(root=prepared, augment=dm.hparams["augment"]).augment == dm.augment


@pytest.mark.data
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_real_dubai_images_through_prepare_and_datamodule(dubai_root, tmp_path):
    """Real Dubai images (Tile 2 parts are 544×509 and 544×510): train crops, val batches padded to the largest."""
    import shutil

    from ctseg.data.prepare import prepare

    src = tmp_path / "src" / dubai_root.name
    for tile in (1, 2):
        for sub, ext in (("images", "jpg"), ("masks", "png")):
            (src / f"Tile {tile}" / sub).mkdir(parents=True)
            for k in (1, 2):
                name = f"image_part_{k:03d}.{ext}"
                shutil.copy(dubai_root / f"Tile {tile}" / sub / name, src / f"Tile {tile}" / sub / name)
    shutil.copy(dubai_root / "classes.json", src / "classes.json")
    prepare("dubai", src.parent, tmp_path / "out", splits={"train": ("Tile 1",), "val": ("Tile 2",)})

    dm = SegmentationDataModule(
        root=tmp_path / "out", batch_size=2, num_workers=0, crop_size=128, val_batch_size=2
    )
    assert dm.protocol.name == "dubai" and dm.num_classes == 5
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (2, 3, 128, 128)
    assert set(train["mask"].unique().tolist()) <= {*range(dm.num_classes), 255}
    sizes = [(t.height, t.width) for t in dm.manifest.split("val")]
    val = next(iter(dm.val_dataloader()))
    assert val["mask"].shape[-2:] == (max(h for h, _ in sizes), max(w for _, w in sizes))
    for i, (h, w) in enumerate(sizes):
        on_disk = np.array(Image.open(tmp_path / "out" / dm.manifest.split("val")[i].mask))
        assert torch.equal(val["mask"][i, :h, :w], torch.from_numpy(on_disk).long())
        assert (val["mask"][i, h:, :] == 255).all() and (val["mask"][i, :, w:] == 255).all()
