"""Small prepared folders in the standard layout, written into ``tmp_path`` for the data tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ctseg.data.layout import Manifest, TileEntry, tile_paths, write_manifest
from ctseg.data.protocols import get_protocol


def blocky_mask(
    rng: np.random.Generator, height: int, width: int, num_classes: int, block: int = 8
) -> np.ndarray:
    """Piecewise-constant labels (blocks of ``block`` px), so crops usually hold several classes."""
    gh, gw = -(-height // block), -(-width // block)
    grid = rng.integers(0, num_classes, size=(gh, gw), dtype=np.uint8)
    return np.kron(grid, np.ones((block, block), dtype=np.uint8))[:height, :width]


def write_prepared(
    root: Path,
    splits: dict[str, int] | None = None,
    size: int | tuple[int, int] | Sequence[tuple[int, int]] = 48,
    protocol: str | dict[str, Any] = "synthetic",
    seed: int = 0,
    ignore_fraction: float = 0.05,
    mask_fn: Callable[[np.random.Generator, int, int, int], np.ndarray] | None = None,
) -> Path:
    """Write a prepared folder: random RGB images, blocky masks with a little ignore, and manifest.json.

    ``size`` is one side, one (H, W) for every tile, or a list of (H, W) cycled over the tiles (variable sizes).
    """
    splits = {"train": 8, "val": 2, "test": 2} if splits is None else splits
    proto = get_protocol(protocol)
    rng = np.random.default_rng(seed)
    if isinstance(size, int):
        sizes: list[tuple[int, int]] = [(size, size)]
    elif isinstance(size, tuple) and len(size) == 2 and isinstance(size[0], int):
        sizes = [size]  # type: ignore[list-item]
    else:
        sizes = list(size)  # type: ignore[arg-type]
    tiles: list[TileEntry] = []
    k = 0
    for split, count in splits.items():
        for i in range(count):
            h, w = sizes[k % len(sizes)]
            k += 1
            tile_id = f"{split}_{i:03d}"
            rel_img, rel_mask = tile_paths(split, tile_id)
            image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            mask = (mask_fn or blocky_mask)(rng, h, w, proto.num_classes)
            mask = np.where(rng.random((h, w)) < ignore_fraction, proto.ignore_index, mask).astype(np.uint8)
            (root / rel_img).parent.mkdir(parents=True, exist_ok=True)
            (root / rel_mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="RGB").save(root / rel_img)
            Image.fromarray(mask, mode="L").save(root / rel_mask)
            tiles.append(TileEntry(split=split, id=tile_id, image=rel_img, mask=rel_mask, height=h, width=w))
    write_manifest(root, Manifest(protocol=proto.to_dict(), tiles=tiles))
    return root


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """8 train, 2 val, 2 test tiles of 48², protocol ``synthetic`` (6 classes, ignore 255)."""
    return write_prepared(tmp_path / "data")
