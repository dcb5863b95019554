"""The prepared-data folder layout shared by every dataset (real or synthetic).

::

    <root>/manifest.json                 format, protocol, sources, one entry per tile
    <root>/<split>/images/<tile_id>.png  RGB uint8 image (H, W, 3)
    <root>/<split>/masks/<tile_id>.png   uint8 label map (H, W): class index or protocol.ignore_index

Every loader and command reads this layout, so whatever ``ctseg prepare`` writes and what the synthetic
generator writes are interchangeable.

Always open a tile through ``TileEntry.image`` / ``TileEntry.mask`` rather than rebuilding the path from
the split: with a ``val_is_test`` protocol the ``val`` entries point at the files under ``test/`` (nothing
is written twice). ``mask`` is ``None`` for images without public labels (LoveDA ``Test``).
``ctseg prepare`` also records in ``TileEntry.extra``: ``source_id``, the window ``y`` / ``x`` in the
(flipped) source, ``flip``, ``label_product``, ``label_source`` and the ``image_sha256`` / ``mask_sha256``
of the written files; and in ``Manifest.extra``: ``dataset``, ``protocol_summary``, ``label_decoding``,
``split_items``, ``unknown_label_values`` and ``warnings``. Its resume state lives beside the manifest
in ``.ctseg-prepare-state.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctseg import __version__
from ctseg.errors import DataError
from ctseg.utils.io import atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ctseg-prepared/1"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TileEntry:
    """One prepared tile. Paths are relative to the dataset root."""

    split: str
    id: str
    image: str
    mask: str | None
    height: int
    width: int
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    protocol: dict[str, Any]
    tiles: list[TileEntry]
    sources: list[dict[str, Any]] = field(default_factory=list)
    format: str = MANIFEST_FORMAT
    created_by: str = f"ctseg {__version__}"
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[TileEntry]:
        return [t for t in self.tiles if t.split == name]

    def get_protocol(self) -> Any:
        """The recorded protocol as a :class:`ctseg.data.protocols.Protocol`."""
        from ctseg.data.protocols import get_protocol

        return get_protocol(self.protocol)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created_by": self.created_by,
            "protocol": self.protocol,
            "sources": self.sources,
            "extra": self.extra,
            "tiles": [asdict(t) for t in self.tiles],
        }


def tile_paths(split: str, tile_id: str) -> tuple[str, str]:
    """Relative (image, mask) paths of a tile in the standard layout."""
    return f"{split}/images/{tile_id}.png", f"{split}/masks/{tile_id}.png"


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_dict())
    return path


def read_manifest(root: str | Path, check_files: bool = True) -> Manifest:
    """Read ``<root>/manifest.json``; with ``check_files`` every listed file must exist."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise DataError(root, "no such data folder")
    if not path.is_file():
        raise DataError(path, "missing; is this a folder written by `ctseg prepare` or `ctseg demo`?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise DataError(
            path, f"unknown manifest format {raw.get('format') if isinstance(raw, dict) else raw!r}"
        )
    try:
        tiles = [TileEntry(**t) for t in raw["tiles"]]
        manifest = Manifest(
            protocol=raw["protocol"],
            tiles=tiles,
            sources=raw.get("sources", []),
            format=raw["format"],
            created_by=raw.get("created_by", ""),
            extra=raw.get("extra", {}),
        )
    except (KeyError, TypeError) as exc:
        raise DataError(path, f"malformed manifest ({exc})") from exc
    if check_files:
        missing = [
            rel for t in tiles for rel in (t.image, t.mask) if rel is not None and not (root / rel).is_file()
        ]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(path, f"lists {len(missing)} missing file(s): {shown}")
    return manifest
