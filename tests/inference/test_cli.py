"""``ctseg predict`` / ``evaluate`` / ``export`` end to end on checkpoints in the ctseg format.

The checkpoints hold a tiny per-pixel network; the model registry is swapped for a builder of that
network (``build_model_from_block``) so that outputs can be checked exactly and the tests stay fast.
Everything else (reading the checkpoint, the weight-fit check, the CLI) is the real code. One test uses
the real registry with a paper preset when it is available.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ctseg.engine.checkpoint as ckpt_mod
from ctseg.cli import main
from ctseg.data.protocols import get_protocol
from ctseg.engine.checkpoint import make_ctseg_block
from ctseg.inference.sliding import predict_large
from tests.inference.conftest import pointwise_net, write_geotiff
from tests.inference.test_evaluate import PROTO, channel_argmax_net, make_prepared

NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def save_checkpoint(path: Path, net: torch.nn.Module, protocol, name: str = "tiny-test") -> Path:
    block = make_ctseg_block(
        model_name=name,
        num_classes=protocol.num_classes,
        model_kwargs={},
        protocol=protocol,
        normalization=NORM,
        ct=None,
    )
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    torch.save({"ctseg": block, "state_dict": state, "epoch": 3}, path)
    return path


@pytest.fixture
def tiny_registry(monkeypatch: pytest.MonkeyPatch):
    """Checkpoints named 'tiny-test' rebuild a fresh pointwise net; 'tiny-rgb3' the channel-argmax net."""
    builders = {
        "tiny-test": lambda k: pointwise_net(k, seed=123),
        "tiny-rgb3": lambda k: channel_argmax_net(),
    }
    monkeypatch.setattr(
        ckpt_mod,
        "build_model_from_block",
        lambda block, path: builders[block["model"]["name"]](block["model"]["num_classes"]),
    )


def test_predict_folder_and_geotiff(tmp_path: Path, tiny_registry, smooth_image: np.ndarray, capsys) -> None:
    protocol = get_protocol("synthetic")
    net = pointwise_net(protocol.num_classes)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", net, protocol)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(smooth_image).save(inputs / "a.png")
    Image.fromarray(smooth_image[:50, :60]).save(inputs / "b.jpg", quality=95)
    args = ["--window", "32", "--overlap", "8", "--batch-size", "3", "--no-progress"]
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "--input",
                str(inputs),
                "--output",
                str(tmp_path / "out"),
                *args,
            ]
        )
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["a_color.png", "a_labels.png", "b_color.png", "b_labels.png"]
    labels = np.asarray(Image.open(tmp_path / "out" / "a_labels.png"))
    # The CLI feeds the recorded normalisation and the checkpoint's weights (not the builder's seed).
    ref = predict_large(net, smooth_image, window=32, overlap=8, normalization=NORM)
    np.testing.assert_array_equal(labels, ref.labels)
    colour = np.asarray(Image.open(tmp_path / "out" / "a_color.png").convert("RGB"))
    np.testing.assert_array_equal(colour, np.asarray(protocol.colors, np.uint8)[ref.labels])

    rasterio = pytest.importorskip("rasterio")
    scene = write_geotiff(tmp_path / "scene.tif", smooth_image)
    out = tmp_path / "geo"
    tta = ["--tta", "flip", "--scales", "1,1.5", "--size-divisor", "8", "--probs"]
    assert (
        main(["predict", "--checkpoint", str(ckpt), "--input", str(scene), "--output", str(out), *args, *tta])
        == 0
    )
    with rasterio.open(out / "scene_labels.tif") as d, rasterio.open(scene) as s:
        assert d.crs == s.crs and d.transform == s.transform and d.shape == s.shape
    with rasterio.open(out / "scene_probs.tif") as p:
        assert p.count == protocol.num_classes and p.descriptions == protocol.classes
    assert "scene_labels.tif" in capsys.readouterr().out


def test_predict_masks_nodata_unless_told_not_to(
    tmp_path: Path, tiny_registry, smooth_image: np.ndarray
) -> None:
    rasterio = pytest.importorskip("rasterio")
    protocol = get_protocol("synthetic")
    ckpt = save_checkpoint(tmp_path / "m.ckpt", pointwise_net(protocol.num_classes), protocol)
    img = np.maximum(np.tile(smooth_image, (4, 3, 1)), 1)  # 308 x 303: one overview level
    img[:, :12] = 0  # outside the scene's footprint
    scene = write_geotiff(tmp_path / "scene.tif", img, nodata=0)
    common = ["--window", "32", "--overlap", "8", "--no-progress", "--checkpoint", str(ckpt)]
    args = [*common, "--input", str(scene)]
    labels = {}
    for name, extra, overviews in (("masked", ["--overviews"], [2]), ("plain", ["--no-nodata-mask"], [])):
        assert main(["predict", *args, "--output", str(tmp_path / name), *extra]) == 0
        with rasterio.open(tmp_path / name / "scene_labels.tif") as d:
            labels[name] = d.read(1)
            assert d.overviews(1) == overviews
    assert (labels["masked"][:, :12] == 255).all() and (labels["plain"] < protocol.num_classes).all()
    np.testing.assert_array_equal(labels["masked"][:, 12:], labels["plain"][:, 12:])
    # A scene without a nodata tag: --nodata declares the value of its border.
    untagged = write_geotiff(tmp_path / "untagged.tif", img)
    out = tmp_path / "declared"
    argv = [*common, "--input", str(untagged), "--output", str(out), "--nodata", "0"]
    assert main(["predict", *argv]) == 0
    with rasterio.open(out / "untagged_labels.tif") as d:
        np.testing.assert_array_equal(d.read(1), labels["masked"])


def test_predict_errors_are_one_line_naming_the_file(tmp_path: Path, tiny_registry, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "m.ckpt", pointwise_net(6), get_protocol("synthetic"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert (
        main(["predict", "--checkpoint", str(ckpt), "--input", str(bad), "--output", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.png" in err and "cannot read image" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
    missing = tmp_path / "nope.ckpt"
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    assert (
        main(["predict", "--checkpoint", str(missing), "--input", str(good), "--output", str(tmp_path / "o")])
        == 2
    )
    assert "nope.ckpt" in capsys.readouterr().err


def test_evaluate_prints_the_per_class_table_and_writes_json(
    tmp_path: Path, tiny_registry, rng, capsys
) -> None:
    data = tmp_path / "data"
    make_prepared(data, rng, [(40, 50)])
    ckpt = save_checkpoint(tmp_path / "m.ckpt", channel_argmax_net(), PROTO, name="tiny-rgb3")
    argv = ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--window", "32", "--overlap", "8"]
    assert main([*argv, "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| red |" in out and "rgb3" in out and "mIoU" in out
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["protocol"] == "rgb3" and report["tiles"] == 1 and 0 < report["mIoU"] <= 1
    # A protocol with other classes than the model is refused.
    assert main([*argv, "--protocol", "synthetic"]) == 2
    assert "differ from the model" in capsys.readouterr().err


def test_export_onnx_with_parity(tmp_path: Path, tiny_registry, capsys) -> None:
    pytest.importorskip("onnxruntime")
    ckpt = save_checkpoint(tmp_path / "m.ckpt", pointwise_net(6), get_protocol("synthetic"))
    out = tmp_path / "m.onnx"
    rc = main(
        ["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--input-size", "64"]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.is_file() and "parity check passed" in text and "max |ORT - PyTorch|" in text
    assert "batch, height and width free" in text  # a per-pixel network takes any size
    assert "(2, 3, 101, 69)" in text


@pytest.mark.slow
def test_predict_and_export_with_a_paper_preset(tmp_path: Path, smooth_image: np.ndarray, capsys) -> None:
    models = pytest.importorskip("ctseg.models")
    if not hasattr(models, "create"):
        pytest.skip("the model registry (ctseg.models.create) is not available in this checkout")
    protocol = get_protocol("synthetic")
    net = models.create("dcpoolformer-paper", num_classes=protocol.num_classes, ct=None, pretrained=False)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", net, protocol, name="dcpoolformer-paper")
    src = tmp_path / "t.png"
    Image.fromarray(smooth_image).save(src)
    args = ["--window", "64", "--overlap", "16", "--no-progress", "--device", "cpu"]
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "--input",
                str(src),
                "--output",
                str(tmp_path / "o"),
                *args,
            ]
        )
        == 0
    )
    assert np.asarray(Image.open(tmp_path / "o" / "t_labels.png")).shape == smooth_image.shape[:2]
    rc = main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--input-size", "256"])
    assert rc == 0, capsys.readouterr().out
