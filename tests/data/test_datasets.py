"""Datasets over prepared folders: loading, file checks (each error), sampler, collate, worker seeding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ctseg.data.datasets import (
    PadCollate,
    SeededRandomSampler,
    SegmentationDataset,
    TileDataError,
)
from ctseg.data.layout import Manifest, TileEntry, tile_paths, write_manifest
from ctseg.data.protocols import get_protocol
from ctseg.errors import DataError
from tests.conftest import shared_data_path
from tests.data.conftest import write_prepared


def test_load_gives_uint8_tile_and_final_item_types(prepared):
    ds = SegmentationDataset(prepared, "train")
    assert len(ds) == 8 and ds.ids[0] == "train_000"
    raw = ds.load(0)
    assert raw["image"].shape == (3, 48, 48) and raw["image"].dtype == torch.uint8
    assert raw["mask"].shape == (48, 48) and raw["mask"].dtype == torch.uint8
    on_disk = np.array(Image.open(prepared / "train/masks/train_000.png"))
    assert (raw["mask"].numpy() == on_disk).all()
    item = ds[0]
    assert item["mask"].dtype == torch.int64 and type(item["mask"]) is torch.Tensor
    assert item["id"] == "train_000"


def test_seeded_item_is_reproducible(prepared):
    from ctseg.data.transforms import AugmentConfig, TransformContext, build_train_transform

    ctx = TransformContext(num_classes=6, ignore_index=255, crop_size=32, crop_window=32)
    ds = SegmentationDataset(
        prepared, "train", transform=build_train_transform(AugmentConfig(mosaic_p=1.0), ctx)
    )
    a, b, c = ds[(3, 123)], ds[(3, 123)], ds[(3, 124)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])


def _replace_mask(root: Path, tile: str, array: np.ndarray, mode: str = "L") -> Path:
    path = root / f"train/masks/{tile}.png"
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_truncated_image_names_file(prepared):
    path = prepared / "train/images/train_001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as info:
        SegmentationDataset(prepared, "train")[1]
    assert info.value.path == path


def test_garbage_image_names_file(prepared):
    path = prepared / "train/images/train_002.png"
    path.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="cannot read image") as info:
        SegmentationDataset(prepared, "train").load(2)
    assert info.value.path == path


@pytest.mark.parametrize("mode, shape", [("RGBA", (48, 48, 4)), ("L", (48, 48))])
def test_wrong_image_channel_count(prepared, mode, shape):
    path = prepared / "train/images/train_000.png"
    Image.fromarray(np.zeros(shape, dtype=np.uint8), mode=mode).save(path)
    with pytest.raises(DataError, match=r"expected 3 \(RGB\)") as info:
        SegmentationDataset(prepared, "train").load(0)
    assert info.value.path == path and f"{len(mode)} channel" in str(info.value)


def test_rgb_mask_is_rejected(prepared):
    path = _replace_mask(prepared, "train_000", np.zeros((48, 48, 3), dtype=np.uint8), mode="RGB")
    with pytest.raises(DataError, match=r"3 channel.*one uint8 channel") as info:
        SegmentationDataset(prepared, "train").load(0)
    assert info.value.path == path


def test_image_mask_size_mismatch(prepared):
    path = _replace_mask(prepared, "train_004", np.zeros((40, 48), dtype=np.uint8))
    with pytest.raises(DataError, match=r"mask is 48×40 px but its image train_004\.png is 48×48") as info:
        SegmentationDataset(prepared, "train").load(4)
    assert info.value.path == path


def test_manifest_size_mismatch(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["tiles"][0]["height"] = 50
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json says 48×50") as info:
        SegmentationDataset(prepared, "train").load(0)
    assert info.value.path == prepared / "train/images/train_000.png"


def test_label_out_of_range(prepared):
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[3, 3], mask[5, 5] = 6, 254
    path = _replace_mask(prepared, "train_002", mask)
    with pytest.raises(
        DataError, match=r"label value\(s\) \[6, 254\] out of range: expected 0..5 or ignore 255"
    ) as info:
        SegmentationDataset(prepared, "train").load(2)
    assert info.value.path == path


def test_ignore_and_all_classes_are_legal(prepared):
    mask = np.array([[0, 1, 2, 3, 4, 5, 255, 0]] * 48, dtype=np.uint8).repeat(6, axis=1)
    _replace_mask(prepared, "train_002", mask)
    assert SegmentationDataset(prepared, "train").load(2)["mask"].shape == (48, 48)


def test_error_survives_dataloader_workers(prepared):
    """A worker re-raises with one argument; TileDataError keeps type, path and problem."""
    path = _replace_mask(prepared, "train_000", np.full((48, 48), 9, dtype=np.uint8))
    ds = SegmentationDataset(prepared, "train")
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=PadCollate(255))
    with pytest.raises(DataError, match="out of range") as info:
        next(iter(loader))
    assert isinstance(info.value, TileDataError)
    assert info.value.path == path
    assert str(info.value) == f"{path}: {info.value.problem}"


def test_tile_data_error_parses_worker_message():
    err = TileDataError("Caught X.\nTraceback...\nctseg.data.datasets.TileDataError: /a/b.png: bad labels\n")
    assert err.path == Path("/a/b.png") and err.problem == "bad labels"


def test_missing_mask_is_ignore_for_eval_and_error_for_train(tmp_path):
    root = tmp_path / "d"
    proto = get_protocol("synthetic")
    rel_img, _ = tile_paths("test", "t0")
    (root / rel_img).parent.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(root / rel_img)
    tiles = [TileEntry(split="test", id="t0", image=rel_img, mask=None, height=8, width=10)]
    write_manifest(root, Manifest(protocol=proto.to_dict(), tiles=tiles))
    item = SegmentationDataset(root, "test")[0]
    assert (item["mask"] == 255).all() and item["mask"].shape == (8, 10)
    with pytest.raises(DataError, match="without a mask"):
        SegmentationDataset(root, "test", require_masks=True)


def test_sampler_is_seeded_per_epoch():
    a, b = SeededRandomSampler(20, seed=5), SeededRandomSampler(20, seed=5)
    e0, e1 = list(a), list(a)
    assert e0 == list(b) and e0 != e1
    assert sorted(i for i, _ in e0) == list(range(20))
    a.set_epoch(0)
    assert list(a) == e0
    assert list(SeededRandomSampler(20, seed=6)) != e0
    assert len({s for _, s in e0}) == 20


def test_pad_collate_pads_image_zero_and_mask_ignore():
    samples = [
        {"image": torch.ones(3, 4, 6), "mask": torch.zeros(4, 6, dtype=torch.int64), "id": "a"},
        {"image": torch.ones(3, 7, 5), "mask": torch.ones(7, 5, dtype=torch.int64), "id": "b"},
    ]
    batch = PadCollate(ignore_index=99)(samples)
    assert batch["image"].shape == (2, 3, 7, 6) and batch["mask"].shape == (2, 7, 6)
    assert batch["id"] == ["a", "b"]
    assert (batch["image"][0, :, 4:, :] == 0).all() and (batch["image"][0, :, :4, :] == 1).all()
    assert (batch["mask"][0, 4:, :] == 99).all() and (batch["mask"][0, :4, :] == 0).all()
    assert (batch["image"][1, :, :, 5:] == 0).all() and (batch["mask"][1, :, 5:] == 99).all()
    assert (batch["mask"][1, :, :5] == 1).all()


class _RandomState(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        info = torch.utils.data.get_worker_info()
        return torch.tensor([info.id, np.random.randint(2**31), random.getrandbits(31)])


def _worker_draws(seed: int) -> dict[int, torch.Tensor]:
    loader = DataLoader(
        _RandomState(), batch_size=None, num_workers=2, generator=torch.Generator().manual_seed(seed)
    )
    return {int(r[0]): r for r in loader}


def test_workers_get_distinct_but_reproducible_numpy_and_python_states():
    """What the DataModule relies on: torch seeds numpy/random per worker from the loader's generator."""
    first, again, other = _worker_draws(0), _worker_draws(0), _worker_draws(1)
    assert set(first) == {0, 1}
    assert first[0][1] != first[1][1] and first[0][2] != first[1][2]
    assert all(torch.equal(first[w], again[w]) for w in (0, 1))
    assert not torch.equal(first[0], other[0])


def test_variable_size_tiles_load_at_native_size(tmp_path):
    root = write_prepared(tmp_path / "d", splits={"val": 3}, size=[(30, 40), (41, 17), (8, 8)])
    ds = SegmentationDataset(root, "val")
    assert [tuple(ds[i]["mask"].shape) for i in range(3)] == [(30, 40), (41, 17), (8, 8)]


@pytest.mark.data
def test_real_potsdam_crop_loads_through_dataset(tmp_path):
    """A real ISPRS Potsdam crop, written in the prepared layout (mmseg encoding 0 = ignore, 1..6 = classes)."""
    img_dir = shared_data_path("isprs_samples", "potsdam", "img")
    ann_dir = shared_data_path("isprs_samples", "potsdam", "ann")
    name = sorted(p.name for p in img_dir.glob("*.png"))[0]
    image = np.array(Image.open(img_dir / name).convert("RGB"))
    ann = np.array(Image.open(ann_dir / name))
    mask = np.where(ann == 0, 255, ann.astype(np.int64) - 1).astype(np.uint8)
    root = tmp_path / "potsdam"
    rel_img, rel_mask = tile_paths("val", "2_10_0_0")
    (root / rel_img).parent.mkdir(parents=True)
    (root / rel_mask).parent.mkdir(parents=True)
    Image.fromarray(image).save(root / rel_img)
    Image.fromarray(mask, mode="L").save(root / rel_mask)
    h, w = mask.shape
    tiles = [TileEntry(split="val", id="2_10_0_0", image=rel_img, mask=rel_mask, height=h, width=w)]
    write_manifest(root, Manifest(protocol=get_protocol("synthetic").to_dict(), tiles=tiles))
    item = SegmentationDataset(root, "val")[0]
    assert item["image"].shape == (3, h, w)
    assert torch.equal(item["mask"], torch.from_numpy(mask).long())
    assert len(torch.unique(item["mask"])) >= 3
