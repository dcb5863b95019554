"""Colour rendering of label maps: :func:`colorize`, overlays and PNG grids (``ctseg data show``).

The demo, reports and prediction previews reuse :func:`colorize` so that a class has the same colour
everywhere: the protocol's colour (the official ISPRS colours for Potsdam / Vaihingen). Ignore is
drawn black, values that are neither a class nor ignore magenta (they indicate a broken mask).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctseg.data.layout import Manifest, read_manifest
from ctseg.data.protocols import Protocol, get_protocol
from ctseg.errors import DataError, OutputError
from ctseg.utils.io import atomic_open

IGNORE_COLOR = (0, 0, 0)
INVALID_COLOR = (255, 0, 255)


def palette(protocol: Protocol, ignore_color: tuple[int, int, int] = IGNORE_COLOR) -> np.ndarray:
    """Lookup table ``(256, 3)`` uint8: class index → colour, ignore → ``ignore_color``, else magenta."""
    lut = np.tile(np.array(INVALID_COLOR, dtype=np.uint8), (256, 1))
    lut[: protocol.num_classes] = np.array(protocol.colors, dtype=np.uint8)
    lut[protocol.ignore_index] = ignore_color
    return lut


def colorize(
    mask: np.ndarray, protocol: Protocol, ignore_color: tuple[int, int, int] = IGNORE_COLOR
) -> np.ndarray:
    """Class-index mask ``(H, W)`` (any integer type) → RGB ``(H, W, 3)`` uint8 in the protocol's colours."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    valid = (mask >= 0) & (mask <= 255)
    out = palette(protocol, ignore_color)[np.where(valid, mask, 0).astype(np.uint8)]
    out[~valid] = INVALID_COLOR  # outside the uint8 table, so a broken mask
    return out


def overlay(image: np.ndarray, mask: np.ndarray, protocol: Protocol, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised mask over ``image`` ``(H, W, 3)`` uint8; ignore pixels keep the image."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    colour = colorize(mask, protocol).astype(np.float32)
    blended = (1 - alpha) * image[..., :3].astype(np.float32) + alpha * colour
    keep = mask == protocol.ignore_index
    blended[keep] = image[..., :3][keep]
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def legend(protocol: Protocol, width: int, row_height: int = 16) -> np.ndarray:
    """A strip ``(rows·row_height, width, 3)`` naming each class beside its colour swatch."""
    names = [*protocol.classes, "ignore"]
    colors = [*protocol.colors, IGNORE_COLOR]
    per_row = max(1, width // 150)
    rows = -(-len(names) // per_row)
    img = Image.new("RGB", (width, rows * row_height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = width // per_row
    for i, (name, color) in enumerate(zip(names, colors)):
        x, y = (i % per_row) * cell + 4, (i // per_row) * row_height + 2
        draw.rectangle(
            [x, y, x + row_height - 5, y + row_height - 5], fill=tuple(color), outline=(90, 90, 90)
        )
        draw.text((x + row_height, y), name, fill=(0, 0, 0))
    return np.asarray(img)


def _fit(arr: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """Letterbox ``arr`` into ``size × size`` keeping its aspect ratio."""
    h, w = arr.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    small = np.asarray(Image.fromarray(arr).resize((nw, nh), resample))
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    out[(size - nh) // 2 : (size - nh) // 2 + nh, (size - nw) // 2 : (size - nw) // 2 + nw] = small
    return out


def make_grid(
    root: str | Path,
    split: str | None = None,
    n: int = 8,
    size: int = 256,
    seed: int = 0,
    alpha: float = 0.5,
    manifest: Manifest | None = None,
) -> np.ndarray:
    """A grid of ``n`` tiles, one row each: image | overlay | colour mask, with a legend below.

    Tiles are drawn at random (``seed``) from ``split`` (all splits when ``None``). Returns
    ``(rows·size + legend, 3·size, 3)`` uint8.
    """
    root = Path(root)
    manifest = manifest or read_manifest(root)
    proto = get_protocol(manifest.protocol)
    tiles = manifest.tiles if split is None else manifest.split(split)
    if not tiles:
        known = sorted({t.split for t in manifest.tiles})
        raise DataError(root / "manifest.json", f"no tiles in split {split!r} (splits: {', '.join(known)})")
    chosen = random.Random(seed).sample(tiles, min(n, len(tiles)))
    rows = []
    for t in chosen:
        image = np.asarray(Image.open(root / t.image).convert("RGB"))
        if t.mask is None:
            mask = np.full(image.shape[:2], proto.ignore_index, dtype=np.uint8)
        else:
            mask = np.asarray(Image.open(root / t.mask))
        cells = [
            _fit(image, size, nearest=False),
            _fit(overlay(image, mask, proto, alpha), size, nearest=False),
            _fit(colorize(mask, proto), size, nearest=True),
        ]
        rows.append(np.concatenate(cells, axis=1))
    grid = np.concatenate(rows, axis=0)
    return np.concatenate([grid, legend(proto, grid.shape[1])], axis=0)


def save_png(arr: np.ndarray, path: str | Path) -> Path:
    """Write ``arr`` as PNG atomically (temp file + rename)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputError(f"{path}: the preview is a PNG; give a path ending in .png")
    with atomic_open(path, "wb") as fh:
        Image.fromarray(arr).save(fh, format="PNG")
    return path
