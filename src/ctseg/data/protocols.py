"""Named, serialisable evaluation/training protocols.

"Potsdam" means different benchmarks in different tools (imagery, label product, split, tiling, which
classes enter the mean). A :class:`Protocol` pins all of these down; every prepared folder, run
directory and report records the protocol it used, and every reported number names it.

Presets are registered with :func:`register_protocol` and looked up with :func:`get_protocol`.

Ignore value: prepared masks store ignore as ``255`` for every preset (``Protocol.ignore_index``). The
reference code (GeoSeg and the CT paper) uses ``6`` = ``len(CLASSES)`` internally; the value differs,
the meaning (never trained on, never evaluated) is the same.

Splits: an entry of ``Protocol.splits`` names source tiles. It matches a source item when it equals the
item's id, the item's group (Dubai ``"Tile 2"``) or a path prefix of the id (LoveDA ``"Train"`` matches
``"Train/Rural/1366"``). Validation comes from training tiles, never from the test tiles; only
``val_is_test=True`` (an explicit flag that reproduces papers which validated on the test set) changes
that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from ctseg.errors import ConfigError
from ctseg.utils.registry import Registry

RGB = tuple[int, int, int]
MaskInterp = Literal["nearest", "bicubic"]

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
FLIPS: tuple[str, ...] = ("h", "v")
LABEL_PRODUCTS: tuple[str, ...] = ("full", "eroded")

# Official ISPRS 2D semantic labelling colours (RGB).
ISPRS_CLASSES: tuple[str, ...] = (
    "impervious_surfaces",
    "building",
    "low_vegetation",
    "tree",
    "car",
    "clutter",
)
ISPRS_COLORS: tuple[RGB, ...] = (
    (255, 255, 255),
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
)
# Black marks the eroded boundary in the ``noBoundary`` label products.
ISPRS_BOUNDARY_COLOR: RGB = (0, 0, 0)

# ISPRS Potsdam: 38 tiles of 6000² px; the standard 24 / 14 split (reference spec §4.1).
POTSDAM_TRAIN_TILES: tuple[str, ...] = (
    "2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12",
    "6_7", "6_8", "6_9", "6_10", "6_11", "6_12", "7_7", "7_8", "7_9", "7_10", "7_11", "7_12",
)  # fmt: skip
POTSDAM_TEST_TILES: tuple[str, ...] = (
    "2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14",
    "6_15", "7_13",
)  # fmt: skip
# Validation tile taken from the training tiles. 2_10 is the tile GeoSeg/UNetFormer users validate
# on; 7_10 would be a poor choice because its labels are known to contain errors.
POTSDAM_VAL_TILE = "2_10"
POTSDAM_BAD_LABEL_TILE = "7_10"

# ISPRS Vaihingen: 33 areas; 16 with the originally released ground truth are the usual training set.
VAIHINGEN_TRAIN_AREAS: tuple[str, ...] = tuple(
    f"area{n}" for n in (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)
)
VAIHINGEN_TEST_AREAS: tuple[str, ...] = tuple(
    f"area{n}" for n in (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)
)
# Our choice of a training area for validation (GeoSeg itself validates on the test areas).
VAIHINGEN_VAL_AREA = "area30"

LOVEDA_CLASSES: tuple[str, ...] = (
    "background",
    "building",
    "road",
    "water",
    "barren",
    "forest",
    "agriculture",
)
# LoveDA ships index masks only; these colours are for overlays (the palette mmsegmentation's docs show).
LOVEDA_COLORS: tuple[RGB, ...] = (
    (255, 255, 255),
    (255, 0, 0),
    (255, 255, 0),
    (0, 0, 255),
    (159, 129, 183),
    (0, 255, 0),
    (255, 195, 128),
)

DUBAI_CLASSES: tuple[str, ...] = ("building", "land", "road", "vegetation", "water")
# The colours actually present in the masks; the hex colours in the dataset's classes.json are wrong.
DUBAI_COLORS: tuple[RGB, ...] = (
    (60, 16, 152),
    (132, 41, 246),
    (110, 193, 228),
    (254, 221, 58),
    (226, 169, 41),
)
DUBAI_UNLABELED_COLOR: RGB = (155, 155, 155)
DUBAI_NODATA_COLOR: RGB = (0, 0, 0)


@dataclass(frozen=True)
class Protocol:
    """Everything that changes a reported number.

    Attributes:
        name: registry name, e.g. ``"potsdam-paper"``.
        dataset: dataset family (``"potsdam"``, ``"vaihingen"``, ``"loveda"``, ``"dubai"``, ``"synthetic"``).
        classes: class names in index order (index = value in prepared masks).
        colors: RGB colour per class (for colour-label decoding and overlays).
        ignore_index: value of pixels that are never trained on nor evaluated (255 in prepared masks).
        mean_classes: classes that enter mIoU / mF1 (``None`` = all classes).
        imagery: imagery product (``"RGB"``, ``"IRRG"``, ``"RGBIR"``).
        train_labels / eval_labels: label products for training and evaluation
            (``"full"`` = with boundary, ``"eroded"`` = ISPRS ``noBoundary``: boundary → ignore).
            Validation and test use ``eval_labels``.
        splits: tile ids per split (``train`` / ``val`` / ``test``); ``val`` is taken from training tiles.
        tile_size / tile_stride: tiling of source images in pixels (``None`` = whole images). Edges are
            padded with ``ignore_index`` (masks) and 0 (images), never with a class.
        eval_tile_stride: stride for the val / test splits (``None`` = ``tile_stride``).
        resize: side length tiles are resized to (``None`` = native).
        mask_interp: interpolation of masks when resizing; only ``"nearest"`` is correct, ``"bicubic"``
            reproduces the CT paper's quirk (reference spec §4.4) and warns.
        val_is_test: validate on the test tiles (reproduces papers that did so; never a default).
            Then every tile of ``splits["val"]`` goes back to training.
        val_fraction: hold out this fraction of the training items for validation (a stable hash of
            the item id decides, so adding files never moves other items); for datasets too large to
            list ids (LoveDA).
        train_flips: extra copies of every training source image, flipped before tiling
            (``"h"`` horizontal, ``"v"`` vertical), as the reference tiling scripts write them.
        ignore_colors: colours of colour-coded labels that decode to ``ignore_index``.
        gsd_m: ground sampling distance in metres.
    """

    name: str
    dataset: str
    classes: tuple[str, ...]
    colors: tuple[RGB, ...]
    ignore_index: int = 255
    mean_classes: tuple[str, ...] | None = None
    imagery: str = "RGB"
    train_labels: str = "full"
    eval_labels: str = "full"
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tile_size: int | None = None
    tile_stride: int | None = None
    resize: int | None = None
    mask_interp: MaskInterp = "nearest"
    val_is_test: bool = False
    gsd_m: float | None = None
    description: str = ""
    eval_tile_stride: int | None = None
    val_fraction: float | None = None
    train_flips: tuple[str, ...] = ()
    ignore_colors: tuple[RGB, ...] = ()

    def __post_init__(self) -> None:
        where = f"protocol {self.name!r}"
        if len(self.classes) != len(self.colors):
            raise ConfigError(f"{where}: {len(self.classes)} classes but {len(self.colors)} colours")
        if not 0 <= self.ignore_index <= 255:
            raise ConfigError(f"{where}: ignore_index {self.ignore_index} does not fit a uint8 mask")
        if 0 <= self.ignore_index < len(self.classes):
            raise ConfigError(f"{where}: ignore_index {self.ignore_index} is a class index")
        unknown = set(self.mean_classes or ()) - set(self.classes)
        if unknown:
            raise ConfigError(f"{where}: mean_classes not among classes: {sorted(unknown)}")
        if self.mask_interp not in ("nearest", "bicubic"):
            raise ConfigError(f"{where}: mask_interp must be 'nearest' or 'bicubic'")
        clash = set(self.colors) & set(self.ignore_colors)
        if clash:
            raise ConfigError(f"{where}: colours {sorted(clash)} are both a class and ignore")
        if len(set(self.colors)) != len(self.colors):
            raise ConfigError(f"{where}: two classes share a colour")
        for size_field in ("tile_size", "tile_stride", "eval_tile_stride", "resize"):
            value = getattr(self, size_field)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}: {size_field} must be positive, got {value}")
        if self.tile_size is None and (self.tile_stride or self.eval_tile_stride):
            raise ConfigError(f"{where}: a tile stride needs a tile_size")
        for stride_field in ("tile_stride", "eval_tile_stride"):
            stride = getattr(self, stride_field)
            if stride is not None and self.tile_size is not None and stride > self.tile_size:
                raise ConfigError(
                    f"{where}: {stride_field} {stride} > tile_size {self.tile_size} skips pixels"
                )
        bad_flips = set(self.train_flips) - set(FLIPS)
        if bad_flips:
            raise ConfigError(f"{where}: train_flips must be among {FLIPS}, got {sorted(bad_flips)}")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{where}: val_fraction must be in (0, 1), got {self.val_fraction}")
        unknown_splits = set(self.splits) - set(SPLIT_NAMES)
        if unknown_splits:
            raise ConfigError(f"{where}: unknown splits {sorted(unknown_splits)}; use {SPLIT_NAMES}")
        for a in SPLIT_NAMES:
            for b in SPLIT_NAMES:
                if a < b:
                    both = set(self.splits.get(a, ())) & set(self.splits.get(b, ()))
                    if both:
                        raise ConfigError(f"{where}: tiles {sorted(both)} are in both {a} and {b}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mean_class_indices(self) -> tuple[int, ...]:
        """Indices of the classes that enter mIoU / mF1."""
        if self.mean_classes is None:
            return tuple(range(self.num_classes))
        return tuple(self.classes.index(c) for c in self.mean_classes)

    def summary(self) -> str:
        """One line that names the protocol wherever a number is reported."""
        mean = "all" if self.mean_classes is None else f"{len(self.mean_classes)}"
        size = f"{self.tile_size}px tiles" if self.tile_size else "whole images"
        if self.resize:
            size += f" resized to {self.resize}"
            if self.mask_interp == "bicubic":
                size += " (masks bicubic: paper quirk)"
        return (
            f"{self.name} ({self.dataset}, {self.imagery}, train labels {self.train_labels}, "
            f"eval labels {self.eval_labels}, {size}, mean over {mean} of {self.num_classes} classes"
            f"{', val = test' if self.val_is_test else ''})"
        )

    def quirks(self) -> list[str]:
        """Warnings to show whenever this protocol is used: choices that are faithful but not correct."""
        notes = []
        if self.resize and self.mask_interp == "bicubic":
            notes.append(
                f"protocol {self.name}: masks are resized bicubically (mask_interp='bicubic'), which "
                "reproduces the CT paper's quirk and invents labels along every class edge; use "
                "'nearest' for new work"
            )
        if self.val_is_test:
            notes.append(
                f"protocol {self.name}: val_is_test=True validates on the test tiles (reproduces the "
                "paper); model selection then sees the test set"
            )
        return notes

    def tile_stride_for(self, split: str) -> int | None:
        """Stride of the tiling grid used for ``split`` (val / test may use ``eval_tile_stride``)."""
        if self.tile_size is None:
            return None
        stride = self.tile_stride or self.tile_size
        if split != "train" and self.eval_tile_stride is not None:
            stride = self.eval_tile_stride
        return stride

    def labels_for(self, split: str) -> str:
        """The label product used by ``split``: training labels for train, evaluation labels otherwise."""
        return self.train_labels if split == "train" else self.eval_labels

    def effective_splits(self) -> dict[str, tuple[str, ...]]:
        """Split entries after ``val_is_test``: the stated val tiles return to train, val = test."""
        splits = {name: tuple(self.splits.get(name, ())) for name in SPLIT_NAMES}
        if self.val_is_test:
            splits["train"] = splits["train"] + splits["val"]
            splits["val"] = splits["test"]
        return splits

    def split_of(self, item_id: str, group: str = "") -> str | None:
        """The split whose folder holds source item ``item_id`` (``None`` = not used by this protocol).

        With ``val_is_test`` the val split is an alias of test and the item's folder is ``test``.
        """
        splits = self.effective_splits()
        order = ("test", "train") if self.val_is_test else ("test", "val", "train")
        for name in order:
            if any(split_entry_matches(e, item_id, group) for e in splits[name]):
                if name == "train" and self.val_fraction is not None and not self.val_is_test:
                    return "val" if _unit_hash(item_id) < self.val_fraction else "train"
                return name
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["splits"] = {k: list(v) for k, v in self.splits.items()}
        d["colors"] = [list(c) for c in self.colors]
        d["ignore_colors"] = [list(c) for c in self.ignore_colors]
        d["train_flips"] = list(self.train_flips)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Protocol:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"protocol: unknown keys {sorted(unknown)}")
        missing = {"name", "dataset", "classes", "colors"} - set(d)
        if missing:
            raise ConfigError(f"protocol: missing keys {sorted(missing)}")
        d = dict(d)
        try:
            d["classes"] = tuple(d["classes"])
            d["colors"] = tuple(tuple(int(v) for v in c) for c in d["colors"])
            d["ignore_colors"] = tuple(tuple(int(v) for v in c) for c in d.get("ignore_colors", ()))
            d["train_flips"] = tuple(d.get("train_flips", ()))
            if d.get("mean_classes") is not None:
                d["mean_classes"] = tuple(d["mean_classes"])
            d["splits"] = {k: tuple(v) for k, v in d.get("splits", {}).items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"protocol {d.get('name')!r}: malformed field ({exc})") from exc
        return cls(**d)

    def with_overrides(self, **changes: Any) -> Protocol:
        if "splits" in changes:
            changes["splits"] = {k: tuple(v) for k, v in changes["splits"].items()}
        return replace(self, **changes)


def split_entry_matches(entry: str, item_id: str, group: str = "") -> bool:
    """Whether a split entry names this source item (by id, group or id path prefix)."""
    return entry in (item_id, group) or item_id.startswith(entry.rstrip("/") + "/")


def _unit_hash(item_id: str) -> float:
    """A stable number in [0, 1) per item id: the same id always lands in the same split."""
    digest = hashlib.sha256(f"ctseg-val:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


_REGISTRY: Registry[Callable[[], Protocol]] = Registry("protocol")


def register_protocol(name: str) -> Callable[[Callable[[], Protocol]], Callable[[], Protocol]]:
    """Decorator registering a zero-argument factory that builds the preset ``name``."""
    return _REGISTRY.register(name)


def get_protocol(name: str | Protocol | dict[str, Any], **overrides: Any) -> Protocol:
    """A preset by name (with optional field overrides), or a protocol from its dict form."""
    if isinstance(name, Protocol):
        proto = name
    elif isinstance(name, dict):
        proto = Protocol.from_dict(name)
    else:
        proto = _REGISTRY[name]()  # an unknown name is a ConfigError listing the known ones
    if overrides:
        unknown = set(overrides) - {f.name for f in fields(Protocol)}
        if unknown:
            raise ConfigError(f"protocol {proto.name!r}: unknown fields {sorted(unknown)}")
        proto = proto.with_overrides(**overrides)
    return proto


def list_protocols() -> dict[str, str]:
    """Registry names with their one-line description."""
    return {name: fn().description for name, fn in sorted(_REGISTRY.items())}


@register_protocol("synthetic")
def _synthetic() -> Protocol:
    return Protocol(
        name="synthetic",
        dataset="synthetic",
        classes=ISPRS_CLASSES,
        colors=ISPRS_COLORS,
        ignore_index=255,
        mean_classes=ISPRS_CLASSES[:5],
        imagery="RGB",
        train_labels="full",
        eval_labels="full",
        splits={},
        description="procedural aerial-like scenes with the six ISPRS classes; mean over 5 (Clutter out), as Potsdam",
    )


def _potsdam_split(val: str, drop: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    train = tuple(t for t in POTSDAM_TRAIN_TILES if t != val and t not in drop)
    return {"train": train, "val": (val,), "test": POTSDAM_TEST_TILES}


@register_protocol("potsdam-paper")
def _potsdam_paper() -> Protocol:
    return Protocol(
        name="potsdam-paper",
        dataset="potsdam",
        classes=ISPRS_CLASSES,
        colors=ISPRS_COLORS,
        mean_classes=ISPRS_CLASSES[:5],
        imagery="RGB",
        train_labels="full",
        eval_labels="eroded",
        splits=_potsdam_split(POTSDAM_VAL_TILE),
        tile_size=500,
        tile_stride=500,
        resize=512,
        mask_interp="nearest",
        train_flips=("h", "v"),
        ignore_colors=(ISPRS_BOUNDARY_COLOR,),
        gsd_m=0.05,
        description=(
            "CT paper (Jyhne et al. 2023): RGB, 500 px tiles resized to 512, train labels with boundary "
            "(x3 flips), eroded test labels, 23 train / val 2_10 / 14 test, mIoU over 5 (Clutter out); "
            "val_is_test=True and mask_interp='bicubic' reproduce the paper exactly"
        ),
    )


@register_protocol("potsdam-geoseg")
def _potsdam_geoseg() -> Protocol:
    return Protocol(
        name="potsdam-geoseg",
        dataset="potsdam",
        classes=ISPRS_CLASSES,
        colors=ISPRS_COLORS,
        mean_classes=ISPRS_CLASSES[:5],
        imagery="RGB",
        train_labels="full",
        eval_labels="eroded",
        splits=_potsdam_split(POTSDAM_VAL_TILE, drop=(POTSDAM_BAD_LABEL_TILE,)),
        tile_size=1024,
        tile_stride=512,
        eval_tile_stride=1024,
        train_flips=("h", "v"),
        ignore_colors=(ISPRS_BOUNDARY_COLOR,),
        gsd_m=0.05,
        description=(
            "GeoSeg / UNetFormer protocol: RGB, 1024 px tiles (train stride 512, x3 flips; test stride "
            "1024), eroded test labels, 22 train (7_10 dropped) / val 2_10 / 14 test, mIoU over 5"
        ),
    )


@register_protocol("potsdam-mmseg")
def _potsdam_mmseg() -> Protocol:
    return Protocol(
        name="potsdam-mmseg",
        dataset="potsdam",
        classes=ISPRS_CLASSES,
        colors=ISPRS_COLORS,
        mean_classes=None,
        imagery="RGB",
        train_labels="eroded",
        eval_labels="eroded",
        splits=_potsdam_split(POTSDAM_VAL_TILE),
        tile_size=512,
        tile_stride=512,
        ignore_colors=(ISPRS_BOUNDARY_COLOR,),
        gsd_m=0.05,
        description=(
            "mmsegmentation protocol: RGB, 512 px crops (non-overlapping, as its converter writes them), "
            "noBoundary labels everywhere, 23 train / val 2_10 / 14 test, mIoU over all 6 classes"
        ),
    )


@register_protocol("vaihingen-geoseg")
def _vaihingen_geoseg() -> Protocol:
    return Protocol(
        name="vaihingen-geoseg",
        dataset="vaihingen",
        classes=ISPRS_CLASSES,
        colors=ISPRS_COLORS,
        mean_classes=ISPRS_CLASSES[:5],
        imagery="IRRG",
        train_labels="full",
        eval_labels="eroded",
        splits={
            "train": tuple(a for a in VAIHINGEN_TRAIN_AREAS if a != VAIHINGEN_VAL_AREA),
            "val": (VAIHINGEN_VAL_AREA,),
            "test": VAIHINGEN_TEST_AREAS,
        },
        tile_size=1024,
        tile_stride=512,
        eval_tile_stride=1024,
        ignore_colors=(ISPRS_BOUNDARY_COLOR,),
        gsd_m=0.09,
        description=(
            "GeoSeg Vaihingen: IRRG, 1024 px tiles (train stride 512, test 1024), eroded test labels, "
            "15 train / val area30 / 17 test areas, mIoU over 5 (Clutter out)"
        ),
    )


@register_protocol("loveda")
def _loveda() -> Protocol:
    return Protocol(
        name="loveda",
        dataset="loveda",
        classes=LOVEDA_CLASSES,
        colors=LOVEDA_COLORS,
        mean_classes=None,
        imagery="RGB",
        splits={"train": ("Train",), "test": ("Val",)},
        val_fraction=0.1,
        gsd_m=0.3,
        description=(
            "LoveDA: whole 1024 px images; train = official Train minus a stable 10% held out for val; "
            "test = official Val (the official Test has no public labels); mIoU over all 7 classes"
        ),
    )


@register_protocol("dubai")
def _dubai() -> Protocol:
    return Protocol(
        name="dubai",
        dataset="dubai",
        classes=DUBAI_CLASSES,
        colors=DUBAI_COLORS,
        mean_classes=None,
        imagery="RGB",
        splits={
            "train": ("Tile 1", "Tile 3", "Tile 4", "Tile 5", "Tile 6"),
            "val": ("Tile 2",),
            "test": ("Tile 7", "Tile 8"),
        },
        ignore_colors=(DUBAI_UNLABELED_COLOR, DUBAI_NODATA_COLOR),
        description=(
            "Dubai aerial (Humans in the Loop): whole images (crops in augmentation), train Tiles 1,3-6 / "
            "val Tile 2 / test Tiles 7-8, Unlabeled and black -> ignore, mIoU over all 5 classes"
        ),
    )


def load_protocol(spec: str | Path) -> Protocol:
    """A protocol from a preset name or a JSON / YAML file.

    A file holds either a complete protocol (the :meth:`Protocol.to_dict` form) or a preset with
    changes: ``{"base": "potsdam-paper", "val_is_test": true}``.
    """
    if isinstance(spec, str) and spec in _REGISTRY:
        return get_protocol(spec)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"unknown protocol {str(spec)!r}: neither a preset ({', '.join(_REGISTRY.names())}) nor a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # any parse failure is the user's file
        raise ConfigError(f"{path}: cannot read protocol ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a protocol file must hold a mapping, not {type(raw).__name__}")
    if "base" in raw:
        base = raw.pop("base")
        return get_protocol(base, **raw)
    return Protocol.from_dict(raw)
