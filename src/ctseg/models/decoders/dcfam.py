"""The DCSwin decoder: dense connected feature aggregation (DCFAM) with linear attention.

Written from reference-spec §2.2 (Wang et al., "A novel transformer based semantic segmentation
scheme for fine-resolution remote sensing images", the DCSwin/DCPoolFormer baselines of the CT paper).
With encoder channels 64-128-256-512 and 6 classes it has 8.06 M parameters. The spec's fixed 256 of
the spatial attention generalises to ``channels[2]`` so that any 4-stage backbone fits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctseg.models.decoders.blocks import Conv, ConvBN, ConvBNAct, SeparableConvBNAct


def _l2_normalize_channels(x: Tensor) -> Tensor:
    """Unit L2 norm over the channel axis of ``(B, C, N)``; the eps only matters for all-zero columns."""
    return F.normalize(x, p=2.0, dim=-2, eps=1e-12)


class SharedSpatialAttention(nn.Module):
    """Linear-complexity spatial attention ``(B, C, H, W) -> (B, C, H, W)``.

    A softmax-free attention whose cost is linear in ``N = H * W``: queries and keys are L2-normalised
    ``C/8``-dim projections, and the kernel ``1 + q.k`` is normalised by its row sums. ``gamma`` starts at
    0, so the block starts as the identity.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = h * w
        q = _l2_normalize_channels(self.query(x).flatten(2)).transpose(1, 2)  # (B, N, C')
        k = _l2_normalize_channels(self.key(x).flatten(2))  # (B, C', N)
        v = self.value(x).flatten(2)  # (B, C, N)
        norm = 1.0 / (n + torch.einsum("bnc,bc->bn", q, k.sum(dim=-1) + 1e-6))  # (B, N)
        kv = torch.einsum("bmn,bcn->bmc", k, v)  # (B, C', C)
        numerator = v.sum(dim=-1, keepdim=True) + torch.einsum("bnm,bmc->bcn", q, kv)  # (B, C, N)
        out = (numerator * norm[:, None, :]).view(b, c, h, w)
        return x + self.gamma * out


class SharedChannelAttention(nn.Module):
    """Linear-complexity channel attention ``(B, C, H, W) -> (B, C, H, W)``; only ``gamma`` is learnt."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = h * w
        v = x.flatten(2)  # (B, C, N)
        q = _l2_normalize_channels(v)  # (B, C, N)
        k = q.transpose(1, 2)  # (B, N, C)
        norm = 1.0 / (n + torch.einsum("bnc,bn->bc", k, q.sum(dim=-2) + 1e-6))  # (B, C)
        vsum = v.sum(dim=-2, keepdim=True)  # (B, 1, N), broadcast over C
        vk = torch.einsum("bcn,bnm->bcm", v, k)  # (B, C, C)
        numerator = vsum + torch.einsum("bcm,bmn->bcn", vk, q)  # (B, C, N)
        out = (numerator * norm[:, :, None]).view(b, c, h, w)
        return x + self.gamma * out


class DownConnection(nn.Module):
    """Residual stride-2 block ``(B, C_in, H, W) -> (B, C_out, H/2, W/2)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride=1)
        self.conv2 = ConvBN(out_channels, out_channels, 3, stride=2)
        self.shortcut = ConvBN(in_channels, out_channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + self.shortcut(x))


def _up2() -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="nearest")


class DCFAM(nn.Module):
    """Dense connected feature aggregation over the four stage maps.

    Input: ``[x1, x2, x3, x4]`` with channels ``c1..c4`` at strides 4/8/16/32. Output: ``(out1, out2)`` at
    strides 4 (``c1`` channels) and 8 (``c2`` channels). One channel attention (``ca``) and one spatial
    attention (``pa``, on ``c3`` channels) are each applied twice with shared weights.
    """

    def __init__(self, channels: Sequence[int], atrous_rates: Sequence[int] = (6, 12)) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        r1, r2 = atrous_rates
        self.conv4 = Conv(c4, c4, 1)
        self.conv1 = Conv(c1, c1, 1)
        self.lf4 = nn.Sequential(
            SeparableConvBNAct(c4, c3, 3, dilation=r1),
            _up2(),
            SeparableConvBNAct(c3, c2, 3, dilation=r2),
            _up2(),
        )
        self.lf3 = nn.Sequential(
            SeparableConvBNAct(c3, c2, 3, dilation=r1),
            _up2(),
            SeparableConvBNAct(c2, c1, 3, dilation=r2),
            _up2(),
        )
        self.ca = SharedChannelAttention()
        self.pa = SharedSpatialAttention(c3)
        self.down12 = DownConnection(c1, c2)
        self.down231 = DownConnection(c2, c3)
        self.down232 = DownConnection(c2, c3)
        self.down34 = DownConnection(c3, c4)

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor, x4: Tensor) -> tuple[Tensor, Tensor]:
        out4 = self.conv4(x4) + self.down34(self.pa(self.down232(x2)))
        out3 = self.pa(x3) + self.down231(self.ca(self.down12(x1)))
        out2 = self.ca(x2) + self.lf4(out4)
        out1 = self.lf3(out3) + self.conv1(x1)
        return out1, out2


class DCFAMDecoder(nn.Module):
    """DCSwin's decoder: DCFAM, a stride-4 fusion head, bilinear upsampling to the input size.

    ``forward(features, output_size)``: ``features`` are 4 maps ``(B, c_i, H/s_i, W/s_i)`` at strides
    4/8/16/32 of a ``(B, 3, H, W)`` input with ``H, W`` multiples of 32; returns ``(B, K, H, W)`` logits.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        num_classes: int,
        dropout: float = 0.05,
        atrous_rates: Sequence[int] = (6, 12),
    ) -> None:
        super().__init__()
        if len(encoder_channels) != 4:
            raise ValueError(f"DCFAMDecoder needs 4 encoder stages, got channels {list(encoder_channels)}")
        c1, c2 = encoder_channels[0], encoder_channels[1]
        self.dcfam = DCFAM(encoder_channels, atrous_rates)
        self.up = nn.Sequential(ConvBNAct(c2, c1, 3), _up2())
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Sequential(ConvBNAct(c1, c1, 3), Conv(c1, num_classes, 1))

    def forward(self, features: Sequence[Tensor], output_size: tuple[int, int]) -> Tensor:
        out1, out2 = self.dcfam(*features)
        x = self.dropout(out1 + self.up(out2))
        x = self.head(x)
        # The reference upsamples with nn.UpsamplingBilinear2d, i.e. align_corners=True.
        return F.interpolate(x, size=output_size, mode="bilinear", align_corners=True)
