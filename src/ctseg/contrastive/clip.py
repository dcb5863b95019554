"""Contrastive-loss clip: how a loss above ``clip`` is bounded (registry of modes)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ctseg.utils.registry import Registry

ClipFn = Callable[[torch.Tensor, float], torch.Tensor]

CLIP_MODES: Registry[ClipFn] = Registry("CT clip_mode")


def register_clip(name: str) -> Callable[[ClipFn], ClipFn]:
    return CLIP_MODES.register(name)


@register_clip("clamp")
def clip_clamp(loss: torch.Tensor, clip: float) -> torch.Tensor:
    """The reference's ``torch.clip(loss, 0, clip)``: above the clip the value is ``clip`` and the
    gradient is exactly zero (CT switches itself off for that step)."""
    return torch.clamp(loss, 0.0, clip)


@register_clip("scale")
def clip_scale(loss: torch.Tensor, clip: float) -> torch.Tensor:
    """Value ``min(loss, clip)`` with the gradient kept (scaled by ``clip / loss`` above the clip)."""
    factor = clip / torch.clamp(loss.detach(), min=clip)
    return loss * factor


@register_clip("none")
def clip_none(loss: torch.Tensor, clip: float) -> torch.Tensor:
    return loss
