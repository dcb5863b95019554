"""Datasets over the prepared layout (``ctseg.data.layout``): one split of a prepared folder.

Each item is ``{"image": float32 (3, H, W), "mask": int64 (H, W), "id": str}`` after the split's transform.
Files are checked as they are read: an unreadable or truncated image, a wrong channel count, an
image/mask size mismatch or label values that are neither a class index nor ``ignore_index`` raise
:class:`TileDataError` (a :class:`~ctseg.errors.DataError`) naming the file and the problem.

Randomness: an item requested as ``(index, seed)`` (what :class:`SeededRandomSampler` yields) runs its
transform under ``torch`` seeded with ``seed``, so a sample does not depend on which worker draws it or on
the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

from ctseg.data.layout import Manifest, TileEntry, read_manifest
from ctseg.data.protocols import Protocol, get_protocol
from ctseg.errors import DataError

Sample = dict[str, Any]


class TileDataError(DataError):
    """A tile that cannot be read; survives being re-raised by a ``DataLoader`` worker (see DataError)."""


def _channels(mode: str) -> int:
    try:
        return PILImage.getmodebands(mode)
    except (KeyError, ValueError):
        return 0


def read_image(path: Path) -> np.ndarray:
    """RGB image file → (H, W, 3) uint8."""
    try:
        with PILImage.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im) if mode == "RGB" else None
    except FileNotFoundError as exc:
        raise TileDataError(path, "image file is missing") from exc
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        raise TileDataError(path, f"cannot read image (corrupt or truncated file: {exc})") from exc
    if arr is None:
        raise TileDataError(
            path, f"image has {_channels(mode)} channel(s) (PIL mode {mode!r}); expected 3 (RGB)"
        )
    return arr


def read_mask(path: Path) -> np.ndarray:
    """Single-channel uint8 label file (PIL mode ``L`` or ``P``) → (H, W) uint8."""
    try:
        with PILImage.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im) if mode in ("L", "P") else None
    except FileNotFoundError as exc:
        raise TileDataError(path, "mask file is missing") from exc
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        raise TileDataError(path, f"cannot read mask (corrupt or truncated file: {exc})") from exc
    if arr is None:
        raise TileDataError(
            path,
            f"mask has {_channels(mode)} channel(s) (PIL mode {mode!r}); expected one uint8 channel of class indices",
        )
    return arr


def label_lut(num_classes: int, ignore_index: int) -> np.ndarray:
    """(256,) bool: which uint8 label values are legal (a class index or ``ignore_index``)."""
    lut = np.zeros(256, dtype=bool)
    lut[:num_classes] = True
    if 0 <= ignore_index < 256:
        lut[ignore_index] = True
    return lut


class SegmentationDataset(Dataset[Sample]):
    """One split of a prepared folder.

    Args:
        root: prepared folder (``manifest.json`` and ``<split>/{images,masks}``).
        split: split name as in the manifest (``"train"``, ``"val"``, ``"test"``).
        protocol: label encoding to check against; ``None`` = the manifest's protocol.
        transform: callable on the raw sample ``{"image": Image (3, H, W) uint8, "mask": Mask (H, W) uint8,
            "id": str}``; if it has ``partners > 0`` (mosaic) the sample also gets ``"partners"``, a
            callable loading that many random other tiles.
        manifest: an already read manifest (saves re-reading it).
        require_masks: tiles without a mask are an error (training); otherwise they get an all-ignore mask.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        protocol: Protocol | str | dict[str, Any] | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        manifest: Manifest | None = None,
        require_masks: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        manifest = manifest if manifest is not None else read_manifest(self.root)
        self.protocol = get_protocol(protocol if protocol is not None else manifest.protocol)
        self.tiles: list[TileEntry] = manifest.split(split)
        self.transform = transform
        self._lut = label_lut(self.protocol.num_classes, self.protocol.ignore_index)
        if require_masks:
            missing = [t.id for t in self.tiles if t.mask is None]
            if missing:
                raise TileDataError(
                    self.root / "manifest.json",
                    f"split {split!r} has {len(missing)} tile(s) without a mask: {missing[:5]}",
                )

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.tiles]

    def load(self, index: int) -> Sample:
        """The checked, untransformed tile: image (3, H, W) uint8 ``Image``, mask (H, W) uint8 ``Mask``."""
        tile = self.tiles[index]
        image_path = self.root / tile.image
        image = read_image(image_path)
        h, w = image.shape[:2]
        if (tile.height, tile.width) != (h, w):
            raise TileDataError(
                image_path, f"image is {w}×{h} px but manifest.json says {tile.width}×{tile.height}"
            )
        if tile.mask is None:
            mask = np.full((h, w), self.protocol.ignore_index, dtype=np.uint8)
        else:
            mask_path = self.root / tile.mask
            mask = read_mask(mask_path)
            if mask.shape != (h, w):
                raise TileDataError(
                    mask_path,
                    f"mask is {mask.shape[1]}×{mask.shape[0]} px but its image {image_path.name} is {w}×{h}",
                )
            legal = self._lut[mask]
            if not legal.all():
                bad = np.unique(mask[~legal])
                raise TileDataError(
                    mask_path,
                    f"label value(s) {bad[:10].tolist()} out of range: expected 0..{self.protocol.num_classes - 1} "
                    f"or ignore {self.protocol.ignore_index} (protocol {self.protocol.name!r})",
                )
        return {
            "image": tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))),
            "mask": tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))),
            "id": tile.id,
        }

    def _partners(self, index: int, count: int) -> Callable[[], list[Sample]]:
        def load() -> list[Sample]:
            n = len(self.tiles)
            if n == 1:
                picks = [index] * count
            else:
                # Uniform over the other tiles, drawn from torch's (seeded) RNG.
                offs = torch.randint(1, n, (count,)).tolist()
                picks = [(index + o) % n for o in offs]
            return [self.load(j) for j in picks]

        return load

    def _get(self, index: int) -> Sample:
        sample = self.load(index)
        if self.transform is None:
            return sample
        partners = getattr(self.transform, "partners", 0)
        if partners:
            sample["partners"] = self._partners(index, partners)
        sample = self.transform(sample)
        sample.pop("partners", None)
        return sample

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                sample = self._get(index)
        else:
            sample = self._get(int(key))
        return finalize_sample(sample)


def finalize_sample(sample: Sample) -> Sample:
    """tv_tensors → plain tensors: image float32 (3, H, W) (or uint8 if never normalised), mask int64 (H, W)."""
    out = dict(sample)
    out["image"] = sample["image"].as_subclass(torch.Tensor)
    out["mask"] = sample["mask"].as_subclass(torch.Tensor).to(torch.int64)
    return out


class SeededRandomSampler(Sampler[tuple[int, int]]):
    """Shuffles ``num_samples`` indices and gives each draw its own seed: yields ``(index, seed)``.

    The order and the per-sample seeds depend only on ``(seed, epoch)``. ``epoch`` advances after every
    pass; :meth:`set_epoch` (called by Lightning before each epoch, forwarded through its distributed
    wrapper) sets it, so a resumed run sees the same stream.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=g).tolist()
        self.epoch += 1
        return iter(list(zip(order, seeds)))


class PadCollate:
    """Stack samples of different sizes: pad bottom/right to the largest (H, W) in the batch.

    Padding is image 0 (in normalised units, i.e. the mean colour) and mask ``ignore_index``, so padded
    pixels are never trained on nor evaluated. Output: image (B, 3, H, W), mask (B, H, W) int64, id list.
    """

    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = int(ignore_index)

    def __call__(self, samples: Sequence[Sample]) -> Sample:
        height = max(int(s["image"].shape[-2]) for s in samples)
        width = max(int(s["image"].shape[-1]) for s in samples)

        def pad(t: torch.Tensor, fill: float) -> torch.Tensor:
            ph, pw = height - int(t.shape[-2]), width - int(t.shape[-1])
            return torch.nn.functional.pad(t, (0, pw, 0, ph), value=fill) if ph or pw else t

        batch: Sample = {
            "image": torch.stack([pad(s["image"], 0) for s in samples]),
            "mask": torch.stack([pad(s["mask"], self.ignore_index) for s in samples]),
            "id": [s["id"] for s in samples],
        }
        return batch
