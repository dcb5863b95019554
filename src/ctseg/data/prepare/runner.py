"""The dataset-independent part of ``ctseg prepare``: split assignment, checks, tiling loop, manifest.

A :class:`Preparer` knows one dataset's files (names, products, label encoding); :func:`run_prepare`
does the rest identically for every dataset.
"""

from __future__ import annotations

import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ctseg.data.layout import Manifest, TileEntry, tile_paths, write_manifest
from ctseg.data.prepare.common import (
    UNKNOWN_POLICIES,
    PendingTile,
    ResumableWriter,
    SourceFile,
    SourceIndex,
    crop_padded,
    decode_colors,
    encode_png,
    flip,
    read_array,
    resize_image,
    resize_mask,
    tile_grid,
)
from ctseg.data.protocols import SPLIT_NAMES, Protocol, split_entry_matches
from ctseg.errors import ConfigError, DataError


@dataclass(frozen=True)
class SourceItem:
    """One source image with its label products.

    Attributes:
        id: the id split entries name (``"2_10"``, ``"Tile 1/image_part_001"``, ``"Train/Rural/1366"``).
        group: a coarser id split entries may name (``"Tile 1"``); equal to ``id`` when there is none.
        key: a file-name-safe form of ``id`` used for tile ids (``"tile1_part001"``).
        image: the image file.
        labels: label file per product (``"full"``, ``"eroded"``).
        unlabelled: the dataset officially ships no labels for this image (LoveDA ``Test``); its
            tiles get ``mask=None``. Any other item without the needed label is an error.
    """

    id: str
    group: str
    key: str
    image: SourceFile
    labels: Mapping[str, SourceFile] = field(default_factory=dict)
    unlabelled: bool = False


class Preparer(ABC):
    """One dataset's source layout and label encoding."""

    #: dataset family; protocols with another ``dataset`` are refused.
    dataset: str = ""
    #: protocol used when none is given.
    default_protocol: str = ""
    #: how source labels become prepared masks (recorded in the manifest).
    label_decoding: str = ""

    @abstractmethod
    def discover(self, index: SourceIndex, protocol: Protocol) -> list[SourceItem]:
        """Every source item found in ``index`` (whether or not the protocol uses it)."""

    @abstractmethod
    def expected_files(self, entry: str, protocol: Protocol) -> str:
        """Human-readable names of the files a split entry needs (for "missing" errors)."""

    def read_image(self, item: SourceItem, protocol: Protocol) -> np.ndarray:
        """(H, W, 3) uint8 image of the item in the protocol's imagery."""
        arr = read_array(item.image)
        # A greyscale, palette or 4-band file in an RGB dataset is a broken or foreign source: converting
        # it would train on invented colours, so it is an error like a wrong channel count at load time.
        if arr.ndim != 3 or arr.shape[2] != 3:
            bands = 1 if arr.ndim == 2 else arr.shape[2]
            raise DataError(item.image.display, f"image has {bands} channel(s); expected 3 (RGB)")
        return arr

    @abstractmethod
    def read_mask(
        self, item: SourceItem, product: str, protocol: Protocol, unknown: str
    ) -> tuple[np.ndarray, dict[Any, int]]:
        """(H, W) uint8 prepared mask of ``product`` and the counts of unknown label values."""


class ColorLabelPreparer(Preparer):
    """A preparer whose label products are RGB colour images decoded with the protocol's colours."""

    def read_mask(
        self, item: SourceItem, product: str, protocol: Protocol, unknown: str
    ) -> tuple[np.ndarray, dict[Any, int]]:
        label = item.labels[product]
        rgb = read_array(label, mode="RGB")
        return decode_colors(
            rgb,
            protocol.colors,
            protocol.ignore_colors,
            protocol.ignore_index,
            unknown=unknown,
            path=label.display,
        )


@dataclass
class PrepareResult:
    manifest: Manifest
    out: Path
    written: int
    skipped: int
    warnings: list[str]
    unknown: dict[str, dict[str, int]]


def _warn(msg: str, collected: list[str]) -> None:
    collected.append(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def assign_splits(
    items: Sequence[SourceItem], protocol: Protocol, preparer: Preparer, src: str, notes: list[str]
) -> dict[str, list[SourceItem]]:
    """Items per split folder; a missing train/val entry is an error, a missing test entry a warning."""
    by_split: dict[str, list[SourceItem]] = {s: [] for s in SPLIT_NAMES}
    for item in items:
        split = protocol.split_of(item.id, item.group)
        if split is not None:
            by_split[split].append(item)
    missing: dict[str, list[str]] = {}
    for split, entries in protocol.effective_splits().items():
        if protocol.val_is_test and split == "val":
            continue  # an alias of test, checked there
        lost = [e for e in entries if not any(split_entry_matches(e, i.id, i.group) for i in items)]
        if lost:
            missing[split] = lost
    for split in ("train", "val"):
        if missing.get(split):
            shown = "; ".join(f"{e} ({preparer.expected_files(e, protocol)})" for e in missing[split][:4])
            more = f" and {len(missing[split]) - 4} more" if len(missing[split]) > 4 else ""
            raise DataError(src, f"{split} split of protocol {protocol.name}: missing {shown}{more}")
    if missing.get("test"):
        _warn(
            f"test split of protocol {protocol.name}: {len(missing['test'])} of "
            f"{len(protocol.splits.get('test', ()))} entries absent ({', '.join(missing['test'])}); "
            f"the prepared test split has {len(by_split['test'])} source images",
            notes,
        )
    if not any(by_split.values()):
        raise DataError(src, f"no source files of {preparer.dataset} found for protocol {protocol.name}")
    return by_split


def _tile_item(
    item: SourceItem,
    split: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    protocol: Protocol,
    product: str | None,
) -> list[PendingTile]:
    flips = ("", *protocol.train_flips) if split == "train" else ("",)
    pending = []
    for how in flips:
        img, msk = flip(image, how), None if mask is None else flip(mask, how)
        h, w = img.shape[:2]
        if protocol.tile_size is None:
            windows = [(0, 0, None)]
        else:
            stride = protocol.tile_stride_for(split)
            windows = [(y, x, protocol.tile_size) for y, x in tile_grid(h, w, protocol.tile_size, stride)]
        for y, x, size in windows:
            t_img = img if size is None else crop_padded(img, y, x, size, fill=0)
            t_msk = (
                None
                if msk is None or size is None
                else crop_padded(msk, y, x, size, fill=protocol.ignore_index)
            )
            if size is None:
                t_msk = msk
            if protocol.resize:
                t_img = resize_image(t_img, protocol.resize)
                if t_msk is not None:
                    t_msk = resize_mask(
                        t_msk,
                        protocol.resize,
                        protocol.mask_interp,
                        protocol.ignore_index,
                        protocol.num_classes,
                    )
            tile_id = item.key + (f"_{how}" if how else "")
            if size is not None:
                tile_id += f"_{y}_{x}"
            image_rel, mask_rel = tile_paths(split, tile_id)
            entry = TileEntry(
                split=split,
                id=tile_id,
                image=image_rel,
                mask=None if t_msk is None else mask_rel,
                height=int(t_img.shape[0]),
                width=int(t_img.shape[1]),
                source=item.image.display,
                extra={
                    "source_id": item.id,
                    "y": y,
                    "x": x,
                    "flip": how,
                    "label_product": product,
                    "label_source": item.labels[product].display if product in item.labels else None,
                },
            )
            pending.append(
                PendingTile(entry, encode_png(t_img), None if t_msk is None else encode_png(t_msk))
            )
    return pending


@contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Any]:
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def run_prepare(
    preparer: Preparer,
    src: Sequence[str | Path],
    out: str | Path,
    protocol: Protocol,
    *,
    unknown_colors: str = "error",
    overwrite: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """Prepare ``src`` (folders and/or zip archives) into the standard layout under ``out``."""
    if protocol.dataset != preparer.dataset:
        raise ConfigError(
            f"protocol {protocol.name!r} is for dataset {protocol.dataset!r}, not {preparer.dataset!r}"
        )
    if unknown_colors not in UNKNOWN_POLICIES:
        raise ConfigError(f"unknown_colors must be one of {UNKNOWN_POLICIES}, not {unknown_colors!r}")
    notes: list[str] = []
    for quirk in protocol.quirks():
        _warn(quirk, notes)
    src_label = ", ".join(str(s) for s in src)
    index = SourceIndex(src)
    items = preparer.discover(index, protocol)
    if not items and index.nested:
        shown = ", ".join(index.nested[:3])
        raise DataError(
            src_label,
            f"holds archives inside an archive ({shown}); extract the outer one and pass its folder",
        )
    by_split = assign_splits(items, protocol, preparer, src_label, notes)
    for split, split_items in by_split.items():
        product = protocol.labels_for(split)
        for item in split_items:
            if product not in item.labels and not item.unlabelled:
                raise DataError(
                    item.image.display,
                    f"no {product!r} label for {item.id} ({split} split needs it); "
                    f"expected {preparer.expected_files(item.id, protocol)}",
                )
    if protocol.val_fraction is not None and not by_split["val"] and by_split["train"]:
        _warn(f"protocol {protocol.name}: val_fraction left the val split empty (too few images)", notes)

    writer = ResumableWriter(Path(out), protocol.to_dict(), preparer.dataset, overwrite=overwrite)
    tiles: list[TileEntry] = []
    unknown: dict[str, dict[str, int]] = {}
    written = skipped = 0
    units = [(split, item) for split in SPLIT_NAMES for item in by_split[split]]
    with _progress(progress, len(units), f"prepare {preparer.dataset}") as advance:
        for split, item in units:
            product = protocol.labels_for(split)
            label = item.labels.get(product)
            key = f"{split}/{item.key}"
            fingerprint = [
                item.image.fingerprint(),
                None if label is None else label.fingerprint(),
                unknown_colors,
            ]
            done = writer.cached(key, fingerprint)
            if done is None:
                image = preparer.read_image(item, protocol)
                mask = None
                if label is not None:
                    mask, bad = preparer.read_mask(item, product, protocol, unknown_colors)
                    if bad:
                        unknown[label.display] = {str(k): v for k, v in bad.items()}
                    if mask.shape[:2] != image.shape[:2]:
                        raise DataError(
                            label.display,
                            f"label is {mask.shape[1]}x{mask.shape[0]} px but its image "
                            f"{item.image.display} is {image.shape[1]}x{image.shape[0]} px",
                        )
                done = writer.write(key, fingerprint, _tile_item(item, split, image, mask, protocol, product))
                written += 1
            else:
                skipped += 1
                unknown.update(writer.state["units"][key].get("unknown", {}))
            if label is not None and label.display in unknown:
                writer.state["units"][key]["unknown"] = {label.display: unknown[label.display]}
            tiles.extend(done)
            advance()
    if unknown:
        total = sum(sum(c.values()) for c in unknown.values())
        _warn(
            f"{total} label pixels in {len(unknown)} files had unknown colours/values and became ignore",
            notes,
        )
    dropped = writer.drop_except({f"{split}/{item.key}" for split, item in units})
    if dropped:
        _warn(f"removed the tiles of {dropped} source images that are no longer in the sources", notes)
    writer.save()

    if protocol.val_is_test:
        # val is an alias of test: entries point at the test files, nothing is written twice.
        tiles.extend(replace(t, split="val") for t in tiles if t.split == "test")
    used = sorted(
        {it.image.container for its in by_split.values() for it in its}
        | {lab.container for its in by_split.values() for it in its for lab in it.labels.values()}
    )
    sources = [
        {
            "path": str(p),
            "kind": "zip" if p.suffix.lower() == ".zip" else "file",
            "size": p.stat().st_size,
            "sha256": writer.source_hash(p),
        }
        for p in used
    ]
    writer.save()
    manifest = Manifest(
        protocol=protocol.to_dict(),
        tiles=tiles,
        sources=sources,
        extra={
            "dataset": preparer.dataset,
            "protocol_summary": protocol.summary(),
            "label_decoding": preparer.label_decoding,
            "split_items": {s: sorted(i.id for i in by_split[s]) for s in SPLIT_NAMES},
            "unknown_label_values": unknown,
            "unknown_colors_policy": unknown_colors,
            "warnings": notes,
            "val_alias_of_test": protocol.val_is_test,
        },
    )
    write_manifest(writer.out, manifest)
    return PrepareResult(manifest, writer.out, written, skipped, notes, unknown)
