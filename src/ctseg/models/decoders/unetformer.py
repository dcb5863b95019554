"""The UNetFormer decoder: global-local transformer blocks, weighted fusion, feature refinement head.

Written from reference-spec §2.3 (Wang et al., "UNetFormer: A UNet-like transformer for efficient
semantic segmentation of remote sensing urban scene imagery", as used by the CT paper). With decode
channels 64 and 6 classes it has 0.51 M parameters. ReLU6 throughout.

The optional auxiliary head of the original UNetFormer (off by default; the CT paper's fork removed it)
classifies the sum of the three decoder stages at stride 8; ``forward(..., return_aux=True)`` returns
its logits beside the main ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctseg.models.decoders.blocks import Conv, ConvBN, ConvBNAct, SeparableConvBN, reflect_pad


class GlobalLocalAttention(nn.Module):
    """Window self-attention (global branch) plus two convolutions (local branch).

    ``(B, C, H, W) -> (B, C, H, W)``; the map is reflect-padded to a multiple of ``window_size`` for the
    attention and cropped back. Relative position bias per head, as in Swin.
    """

    def __init__(self, dim: int = 64, num_heads: int = 8, window_size: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.local3 = ConvBN(dim, dim, 3)
        self.local1 = ConvBN(dim, dim, 1)
        self.qkv = Conv(dim, 3 * dim, 1)
        self.proj = SeparableConvBN(dim, dim, window_size)
        # Vertical / horizontal smoothing of the attention map across window borders.
        self.pool_h = nn.AvgPool2d((window_size, 1), stride=1, padding=(window_size // 2 - 1, 0))
        self.pool_w = nn.AvgPool2d((1, window_size), stride=1, padding=(0, window_size // 2 - 1))

        span = 2 * window_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(span * span, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(
            torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        ).flatten(1)  # (2, ws*ws)
        rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)  # (2, ws*ws, ws*ws)
        self.register_buffer("relative_position_index", rel[0] * span + rel[1], persistent=False)

    def _window_attention(self, x: Tensor) -> Tensor:
        """``(B, C, Hp, Wp)`` with ``Hp, Wp`` multiples of the window -> same shape."""
        b, c, hp, wp = x.shape
        ws, heads = self.window_size, self.num_heads
        d = c // heads
        hh, ww = hp // ws, wp // ws
        qkv = self.qkv(x).view(b, 3, heads, d, hh, ws, ww, ws)
        qkv = qkv.permute(1, 0, 4, 6, 2, 5, 7, 3).reshape(3, b * hh * ww, heads, ws * ws, d)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B * windows, heads, ws*ws, d)
        bias = self.relative_position_bias_table[self.relative_position_index]  # (ws², ws², heads)
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias.permute(2, 0, 1).unsqueeze(0)
        out = attn.softmax(dim=-1) @ v
        out = out.view(b, hh, ww, heads, ws, ws, d).permute(0, 3, 6, 1, 4, 2, 5)
        return out.reshape(b, c, hp, wp)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        local = self.local1(x) + self.local3(x)
        ws = self.window_size
        padded = reflect_pad(x, (ws - w % ws) % ws, (ws - h % ws) % ws)
        attn = self._window_attention(padded)[:, :, :h, :w]
        out = self.pool_h(reflect_pad(attn, 0, 1)) + self.pool_w(reflect_pad(attn, 1, 0)) + local
        return self.proj(reflect_pad(out, 1, 1))[:, :, :h, :w]


class Mlp(nn.Sequential):
    """1x1 conv ``C -> hidden`` (bias), ReLU6, 1x1 conv ``hidden -> C`` (bias)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Conv2d(dim, hidden, 1), nn.ReLU6(), nn.Conv2d(hidden, dim, 1))


class TransformerBlock(nn.Module):
    """``x + GLA(BN(x))`` then ``x + Mlp(BN(x))``; ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(
        self, dim: int = 64, num_heads: int = 8, window_size: int = 8, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = GlobalLocalAttention(dim, num_heads, window_size)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class WeightedFusion(nn.Module):
    """Upsample the decoder map ×2 and blend it with a projected skip map by two learnt, normalised weights.

    ``x (B, D, h, w)``, ``skip (B, C_skip, 2h, 2w)`` -> ``(B, D, 2h, 2w)``.
    """

    def __init__(self, skip_channels: int, decode_channels: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.skip_proj = Conv(skip_channels, decode_channels, 1)
        self.weights = nn.Parameter(torch.ones(2))
        self.eps = eps
        self.post = ConvBNAct(decode_channels, decode_channels, 3, act=nn.ReLU6)

    def fuse(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        w = F.relu(self.weights)
        w = w / (w.sum() + self.eps)
        return self.post(w[0] * self.skip_proj(skip) + w[1] * x)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.fuse(x, skip)


class FeatureRefinementHead(WeightedFusion):
    """Weighted fusion with the stride-4 map, then spatial and channel gating and a residual projection."""

    def __init__(self, skip_channels: int, decode_channels: int, reduction: int = 16) -> None:
        super().__init__(skip_channels, decode_channels)
        d = decode_channels
        self.spatial_gate = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, groups=d), nn.Sigmoid())
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            Conv(d, max(d // reduction, 1), 1),
            nn.ReLU6(),
            Conv(max(d // reduction, 1), d, 1),
            nn.Sigmoid(),
        )
        self.shortcut = ConvBN(d, d, 1)
        self.proj = SeparableConvBN(d, d, 3)
        self.act = nn.ReLU6()

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.fuse(x, skip)
        gated = self.spatial_gate(x) * x + self.channel_gate(x) * x
        return self.act(self.proj(gated) + self.shortcut(x))


class ClassifierHead(nn.Sequential):
    """3x3 ConvBNReLU6 -> dropout -> 1x1 conv to ``num_classes``, at the input map's resolution."""

    def __init__(self, channels: int, num_classes: int, dropout: float, dropout2d: bool = True) -> None:
        super().__init__(
            ConvBNAct(channels, channels, 3, act=nn.ReLU6),
            nn.Dropout2d(dropout) if dropout2d else nn.Dropout(dropout),
            Conv(channels, num_classes, 1),
        )


class UNetFormerDecoder(nn.Module):
    """UNetFormer's decoder over four stage maps at strides 4/8/16/32.

    ``forward(features, output_size)``: ``features`` are ``(B, c_i, H/s_i, W/s_i)``; returns ``(B, K, H, W)``
    logits (bilinear, ``align_corners=False``), or ``(logits, aux_logits)`` with ``return_aux=True`` when
    built with ``aux_head=True``.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        num_classes: int,
        decode_channels: int = 64,
        dropout: float = 0.05,
        window_size: int = 8,
        num_heads: int = 8,
        aux_head: bool = False,
    ) -> None:
        super().__init__()
        if len(encoder_channels) != 4:
            raise ValueError(
                f"UNetFormerDecoder needs 4 encoder stages, got channels {list(encoder_channels)}"
            )
        c1, c2, c3, c4 = encoder_channels
        d = decode_channels
        self.pre_conv = ConvBN(c4, d, 1)
        self.block4 = TransformerBlock(d, num_heads, window_size)
        self.fuse3 = WeightedFusion(c3, d)
        self.block3 = TransformerBlock(d, num_heads, window_size)
        self.fuse2 = WeightedFusion(c2, d)
        self.block2 = TransformerBlock(d, num_heads, window_size)
        self.refine1 = FeatureRefinementHead(c1, d)
        self.head = ClassifierHead(d, num_classes, dropout)
        self.aux_head = ClassifierHead(d, num_classes, 0.1, dropout2d=False) if aux_head else None

    def forward(
        self, features: Sequence[Tensor], output_size: tuple[int, int], return_aux: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        res1, res2, res3, res4 = features
        x4 = self.block4(self.pre_conv(res4))  # stride 32
        x3 = self.block3(self.fuse3(x4, res3))  # stride 16
        x2 = self.block2(self.fuse2(x3, res2))  # stride 8
        x = self.refine1(x2, res1)  # stride 4
        logits = F.interpolate(self.head(x), size=output_size, mode="bilinear", align_corners=False)
        if not return_aux:
            return logits
        if self.aux_head is None:
            raise RuntimeError("return_aux=True needs a decoder built with aux_head=True")
        stride8 = (
            F.interpolate(x4, scale_factor=4.0, mode="bilinear", align_corners=True)
            + F.interpolate(x3, scale_factor=2.0, mode="bilinear", align_corners=True)
            + x2
        )
        aux = F.interpolate(self.aux_head(stride8), size=output_size, mode="bilinear", align_corners=False)
        return logits, aux
