"""The Swin encoder of the paper's DCSwin / UNetFormer baselines (reference-spec §2.1), written from the spec.

Differences to timm's Swin that matter numerically: windows that do not divide the map are handled by
zero-padding bottom/right *before* the cyclic shift, and the shift mask is built on the padded size
(timm rolls first, then pads). Every stage output passes through its own LayerNorm (``norm{i}``) before it
is returned, as the paper's features are post-norm. Parameter names follow the Swin-for-segmentation
layout (``patch_embed``, ``layers.{i}.blocks.{j}``, ``layers.{i}.downsample``, ``norm{i}``) so that
checkpoints written by this class are easy to inspect; no pretrained weights exist for this shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ctseg.models.backbones.base import Backbone

# Added to attention logits between tokens of different regions of a shifted window; exp(-100) is 0 in fp32.
MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, W, C)`` with ``H, W`` multiples of ``window`` → ``(B * nW, window * window, C)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, window * window, C)`` → ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _region_ids(size: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    # After rolling by -shift, the last `window` rows hold two regions that were not adjacent in the image:
    # [0, size-window) | [size-window, size-shift) | [size-shift, size).
    idx = torch.arange(size, device=device)
    return (idx >= size - window).long() + (idx >= size - shift).long()


def shifted_window_mask(
    height: int, width: int, window: int, shift: int, device: torch.device | None = None
) -> torch.Tensor:
    """Additive attention mask of a shifted window layer on a (padded) map of ``height × width``.

    Both sizes must be multiples of ``window``. Returns ``(nW, window², window²)`` holding 0 for pairs of
    tokens from the same region of the rolled map and :data:`MASK_VALUE` (−100) for pairs across regions.
    """
    if height % window or width % window:
        raise ValueError(f"mask size {height}x{width} is not a multiple of the window {window}")
    rows = _region_ids(height, window, shift, device or torch.device("cpu"))
    cols = _region_ids(width, window, shift, rows.device)
    regions = (rows[:, None] * 3 + cols[None, :]).to(torch.float32)  # (H, W)
    regions = window_partition(regions[None, :, :, None], window).squeeze(-1)  # (nW, window²)
    same = regions[:, :, None] == regions[:, None, :]
    return torch.where(same, 0.0, MASK_VALUE)


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return bool(is_exporting and is_exporting())


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``window × window`` windows with a learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        coords = torch.stack(
            torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (
            window - 1
        )  # (N, N, 2) in [0, 2w-2]
        # Derived from the window size, so not part of checkpoints.
        self.register_buffer(
            "relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """``(heads, window², window²)`` bias added to every window's attention logits."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B·nW, N, C)`` with ``N = window²``; ``mask`` ``(nW, N, N)`` or None → ``(B·nW, N, C)``."""
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B·nW, heads, N, d)
        bias = self.relative_position_bias().to(q.dtype)[None]  # (1, heads, N, N)
        if mask is not None:
            nw = mask.shape[0]
            # Fold windows into the head axis, (B, nW·heads, N, d), so the per-window mask broadcasts over
            # the batch without being copied B times and the call stays 4-D (fused kernels on GPU).
            q, k, v = (t.reshape(bw // nw, nw * self.num_heads, n, -1) for t in (q, k, v))
            bias = (bias + mask[:, None].to(q.dtype)).reshape(1, nw * self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale = head_dim ** -0.5
        if _is_exporting():
            # torch.export's decomposition of SDPA yields other strides than traced, and the reshape below
            # then becomes an invalid view (ONNX export fails); a real copy avoids it. Not needed otherwise.
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.reshape(bw, self.num_heads, n, -1).transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One W-MSA (``shift == 0``) or SW-MSA block on tokens ``(B, H·W, C)`` of an ``H × W`` map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int = 7,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, window={window})")
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        ws = self.window
        return h + (-h) % ws, w + (-w) % ws

    def forward(self, x: torch.Tensor, h: int, w: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, H·W, C)``; ``mask`` from :func:`shifted_window_mask` on the padded size (shifted
        blocks; built here when not given) → ``(B, H·W, C)``."""
        b, n, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        hp, wp = self.padded_size(h, w)
        if self.shift and mask is None:
            mask = shifted_window_mask(hp, wp, self.window, self.shift, x.device)
        # Pad first, then roll: the padded zeros take part in the shift, as in the paper's encoder.
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window), mask if self.shift else None)
        x = window_reverse(windows, self.window, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, n, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbourhood concat → LayerNorm(4C) → Linear(4C → 2C, no bias): ``(B, H·W, C)`` → ``(B, H/2·W/2, 2C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))  # odd sizes: pad one row/column (never for 32-multiples)
        # Order (0,0), (1,0), (0,1), (1,1) fixes the layout of the 4C channels the Linear sees.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        h, w = x.shape[1], x.shape[2]
        return self.reduction(self.norm(x.view(b, h * w, 4 * c))), h, w


class SwinStage(nn.Module):
    """``depth`` blocks alternating W-MSA / SW-MSA (shift ``window // 2``), sharing one shift mask per call."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim, num_heads, window, 0 if i % 2 == 0 else self.shift, mlp_ratio, qkv_bias, drop_path[i]
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``(B, H·W, C)`` → ``(B, H·W, C)`` (the stage output, before any downsampling)."""
        hp, wp = self.blocks[0].padded_size(h, w)
        mask = (
            shifted_window_mask(hp, wp, self.window, self.shift, x.device) if len(self.blocks) > 1 else None
        )
        for block in self.blocks:
            x = block(x, h, w, mask)
        return x


class PatchEmbed(nn.Module):
    """Conv2d(k=s=patch) → LayerNorm: ``(B, 3, H, W)`` → tokens ``(B, H/p·W/p, C)`` and the grid size."""

    def __init__(self, in_chans: int, dim: int, patch: int, norm: bool) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        p = self.patch
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class SwinPaper(Backbone):
    """The paper's Swin encoder (§2.1): embed 64, depths 2-2-8-2, heads 2-4-8-16, window 7; 13.83 M params.

    ``x`` ``(B, 3, H, W)`` → ``[(B, 64, H/4, W/4), (B, 128, H/8, W/8), (B, 256, H/16, W/16), (B, 512, H/32, W/32)]``,
    each after its stage's LayerNorm. Random init (the paper's pretrained load matched no tensor).
    """

    def __init__(
        self,
        embed_dim: int = 64,
        depths: Sequence[int] = (2, 2, 8, 2),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.3,
        patch_size: int = 4,
        patch_norm: bool = True,
        in_chans: int = 3,
    ) -> None:
        if len(depths) != len(num_heads):
            raise ValueError(f"{len(depths)} depths but {len(num_heads)} head counts")
        dims = [embed_dim * 2**i for i in range(len(depths))]
        super().__init__(dims, [patch_size * 2**i for i in range(len(depths))])
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, patch_norm)
        # Stochastic depth grows linearly over all blocks of all stages (0 → drop_path_rate).
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            SwinStage(
                dims[i],
                depths[i],
                num_heads[i],
                window_size,
                mlp_ratio,
                qkv_bias,
                rates[starts[i] : starts[i] + depths[i]],
                downsample=i < len(depths) - 1,
            )
            for i in range(len(depths))
        )
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, h, w = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x, h, w)
            out = getattr(self, f"norm{i}")(x)
            outs.append(out.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x, h, w = stage.downsample(x, h, w)
        return outs


def _init_weights(m: nn.Module) -> None:
    # §2.1: Linear trunc-normal(0.02)/bias 0, LayerNorm 1/0; convs keep PyTorch's default init.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
