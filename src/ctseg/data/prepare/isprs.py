"""ISPRS Potsdam and Vaihingen from their official archives (or the extracted folders).

File names, as distributed by ISPRS (checked against public preparation scripts and READMEs, see
``docs/data.md``):

* Potsdam: ``2_Ortho_RGB.zip`` → ``2_Ortho_RGB/top_potsdam_2_10_RGB.tif``; ``3_Ortho_IRRG.zip`` →
  ``top_potsdam_2_10_IRRG.tif``; ``4_Ortho_RGBIR.zip`` → ``top_potsdam_2_10_RGBIR.tif``;
  ``5_Labels_all.zip`` → ``top_potsdam_2_10_label.tif`` (with boundary); ``5_Labels_all_noBoundary.zip``
  → ``top_potsdam_2_10_label_noBoundary.tif`` (eroded: boundary pixels black).
* Vaihingen: ``ISPRS_semantic_labeling_Vaihingen.zip`` → ``top/top_mosaic_09cm_area1.tif`` (IRRG);
  ``ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip`` → ``top_mosaic_09cm_area1.tif``;
  ``ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip`` →
  ``top_mosaic_09cm_area1_noBoundary.tif``. Image and full label share a file name, so images are
  the files under a ``top`` folder.

Labels are colour-coded in RGB (white impervious, blue building, cyan low vegetation, green tree,
yellow car, red clutter; black = eroded boundary → ignore). Compare in RGB: GeoSeg's tables are BGR
because it converts with OpenCV first.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ctseg.data.prepare import register_preparer
from ctseg.data.prepare.common import SourceFile, SourceIndex, decode_indices, read_array
from ctseg.data.prepare.runner import ColorLabelPreparer, SourceItem
from ctseg.data.protocols import Protocol
from ctseg.errors import ConfigError, DataError

# mmsegmentation's converted ISPRS labels store 0 = boundary/ignore and 1..6 = the six classes
# (its datasets then use ``reduce_zero_label``). The documented id shift to our masks:
# prepared = mmseg - 1 for 1..6, and 0 → ignore.
MMSEG_ISPRS_ID_SHIFT: dict[int, int | None] = {0: None, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5}

_COLOR_NOTE = (
    "RGB colour labels: (255,255,255) impervious 0, (0,0,255) building 1, (0,255,255) low_vegetation 2, "
    "(0,255,0) tree 3, (255,255,0) car 4, (255,0,0) clutter 5; (0,0,0) eroded boundary -> ignore 255"
)


def decode_mmseg_isprs(ann: np.ndarray, ignore_index: int = 255, path: Any = None) -> np.ndarray:
    """mmsegmentation-converted ISPRS label ``(H, W)`` (0 = ignore, 1..6) → prepared mask (0..5, ignore)."""
    mapping = {src: ignore_index if dst is None else dst for src, dst in MMSEG_ISPRS_ID_SHIFT.items()}
    mask, _ = decode_indices(ann, mapping, ignore_index, unknown="error", path=path)
    return mask


class _IsprsPreparer(ColorLabelPreparer):
    label_decoding = _COLOR_NOTE


_POTSDAM_IMAGE = re.compile(r"^top_potsdam_(\d+_\d+)_(RGB|IRRG|RGBIR)\.tif$", re.IGNORECASE)
_POTSDAM_PRODUCT_DIR = {"RGB": "2_ortho_rgb", "IRRG": "3_ortho_irrg", "RGBIR": "4_ortho_rgbir"}
# Band order of the 4-band RGBIR product; the 3-band products are taken from it when absent.
_FROM_RGBIR = {"RGB": (0, 1, 2), "IRRG": (3, 0, 1)}


@register_preparer("potsdam")
class PotsdamPreparer(_IsprsPreparer):
    dataset = "potsdam"
    default_protocol = "potsdam-paper"

    def _image(self, index: SourceIndex, tile: str, imagery: str) -> SourceFile | None:
        if imagery not in _FROM_RGBIR:
            raise ConfigError(f"potsdam: imagery {imagery!r} not supported; use RGB or IRRG")
        own = index.find(f"top_potsdam_{tile}_{imagery}.tif", prefer=(_POTSDAM_PRODUCT_DIR[imagery],))
        return own or index.find(f"top_potsdam_{tile}_RGBIR.tif", prefer=("4_ortho_rgbir",))

    def discover(self, index: SourceIndex, protocol: Protocol) -> list[SourceItem]:
        tiles = sorted({m.group(1) for f in index.files() if (m := _POTSDAM_IMAGE.match(f.name))})
        items = []
        for tile in tiles:
            image = self._image(index, tile, protocol.imagery)
            if image is None:
                continue
            labels = {
                "full": index.find(f"top_potsdam_{tile}_label.tif", prefer=("5_labels_all",)),
                "eroded": index.find(
                    f"top_potsdam_{tile}_label_noBoundary.tif", prefer=("5_labels_all_noboundary",)
                ),
            }
            items.append(
                SourceItem(tile, tile, tile, image, {k: v for k, v in labels.items() if v is not None})
            )
        return items

    def expected_files(self, entry: str, protocol: Protocol) -> str:
        product = _POTSDAM_PRODUCT_DIR.get(protocol.imagery, "2_ortho_rgb")
        return (
            f"top_potsdam_{entry}_{protocol.imagery}.tif in {product.replace('o', 'O', 1)}[.zip] and its "
            f"labels top_potsdam_{entry}_label[_noBoundary].tif in 5_Labels_all[_noBoundary][.zip]"
        )

    def read_image(self, item: SourceItem, protocol: Protocol) -> np.ndarray:
        arr = read_array(item.image)
        if item.image.name.lower().endswith("_rgbir.tif"):
            if arr.ndim != 3 or arr.shape[-1] != 4:
                raise DataError(item.image.display, f"RGBIR image has shape {arr.shape}; expected 4 bands")
            return np.ascontiguousarray(arr[..., list(_FROM_RGBIR[protocol.imagery])])
        if arr.ndim != 3 or arr.shape[-1] < 3:
            raise DataError(item.image.display, f"image has shape {arr.shape}; expected 3 bands")
        return np.ascontiguousarray(arr[..., :3])


_VAIHINGEN_IMAGE = re.compile(r"^top_mosaic_09cm_(area\d+)\.tif$", re.IGNORECASE)
_VAIHINGEN_FULL = ("isprs_semantic_labeling_vaihingen_ground_truth_complete", "gts_for_participants")
_VAIHINGEN_ERODED = (
    "isprs_semantic_labeling_vaihingen_ground_truth_eroded_complete",
    "gts_eroded_for_participants",
)


@register_preparer("vaihingen")
class VaihingenPreparer(_IsprsPreparer):
    dataset = "vaihingen"
    default_protocol = "vaihingen-geoseg"

    def discover(self, index: SourceIndex, protocol: Protocol) -> list[SourceItem]:
        if protocol.imagery != "IRRG":
            raise ConfigError(f"vaihingen: the imagery is IRRG only, protocol asks for {protocol.imagery!r}")
        areas = sorted(
            {m.group(1) for f in index.files() if "top" in f.parts and (m := _VAIHINGEN_IMAGE.match(f.name))},
            key=lambda a: int(a[4:]),
        )
        items = []
        for area in areas:
            name = f"top_mosaic_09cm_{area}.tif"
            image = index.find(name, prefer=("top",))
            if image is None or "top" not in image.parts:
                continue
            full = index.find(name, prefer=_VAIHINGEN_FULL, exclude=("top", "dsm"))
            eroded = index.find(f"top_mosaic_09cm_{area}_noBoundary.tif", prefer=_VAIHINGEN_ERODED)
            labels = {k: v for k, v in (("full", full), ("eroded", eroded)) if v is not None}
            items.append(SourceItem(area, area, area, image, labels))
        return items

    def expected_files(self, entry: str, protocol: Protocol) -> str:
        return (
            f"top/top_mosaic_09cm_{entry}.tif in ISPRS_semantic_labeling_Vaihingen[.zip] and its labels "
            f"top_mosaic_09cm_{entry}[_noBoundary].tif in "
            "ISPRS_semantic_labeling_Vaihingen_ground_truth[_eroded]_COMPLETE[.zip]"
        )

    def read_image(self, item: SourceItem, protocol: Protocol) -> np.ndarray:
        arr = read_array(item.image)
        if arr.ndim != 3 or arr.shape[-1] < 3:
            raise DataError(item.image.display, f"image has shape {arr.shape}; expected 3 bands (IRRG)")
        return np.ascontiguousarray(arr[..., :3])
