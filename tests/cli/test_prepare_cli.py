"""``ctseg prepare`` and ``ctseg data stats|show|protocols`` end to end through the CLI entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctseg.cli import main
from tests.conftest import shared_data_path

TOP = "Semantic segmentation dataset"


def two_tile_dubai(dest: Path) -> Path:
    """Tiles 1 and 2 of the real Dubai data (3 images each) in the Kaggle layout."""
    root = shared_data_path("dubai", TOP)
    for tile in (1, 2):
        for sub, ext in (("images", "jpg"), ("masks", "png")):
            (dest / TOP / f"Tile {tile}" / sub).mkdir(parents=True)
            for k in (1, 2, 3):
                name = f"image_part_{k:03d}.{ext}"
                shutil.copy(root / f"Tile {tile}" / sub / name, dest / TOP / f"Tile {tile}" / sub / name)
    return dest


@pytest.fixture
def dubai_protocol_file(tmp_path: Path) -> Path:
    path = tmp_path / "dubai-2tiles.yaml"
    path.write_text(
        "base: dubai\nsplits:\n  train: ['Tile 1']\n  val: ['Tile 2']\n  test: ['Tile 7', 'Tile 8']\n"
    )
    return path


def test_prepare_then_stats_then_show(tmp_path: Path, dubai_protocol_file: Path, capsys) -> None:
    src = two_tile_dubai(tmp_path / "dubai")
    out = tmp_path / "prepared"
    argv = ["prepare", "dubai", "--src", str(src), "--out", str(out), "--protocol", str(dubai_protocol_file)]
    assert main([*argv, "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "prepared 6 tiles (train 3, val 3, test 0)" in cap.out
    assert "warning: test split of protocol dubai" in cap.err and "protocol: dubai" in cap.err
    assert main([*argv, "--no-progress"]) == 0
    assert "0 source images processed, 6 already verified and skipped" in capsys.readouterr().out

    assert main(["data", "stats", str(out), "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    for name in ("building", "land", "road", "vegetation", "water", "class share of labelled pixels"):
        assert name in text
    shares = json.loads((tmp_path / "s.json").read_text())["splits"]["train"]["class_shares"]
    assert abs(sum(shares.values()) - 1) < 1e-4

    assert main(["data", "show", str(out), "--split", "val", "-n", "2", "--size", "64"]) == 0
    preview = out / "preview-val.png"
    assert preview.is_file() and Image.open(preview).size[0] == 192
    assert "wrote" in capsys.readouterr().out


def test_prepare_with_progress_bar_writes_to_stderr(
    tmp_path: Path, dubai_protocol_file: Path, capsys
) -> None:
    src = two_tile_dubai(tmp_path / "dubai")
    argv = [
        "prepare",
        "dubai",
        "--src",
        str(src),
        "--out",
        str(tmp_path / "o"),
        "--protocol",
        str(dubai_protocol_file),
    ]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "prepare dubai" in cap.err and "6/6" not in cap.out


def test_user_errors_are_one_line_with_the_file(tmp_path: Path, dubai_protocol_file: Path, capsys) -> None:
    src = two_tile_dubai(tmp_path / "dubai")
    mask = src / TOP / "Tile 2/masks/image_part_003.png"
    rgb = np.asarray(Image.open(mask).convert("RGB")).copy()
    rgb[5, 5] = (1, 2, 3)
    Image.fromarray(rgb).save(mask)
    argv = ["prepare", "dubai", "--src", str(src), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*argv, "--protocol", str(dubai_protocol_file)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Tile 2/masks/image_part_003.png" in err and "Traceback" not in err
    assert main([*argv, "--protocol", str(dubai_protocol_file), "--unknown-colors", "ignore"]) == 0
    assert "unknown label values mapped to ignore" in capsys.readouterr().out
    # the default dubai protocol needs Tiles 3-6 for training
    assert main([*argv[:-1], "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "missing Tile 3" in capsys.readouterr().err
    assert main(["prepare", "dubai", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path / "nope")]) == 2
    assert (
        main(["prepare", "potsdam", "--src", str(src), "--out", str(tmp_path / "o4"), "--protocol", "dubai"])
        == 2
    )
    assert "is for dataset 'dubai'" in capsys.readouterr().err


def test_paper_switches_warn(tmp_path: Path, capsys) -> None:
    from tests.data.test_prepare_isprs import make_potsdam

    make_potsdam(tmp_path / "potsdam", tiles=("2_10", "2_13"), size=(300, 300))
    proto = tmp_path / "p.json"
    proto.write_text(json.dumps({"base": "potsdam-paper", "splits": {"train": ["2_10"], "test": ["2_13"]}}))
    argv = ["prepare", "potsdam", "--src", str(tmp_path / "potsdam"), "--out", str(tmp_path / "o")]
    assert (
        main([*argv, "--protocol", str(proto), "--val-is-test", "--mask-interp", "bicubic", "--no-progress"])
        == 0
    )
    cap = capsys.readouterr()
    assert "bicubic" in cap.err and "val_is_test" in cap.err and "val = test" in cap.err
    assert "(train 3, val 1, test 1)" in cap.out


def test_listings(capsys) -> None:
    assert main(["prepare", "--list"]) == 0
    out = capsys.readouterr().out
    assert "potsdam-paper" in out and "datasets: dubai, loveda, potsdam, vaihingen" in out
    assert main(["data", "protocols"]) == 0
    assert "vaihingen-geoseg" in capsys.readouterr().out
    assert main(["data", "protocols", "potsdam-paper"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[: out.rindex("}") + 1])["val_is_test"] is False


@pytest.mark.slow
def test_real_dubai_end_to_end(tmp_path: Path, capsys) -> None:
    """The acceptance check: the whole real Dubai folder with the dubai preset, then its class shares."""
    src = shared_data_path("dubai")
    out = tmp_path / "dubai"
    assert main(["prepare", "dubai", "--src", str(src), "--out", str(out), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "prepared 54 tiles (train 45, val 9, test 0)" in cap.out
    assert "Tile 7, Tile 8" in cap.err
    assert main(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "water" in text and "%" in text
