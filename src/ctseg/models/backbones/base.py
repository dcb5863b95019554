"""The encoder contract every decoder relies on, and the small layers the adapters share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.models.weights import LoadReport

#: Output strides every backbone must produce; the decoders and the contrastive patch sizes assume them.
STANDARD_STRIDES: tuple[int, ...] = (4, 8, 16, 32)


class Backbone(nn.Module):
    """Base class of all encoders.

    ``forward(x)`` maps ``x`` of shape ``(B, 3, H, W)``, with ``H`` and ``W`` multiples of 32 (the model
    wrapper pads to that), to a list of four contiguous NCHW maps; map ``i`` has shape
    ``(B, out_channels[i], H // strides[i], W // strides[i])`` with ``strides == [4, 8, 16, 32]``.
    """

    out_channels: list[int]
    strides: list[int]
    #: What ctseg's loader copied when the backbone was built with weights (None: random init or timm's loader).
    load_report: LoadReport | None

    def __init__(self, out_channels: list[int], strides: list[int] | None = None) -> None:
        super().__init__()
        self.out_channels = [int(c) for c in out_channels]
        self.strides = list(STANDARD_STRIDES if strides is None else strides)
        self.load_report = None
        if len(self.out_channels) != len(self.strides):
            raise ValueError(f"{len(self.out_channels)} channel counts for {len(self.strides)} strides")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW map ``(B, C, H, W)``.

    Same parameters (``weight``/``bias`` of shape ``(C,)``) as ``nn.LayerNorm(C)`` applied to tokens, so
    a per-stage norm computed here matches the token-space norm of the paper's Swin.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
