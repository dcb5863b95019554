"""LoveDA (Wang et al. 2021) from its official layout (folders or the ``Train.zip`` / ``Val.zip`` /
``Test.zip`` archives).

Layout: ``{Train,Val,Test}/{Rural,Urban}/images_png/<n>.png`` and ``.../masks_png/<n>.png`` (no masks
for ``Test``: its labels are kept by the benchmark server). Masks are index maps: 0 = no-data → ignore,
1..7 = background, building, road, water, barren, forest, agriculture → classes 0..6 (id shift −1).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ctseg.data.prepare import register_preparer
from ctseg.data.prepare.common import SourceIndex, decode_indices, read_array
from ctseg.data.prepare.runner import Preparer, SourceItem
from ctseg.data.protocols import Protocol
from ctseg.errors import DataError

LOVEDA_SPLITS = {"train": "Train", "val": "Val", "test": "Test"}
LOVEDA_DOMAINS = {"rural": "Rural", "urban": "Urban"}
_NAME = re.compile(r"^(\d+)\.png$", re.IGNORECASE)


def loveda_mapping(ignore_index: int = 255) -> dict[int, int]:
    """LoveDA mask value → prepared class index (0 no-data → ignore, v → v − 1 for 1..7)."""
    return {0: ignore_index, **{v: v - 1 for v in range(1, 8)}}


@register_preparer("loveda")
class LoveDAPreparer(Preparer):
    dataset = "loveda"
    default_protocol = "loveda"
    label_decoding = (
        "index masks: 0 no-data -> ignore 255; 1 background 0, 2 building 1, 3 road 2, 4 water 3, "
        "5 barren 4, 6 forest 5, 7 agriculture 6 (id shift -1)"
    )

    def discover(self, index: SourceIndex, protocol: Protocol) -> list[SourceItem]:
        items = []
        for f in index.files():
            m = _NAME.match(f.name)
            if not m or len(f.parts) < 3 or f.parts[-1] != "images_png":
                continue
            split, domain = f.parts[-3], f.parts[-2]
            if split not in LOVEDA_SPLITS or domain not in LOVEDA_DOMAINS:
                continue
            masks = [c for c in index.candidates(f.name) if f.sibling_in(c, "masks_png")]
            group = f"{LOVEDA_SPLITS[split]}/{LOVEDA_DOMAINS[domain]}"
            items.append(
                SourceItem(
                    id=f"{group}/{m.group(1)}",
                    group=group,
                    key=f"{split}_{domain}_{m.group(1)}",
                    image=f,
                    labels={"full": masks[0]} if masks else {},
                    unlabelled=split == "test" and not masks,
                )
            )
        return sorted(items, key=lambda i: i.id)

    def expected_files(self, entry: str, protocol: Protocol) -> str:
        return f"'{entry}/{{Rural,Urban}}/images_png/*.png' and masks_png beside it"

    def read_mask(
        self, item: SourceItem, product: str, protocol: Protocol, unknown: str
    ) -> tuple[np.ndarray, dict[Any, int]]:
        label = item.labels[product]
        ann = read_array(label)
        if ann.ndim != 2:
            raise DataError(label.display, f"mask has shape {ann.shape}; expected a single-band index map")
        return decode_indices(
            ann,
            loveda_mapping(protocol.ignore_index),
            protocol.ignore_index,
            unknown=unknown,
            path=label.display,
        )
