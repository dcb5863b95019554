"""Segmentation decoders over 4-stage feature pyramids (strides 4/8/16/32).

Every decoder is built as ``cls(encoder_channels, num_classes, **options)`` and called as
``decoder(features, output_size) -> (B, K, H, W)`` logits, where ``features`` are the backbone's four
NCHW maps of a ``(B, 3, H, W)`` input with ``H, W`` multiples of 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ctseg.models.decoders.dcfam import DCFAMDecoder
from ctseg.models.decoders.unetformer import UNetFormerDecoder
from ctseg.utils.registry import Registry

DECODERS: Registry[type[nn.Module]] = Registry("decoder")
DECODERS.add("dcfam", DCFAMDecoder)
DECODERS.add("unetformer", UNetFormerDecoder)


def create_decoder(name: str, encoder_channels: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    """Build the decoder registered as ``name`` for the given encoder channels."""
    cls = DECODERS[name]  # an unknown name is a ConfigError listing the known ones
    return cls(list(encoder_channels), num_classes, **options)


__all__ = ["DECODERS", "DCFAMDecoder", "UNetFormerDecoder", "create_decoder"]
