"""Class shares and sizes of a prepared folder (``ctseg data stats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ctseg.data.layout import SPLITS, Manifest, read_manifest
from ctseg.data.protocols import Protocol, get_protocol
from ctseg.errors import DataError


@dataclass
class SplitStats:
    """Pixel counts of one split. ``class_pixels[k]`` counts class ``k``; ``invalid`` counts values that
    are neither a class nor ignore (a broken mask)."""

    split: str
    tiles: int = 0
    unlabelled_tiles: int = 0
    min_hw: tuple[int, int] | None = None
    max_hw: tuple[int, int] | None = None
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignore_pixels: int = 0
    invalid_pixels: int = 0
    alias_of: str | None = None

    @property
    def labelled_pixels(self) -> int:
        return int(self.class_pixels.sum())

    @property
    def total_pixels(self) -> int:
        return self.labelled_pixels + self.ignore_pixels + self.invalid_pixels

    def shares(self) -> np.ndarray:
        """Share of each class among labelled (non-ignore) pixels, shape ``(K,)``; zeros if none."""
        n = self.labelled_pixels
        return self.class_pixels / n if n else np.zeros_like(self.class_pixels, dtype=np.float64)


@dataclass
class DataStats:
    root: Path
    protocol: Protocol
    splits: dict[str, SplitStats]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"root": str(self.root), "protocol": self.protocol.summary(), "splits": {}}
        for name, s in self.splits.items():
            out["splits"][name] = {
                "tiles": s.tiles,
                "unlabelled_tiles": s.unlabelled_tiles,
                "min_hw": s.min_hw,
                "max_hw": s.max_hw,
                "labelled_pixels": s.labelled_pixels,
                "ignore_pixels": s.ignore_pixels,
                "invalid_pixels": s.invalid_pixels,
                "class_pixels": dict(zip(self.protocol.classes, s.class_pixels.tolist())),
                "class_shares": dict(zip(self.protocol.classes, s.shares().round(6).tolist())),
                "alias_of": s.alias_of,
            }
        return out


def compute_stats(root: str | Path, manifest: Manifest | None = None) -> DataStats:
    """Read every mask of a prepared folder and count pixels per class and split."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    proto = get_protocol(manifest.protocol)
    k = proto.num_classes
    names = [s for s in SPLITS if manifest.split(s)] + sorted({t.split for t in manifest.tiles} - set(SPLITS))
    result: dict[str, SplitStats] = {}
    for name in names:
        tiles = manifest.split(name)
        st = SplitStats(name, class_pixels=np.zeros(k, dtype=np.int64))
        other = {t.image.split("/", 1)[0] for t in tiles} - {name}
        st.alias_of = other.pop() if len(other) == 1 else None
        for t in tiles:
            st.tiles += 1
            hw = (t.height, t.width)
            st.min_hw = hw if st.min_hw is None else (min(st.min_hw[0], hw[0]), min(st.min_hw[1], hw[1]))
            st.max_hw = hw if st.max_hw is None else (max(st.max_hw[0], hw[0]), max(st.max_hw[1], hw[1]))
            if t.mask is None:
                st.unlabelled_tiles += 1
                continue
            path = root / t.mask
            try:
                with Image.open(path) as im:
                    mask = np.asarray(im)
            except OSError as exc:
                raise DataError(path, f"cannot be read ({exc})") from exc
            if mask.ndim != 2:
                raise DataError(path, f"mask has shape {mask.shape}; expected (H, W) class indices")
            counts = np.bincount(mask.ravel(), minlength=256)
            st.class_pixels += counts[:k]
            st.ignore_pixels += int(counts[proto.ignore_index])
            st.invalid_pixels += int(counts.sum() - counts[:k].sum() - counts[proto.ignore_index])
        result[name] = st
    return DataStats(root, proto, result)


def format_stats(stats: DataStats) -> str:
    """A plain-text table: one column per split, one row per class share, then sizes."""
    splits = list(stats.splits.values())
    width = max([len(c) for c in stats.protocol.classes] + [14])
    head = f"{'':<{width}}" + "".join(
        f"{s.split + ('=' + s.alias_of if s.alias_of else ''):>14}" for s in splits
    )
    lines = [f"protocol: {stats.protocol.summary()}", f"folder:   {stats.root}", "", head]

    def row(label: str, values: list[str]) -> str:
        return f"{label:<{width}}" + "".join(f"{v:>14}" for v in values)

    lines.append(row("tiles", [str(s.tiles) for s in splits]))
    lines.append(row("min size HxW", [f"{s.min_hw[0]}x{s.min_hw[1]}" if s.min_hw else "-" for s in splits]))
    lines.append(row("max size HxW", [f"{s.max_hw[0]}x{s.max_hw[1]}" if s.max_hw else "-" for s in splits]))
    lines.append(row("labelled Mpx", [f"{s.labelled_pixels / 1e6:.2f}" for s in splits]))
    lines.append(
        row(
            "ignore share",
            [f"{s.ignore_pixels / s.total_pixels:.2%}" if s.total_pixels else "-" for s in splits],
        )
    )
    lines.append("class share of labelled pixels:")
    mean = set(stats.protocol.mean_class_indices)
    for i, name in enumerate(stats.protocol.classes):
        label = f"  {name}" + ("" if i in mean else " *")
        lines.append(row(label, [f"{s.shares()[i]:.2%}" if s.labelled_pixels else "-" for s in splits]))
    if len(mean) < stats.protocol.num_classes:
        lines.append("  * not in the mean metrics of this protocol")
    if any(s.unlabelled_tiles for s in splits):
        lines.append(row("unlabelled tiles", [str(s.unlabelled_tiles) for s in splits]))
    if any(s.invalid_pixels for s in splits):
        lines.append(row("INVALID pixels", [str(s.invalid_pixels) for s in splits]))
    return "\n".join(lines)
