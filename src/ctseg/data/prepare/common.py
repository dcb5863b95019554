"""Building blocks shared by every preparer: source lookup in folders and zips, label decoding,
tiling arithmetic, resizing, hashing and the resumable tile writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ctseg.data.layout import MANIFEST_NAME, TileEntry
from ctseg.errors import DataError, OutputError
from ctseg.utils.io import atomic_write_bytes, atomic_write_json

RGB = tuple[int, int, int]
UNKNOWN_POLICIES = ("error", "ignore")
STATE_NAME = ".ctseg-prepare-state.json"
STATE_FORMAT = "ctseg-prepare-state/1"
_HASH_CHUNK = 1 << 20
_PNG_LEVEL = 3  # zlib level: ~2x faster than the default 6 for a few % larger tiles


# --------------------------------------------------------------------------------------------------
# Sources: files in folders and members of zip archives, looked up by name
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One source file: a plain file on disk or a member of a zip archive on disk."""

    container: Path  # the file on disk (the archive for members)
    member: str | None  # path inside the archive, None for a plain file
    size: int
    parts: tuple[str, ...]  # lower-case folder names above it, archive stems included, for product lookup
    crc: int = 0  # CRC-32 of a zip member (fingerprint without reading it)

    @property
    def name(self) -> str:
        return (self.member or self.container.name).rsplit("/", 1)[-1]

    @property
    def display(self) -> str:
        return f"{self.container}!{self.member}" if self.member else str(self.container)

    @property
    def folder(self) -> str:
        """The logical folder holding the file (inside its archive for members), '/'-separated."""
        if self.member is None:
            return self.container.parent.as_posix()
        inner = self.member.rsplit("/", 1)[0] if "/" in self.member else ""
        return f"{self.container.as_posix()}!{inner}"

    def sibling_in(self, other: SourceFile, folder: str) -> bool:
        """Whether ``other`` lies in a folder called ``folder`` beside this file's folder
        (``Tile 1/images/x.jpg`` → ``Tile 1/masks/x.png``)."""
        mine, theirs = self.folder.rsplit("/", 1), other.folder.rsplit("/", 1)
        return len(mine) == len(theirs) == 2 and mine[0] == theirs[0] and theirs[1].lower() == folder.lower()

    def read_bytes(self) -> bytes:
        try:
            if self.member is None:
                return self.container.read_bytes()
            with zipfile.ZipFile(self.container) as zf, zf.open(self.member) as fh:
                return fh.read()
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise DataError(self.display, f"cannot be read ({exc})") from exc

    def fingerprint(self) -> list[Any]:
        """Cheap identity of the file's content (no read): path, size, mtime, member CRC."""
        st = self.container.stat()
        return [str(self.container), self.member, self.size, st.st_mtime_ns, self.crc]


class SourceIndex:
    """Every file under the given folders and inside the zip archives found there, indexed by name.

    ``srcs`` are folders (searched recursively, zip archives in them opened) or zip archives. Official
    products come either as archives (``5_Labels_all.zip``) or as their extracted folders; the index
    treats both alike so that preparers look files up by name and product folder only.
    """

    def __init__(self, srcs: Sequence[str | Path]) -> None:
        self.roots = [Path(s) for s in srcs]
        self._by_name: dict[str, list[SourceFile]] = {}
        self.nested: list[str] = []  # archives inside archives (not opened; they must be extracted)
        for root in self.roots:
            if not root.exists():
                raise DataError(root, "no such file or folder")
            if root.is_dir():
                self._add_folder(root)
            elif zipfile.is_zipfile(root):
                self._add_zip(root, ())
            else:
                raise DataError(root, "is neither a folder nor a zip archive")

    def _add_folder(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_parts = tuple(p.lower() for p in Path(dirpath).relative_to(root).parts)
            parts = (root.name.lower(), *rel_parts)
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                path = Path(dirpath) / fname
                if fname.lower().endswith(".zip"):
                    if not zipfile.is_zipfile(path):
                        raise DataError(path, "is not a readable zip archive (incomplete download?)")
                    self._add_zip(path, parts)
                else:
                    self._add(SourceFile(path, None, path.stat().st_size, parts))

    def _add_zip(self, path: Path, parts: tuple[str, ...]) -> None:
        stem = path.name[:-4].lower() if path.name.lower().endswith(".zip") else path.name.lower()
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(path, f"is not a readable zip archive ({exc})") from exc
        for info in infos:
            if info.is_dir() or info.filename.rsplit("/", 1)[-1].startswith("."):
                continue
            member_parts = tuple(p.lower() for p in info.filename.split("/")[:-1] if p)
            if "__macosx" in member_parts:
                continue
            if info.filename.lower().endswith(".zip"):
                self.nested.append(f"{path}!{info.filename}")
                continue
            self._add(
                SourceFile(path, info.filename, info.file_size, (*parts, stem, *member_parts), info.CRC)
            )

    def _add(self, sf: SourceFile) -> None:
        self._by_name.setdefault(sf.name.lower(), []).append(sf)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    def files(self) -> Iterator[SourceFile]:
        for name in sorted(self._by_name):
            yield from self._by_name[name]

    def candidates(self, name: str) -> list[SourceFile]:
        """Every file called ``name`` (case-insensitive), plain files before archive members."""
        return sorted(self._by_name.get(name.lower(), []), key=lambda c: (c.member is not None, c.display))

    def find(
        self,
        name: str,
        *,
        prefer: Iterable[str] = (),
        exclude: Iterable[str] = (),
    ) -> SourceFile | None:
        """The file called ``name``; among several, the first whose folders/archives include a
        ``prefer`` token (in order), ignoring those under an ``exclude`` folder."""
        excl = {e.lower() for e in exclude}
        cands = [c for c in self._by_name.get(name.lower(), []) if not excl & set(c.parts)]
        if not cands:
            return None
        for token in prefer:
            token = token.lower()
            hits = [c for c in cands if token in c.parts]
            if hits:
                return _prefer_plain(hits)
        return _prefer_plain(cands)


def _prefer_plain(cands: list[SourceFile]) -> SourceFile:
    # An extracted copy reads faster than an archive member; both hold the same bytes.
    return sorted(cands, key=lambda c: (c.member is not None, c.display))[0]


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, streamed in 1 MiB chunks (archives are many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Reading and decoding
# --------------------------------------------------------------------------------------------------


def read_array(sf: SourceFile, mode: str | None = None) -> np.ndarray:
    """Decode an image file to ``(H, W)`` or ``(H, W, C)`` uint8; Pillow first, rasterio if installed."""
    data = sf.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        arr = _read_with_rasterio(data)
        if arr is None:
            raise DataError(sf.display, f"cannot be decoded as an image ({exc})") from exc
    if arr.dtype != np.uint8:
        raise DataError(sf.display, f"has pixel type {arr.dtype}; expected 8-bit")
    return arr


def _read_with_rasterio(data: bytes) -> np.ndarray | None:
    try:
        from rasterio.io import MemoryFile
    except ImportError:
        return None
    try:
        with MemoryFile(data) as mem, mem.open() as ds:
            bands = ds.read()  # (C, H, W)
    except Exception:  # rasterio raises many types; any failure means "not readable"
        return None
    return bands[0] if bands.shape[0] == 1 else np.moveaxis(bands, 0, -1)


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) uint32 key ``r << 16 | g << 8 | b``."""
    rgb = rgb.astype(np.uint32, copy=False)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


_UNKNOWN = np.uint16(0xFFFF)


@lru_cache(maxsize=8)
def _color_lut(colors: tuple[RGB, ...], ignore_colors: tuple[RGB, ...], ignore_index: int) -> np.ndarray:
    # A 2^24 lookup table (32 MiB) decodes a 6000² label in one gather instead of one pass per colour.
    lut = np.full(1 << 24, _UNKNOWN, dtype=np.uint16)
    for i, (r, g, b) in enumerate(colors):
        lut[(r << 16) | (g << 8) | b] = i
    for r, g, b in ignore_colors:
        lut[(r << 16) | (g << 8) | b] = ignore_index
    return lut


def decode_colors(
    rgb: np.ndarray,
    colors: Sequence[RGB],
    ignore_colors: Sequence[RGB],
    ignore_index: int,
    *,
    unknown: str = "error",
    path: str | Path | None = None,
) -> tuple[np.ndarray, dict[RGB, int]]:
    """Colour-coded label ``(H, W, 3)`` uint8 in RGB order → class-index mask ``(H, W)`` uint8.

    Colours in ``colors`` map to their index, ``ignore_colors`` to ``ignore_index``. Any other colour
    raises :class:`DataError` naming ``path`` and the most frequent offenders, or with
    ``unknown="ignore"`` becomes ``ignore_index``. Returns the mask and the unknown-colour pixel counts.
    """
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}")
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise DataError(path, f"label has shape {rgb.shape}; expected a colour image (H, W, 3)")
    lut = _color_lut(tuple(map(tuple, colors)), tuple(map(tuple, ignore_colors)), ignore_index)
    idx = lut[_pack(rgb[..., :3])]
    bad = idx == _UNKNOWN
    counts: dict[RGB, int] = {}
    if bad.any():
        keys, n = np.unique(_pack(rgb[..., :3])[bad], return_counts=True)
        counts = {
            (int(k >> 16) & 255, int(k >> 8) & 255, int(k) & 255): int(c)
            for k, c in sorted(zip(keys.tolist(), n.tolist()), key=lambda kc: -kc[1])
        }
        if unknown == "error":
            raise DataError(
                path,
                f"{_describe_unknown(counts, bad.size)}; pass --unknown-colors ignore to map them to ignore",
            )
        idx[bad] = ignore_index
    return idx.astype(np.uint8), counts


def decode_indices(
    ann: np.ndarray,
    mapping: Mapping[int, int],
    ignore_index: int,
    *,
    unknown: str = "error",
    path: str | Path | None = None,
) -> tuple[np.ndarray, dict[int, int]]:
    """Index-coded label ``(H, W)`` uint8 → prepared mask via ``mapping`` (source value → class or ignore)."""
    if ann.ndim != 2:
        raise DataError(path, f"label has shape {ann.shape}; expected a single-band index map (H, W)")
    lut = np.full(256, _UNKNOWN, dtype=np.uint16)
    for src, dst in mapping.items():
        lut[src] = dst
    idx = lut[ann]
    bad = idx == _UNKNOWN
    counts: dict[int, int] = {}
    if bad.any():
        vals, n = np.unique(ann[bad], return_counts=True)
        counts = {int(v): int(c) for v, c in zip(vals.tolist(), n.tolist())}
        if unknown == "error":
            shown = ", ".join(f"{v} ({c} px)" for v, c in list(counts.items())[:5])
            raise DataError(
                path, f"{int(bad.sum())} pixels have label values outside {sorted(mapping)}: {shown}"
            )
        idx[bad] = ignore_index
    return idx.astype(np.uint8), counts


def _describe_unknown(counts: Mapping[RGB, int], total: int) -> str:
    n = sum(counts.values())
    shown = ", ".join(f"{c} ({k} px)" for c, k in list(counts.items())[:5])
    more = f" and {len(counts) - 5} more colours" if len(counts) > 5 else ""
    return f"{n} of {total} pixels have colours that are not in the protocol's colour table: {shown}{more}"


# --------------------------------------------------------------------------------------------------
# Tiling and resizing
# --------------------------------------------------------------------------------------------------


def tile_count(length: int, size: int, stride: int) -> int:
    """Tiles along one axis: windows at 0, stride, 2·stride, … until the last one reaches the edge.

    The last window may stick out past the edge; that part is padded (with ignore in masks).
    6000 px at size 500 / stride 500 → 12; 600 at 500/500 → 2; 300 at 500 → 1.
    """
    if length <= 0 or size <= 0 or stride <= 0:
        raise ValueError(f"length, size and stride must be positive, got {length}, {size}, {stride}")
    if stride > size:
        raise ValueError(f"stride {stride} > tile size {size} would skip pixels")
    if length <= size:
        return 1
    return math.ceil((length - size) / stride) + 1


def tile_grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the tiles, row-major."""
    ys = [i * stride for i in range(tile_count(height, size, stride))]
    xs = [i * stride for i in range(tile_count(width, size, stride))]
    return [(y, x) for y in ys for x in xs]


def crop_padded(arr: np.ndarray, y: int, x: int, size: int, fill: int) -> np.ndarray:
    """The ``size × size`` window at ``(y, x)`` of ``(H, W[, C])``; the part past the edge is ``fill``."""
    win = arr[y : y + size, x : x + size]
    if win.shape[0] == size and win.shape[1] == size:
        return win
    out = np.full((size, size, *arr.shape[2:]), fill, dtype=arr.dtype)
    out[: win.shape[0], : win.shape[1]] = win
    return out


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3), bicubic (images only; never masks)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def resize_mask(mask: np.ndarray, size: int, interp: str, ignore_index: int, num_classes: int) -> np.ndarray:
    """(H, W) uint8 mask → (size, size).

    ``"nearest"`` keeps every label valid. ``"bicubic"`` reproduces the CT reference code (spec §4.4):
    the mask is resized in the reference encoding (ignore = ``num_classes``) with Pillow's bicubic
    filter, so values between two labels are invented along every edge; values ``>= num_classes``
    (the reference's ``7 → 6`` fix-up) become ignore again.
    """
    if mask.shape[0] == size and mask.shape[1] == size:
        return mask
    if interp == "nearest":
        return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    if interp != "bicubic":
        raise ValueError(f"mask interpolation {interp!r}")
    ref = mask.copy()
    ref[ref == ignore_index] = num_classes
    out = np.asarray(Image.fromarray(ref).resize((size, size), Image.Resampling.BICUBIC)).copy()
    out[out >= num_classes] = ignore_index
    return out


FLIP_AXES = {"": None, "h": 1, "v": 0}


def flip(arr: np.ndarray, how: str) -> np.ndarray:
    """Flip ``(H, W[, C])``: ``"h"`` left-right, ``"v"`` up-down, ``""`` unchanged."""
    axis = FLIP_AXES[how]
    return arr if axis is None else np.ascontiguousarray(np.flip(arr, axis=axis))


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=_PNG_LEVEL)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Resumable writer
# --------------------------------------------------------------------------------------------------


@dataclass
class PendingTile:
    entry: TileEntry
    image_png: bytes
    mask_png: bytes | None


@dataclass
class ResumableWriter:
    """Writes prepared tiles unit by unit (one unit = one source image with all its tiles).

    After each unit the state file ``<out>/.ctseg-prepare-state.json`` records the unit's source
    fingerprint and the SHA-256 of every tile it wrote. A later run with the same protocol skips a
    unit whose sources are unchanged and whose tiles are all present with the recorded hashes; an
    interrupted run therefore resumes where it stopped, and a finished one is a no-op.
    """

    out: Path
    protocol: dict[str, Any]
    dataset: str
    overwrite: bool = False
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        # Compare in JSON form: the state file turns tuples into lists.
        self.protocol = json.loads(json.dumps(self.protocol))
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out}: exists and is not a folder")
        fresh = {
            "format": STATE_FORMAT,
            "dataset": self.dataset,
            "protocol": self.protocol,
            "units": {},
            "hashes": {},
        }
        old = self._load_state()
        same = old is not None and old.get("protocol") == self.protocol and old.get("dataset") == self.dataset
        if not self.overwrite:
            if old is None and self.out.is_dir() and any(self.out.iterdir()):
                raise OutputError(
                    f"{self.out}: is not empty and was not written by `ctseg prepare`; "
                    "choose another --out or pass --overwrite"
                )
            if old is not None and old.get("protocol") is not None and not same:
                raise OutputError(
                    f"{self.out}: holds {old.get('dataset')} data prepared with protocol "
                    f"{old['protocol'].get('name')!r} and other settings; choose another --out or "
                    "pass --overwrite to prepare it again"
                )
        self.state = old if same and old is not None else fresh
        self.state.setdefault("hashes", {})
        if old is not None:
            # Source hashes are keyed by path, size and mtime: still valid under another protocol.
            self.state["hashes"].update(old.get("hashes", {}))
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot create ({exc.strerror or exc})") from exc

    @property
    def state_path(self) -> Path:
        return self.out / STATE_NAME

    def _load_state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        try:
            raw = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            # A damaged state file only costs a full rewrite: nothing in it is trusted.
            return {"format": STATE_FORMAT, "dataset": None, "protocol": None, "units": {}, "hashes": {}}
        return raw if isinstance(raw, dict) and raw.get("format") == STATE_FORMAT else None

    def cached(self, key: str, fingerprint: Any) -> list[TileEntry] | None:
        """The unit's tiles if it was written before from the same sources and every file verifies."""
        unit = self.state["units"].get(key)
        if unit is None or unit.get("source") != fingerprint:
            return None
        entries = [TileEntry(**t) for t in unit["tiles"]]
        for e in entries:
            for rel, digest in ((e.image, e.extra.get("image_sha256")), (e.mask, e.extra.get("mask_sha256"))):
                if rel is None:
                    continue
                path = self.out / rel
                if not path.is_file() or sha256_file(path) != digest:
                    return None
        return entries

    def write(self, key: str, fingerprint: Any, tiles: Sequence[PendingTile]) -> list[TileEntry]:
        entries = []
        for t in tiles:
            extra = dict(t.entry.extra)
            atomic_write_bytes(self.out / t.entry.image, t.image_png)
            extra["image_sha256"] = hashlib.sha256(t.image_png).hexdigest()
            if t.entry.mask is not None and t.mask_png is not None:
                atomic_write_bytes(self.out / t.entry.mask, t.mask_png)
                extra["mask_sha256"] = hashlib.sha256(t.mask_png).hexdigest()
            entries.append(replace(t.entry, extra=extra))
        self.state["units"][key] = {"source": fingerprint, "tiles": [asdict(e) for e in entries]}
        self.save()
        return entries

    def source_hash(self, path: Path) -> str:
        """SHA-256 of a source file on disk, cached in the state by (path, size, mtime)."""
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = self.state["hashes"].get(key)
        if digest is None:
            digest = sha256_file(path)
            self.state["hashes"][key] = digest
        return digest

    def save(self) -> None:
        atomic_write_json(self.state_path, self.state, indent=None)

    def drop_except(self, keep: set[str]) -> int:
        """Delete the tiles of recorded units not in ``keep`` (their sources are gone); returns how many."""
        stale = [k for k in self.state["units"] if k not in keep]
        for key in stale:
            for t in self.state["units"].pop(key)["tiles"]:
                for rel in (t["image"], t["mask"]):
                    if rel is not None:
                        (self.out / rel).unlink(missing_ok=True)
        return len(stale)

    def manifest_path(self) -> Path:
        return self.out / MANIFEST_NAME
