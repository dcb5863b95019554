"""The bad-input corpus, end to end through the real ``ctseg`` CLI.

Every case must give exit status 2, exactly one ``ctseg <command>: error: ...`` line naming the file and
the problem, no traceback (``--debug`` shows one), and no partial output (no truncated or temporary
file, no output for the failed input).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctseg.cli import main
from ctseg.data.protocols import get_protocol
from ctseg.errors import CheckpointError, DataError
from tests.fit import fit_args
from tests.reliability.conftest import files_under, temp_leftovers

TOP = "Semantic segmentation dataset"


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run ``ctseg argv``; assert exit 2 and one error line holding every needle; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"ctseg {argv[0]}: error:")]
    assert rc == 2, f"exit {rc}, stderr:\n{err[-2000:]}"
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------------------- prepare
def dubai_source(root: Path, size: int = 48) -> Path:
    """A tiny Dubai-layout source (Tile 1 = train, Tile 2 = val), 2 images per tile, in the real colours."""
    colors = np.array(get_protocol("dubai").colors, np.uint8)
    rng = np.random.default_rng(0)
    for tile in (1, 2):
        for k in (1, 2):
            for sub in ("images", "masks"):
                (root / TOP / f"Tile {tile}" / sub).mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / TOP / f"Tile {tile}/images/image_part_{k:03d}.jpg")
            labels = colors[rng.integers(0, len(colors), (size // 8, size // 8))].repeat(8, 0).repeat(8, 1)
            Image.fromarray(labels).save(root / TOP / f"Tile {tile}/masks/image_part_{k:03d}.png")
    return root


@pytest.fixture
def dubai(tmp_path: Path) -> tuple[Path, list[str]]:
    """(source folder, ``ctseg prepare`` argv without --src) for a 2-tile protocol."""
    proto = tmp_path / "dubai-2.yaml"
    proto.write_text("base: dubai\nsplits:\n  train: ['Tile 1']\n  val: ['Tile 2']\n  test: []\n")
    src = dubai_source(tmp_path / "src")
    out = tmp_path / "out"
    return src, ["prepare", "dubai", "--out", str(out), "--protocol", str(proto), "--no-progress"]


def no_partial_prepare(out: Path) -> None:
    assert not (out / "manifest.json").exists(), "a failed prepare must not publish a manifest"
    assert temp_leftovers(out) == []


def test_prepare_good_source_works(dubai, capsys) -> None:
    src, argv = dubai
    assert main([*argv, "--src", str(src)]) == 0  # the fixture itself is valid
    assert "prepared 4 tiles" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("truncated image", "cannot be decoded"),
        ("corrupt image", "cannot be decoded"),
        ("zero-size image", "cannot be decoded"),
        ("size mismatch", "image_part_002"),
        ("unknown colour", "image_part_002.png"),
        ("greyscale image", "expected 3 (RGB)"),
        ("RGBA image", "expected 3 (RGB)"),
    ],
)
def test_prepare_rejects_a_bad_source_file(dubai, capsys, case: str, needle: str) -> None:
    src, argv = dubai
    image = src / TOP / "Tile 2/images/image_part_002.jpg"
    mask = src / TOP / "Tile 2/masks/image_part_002.png"
    if case == "truncated image":
        image.write_bytes(image.read_bytes()[:200])
    elif case == "corrupt image":
        image.write_bytes(b"\xff\xd8 not a jpeg at all" * 10)
    elif case == "zero-size image":
        image.write_bytes(b"")
    elif case == "size mismatch":
        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(image)
    elif case == "greyscale image":
        Image.open(image).convert("L").save(image)
    elif case == "RGBA image":  # a PNG under the .jpg name: decoders go by content, not by name
        Image.open(image).convert("RGBA").save(image, format="PNG")
    elif case == "unknown colour":
        rgb = np.asarray(Image.open(mask).convert("RGB")).copy()
        rgb[3, 3] = (1, 2, 3)
        Image.fromarray(rgb).save(mask)
    out = Path(argv[argv.index("--out") + 1])
    fails(capsys, [*argv, "--src", str(src)], "Tile 2/", needle)
    no_partial_prepare(out)


def test_prepare_rejects_missing_and_empty_sources(dubai, tmp_path: Path, capsys) -> None:
    _, argv = dubai
    out = Path(argv[argv.index("--out") + 1])
    fails(capsys, [*argv, "--src", str(tmp_path / "nope")], "nope", "no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, [*argv, "--src", str(empty)], "missing Tile 1")
    no_partial_prepare(out)


# ------------------------------------------------------------------------------------ fit on bad data
def first_tile(root: Path, split: str = "train") -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    return next(t for t in manifest["tiles"] if t["split"] == split)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("manifest lists a missing file", "missing file"),
        ("truncated image", "cannot read image"),
        ("wrong channel count", "expected 3 (RGB)"),
        ("zero-size image", "cannot read image"),
        ("label out of range", "out of range"),
        ("image/label size mismatch", "mask is"),
    ],
)
def test_fit_rejects_a_bad_prepared_tile(
    synth_copy: Path, tmp_path: Path, capsys, case: str, needle: str
) -> None:
    tile = first_tile(synth_copy)
    image, mask = synth_copy / tile["image"], synth_copy / tile["mask"]
    # relative path: the message names the tile file itself or the manifest listing it
    bad = tile["mask"] if case in ("label out of range", "image/label size mismatch") else tile["image"]
    if case == "manifest lists a missing file":
        image.unlink()
    elif case == "truncated image":
        image.write_bytes(image.read_bytes()[:100])
    elif case == "wrong channel count":
        Image.open(image).convert("LA").save(image)
    elif case == "zero-size image":
        image.write_bytes(b"")
    elif case == "label out of range":
        m = np.asarray(Image.open(mask)).copy()
        m[0, 0] = 17
        Image.fromarray(m).save(mask)
    elif case == "image/label size mismatch":
        Image.fromarray(np.zeros((32, 64), np.uint8)).save(mask)
    run = tmp_path / "run"
    fails(capsys, ["fit", *fit_args(synth_copy, run)], bad, needle)
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    assert temp_leftovers(run) == []


def test_fit_rejects_missing_or_empty_data_folder(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    fails(capsys, ["fit", *fit_args(tmp_path / "nope", run)], "nope")
    (tmp_path / "empty").mkdir()
    fails(capsys, ["fit", *fit_args(tmp_path / "empty", run)], "empty")
    assert files_under(run) == set()


# ------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["--model.no_such_option", "1"], "no_such_option"),
        (["--data.batch_size", "many"], "command line)"),
        (["--trainer.max_epochs", "1.5"], "max_epochs"),
        (["--model.scheduler", "sometimes"], "sometimes"),
        (["--nonfinite", "ignore"], "nonfinite"),
    ],
)
def test_bad_config_stops_before_training(synth: Path, tmp_path: Path, capsys, override, needle) -> None:
    run = tmp_path / "run"
    fails(capsys, ["fit", *fit_args(synth, run), *override], needle)
    assert not run.exists(), "nothing may be written before the config is valid"


def test_unknown_key_in_a_config_file(synth: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "extra.yaml"
    cfg.write_text("model:\n  learning_rate: 0.1\n")
    run = tmp_path / "run"
    fails(capsys, ["fit", *fit_args(synth, run), "--config", str(cfg)], str(cfg), "learning_rate")
    assert not run.exists()


def test_contradictory_determinism_flags(synth: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["fit", *fit_args(synth, run), "--trainer.deterministic", "true", "--trainer.benchmark", "true"]
    fails(capsys, argv, "deterministic", "benchmark")
    assert not run.exists()


# --------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_model_or_protocol(
    trained_run: Path, synth: Path, tmp_path: Path, capsys
) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    other = ["--model.model", "unetformer-r18", "--model.model_kwargs", "{}", "--ckpt_path", str(ckpt)]
    fails(
        capsys, ["validate", *fit_args(synth, tmp_path / "v"), *other], "unetformer-paper", "unetformer-r18"
    )
    fails(
        capsys,
        ["evaluate", "--checkpoint", str(ckpt), "--data", str(synth), "--protocol", "dubai"],
        "dubai",
    )
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(image)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(ckpt.read_bytes()[:1000])  # a truncated copy
    resume = ["--ckpt_path", str(garbage)]
    fails(
        capsys, ["fit", *fit_args(synth, tmp_path / "f"), *resume], "garbage.ckpt", "cannot read checkpoint"
    )
    resume = ["--ckpt_path", str(tmp_path / "nope.ckpt")]
    fails(capsys, ["fit", *fit_args(synth, tmp_path / "f"), *resume], "nope.ckpt", "not found")
    fails(
        capsys,
        ["predict", "--checkpoint", str(garbage), "--input", str(image), "--output", str(tmp_path / "o")],
        "garbage.ckpt",
        "cannot read checkpoint",
    )
    assert files_under(tmp_path / "o") == set()


# ------------------------------------------------------------------------------------------- predict
def write_float_geotiff(path: Path, array: np.ndarray) -> None:
    rasterio = pytest.importorskip("rasterio")
    h, w, c = array.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype="float32") as ds:
        ds.write(array.transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("truncated image", "cannot read image"),
        ("zero-size image", "empty file"),
        ("greyscale", "expected 3"),
        ("NaN pixels", "non-finite"),
        ("Inf pixels", "non-finite"),
    ],
)
def test_predict_rejects_a_bad_image(
    trained_run: Path, tmp_path: Path, capsys, case: str, needle: str
) -> None:
    good = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    if case in ("NaN pixels", "Inf pixels"):
        path = tmp_path / "in" / "scene.tif"
        path.parent.mkdir()
        arr = good.astype(np.float32) / 255
        arr[10, 7, 1] = np.nan if case == "NaN pixels" else np.inf
        write_float_geotiff(path, arr)
        extra = ["--input-max", "1"]
    else:
        path = tmp_path / "in" / "img.png"
        path.parent.mkdir()
        Image.fromarray(good).save(path)
        extra = []
        if case == "truncated image":
            path.write_bytes(path.read_bytes()[:150])
        elif case == "zero-size image":
            path.write_bytes(b"")
        elif case == "greyscale":
            Image.fromarray(good[..., 0]).save(path)
    out = tmp_path / "out"
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    argv = [
        "predict",
        "--checkpoint",
        str(ckpt),
        "--input",
        str(path),
        "--output",
        str(out),
        "--window",
        "64",
    ]
    fails(capsys, [*argv, "--overlap", "16", "--no-progress", "--device", "cpu", *extra], path.name, needle)
    assert not out.exists() or list(out.iterdir()) == [], "no output for a failed input"


def test_predict_rejects_missing_and_empty_inputs(trained_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    out = tmp_path / "out"
    base = ["predict", "--checkpoint", ckpt, "--output", str(out), "--no-progress", "--device", "cpu"]
    fails(capsys, [*base, "--input", str(tmp_path / "nope")], "nope", "no such file")
    (tmp_path / "empty").mkdir()
    fails(capsys, [*base, "--input", str(tmp_path / "empty")], "empty", "no images")
    assert not out.exists() or list(out.iterdir()) == []


def test_unwritable_output_folder(trained_run: Path, synth: Path, tmp_path: Path, capsys) -> None:
    # A regular file where a folder must be: refused even for root (chmod is not, and tests may run as root).
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(image)
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    base = ["predict", "--checkpoint", ckpt, "--input", str(image), "--no-progress", "--device", "cpu"]
    fails(capsys, [*base, "--output", str(blocker / "out")], "blocker")
    fails(capsys, ["fit", *fit_args(synth, blocker / "run")], "blocker")
    fails(
        capsys,
        [
            "evaluate",
            "--checkpoint",
            ckpt,
            "--data",
            str(synth),
            "--output",
            str(blocker / "ev"),
            "--window",
            "64",
        ],
        "blocker",
    )
    assert blocker.read_text() == "a file, not a folder"


# ------------------------------------------------------------------------------------ --debug and exit
def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTSEG_DEBUG", "0")  # --debug sets it for child processes; undone after the test
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"nope\.ckpt"):
        main(
            [
                "--debug",
                "predict",
                "--checkpoint",
                str(tmp_path / "nope.ckpt"),
                "--input",
                str(bad),
                "--output",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(DataError, match="nope"):
        main(["--debug", "data", "stats", str(tmp_path / "nope")])


def test_a_real_process_exits_2_with_one_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "ctseg", "data", "stats", str(tmp_path / "nope")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CTSEG_DEBUG": "0"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "nope" in done.stderr and "Traceback" not in done.stderr
    debug = subprocess.run(
        [*argv[:3], "--debug", *argv[3:]], capture_output=True, text=True, timeout=120, env=env
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
