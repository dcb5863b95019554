"""Segmentation losses, registered by name (``seg_loss:`` in configs).

The paper-era recipe (reference-spec §3) is ``softce_dice``: soft cross-entropy with label smoothing
plus multiclass Dice, weights 1 and 1. The exact reductions matter for reproducing the recipe and are
documented per class; they are computed in fp32 even under autocast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctseg.errors import ConfigError
from ctseg.utils.registry import Registry

SegLossFactory = Callable[..., nn.Module]
_REGISTRY: Registry[SegLossFactory] = Registry("seg_loss")


def register_seg_loss(name: str) -> Callable[[SegLossFactory], SegLossFactory]:
    """Register ``factory(*, num_classes, ignore_index, smoothing) -> loss module`` as ``name``."""
    return _REGISTRY.register(name)


def list_seg_losses() -> list[str]:
    return _REGISTRY.names()


def create_seg_loss(name: str, *, num_classes: int, ignore_index: int, smoothing: float = 0.05) -> nn.Module:
    """Build a registered segmentation loss; ``loss(logits (B,K,H,W), target (B,H,W) long) -> scalar``."""
    factory = _REGISTRY[name]  # an unknown name is a ConfigError listing the known ones
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"seg_loss smoothing must be in [0, 1), got {smoothing}")
    return factory(num_classes=num_classes, ignore_index=ignore_index, smoothing=smoothing)


class SoftCrossEntropyLoss(nn.Module):
    """Label-smoothed cross-entropy, reduced as in the reference recipe.

    With ``lp = log_softmax(logits)``, per pixel ``nll = -lp[y]`` and ``smooth = -Σ_k lp_k``, both 0 where
    ``y == ignore_index``; ``loss = (1-ε)·mean(nll) + (ε/K)·mean(smooth)`` where the means run over *all*
    pixels, ignored ones included (so ignore pixels dilute the loss, as in the reference).
    """

    def __init__(self, num_classes: int, ignore_index: int, smoothing: float = 0.05) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.smoothing = smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        lp = F.log_softmax(logits.float(), dim=1)  # (B, K, H, W)
        valid = target != self.ignore_index  # (B, H, W)
        safe = torch.where(valid, target, torch.zeros_like(target))
        nll = -lp.gather(1, safe.unsqueeze(1)).squeeze(1)
        smooth = -lp.sum(dim=1)
        zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
        nll = torch.where(valid, nll, zero)
        smooth = torch.where(valid, smooth, zero)
        eps = self.smoothing
        return (1.0 - eps) * nll.mean() + (eps / self.num_classes) * smooth.mean()


class DiceLoss(nn.Module):
    """Multiclass soft Dice over the whole batch, as in the reference recipe.

    ``p = softmax(logits)``; ignored pixels get ``p = 0`` and one-hot 0. Per class c, summed over batch and
    pixels: ``dice_c = (2·Σ p·t + s) / max(Σ (p + t) + s, 1e-7)`` with ``s = smooth``; ``loss_c = 1 - dice_c``,
    set to 0 for classes absent from the batch's targets; result = mean over all K classes.
    """

    def __init__(self, num_classes: int, ignore_index: int, smooth: float = 0.05, eps: float = 1e-7) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.eps = eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        b, k = logits.shape[:2]
        p = F.softmax(logits.float(), dim=1).reshape(b, k, -1)  # (B, K, N)
        target = target.reshape(b, -1)  # (B, N)
        valid = (target != self.ignore_index).unsqueeze(1)  # (B, 1, N)
        safe = torch.where(valid.squeeze(1), target, torch.zeros_like(target))
        t = F.one_hot(safe, k).permute(0, 2, 1).to(p.dtype) * valid  # (B, K, N)
        p = p * valid
        inter = (p * t).sum(dim=(0, 2))
        card = (p + t).sum(dim=(0, 2))
        dice = (2.0 * inter + self.smooth) / (card + self.smooth).clamp_min(self.eps)
        present = t.sum(dim=(0, 2)) > 0
        return ((1.0 - dice) * present.to(dice.dtype)).mean()


class CrossEntropyLoss(nn.Module):
    """Plain cross-entropy averaged over valid pixels (0 when a batch has none)."""

    def __init__(self, num_classes: int, ignore_index: int, smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.smoothing = smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if not bool((target != self.ignore_index).any()):
            # cross_entropy would return NaN (0/0); keep the graph so backward still works.
            return logits.float().sum() * 0.0
        return F.cross_entropy(
            logits.float(), target, ignore_index=self.ignore_index, label_smoothing=self.smoothing
        )


class JointLoss(nn.Module):
    """Weighted sum of two losses."""

    def __init__(self, first: nn.Module, second: nn.Module, w1: float = 1.0, w2: float = 1.0) -> None:
        super().__init__()
        self.first, self.second, self.w1, self.w2 = first, second, w1, w2

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.w1 * self.first(logits, target) + self.w2 * self.second(logits, target)


@register_seg_loss("softce_dice")
def _softce_dice(num_classes: int, ignore_index: int, smoothing: float) -> nn.Module:
    # The reference uses the same 0.05 for SoftCE smoothing and the Dice smoothing constant.
    return JointLoss(
        SoftCrossEntropyLoss(num_classes, ignore_index, smoothing),
        DiceLoss(num_classes, ignore_index, smooth=0.05),
    )


@register_seg_loss("softce")
def _softce(num_classes: int, ignore_index: int, smoothing: float) -> nn.Module:
    return SoftCrossEntropyLoss(num_classes, ignore_index, smoothing)


@register_seg_loss("ce")
def _ce(num_classes: int, ignore_index: int, smoothing: float) -> nn.Module:
    # "plain" CE: the smoothing of the recipe is deliberately not applied.
    return CrossEntropyLoss(num_classes, ignore_index, 0.0)


@register_seg_loss("ce_dice")
def _ce_dice(num_classes: int, ignore_index: int, smoothing: float) -> nn.Module:
    return JointLoss(CrossEntropyLoss(num_classes, ignore_index, 0.0), DiceLoss(num_classes, ignore_index))


@register_seg_loss("dice")
def _dice(num_classes: int, ignore_index: int, smoothing: float) -> nn.Module:
    return DiceLoss(num_classes, ignore_index)
