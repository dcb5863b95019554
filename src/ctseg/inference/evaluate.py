"""Full-tile evaluation at native resolution: sliding-window prediction of every tile of a prepared split.

Training-time validation scores fixed-size crops; this scores each whole tile as a user would predict
it (same sliding window, blending and optional TTA as ``ctseg predict``), against the masks of the
split, which ``ctseg prepare`` writes in the protocol's evaluation label product (e.g. eroded
boundaries set to the ignore index for the test split). One confusion matrix is accumulated over all
pixels of all tiles (ignore pixels dropped), and scored as in reference-spec §5
(:func:`ctseg.engine.metrics.scores_from_confusion`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctseg.data.layout import read_manifest
from ctseg.data.protocols import Protocol
from ctseg.engine.metrics import SegmentationScores, scores_from_confusion
from ctseg.errors import ConfigError, DataError
from ctseg.inference.io import open_scene
from ctseg.inference.sliding import SlidingWindow, iter_blended_rows


@dataclass
class EvalReport:
    """Scores of one split under one protocol, and how they were obtained."""

    protocol: Protocol
    split: str
    tiles: int
    scores: SegmentationScores
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol.name,
            "protocol_summary": self.protocol.summary(),
            "split": self.split,
            "tiles": self.tiles,
            "evaluation": "full tiles at native resolution, sliding window",
            "settings": self.settings,
            **self.scores.to_dict(),
        }

    def to_markdown(self) -> str:
        """Per-class table (IoU, F1, precision, recall in %) plus the summary lines naming the protocol."""

        def pct(v: float) -> str:
            return "—" if v != v else f"{100 * v:.2f}"

        s = self.scores
        lines = [
            f"Protocol: {self.protocol.summary()}",
            f"Split: {self.split} ({self.tiles} tiles, {s.pixels} evaluated pixels); full tiles at native "
            f"resolution, sliding window {self.settings.get('window')}/{self.settings.get('overlap')} "
            f"({self.settings.get('blend')}), TTA {self.settings.get('tta') or 'none'}",
            "",
            "| class | IoU | F1 | precision | recall | in mean |",
            "|---|---:|---:|---:|---:|:---:|",
        ]
        for i, c in enumerate(s.classes):
            mark = "yes" if c in s.mean_classes else ""
            lines.append(
                f"| {c} | {pct(s.iou[i])} | {pct(s.f1[i])} | {pct(s.precision[i])} | {pct(s.recall[i])} | {mark} |"
            )
        lines += [
            "",
            f"mIoU {pct(s.miou)}  mF1 {pct(s.mf1)}  (mean over {len(s.mean_classes)} of {len(s.classes)} classes)  "
            f"OA {pct(s.oa)} (all classes)",
        ]
        return "\n".join(lines)


def _read_mask(path: Path, height: int, width: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mask = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(path, f"cannot read mask ({exc})") from exc
    if mask.ndim != 2:
        raise DataError(path, f"mask must be a single-channel label map, got shape {mask.shape}")
    if mask.shape != (height, width):
        raise DataError(path, f"mask is {mask.shape[0]}x{mask.shape[1]}, its image {height}x{width}")
    return mask


def evaluate_tiles(
    model: nn.Module,
    data_root: str | Path,
    protocol: Protocol,
    *,
    split: str = "test",
    settings: SlidingWindow | None = None,
    normalization: dict[str, Sequence[float]] | None = None,
    device: str | torch.device | None = None,
    tta: str | None = None,
    on_tile: Callable[[int, int, str], None] | None = None,
) -> EvalReport:
    """Predict every tile of ``split`` whole and score it against its mask.

    Args:
        model: network (wrapped in :class:`~ctseg.inference.tta.TTA` when augmenting; ``tta`` only labels it).
        data_root: a prepared folder (``manifest.json``, ``<split>/images``, ``<split>/masks``).
        protocol: classes, ignore index and mean classes used for scoring.
        split: ``train`` / ``val`` / ``test``.
        settings, normalization, device: see :func:`~ctseg.inference.sliding.iter_blended_rows`.
        on_tile: ``on_tile(index, total, tile_id)`` after each tile (progress).
    """
    settings = settings or SlidingWindow()
    root = Path(data_root)
    manifest = read_manifest(root)
    tiles = [t for t in manifest.split(split) if t.mask is not None]
    if not tiles:
        raise DataError(root / "manifest.json", f"split {split!r} has no tiles with masks")
    data_classes = manifest.protocol.get("classes")
    if data_classes is not None and tuple(data_classes) != protocol.classes:
        raise ConfigError(
            f"{root}: data classes {list(data_classes)} differ from the protocol's {list(protocol.classes)}"
        )
    k = protocol.num_classes
    confusion = torch.zeros(k * k, dtype=torch.int64)  # rows = ground truth, columns = prediction
    for i, tile in enumerate(tiles):
        with open_scene(root / tile.image) as reader:
            mask = _read_mask(root / tile.mask, reader.height, reader.width)
            for y0, block in iter_blended_rows(
                model, reader, settings, normalization=normalization, device=device
            ):
                if block.shape[0] != protocol.num_classes:
                    raise ConfigError(
                        f"model gives {block.shape[0]} logits but protocol {protocol.name!r} has "
                        f"{protocol.num_classes} classes"
                    )
                pred = block.argmax(0).cpu().reshape(-1)
                target = torch.from_numpy(mask[y0 : y0 + block.shape[1]].astype(np.int64)).reshape(-1)
                keep = target < k  # ignore index and any other non-class value are not evaluated
                confusion += torch.bincount(target[keep] * k + pred[keep], minlength=k * k)
        if on_tile is not None:
            on_tile(i + 1, len(tiles), tile.id)
    return EvalReport(
        protocol=protocol,
        split=split,
        tiles=len(tiles),
        scores=scores_from_confusion(confusion.view(k, k), protocol.classes, protocol.mean_class_indices),
        settings={
            "window": settings.window,
            "overlap": settings.overlap,
            "blend": settings.blend,
            "batch_size": settings.batch_size,
            "tta": tta,
        },
    )
