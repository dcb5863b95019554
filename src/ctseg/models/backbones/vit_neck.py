"""A plain (single-scale) timm ViT as a 4-level :class:`Backbone`, via a simple feature pyramid.

The ViT's tokens live on one grid at stride 16 (other patch sizes, e.g. 14, are padded and resampled
onto it). Following the "simple feature pyramid" of ViTDet, the levels are made from that grid alone:
two stride-2 transposed convs (→ stride 4), one (→ 8), identity (→ 16) and a 2×2 max-pool (→ 32). Each level reads either its own block (four evenly spaced blocks,
default) or the last block. timm's ``forward_intermediates`` removes the class / register (prefix) tokens
and reshapes to NCHW; ``dynamic_img_size=True`` resamples the position embedding for any input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import ConfigError
from ctseg.models.backbones.base import STANDARD_STRIDES, Backbone, LayerNorm2d
from ctseg.models.backbones.timm_adapter import create_timm_model, is_weights_file, load_partial

VIT_STRIDE = 16  # the grid the pyramid is built from; other patch sizes are resampled onto it


def spaced_block_indices(depth: int, levels: int = 4) -> list[int]:
    """Indices of ``levels`` evenly spaced blocks ending with the last one (12 blocks → 2, 5, 8, 11)."""
    if depth < levels:
        raise ConfigError(
            f"a ViT with {depth} blocks cannot feed {levels} distinct levels; use levels='last'"
        )
    return [depth * (i + 1) // levels - 1 for i in range(levels)]


class SimpleFeaturePyramid(nn.Module):
    """Four ``(B, C, h, w)`` maps at stride 16 → ``(B, C/4, 4h, 4w)``, ``(B, C/2, 2h, 2w)``, ``(B, C, h, w)``,
    ``(B, C, h/2, w/2)``; with ``out_channels`` each level is then projected (1×1 conv + LayerNorm)."""

    def __init__(self, dim: int, out_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        if dim % 4:
            raise ConfigError(f"ViT width {dim} is not divisible by 4, needed by the ×4 up-sampling level")
        self.levels = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                ),
                nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, stride=2),
            ]
        )
        channels = [dim // 4, dim // 2, dim, dim]
        if out_channels is not None:
            if len(out_channels) != 4:
                raise ConfigError(f"out_channels needs 4 values, got {list(out_channels)}")
            self.proj: nn.ModuleList | None = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, o, 1, bias=False), LayerNorm2d(o))
                for c, o in zip(channels, out_channels)
            )
            channels = list(out_channels)
        else:
            self.proj = None
        self.out_channels = channels

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs = [level(f) for level, f in zip(self.levels, feats)]
        if self.proj is not None:
            outs = [p(o) for p, o in zip(self.proj, outs)]
        return [o.contiguous() for o in outs]  # LayerNorm2d hands out permuted views


class TimmViTBackbone(Backbone):
    """A plain timm ViT (``vit_*``, ``deit_*``, ``eva*`` …) with a simple feature pyramid.

    ``x`` ``(B, 3, H, W)`` with ``H, W`` multiples of 32 → maps at strides 4, 8, 16, 32 with channels
    ``[D/4, D/2, D, D]`` (``D`` = ViT width) or ``out_channels``. ``levels="spaced"`` feeds level ``i`` from
    block ``spaced_block_indices(depth)[i]``; ``"last"`` feeds all from the last block. ``norm`` applies the
    ViT's final norm to the taken tokens. ``partial=True`` with a weights file copies only the tensors
    that fit. Extra keyword arguments go to ``timm.create_model``.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool | str | Path = False,
        partial: bool = False,
        levels: Literal["spaced", "last"] = "spaced",
        out_channels: Sequence[int] | None = None,
        norm: bool = True,
        img_size: int | tuple[int, int] | None = None,
        **timm_kwargs: Any,
    ) -> None:
        if levels not in ("spaced", "last"):
            raise ConfigError(f"levels must be 'spaced' or 'last', got {levels!r}")
        kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
        if img_size is not None:
            kwargs["img_size"] = img_size
        kwargs.update(timm_kwargs)
        load_later = partial and is_weights_file(pretrained)
        vit = create_timm_model(model_name, False if load_later else pretrained, **kwargs)
        report = load_partial(vit, pretrained) if load_later else None
        if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "blocks"):
            raise ConfigError(f"timm:{model_name} is not a plain ViT with blocks and forward_intermediates")
        depth = len(vit.blocks)
        indices = spaced_block_indices(depth) if levels == "spaced" else [depth - 1]
        vit.prune_intermediate_layers(indices, prune_norm=not norm, prune_head=True)
        dim = int(vit.embed_dim)
        patch = vit.patch_embed.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if patch[0] != patch[1]:
            raise ConfigError(f"timm:{model_name}: non-square patches {patch} are not supported")
        neck = SimpleFeaturePyramid(dim, out_channels)
        super().__init__(neck.out_channels, list(STANDARD_STRIDES))
        self.model_name = model_name
        self.vit = vit
        self.neck = neck
        self.indices = indices
        self.norm = norm
        self.load_report = report
        self.patch = int(patch[0])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2] // VIT_STRIDE, x.shape[-1] // VIT_STRIDE
        if self.patch != VIT_STRIDE:
            # e.g. patch 14 (DINOv2, EVA-02): pad bottom/right so the patches tile the input.
            x = F.pad(x, (0, (-x.shape[-1]) % self.patch, 0, (-x.shape[-2]) % self.patch))
        feats = self.vit.forward_intermediates(
            x, indices=self.indices, norm=self.norm, output_fmt="NCHW", intermediates_only=True
        )  # prefix tokens dropped: each (B, D, ceil(H/p), ceil(W/p))
        if len(feats) == 1:
            feats = feats * 4
        if self.patch != VIT_STRIDE:
            # Resample the stride-p grid onto the stride-16 grid with cell centres aligned (a fixed scale
            # p/16, not the ratio of grid sizes, which the padding would skew), then drop the padding.
            scale = self.patch / VIT_STRIDE
            feats = [
                F.interpolate(f, scale_factor=scale, mode="bilinear", recompute_scale_factor=False)[
                    ..., :h, :w
                ]
                for f in feats
            ]
        return self.neck(feats)
