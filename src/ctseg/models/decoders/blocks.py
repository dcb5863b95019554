"""Convolution building blocks shared by the decoders (reference-spec §2.2, §2.3).

All convolutions are bias-free unless a block says otherwise, and use "same"-style padding
``((stride - 1) + dilation * (kernel - 1)) // 2``: with stride 1 and an odd kernel the map keeps its
size; with stride 2 it halves (rounded up).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def same_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """Padding that keeps ``H`` (stride 1, odd kernel) or gives ``ceil(H / stride)`` (stride 2)."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def _reflect_index(size: int, padded: int, device: torch.device) -> Tensor:
    """Source index of each of ``padded`` positions when a length-``size`` axis is reflect-extended.

    Reflection without repeating the edge, extended periodically (period ``2 * (size - 1)``), which is
    what repeated ``F.pad(mode="reflect")`` calls give. A length-1 axis repeats its element.
    """
    i = torch.arange(padded, device=device)
    # ``last`` as a 0-d tensor taken from an arange, not a Python/symbolic int, so that an exported
    # graph computes it from the input shape (ONNX cannot take a symbolic scalar here).
    last = torch.arange(size, device=device)[-1]
    period = (2 * last).clamp(min=1)
    return last - (torch.remainder(i, period) - last).abs()


def reflect_pad(x: Tensor, right: int, bottom: int) -> Tensor:
    """Reflect-pad ``(B, C, H, W)`` by ``bottom`` rows and ``right`` columns, for any map size.

    Equals ``F.pad(x, (0, right, 0, bottom), mode="reflect")`` where that is defined (``pad < size``)
    and extends it to small maps (e.g. the stride-32 map of a 128 px input, 4 px, padded to a window
    of 8). Written as an index gather without branches on the size, so an exported graph stays valid
    for every input size.
    """
    h, w = x.shape[-2], x.shape[-1]
    x = x.index_select(-2, _reflect_index(h, h + bottom, x.device))
    return x.index_select(-1, _reflect_index(w, w + right, x.device))


def _conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=same_padding(kernel_size, stride, dilation),
        dilation=dilation,
        groups=groups,
        bias=bias,
    )


class Conv(nn.Sequential):
    """A plain convolution ``(B, C_in, H, W) -> (B, C_out, H/stride, W/stride)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(_conv(in_channels, out_channels, kernel_size, stride, dilation, bias=bias))


class ConvBN(nn.Sequential):
    """Convolution then BatchNorm."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
    ) -> None:
        super().__init__(
            _conv(in_channels, out_channels, kernel_size, stride, dilation),
            nn.BatchNorm2d(out_channels),
        )


class ConvBNAct(nn.Sequential):
    """Convolution, BatchNorm, activation (``act`` is a module class: ``nn.ReLU`` or ``nn.ReLU6``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            _conv(in_channels, out_channels, kernel_size, stride, dilation),
            nn.BatchNorm2d(out_channels),
            act(),
        )


class SeparableConvBNAct(nn.Sequential):
    """Depthwise ``k x k`` (dilated) conv -> pointwise 1x1 ``C_in -> C_out`` -> BatchNorm -> activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            _conv(in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels),
            _conv(in_channels, out_channels, 1),
            nn.BatchNorm2d(out_channels),
            act(),
        )


class SeparableConvBN(nn.Sequential):
    """Depthwise ``k x k`` conv -> BatchNorm(C_in) -> pointwise 1x1 ``C_in -> C_out`` (no activation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__(
            _conv(in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels),
            nn.BatchNorm2d(in_channels),
            _conv(in_channels, out_channels, 1),
        )
