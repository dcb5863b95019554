"""Full-tile evaluation against a prepared split: the confusion matrix and scores match a direct count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ctseg.data.layout import Manifest, TileEntry, tile_paths, write_manifest
from ctseg.data.protocols import Protocol
from ctseg.errors import ConfigError, DataError
from ctseg.inference.evaluate import evaluate_tiles
from ctseg.inference.sliding import SlidingWindow

PROTO = Protocol(
    name="rgb3",
    dataset="synthetic",
    classes=("red", "green", "blue"),
    colors=((255, 0, 0), (0, 255, 0), (0, 0, 255)),
    ignore_index=255,
    mean_classes=("red", "green"),
)


def channel_argmax_net() -> nn.Module:
    """Logits = the RGB channels: the predicted class of a pixel is its brightest channel."""
    net = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        net.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        net.bias.zero_()
    return net.eval()


def make_prepared(
    root: Path, rng: np.random.Generator, sizes: list[tuple[int, int]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Write a prepared folder with test tiles whose masks are the true class with noise and ignore pixels."""
    tiles, pairs = [], []
    for i, (h, w) in enumerate(sizes):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = image.argmax(-1).astype(np.uint8)
        flip = rng.random((h, w)) < 0.2
        mask[flip] = rng.integers(0, 3, int(flip.sum()))
        mask[rng.random((h, w)) < 0.1] = 255
        img_rel, mask_rel = tile_paths("test", f"t{i}")
        (root / img_rel).parent.mkdir(parents=True, exist_ok=True)
        (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / img_rel)
        Image.fromarray(mask).save(root / mask_rel)
        tiles.append(TileEntry("test", f"t{i}", img_rel, mask_rel, h, w))
        pairs.append((image, mask))
    write_manifest(root, Manifest(protocol=PROTO.to_dict(), tiles=tiles))
    return pairs


def test_full_tile_scores_match_a_direct_count(tmp_path: Path, rng: np.random.Generator) -> None:
    pairs = make_prepared(tmp_path, rng, [(45, 70), (64, 33)])
    report = evaluate_tiles(
        channel_argmax_net(), tmp_path, PROTO, settings=SlidingWindow(window=32, overlap=8, batch_size=4)
    )
    cm = np.zeros((3, 3), np.int64)
    for image, mask in pairs:
        keep = mask < 3
        np.add.at(cm, (mask[keep], image.argmax(-1)[keep]), 1)
    assert np.array_equal(np.array(report.scores.confusion), cm)
    tp = np.diag(cm)
    iou = tp / (cm.sum(0) + cm.sum(1) - tp)
    np.testing.assert_allclose(report.scores.iou, iou)
    assert report.scores.miou == pytest.approx(iou[:2].mean())  # mean over the protocol's mean classes
    assert report.scores.oa == pytest.approx(tp.sum() / cm.sum())
    assert report.tiles == 2 and report.split == "test"
    md = report.to_markdown()
    assert "rgb3" in md and "| blue |" in md and "mean over 2 of 3 classes" in md
    d = report.to_dict()
    assert d["protocol"] == "rgb3" and d["settings"]["window"] == 32


def test_mismatching_mask_and_classes_are_reported(tmp_path: Path, rng: np.random.Generator) -> None:
    make_prepared(tmp_path, rng, [(40, 40)])
    Image.fromarray(np.zeros((39, 40), np.uint8)).save(tmp_path / "test/masks/t0.png")
    with pytest.raises(DataError, match=r"t0\.png.*39x40"):
        evaluate_tiles(channel_argmax_net(), tmp_path, PROTO, settings=SlidingWindow(window=32, overlap=8))
    other = PROTO.with_overrides(name="other", classes=("a", "b", "c"), mean_classes=None)
    with pytest.raises(ConfigError, match="data classes"):
        evaluate_tiles(channel_argmax_net(), tmp_path, other)
    with pytest.raises(DataError, match="no tiles"):
        evaluate_tiles(channel_argmax_net(), tmp_path, PROTO, split="val")
