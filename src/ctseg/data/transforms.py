"""Mask-safe augmentation for segmentation samples, built on ``torchvision.transforms.v2``.

A sample is a dict ``{"image": tv_tensors.Image (3, H, W) uint8, "mask": tv_tensors.Mask (H, W) uint8, ...}``.
Every transform here treats *all* ``tv_tensors.Mask`` entries of a sample alike: geometry is applied with
nearest-neighbour sampling (torchvision dispatches ``Mask`` to its nearest kernels), and regions added by
padding are filled with ``0`` in images and ``ignore_index`` in masks.

Label guarantee (tested with hypothesis in ``tests/data/test_transforms.py``): with ``mask_interp="nearest"``
every output mask pixel is either a copy of a pixel of one of its source masks (the sample's own, or the
three partner tiles of a mosaic), or lies in a region added by padding (SmartCrop or mosaic on an input
smaller than the window), where it is ``ignore_index``. So no transform invents a class, and ``ignore_index``
appears in an output only where it was in a source mask or where padding was added. The one exception is
``mask_interp="bicubic"``, the reference code's quirk (reference spec §4.4), which interpolates label
values by design; it maps values ``>= num_classes`` to ignore and warns once.

Transforms are built by name from a registry (:func:`register_transform`, :func:`build_train_transform`),
so a YAML config can reorder or drop steps (``AugmentConfig.ops``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image as PILImage
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ctseg.errors import ConfigError
from ctseg.utils.registry import Registry

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ImageInterp = Literal["bilinear", "bicubic"]
Sample = dict[str, Any]

DEFAULT_OPS: tuple[str, ...] = (
    "mosaic",
    "random_scale",
    "smart_crop",
    "resize",
    "hflip",
    "vflip",
    "rot90",
    "color_jitter",
)


@dataclass
class AugmentConfig:
    """Training augmentation; defaults follow the paper's recipe (reference spec §3).

    Attributes:
        ops: augmentation steps in order, names from the transform registry (see :func:`list_transforms`).
            ``"mosaic"`` may only come first. Normalisation is always applied after them.
        mosaic_p: probability of building a 4-tile mosaic (paper 0.25).
        scales: random-scale factors, one drawn uniformly per sample (paper 0.75, 1, 1.25, 1.5).
        crop_window: side of the SmartCrop window in prepared-tile pixels; the crop is then resized to
            ``crop_size`` (step ``"resize"``). ``None`` = ``crop_size`` (no resize). Prepared tiles are
            already at the protocol's scale (``ctseg prepare`` applies ``resize``); the paper cropped
            375 px of its 500 px tiles and enlarged them to 512, i.e. ``crop_window=384`` on 512 px
            prepared tiles.
        crop_tries: SmartCrop attempts before keeping the last one (paper 11).
        crop_max_ratio: a crop is accepted only if no class reaches this share of its non-ignore pixels.
        crop_min_classes: ... and at least this many classes are present.
        hflip_p / vflip_p: flip probabilities (the paper stored flipped copies of every tile instead).
        rot90_p: probability of a rotation by 90°, 180° or 270° (uniform among the three).
        color_jitter: (brightness, contrast, saturation, hue) for ``v2.ColorJitter``; all zero = off.
    """

    ops: tuple[str, ...] = DEFAULT_OPS
    mosaic_p: float = 0.25
    scales: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5)
    crop_window: int | None = None
    crop_tries: int = 11
    crop_max_ratio: float = 0.75
    crop_min_classes: int = 2
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        self.scales = tuple(float(s) for s in self.scales)
        self.color_jitter = tuple(float(v) for v in self.color_jitter)  # type: ignore[assignment]
        unknown = [op for op in self.ops if op not in _REGISTRY]
        if unknown:
            raise ConfigError(
                f"augment.ops: unknown transform(s) {unknown}; known: {', '.join(list_transforms())}"
            )
        if "mosaic" in self.ops[1:]:
            raise ConfigError("augment.ops: 'mosaic' combines whole tiles and must be the first step")
        for name in ("mosaic_p", "hflip_p", "vflip_p", "rot90_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"augment.scales must be positive factors, got {self.scales}")
        if self.crop_window is not None and self.crop_window < 1:
            raise ConfigError(f"augment.crop_window must be >= 1, got {self.crop_window}")
        if self.crop_tries < 1:
            raise ConfigError(f"augment.crop_tries must be >= 1, got {self.crop_tries}")
        if not 0.0 < self.crop_max_ratio <= 1.0:
            raise ConfigError(f"augment.crop_max_ratio must be in (0, 1], got {self.crop_max_ratio}")
        if len(self.color_jitter) != 4 or any(v < 0 for v in self.color_jitter) or self.color_jitter[3] > 0.5:
            raise ConfigError(
                "augment.color_jitter must be 4 non-negative numbers (brightness, contrast, saturation, hue<=0.5)"
            )

    @classmethod
    def from_any(cls, value: AugmentConfig | dict[str, Any] | None) -> AugmentConfig:
        """``None`` gives the defaults; a dict is checked for unknown keys."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = set(cls.__dataclass_fields__)
            unknown = set(value) - known
            if unknown:
                raise ConfigError(f"augment: unknown keys {sorted(unknown)}; known: {sorted(known)}")
            return cls(**value)
        raise ConfigError(f"augment must be an AugmentConfig, a dict or None, not {type(value).__name__}")


@dataclass(frozen=True)
class TransformContext:
    """What a transform builder needs besides :class:`AugmentConfig`."""

    num_classes: int
    ignore_index: int
    crop_size: int
    crop_window: int
    mask_interp: Literal["nearest", "bicubic"] = "nearest"
    image_interp: ImageInterp = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# helpers


def _interp(name: str) -> v2.InterpolationMode:
    return v2.InterpolationMode.BICUBIC if name == "bicubic" else v2.InterpolationMode.BILINEAR


def _fill(inpt: torch.Tensor, ignore_index: int) -> int:
    return ignore_index if isinstance(inpt, tv_tensors.Mask) else 0


def _hw(inpt: torch.Tensor) -> tuple[int, int]:
    return int(inpt.shape[-2]), int(inpt.shape[-1])


def _pad_bottom_right(inpt: torch.Tensor, height: int, width: int, ignore_index: int) -> torch.Tensor:
    """Pad ``inpt`` (…, H, W) at the bottom/right to at least (height, width); image 0, mask ignore."""
    h, w = _hw(inpt)
    ph, pw = max(0, height - h), max(0, width - w)
    if ph == 0 and pw == 0:
        return inpt
    return F.pad(inpt, [0, 0, pw, ph], fill=_fill(inpt, ignore_index))


def _first_mask(flat_inputs: Sequence[Any]) -> tv_tensors.Mask:
    for inpt in flat_inputs:
        if isinstance(inpt, tv_tensors.Mask):
            return inpt
    raise ValueError("sample has no tv_tensors.Mask")


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive), from torch's RNG so seeding torch seeds everything."""
    return int(torch.randint(low, high + 1, (1,)).item())


_BICUBIC_WARNED = False


def resize_mask_bicubic_quirk(
    mask: torch.Tensor, size: tuple[int, int], num_classes: int, ignore_index: int
) -> torch.Tensor:
    """Reproduce the reference code's mask resize: PIL BICUBIC on an ``L``-mode mask (reference spec §4.4).

    The mask is resized in the reference's encoding, where ignore is the value ``num_classes`` (6 for
    Potsdam), so blends between a class and ignore invent the classes in between (0 … 6 → 1 … 5), as
    in the paper. Interpolated values ``>= num_classes`` (ignore, and the reference's ``7 → 6`` overshoot)
    become ``ignore_index``. Same rule as ``ctseg.data.prepare.common.resize_mask``.

    Args:
        mask: (H, W) uint8 labels.
        size: (height, width) of the output.
    Returns:
        (height, width) uint8, same tensor type as ``mask``.
    """
    global _BICUBIC_WARNED
    if not _BICUBIC_WARNED:
        _BICUBIC_WARNED = True
        warnings.warn(
            "mask_interp='bicubic' reproduces the reference code's quirk: interpolated label values appear "
            "along every class edge. Use mask_interp='nearest' for new work.",
            UserWarning,
            stacklevel=2,
        )
    arr = mask.detach().cpu().numpy().astype(np.uint8)
    arr = np.where(arr == ignore_index, num_classes, arr).astype(np.uint8)
    pil = PILImage.fromarray(arr, mode="L").resize((size[1], size[0]), PILImage.Resampling.BICUBIC)
    out = np.array(pil, dtype=np.uint8)
    out[out >= num_classes] = ignore_index
    return (
        tv_tensors.wrap(torch.from_numpy(out), like=mask)
        if isinstance(mask, tv_tensors.Mask)
        else torch.from_numpy(out)
    )


# --------------------------------------------------------------------------------------------------
# transforms


class RandomScale(v2.Transform):
    """Rescale by a factor drawn uniformly from ``scales``; new size ``int(s·H), int(s·W)`` as the reference.

    Images use ``interpolation``; masks always nearest (torchvision's ``Mask`` kernel).
    """

    def __init__(self, scales: Sequence[float], interpolation: ImageInterp = "bicubic") -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.interpolation = interpolation

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        scale = self.scales[int(torch.randint(len(self.scales), (1,)).item())]
        h, w = _hw(_first_mask(flat_inputs))
        return {"size": [max(1, int(scale * h)), max(1, int(scale * w))], "identity": scale == 1.0}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["identity"]:
            return inpt
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=_interp(self.interpolation))


class SmartCrop(v2.Transform):
    """Class-balanced random crop (the reference's SmartCropV1).

    Up to ``tries`` random ``size × size`` windows are drawn; the first whose non-ignore labels (in the
    first ``Mask`` of the sample) hold at least ``min_classes`` classes, none reaching ``max_ratio`` of
    them, is taken, otherwise the last one. Inputs smaller than the window are first padded at the
    bottom/right (image 0, mask ``ignore_index``).
    """

    def __init__(
        self, size: int, ignore_index: int, tries: int = 11, max_ratio: float = 0.75, min_classes: int = 2
    ) -> None:
        super().__init__()
        self.size = int(size)
        self.ignore_index = int(ignore_index)
        self.tries = int(tries)
        self.max_ratio = float(max_ratio)
        self.min_classes = int(min_classes)

    def _balanced(self, crop: torch.Tensor) -> bool:
        counts = torch.bincount(crop.reshape(-1).to(torch.int64), minlength=256)
        counts[self.ignore_index] = 0
        total = int(counts.sum())
        if total == 0:
            return False
        present = int((counts > 0).sum())
        return present >= self.min_classes and int(counts.max()) < self.max_ratio * total

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        mask = _pad_bottom_right(_first_mask(flat_inputs), self.size, self.size, self.ignore_index)
        h, w = _hw(mask)
        top = left = 0
        for _ in range(self.tries):
            top, left = _randint(0, h - self.size), _randint(0, w - self.size)
            if self._balanced(mask[..., top : top + self.size, left : left + self.size]):
                break
        return {"top": top, "left": left}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        inpt = _pad_bottom_right(inpt, self.size, self.size, self.ignore_index)
        return self._call_kernel(F.crop, inpt, params["top"], params["left"], self.size, self.size)


class ResizeTo(v2.Transform):
    """Resize to ``size`` (H, W); skipped when already that size.

    Images use ``interpolation``; masks nearest, or with ``mask_interp="bicubic"`` the reference's quirk
    (:func:`resize_mask_bicubic_quirk`).
    """

    def __init__(
        self,
        size: tuple[int, int],
        num_classes: int,
        ignore_index: int,
        interpolation: ImageInterp = "bicubic",
        mask_interp: Literal["nearest", "bicubic"] = "nearest",
    ) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.interpolation = interpolation
        self.mask_interp = mask_interp

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if _hw(inpt) == self.size:
            return inpt
        if isinstance(inpt, tv_tensors.Mask) and self.mask_interp == "bicubic":
            return resize_mask_bicubic_quirk(inpt, self.size, self.num_classes, self.ignore_index)
        return self._call_kernel(F.resize, inpt, list(self.size), interpolation=_interp(self.interpolation))


class RandomRot90(v2.Transform):
    """With probability ``p`` rotate by k·90°, k uniform in {1, 2, 3} (exact: no interpolation)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        k = _randint(1, 3) if torch.rand(1).item() < self.p else 0
        return {"k": k}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["k"] == 0:
            return inpt
        return tv_tensors.wrap(
            torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1)), like=inpt
        )


class Mosaic(v2.Transform):
    """With probability ``p`` replace the sample by a mosaic of it and three partner tiles.

    The canvas has the sample's size (H, W); the split point (ox, oy) is uniform in [W/4, 3W/4] ×
    [H/4, 3H/4]; each quadrant is a random crop of its tile (padded bottom/right with image 0 / mask
    ignore when the tile is smaller). Partners come from ``sample["partners"]``: a zero-argument callable
    returning three samples with the same keys, so they are only loaded when a mosaic is built. The
    ``"partners"`` key is removed from the output.
    """

    partners = 3

    def __init__(self, p: float, ignore_index: int) -> None:
        super().__init__()
        self.p = float(p)
        self.ignore_index = int(ignore_index)

    def _random_crop(self, sample: Sample, keys: list[str], height: int, width: int) -> list[torch.Tensor]:
        ref = _pad_bottom_right(sample[keys[0]], height, width, self.ignore_index)
        h, w = _hw(ref)
        top, left = _randint(0, h - height), _randint(0, w - width)
        out = []
        for key in keys:
            t = _pad_bottom_right(sample[key], height, width, self.ignore_index)
            out.append(t[..., top : top + height, left : left + width])
        return out

    def forward(self, sample: Sample) -> Sample:  # type: ignore[override]
        sample = dict(sample)
        loader: Callable[[], list[Sample]] | None = sample.pop("partners", None)
        if loader is None or torch.rand(1).item() >= self.p:
            return sample
        others = loader()
        if len(others) != self.partners:
            raise ValueError(f"Mosaic needs {self.partners} partner samples, got {len(others)}")
        keys = [k for k, v in sample.items() if isinstance(v, tv_tensors.Image | tv_tensors.Mask)]
        h, w = _hw(sample[keys[0]])
        oy, ox = _randint(h // 4, (3 * h) // 4), _randint(w // 4, (3 * w) // 4)
        quads = [(oy, ox), (oy, w - ox), (h - oy, ox), (h - oy, w - ox)]
        crops = [self._random_crop(s, keys, qh, qw) for s, (qh, qw) in zip([sample, *others], quads)]
        for i, key in enumerate(keys):
            tl, tr, bl, br = (c[i].as_subclass(torch.Tensor) for c in crops)
            canvas = torch.cat([torch.cat([tl, tr], dim=-1), torch.cat([bl, br], dim=-1)], dim=-2)
            sample[key] = tv_tensors.wrap(canvas, like=sample[key])
        return sample


class SegmentationTransform(v2.Compose):
    """A composed pipeline; ``partners`` says how many extra tiles a sample needs (mosaic), else 0."""

    def __init__(self, transforms: Sequence[Callable[..., Any]]) -> None:
        super().__init__(list(transforms))
        self.partners = max((getattr(t, "partners", 0) for t in self.transforms), default=0)

    def forward(self, *inputs: Any) -> Any:
        sample = inputs[0] if len(inputs) == 1 else inputs
        for t in self.transforms:
            sample = t(sample)
        if isinstance(sample, dict):
            sample.pop("partners", None)
        return sample


def normalize_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Transform:
    """uint8 image → float32 in [0, 1] → ``(x − mean) / std``; masks untouched."""
    return v2.Compose(
        [
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


# --------------------------------------------------------------------------------------------------
# registry

TransformBuilder = Callable[[AugmentConfig, TransformContext], v2.Transform | None]
_REGISTRY: Registry[TransformBuilder] = Registry("transform")


def register_transform(name: str) -> Callable[[TransformBuilder], TransformBuilder]:
    """Register ``builder(cfg, ctx) -> Transform | None`` (``None``: the step is off under this config)."""
    return _REGISTRY.register(name)


def list_transforms() -> list[str]:
    return _REGISTRY.names()


def build_transform(name: str, cfg: AugmentConfig, ctx: TransformContext) -> v2.Transform | None:
    return _REGISTRY[name](cfg, ctx)  # an unknown name is a ConfigError listing the known ones


@register_transform("mosaic")
def _build_mosaic(cfg: AugmentConfig, ctx: TransformContext) -> v2.Transform | None:
    return Mosaic(cfg.mosaic_p, ctx.ignore_index) if cfg.mosaic_p > 0 else None


@register_transform("random_scale")
def _build_random_scale(cfg: AugmentConfig, ctx: TransformContext) -> v2.Transform | None:
    if all(s == 1.0 for s in cfg.scales):
        return None
    return RandomScale(cfg.scales, ctx.image_interp)


@register_transform("smart_crop")
def _build_smart_crop(cfg: AugmentConfig, ctx: TransformContext) -> v2.Transform | None:
    return SmartCrop(
        ctx.crop_window, ctx.ignore_index, cfg.crop_tries, cfg.crop_max_ratio, cfg.crop_min_classes
    )


@register_transform("resize")
def _build_resize(cfg: AugmentConfig, ctx: TransformContext) -> v2.Transform | None:
    return ResizeTo(
        (ctx.crop_size, ctx.crop_size), ctx.num_classes, ctx.ignore_index, ctx.image_interp, ctx.mask_interp
    )


@register_transform("hflip")
def _build_hflip(cfg: AugmentConfig, ctx: TransformContext) -> v2.Transform | None:
    return v2.RandomHorizontalFlip(cfg.hflip_p) if cfg.hflip_p > 0 else None


@register_transform("vflip")
def _build_vflip(cfg: AugmentConfig, ctx: TransformContext) -> v2.Transform | None:
    return v2.RandomVerticalFlip(cfg.vflip_p) if cfg.vflip_p > 0 else None


@register_transform("rot90")
def _build_rot90(cfg: AugmentConfig, ctx: TransformContext) -> v2.Transform | None:
    return RandomRot90(cfg.rot90_p) if cfg.rot90_p > 0 else None


@register_transform("color_jitter")
def _build_color_jitter(cfg: AugmentConfig, ctx: TransformContext) -> v2.Transform | None:
    if not any(cfg.color_jitter):
        return None
    b, c, s, h = cfg.color_jitter
    return v2.ColorJitter(brightness=b or None, contrast=c or None, saturation=s or None, hue=h or None)


def build_train_transform(cfg: AugmentConfig, ctx: TransformContext) -> SegmentationTransform:
    """``cfg.ops`` in order (steps that are off dropped), then normalisation."""
    steps = [t for t in (build_transform(name, cfg, ctx) for name in cfg.ops) if t is not None]
    return SegmentationTransform([*steps, normalize_transform(ctx.mean, ctx.std)])


def build_eval_transform(ctx: TransformContext, resize: int | None) -> SegmentationTransform:
    """Validation/test: no random ops; resize to ``resize × resize`` when the protocol says so; normalise."""
    steps: list[Callable[..., Any]] = []
    if resize:
        steps.append(
            ResizeTo((resize, resize), ctx.num_classes, ctx.ignore_index, ctx.image_interp, ctx.mask_interp)
        )
    return SegmentationTransform([*steps, normalize_transform(ctx.mean, ctx.std)])
