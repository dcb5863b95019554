"""The Dubai aerial set (Humans in the Loop, Kaggle ``semantic-segmentation-of-aerial-imagery``).

Layout, as on Kaggle (folder or its zip): ``Semantic segmentation dataset/Tile N/images/image_part_00K.jpg``
and ``.../Tile N/masks/image_part_00K.png``. Masks are RGB or palette PNGs (converted to RGB before
matching). The hex colours in the dataset's ``classes.json`` do not match the pixels, so it is not
read; the protocol holds the colours actually present.
"""

from __future__ import annotations

import re

from ctseg.data.prepare import register_preparer
from ctseg.data.prepare.common import SourceIndex
from ctseg.data.prepare.runner import ColorLabelPreparer, SourceItem
from ctseg.data.protocols import Protocol

_TILE = re.compile(r"^tile (\d+)$")
_PART = re.compile(r"^image_part_(\d+)\.jpg$", re.IGNORECASE)


@register_preparer("dubai")
class DubaiPreparer(ColorLabelPreparer):
    dataset = "dubai"
    default_protocol = "dubai"
    label_decoding = (
        "RGB colour masks (palette masks converted to RGB): (60,16,152) building 0, (132,41,246) land 1, "
        "(110,193,228) road 2, (254,221,58) vegetation 3, (226,169,41) water 4; (155,155,155) Unlabeled "
        "and (0,0,0) -> ignore 255. classes.json colours are wrong and unused."
    )

    def discover(self, index: SourceIndex, protocol: Protocol) -> list[SourceItem]:
        items = []
        for f in index.files():
            m = _PART.match(f.name)
            if not m or len(f.parts) < 2 or f.parts[-1] != "images" or not _TILE.match(f.parts[-2]):
                continue
            tile_no = int(_TILE.match(f.parts[-2]).group(1))  # type: ignore[union-attr]
            mask_name = f.name.rsplit(".", 1)[0] + ".png"
            masks = [c for c in index.candidates(mask_name) if f.sibling_in(c, "masks")]
            group = f"Tile {tile_no}"
            stem = f.name.rsplit(".", 1)[0]
            labels = {"full": masks[0]} if masks else {}
            items.append(
                SourceItem(f"{group}/{stem}", group, f"tile{tile_no}_part{int(m.group(1)):03d}", f, labels)
            )
        return sorted(items, key=lambda i: i.key)

    def expected_files(self, entry: str, protocol: Protocol) -> str:
        return f"'{entry}/images/image_part_*.jpg' and '{entry}/masks/image_part_*.png'"
