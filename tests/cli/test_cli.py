"""The ``ctseg`` entry point and ``ctseg demo``, run as a user runs them (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ctseg
from ctseg.cli.demo import class_shares, generate_data, write_preview
from ctseg.data.layout import read_manifest
from ctseg.errors import ConfigError


def ctseg_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctseg", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_help_lists_the_commands() -> None:
    result = ctseg_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: ctseg" in result.stdout
    for name in ("demo", "fit", "predict"):
        assert name in result.stdout


def test_version() -> None:
    result = ctseg_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ctseg {ctseg.__version__}"


def test_demo_help() -> None:
    result = ctseg_cli("demo", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--out", "--size", "--n-train", "--n-val", "--seed"):
        assert option in result.stdout


def test_demo_writes_data_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ("demo", "--out", str(out), "--size", "64", "--n-train", "2", "--n-val", "1", "--no-train")
    result = ctseg_cli(*args)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out / "data")
    assert [len(manifest.split(s)) for s in ("train", "val")] == [2, 1]
    assert {(t.height, t.width) for t in manifest.tiles} == {(64, 64)}
    with Image.open(out / "preview.png") as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10, "the preview is blank"
    assert str(out / "data") in result.stdout and str(out / "preview.png") in result.stdout
    assert "class shares: impervious_surfaces" in result.stdout

    # Same arguments again: the set is reused; other arguments: a one-line error, no traceback.
    again = ctseg_cli(*args)
    assert again.returncode == 0, again.stderr
    clash = ctseg_cli(
        "demo", "--out", str(out), "--size", "32", "--n-train", "2", "--n-val", "1", "--no-train"
    )
    assert clash.returncode == 2
    assert "Traceback" not in clash.stderr
    assert "made with size=64 (asked: size=32)" in clash.stderr and str(out / "data") in clash.stderr


def test_demo_trains_compares_and_reports(tmp_path: Path) -> None:
    """The whole demo in a reduced size: tiny scenes, a narrow UNetFormer, 2 epochs per model."""
    import json

    out = tmp_path / "demo"
    tiny = {
        "backbone_kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]},
        "decoder_kwargs": {"decode_channels": 16, "num_heads": 2},
    }
    result = subprocess.run(
        [sys.executable, "-m", "ctseg", "demo", "--out", str(out), "--size", "64", "--n-train", "4", "--n-val", "2",
         "--n-test", "2", "--batch-size", "2", "--crop-size", "64", "--max-epochs", "2", "--minutes", "2",
         "--no-progress", "--model-kwargs", json.dumps(tiny)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| IoU car |" in result.stdout and "**mIoU (5 classes)**" in result.stdout
    assert "baseline" in result.stdout and "ct-cl" in result.stdout
    report = (out / "report.md").read_text()
    assert "Test scores" in report and "synthetic" in report and "(curves.png)" in report
    for png in ("curves.png", "predictions.png", "preview.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and np.asarray(im.convert("RGB")).std() > 10, png
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["baseline", "ct-cl"] and all(r["epochs"] == 2 for r in runs)
    assert (out / "ct-cl" / "checkpoints" / "last.ckpt").is_file()


def test_demo_rejects_bad_sizes_without_traceback(tmp_path: Path) -> None:
    result = ctseg_cli("demo", "--out", str(tmp_path / "x"), "--size", "0")
    assert result.returncode == 2
    assert "--size must be >= 1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_preview_functions_are_reusable(tmp_path: Path) -> None:
    root, manifest = generate_data(tmp_path, size=40, n_train=1, n_val=1, n_test=0, seed=3)
    assert root == tmp_path / "data" and len(manifest.tiles) == 2
    shares = class_shares(manifest)
    assert list(shares) == list(manifest.protocol["classes"]) and sum(shares.values()) == pytest.approx(1.0)
    path = write_preview(root, tmp_path / "figs" / "p.png", count=5)  # more than there are: shows both
    with Image.open(path) as im:
        assert im.format == "PNG"
    with pytest.raises(ConfigError):
        write_preview(root, tmp_path / "q.png", count=0)
    assert not (tmp_path / "q.png").exists()
