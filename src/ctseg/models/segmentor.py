"""The segmentation network: pad to a multiple of 32, backbone, decoder, crop.

Padding contract (the CT loss relies on it): an input ``(B, 3, H, W)`` is padded at the bottom and
right to ``(Hp, Wp)``, the next multiples of ``pad_multiple`` (32). Logits are cropped back to
``(H, W)``. The returned ``features`` refer to the *padded* image: patch ``(i, j)`` of a stride-``p``
map covers pixels ``[i·p, (i+1)·p) x [j·p, (j+1)·p)`` of the padded image, so a patch on the bottom or
right edge may contain padding; :class:`ctseg.contrastive.PatchContrastiveLoss` pads the mask with the
ignore index to ``(Hp, Wp)`` to match.

Padding mode: ``"reflect"`` by default (the border context looks like image content, not like a black
frame), ``"constant"`` (zeros = the dataset mean after normalisation) or ``"replicate"``. Reflection
needs ``pad < size``; inputs smaller than the padding they need are padded by repeated reflection.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ctseg.models.decoders.blocks import reflect_pad

PAD_MODES = ("reflect", "constant", "replicate")


def pad_to_multiple(x: Tensor, multiple: int, mode: str = "reflect") -> Tensor:
    """Pad ``(B, C, H, W)`` bottom/right to the next multiples of ``multiple`` (no-op when already there)."""
    h, w = x.shape[-2], x.shape[-1]
    pad_h, pad_w = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
    if mode == "reflect":
        return reflect_pad(x, pad_w, pad_h)
    if mode == "constant":
        return F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=0.0)
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


class SegmentationModel(nn.Module):
    """``backbone`` (4 stages, strides 4/8/16/32) + ``decoder`` -> per-pixel class logits.

    ``model(x)`` maps ``(B, 3, H, W)`` to ``(B, K, H, W)`` for any ``H, W``;
    ``model(x, return_features=True)`` returns ``(logits, features)`` with the 4 backbone maps
    ``(B, C_s, Hp/s, Wp/s)`` of the padded input (see the module docstring). A model created with CT has
    a ``ct_loss`` submodule (the projection heads); :meth:`for_inference` drops it.

    Attributes:
        feature_channels: channels of the 4 feature maps, e.g. ``[64, 128, 256, 512]``.
        feature_strides: their strides, ``[4, 8, 16, 32]``.
        num_classes: ``K``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decoder: nn.Module,
        num_classes: int,
        pad_multiple: int = 32,
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        strides = list(backbone.strides)
        if pad_multiple % max(strides):
            raise ValueError(
                f"pad_multiple {pad_multiple} is not a multiple of the largest stride {max(strides)}"
            )
        self.backbone = backbone
        self.decoder = decoder
        self.num_classes = int(num_classes)
        self.pad_multiple = int(pad_multiple)
        self.pad_mode = pad_mode
        self.feature_channels: list[int] = list(backbone.out_channels)
        self.feature_strides: list[int] = strides

    def forward(
        self, x: Tensor, return_features: bool = False, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, ...]:
        """``(B, 3, H, W)`` -> logits ``(B, K, H, W)``.

        With ``return_features``: ``(logits, features)``. With ``return_aux`` (decoders built with an
        auxiliary head): ``(logits, aux_logits)`` or ``(logits, features, aux_logits)``.
        """
        if return_aux and getattr(self.decoder, "aux_head", None) is None:
            raise ValueError(
                f"return_aux=True needs a decoder with an auxiliary head; {type(self.decoder).__name__} "
                "has none (UNetFormer: decoder_kwargs={'aux_head': True})"
            )
        h, w = x.shape[-2], x.shape[-1]
        padded = pad_to_multiple(x, self.pad_multiple, self.pad_mode)
        features = list(self.backbone(padded))
        size = (padded.shape[-2], padded.shape[-1])
        if return_aux:
            logits, aux = self.decoder(features, size, return_aux=True)
            aux = aux[:, :, :h, :w]
        else:
            logits = self.decoder(features, size)
        logits = logits[:, :, :h, :w]
        out: tuple[Any, ...] = (logits,)
        if return_features:
            out += (features,)
        if return_aux:
            out += (aux,)
        return out if len(out) > 1 else logits

    def for_inference(self) -> SegmentationModel:
        """A copy without the CT heads, in eval mode: same weights, ``state_dict`` without ``ct_loss.*``."""
        ct_loss = self._modules.pop("ct_loss", None)
        try:
            clone = copy.deepcopy(self)
        finally:
            if ct_loss is not None:
                self._modules["ct_loss"] = ct_loss
        return clone.eval()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feature_channels={self.feature_channels}, "
            f"pad_multiple={self.pad_multiple}, pad_mode={self.pad_mode!r}"
        )
