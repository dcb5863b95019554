"""Test-time augmentation: flips, 90° rotations and scales, inverted on the logits and averaged.

A :class:`TTA` wraps any segmentation network and is itself one, so sliding-window prediction, export
checks and evaluation use it unchanged. Every view maps the input batch, runs the network and maps the
logits back to the input's geometry (flips and rotations exactly, scales by bilinear resizing); the
logits of all views are averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import ConfigError

Tensor4 = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class View:
    """A geometric view: ``forward`` on the ``(B, C, H, W)`` input, ``inverse`` on the ``(B, K, H', W')`` logits."""

    forward: Tensor4
    inverse: Tensor4


def _rot(k: int) -> Tensor4:
    return lambda x: torch.rot90(x, k, dims=(-2, -1))


def _flip(*dims: int) -> Tensor4:
    return lambda x: torch.flip(x, dims=dims)


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


def _anti_transpose(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-2, -1)).transpose(-2, -1)


VIEWS: dict[str, View] = {
    "identity": View(lambda x: x, lambda x: x),
    "hflip": View(_flip(-1), _flip(-1)),
    "vflip": View(_flip(-2), _flip(-2)),
    "rot90": View(_rot(1), _rot(-1)),
    "rot180": View(_rot(2), _rot(2)),
    "rot270": View(_rot(3), _rot(1)),
    "transpose": View(_transpose, _transpose),
    "antitranspose": View(_anti_transpose, _anti_transpose),
}
"""The eight elements of the dihedral group D4 of the square, by name."""

PRESETS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "flip": ("identity", "hflip", "vflip"),
    # GeoSeg's "lr" (ttach HorizontalFlip x VerticalFlip): 4 views.
    "flip4": ("identity", "hflip", "vflip", "rot180"),
    "rot": ("identity", "rot90", "rot180", "rot270"),
    "d4": tuple(VIEWS),
}
"""Named sets of views; ``--tta`` takes a preset or a comma-separated list of view names and presets."""


def resolve_views(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Expand presets and view names (``"flip"``, ``"hflip,rot90"``, ``["d4"]``) into unique view names.

    The un-augmented input is always one of the views: ``"hflip"`` means the image and its mirror.
    """
    if spec is None:
        return ("identity",)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = ["identity"]
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item in PRESETS:
            expanded = PRESETS[item]
        elif item in VIEWS:
            expanded = (item,)
        else:
            raise ConfigError(
                f"unknown TTA view {item!r}; presets: {', '.join(PRESETS)}; views: {', '.join(VIEWS)}"
            )
        names.extend(n for n in expanded if n not in names)
    return tuple(names)


class TTA(nn.Module):
    """Average a network's logits over geometric views and scales.

    Args:
        model: ``(B, 3, H, W)`` -> ``(B, K, H, W)`` logits.
        views: view names / presets (see :data:`VIEWS`, :data:`PRESETS`).
        scales: input scale factors; each scaled input is ``round(H * s)`` (rounded to a multiple of
            ``size_divisor``) and its logits are resized back to ``(H, W)`` bilinearly.
        size_divisor: scaled sizes are multiples of it (for networks that need e.g. multiples of 32).
    """

    def __init__(
        self,
        model: nn.Module,
        views: str | Sequence[str] | None = "identity",
        scales: Sequence[float] = (1.0,),
        size_divisor: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.view_names = resolve_views(views)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or any(not s > 0 for s in self.scales):
            raise ConfigError(f"TTA scales must be positive, got {list(scales)}")
        self.size_divisor = max(int(size_divisor), 1)

    @property
    def num_views(self) -> int:
        return len(self.view_names) * len(self.scales)

    def _scaled(self, n: int, s: float) -> int:
        d = self.size_divisor
        return max(d, round(n * s / d) * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> mean logits ``(B, K, H, W)`` over all views and scales."""
        h, w = x.shape[-2:]
        total: torch.Tensor | None = None
        for s in self.scales:
            size = (self._scaled(h, s), self._scaled(w, s))
            xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for name in self.view_names:
                view = VIEWS[name]
                y = view.inverse(self.model(view.forward(xs))).to(torch.float32)
                if y.shape[-2:] != (h, w):
                    y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
                total = y if total is None else total + y
        assert total is not None
        return total / self.num_views


def maybe_tta(
    model: nn.Module,
    views: str | Sequence[str] | None = None,
    scales: Sequence[float] = (1.0,),
    size_divisor: int = 1,
) -> nn.Module:
    """``model`` itself when no augmentation is asked for, else a :class:`TTA` around it."""
    names = resolve_views(views)
    if names == ("identity",) and tuple(float(s) for s in scales) == (1.0,):
        return model
    return TTA(model, names, scales, size_divisor)
