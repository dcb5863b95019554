"""The PoolFormer encoder of the paper's DCPoolFormer baseline (reference-spec §2.4), written from the spec.

The fork differs from official PoolFormer-S12: 8×8/stride-4 stem, 2×2/stride-2 downsampling, 8 blocks of
256 channels in stage 3, and an output GroupNorm on every stage. Parameter names follow the official
(sail-sg) checkpoint layout — ``patch_embed.proj``, ``network.{0,2,4,6}.{j}`` for blocks,
``network.{1,3,5}.proj`` for downsampling, ``norm{0,2,4,6}`` — so official S12 files load by name;
:func:`load_poolformer_s12` also accepts timm's ``poolformer_s12`` layout and copies the tensors whose
shapes fit (§2.4: 63 of this encoder's 156 tensors).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from timm.layers import trunc_normal_
from torch import nn

from ctseg.models.backbones.base import Backbone
from ctseg.models.weights import LoadReport, load_state_dict_report, read_state_dict

log = logging.getLogger(__name__)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group: normalises over ``(C, H, W)`` of each sample of ``(B, C, H, W)``."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(1, num_channels)


class Pooling(nn.Module):
    """Token mixer ``AvgPool(k, s1, p=k//2, count_include_pad=False)(x) − x`` on ``(B, C, H, W)``."""

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Subtracting x because the block adds the residual itself.
        return self.pool(x) - x


class ConvMlp(nn.Module):
    """1×1 conv ``C → hidden`` → GELU → 1×1 conv ``hidden → C`` on ``(B, C, H, W)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        for conv in (self.fc1, self.fc2):
            trunc_normal_(conv.weight, std=0.02)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PoolFormerBlock(nn.Module):
    """``x + ls1·Pool(GN(x))`` then ``x + ls2·Mlp(GN(x))``; LayerScale vectors of shape ``(C,)``."""

    def __init__(self, dim: int, pool_size: int, mlp_ratio: float, layer_scale_init: float) -> None:
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = Pooling(pool_size)
        self.norm2 = GroupNorm1(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """A strided conv used both as stem and as downsampling: ``(B, Cin, H, W)`` → ``(B, Cout, H', W')``."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PoolFormerPaper(Backbone):
    """The fork's PoolFormer (§2.4): layers 2-2-8-2, dims 64-128-256-512; 9.46 M params.

    ``x`` ``(B, 3, H, W)`` → ``[(B, 64, H/4, W/4), (B, 128, H/8, W/8), (B, 256, H/16, W/16), (B, 512, H/32, W/32)]``,
    each after its output GroupNorm(1, C). The defaults are the paper's; the arguments also describe
    official PoolFormer variants (S12: ``layers=(2,2,6,2), embed_dims=(64,128,320,512), in_patch_size=7,
    down_patch_size=3, down_pad=1``).
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        mlp_ratio: float = 4.0,
        pool_size: int = 3,
        in_patch_size: int = 8,
        in_stride: int = 4,
        in_pad: int = 2,
        down_patch_size: int = 2,
        down_stride: int = 2,
        down_pad: int = 0,
        layer_scale_init: float = 1e-5,
        in_chans: int = 3,
    ) -> None:
        if len(layers) != len(embed_dims):
            raise ValueError(f"{len(layers)} stage depths but {len(embed_dims)} widths")
        super().__init__(list(embed_dims), [in_stride * down_stride**i for i in range(len(layers))])
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], in_patch_size, in_stride, in_pad)
        network: list[nn.Module] = []
        for i, (depth, dim) in enumerate(zip(layers, embed_dims)):
            if i > 0:
                network.append(PatchEmbed(embed_dims[i - 1], dim, down_patch_size, down_stride, down_pad))
            network.append(
                nn.Sequential(
                    *(PoolFormerBlock(dim, pool_size, mlp_ratio, layer_scale_init) for _ in range(depth))
                )
            )
        self.network = nn.ModuleList(network)
        self.stage_indices = [2 * i for i in range(len(layers))]  # positions of the block stacks in `network`
        for i, dim in zip(self.stage_indices, embed_dims):
            self.add_module(f"norm{i}", GroupNorm1(dim))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        outs = []
        for i, module in enumerate(self.network):
            x = module(x)
            if i in self.stage_indices:
                outs.append(getattr(self, f"norm{i}")(x))
        return outs


# timm's MetaFormer names → the official (sail-sg) names used by PoolFormerPaper.
_TIMM_TO_SAIL: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^stem\.conv\."), "patch_embed.proj."),
    (re.compile(r"^head\.norm\."), "norm."),
    (re.compile(r"^head\.fc\."), "head."),
]
_TIMM_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample\.conv\.(.+)$")
_TIMM_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_TIMM_LAYER_SCALE = re.compile(r"^layer_scale(\d)\.scale$")


def timm_to_sail_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm ``poolformer_*`` state dict to the official layout (``network.{2i}.{j}`` …)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _TIMM_TO_SAIL:
            new = pattern.sub(repl, new)
        if m := _TIMM_DOWNSAMPLE.match(new):
            new = f"network.{2 * int(m[1]) - 1}.proj.{m[2]}"
        elif m := _TIMM_BLOCK.match(new):
            rest = _TIMM_LAYER_SCALE.sub(r"layer_scale_\1", m[3])
            new = f"network.{2 * int(m[1])}.{m[2]}.{rest}"
        out[new] = value
    return out


def is_timm_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("stem.conv.", "stages.")) for k in state_dict)


def load_poolformer_s12(
    module: PoolFormerPaper,
    weights: str | Path | Mapping[str, torch.Tensor],
    *,
    source: str | None = None,
    weights_only: bool = True,
) -> LoadReport:
    """Copy the shape-compatible tensors of an official PoolFormer-S12 checkpoint into ``module``.

    ``weights``: a file or state dict in the official layout (``network.0.0.norm1.weight`` …) or in timm's
    ``poolformer_s12`` layout (``stages.0.blocks.0.norm1.weight`` …). Tensors whose shape differs (stem
    and downsampling kernels, all of stage 3) stay randomly initialised; the returned report lists them
    and is logged. ``source`` names a state dict in messages.
    """
    state_dict, name = read_state_dict(weights, weights_only=weights_only)
    if is_timm_layout(state_dict):
        state_dict = timm_to_sail_keys(state_dict)
    report = load_state_dict_report(module, state_dict, strict=False, partial=True, source=source or name)
    log.info("PoolFormer-S12 initialisation: %s", report)
    return report
