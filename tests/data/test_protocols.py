"""Protocol presets: the numbers-changing choices of each benchmark, serialisation, validation."""

from __future__ import annotations

import json

import pytest

from ctseg.data.protocols import (
    ISPRS_CLASSES,
    POTSDAM_TEST_TILES,
    POTSDAM_TRAIN_TILES,
    Protocol,
    get_protocol,
    list_protocols,
    load_protocol,
    split_entry_matches,
)
from ctseg.errors import ConfigError

PRESETS = (
    "potsdam-paper",
    "potsdam-geoseg",
    "potsdam-mmseg",
    "vaihingen-geoseg",
    "loveda",
    "dubai",
    "synthetic",
)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_json(name: str) -> None:
    proto = get_protocol(name)
    again = Protocol.from_dict(json.loads(json.dumps(proto.to_dict())))
    assert again == proto
    assert proto.name in proto.summary()
    assert proto.ignore_index == 255
    assert name in list_protocols()


def test_potsdam_paper_is_the_ct_paper_with_a_real_validation_tile() -> None:
    p = get_protocol("potsdam-paper")
    assert p.imagery == "RGB" and p.train_labels == "full" and p.eval_labels == "eroded"
    assert (p.tile_size, p.tile_stride, p.resize, p.mask_interp) == (500, 500, 512, "nearest")
    assert p.splits["val"] == ("2_10",)
    assert len(p.splits["train"]) == 23 and "2_10" not in p.splits["train"] and "7_10" in p.splits["train"]
    assert p.splits["test"] == POTSDAM_TEST_TILES and len(POTSDAM_TEST_TILES) == 14
    assert p.mean_classes == ISPRS_CLASSES[:5] and "clutter" not in p.mean_classes
    assert p.mean_class_indices == (0, 1, 2, 3, 4)
    assert p.val_is_test is False and p.quirks() == []
    assert p.split_of("2_10") == "val" and p.split_of("7_10") == "train" and p.split_of("2_13") == "test"


def test_val_is_test_returns_the_val_tile_to_training() -> None:
    p = get_protocol("potsdam-paper", val_is_test=True)
    eff = p.effective_splits()
    assert set(eff["train"]) == set(POTSDAM_TRAIN_TILES) and len(eff["train"]) == 24
    assert eff["val"] == eff["test"] == POTSDAM_TEST_TILES
    assert p.split_of("2_10") == "train" and p.split_of("2_13") == "test"
    assert any("val_is_test" in q for q in p.quirks())
    assert "val = test" in p.summary()


def test_bicubic_masks_are_flagged_as_the_paper_quirk() -> None:
    p = get_protocol("potsdam-paper", mask_interp="bicubic")
    assert any("bicubic" in q and "quirk" in q for q in p.quirks())
    assert "paper quirk" in p.summary()


def test_other_potsdam_presets() -> None:
    geo = get_protocol("potsdam-geoseg")
    assert len(geo.splits["train"]) == 22 and geo.split_of("7_10") is None
    assert (geo.tile_size, geo.tile_stride_for("train"), geo.tile_stride_for("test")) == (1024, 512, 1024)
    mm = get_protocol("potsdam-mmseg")
    assert mm.train_labels == mm.eval_labels == "eroded"
    assert mm.mean_class_indices == tuple(range(6))
    vai = get_protocol("vaihingen-geoseg")
    assert vai.imagery == "IRRG" and vai.splits["val"] == ("area30",) and len(vai.splits["test"]) == 17


def test_dubai_preset() -> None:
    p = get_protocol("dubai")
    assert p.classes == ("building", "land", "road", "vegetation", "water")
    assert (
        p.colors[0] == (60, 16, 152) and (155, 155, 155) in p.ignore_colors and (0, 0, 0) in p.ignore_colors
    )
    assert p.tile_size is None
    assert p.split_of("Tile 2/image_part_001", "Tile 2") == "val"
    assert p.split_of("Tile 7/image_part_001", "Tile 7") == "test"
    assert p.split_of("Tile 1/image_part_009", "Tile 1") == "train"


def test_loveda_val_fraction_is_stable_and_about_ten_percent() -> None:
    p = get_protocol("loveda")
    ids = [f"Train/Rural/{i}" for i in range(2000)]
    splits = [p.split_of(i, "Train/Rural") for i in ids]
    share = splits.count("val") / len(ids)
    assert 0.08 < share < 0.12
    assert splits == [p.split_of(i, "Train/Rural") for i in ids]
    assert p.split_of("Val/Urban/5", "Val/Urban") == "test"


def test_split_entries_match_id_group_or_path_prefix() -> None:
    assert split_entry_matches("2_10", "2_10")
    assert not split_entry_matches("2_1", "2_10")
    assert split_entry_matches("Tile 1", "Tile 1/image_part_001", "Tile 1")
    assert split_entry_matches("Train", "Train/Rural/3")
    assert not split_entry_matches("Tra", "Train/Rural/3")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"splits": {"train": ("a",), "test": ("a",)}}, "both"),
        ({"ignore_index": 3}, "class index"),
        ({"train_flips": ("x",)}, "train_flips"),
        ({"mask_interp": "bilinear"}, "mask_interp"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"splits": {"holdout": ("a",)}}, "unknown splits"),
        ({"ignore_colors": ((255, 255, 255),)}, "both a class and ignore"),
        ({"tile_size": None, "tile_stride": 4}, "tile_size"),
        ({"tile_stride": 600}, "skips pixels"),
    ],
)
def test_invalid_protocols_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_protocol("potsdam-paper", **changes)


def test_unknown_preset_and_field() -> None:
    with pytest.raises(ConfigError, match="unknown protocol"):
        get_protocol("potsdam-nope")
    with pytest.raises(ConfigError, match="unknown fields"):
        get_protocol("dubai", tile=3)


def test_load_protocol_from_files(tmp_path) -> None:
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"base": "potsdam-paper", "val_is_test": True, "splits": {"train": ["2_10"]}}))
    p = load_protocol(j)
    assert p.val_is_test and p.splits == {"train": ("2_10",)}
    y = tmp_path / "p.yaml"
    y.write_text("base: dubai\nmask_interp: nearest\n")
    assert load_protocol(y).name == "dubai"
    full = tmp_path / "full.json"
    full.write_text(json.dumps(get_protocol("loveda").to_dict()))
    assert load_protocol(full) == get_protocol("loveda")
    assert load_protocol("dubai") == get_protocol("dubai")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        load_protocol(bad)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_protocol(tmp_path / "missing.json")
