"""Segmentation decoders over 4-stage feature pyramids (strides 4/8/16/32).

Every decoder is built as ``cls(encoder_channels, num_classes, **options)`` and called as
``decoder(features, output_size) -> (B, K, H, W)`` logits, where ``features`` are the backbone's four
NCHW maps of a ``(B, 3, H, W)`` input with ``H, W`` multiples of 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ctseg.errors import ConfigError
from ctseg.models.decoders.dcfam import DCFAMDecoder
from ctseg.models.decoders.unetformer import UNetFormerDecoder

DECODERS: dict[str, type[nn.Module]] = {
    "dcfam": DCFAMDecoder,
    "unetformer": UNetFormerDecoder,
}


def create_decoder(name: str, encoder_channels: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    """Build the decoder registered as ``name`` for the given encoder channels."""
    try:
        cls = DECODERS[name]
    except KeyError:
        raise ConfigError(f"unknown decoder {name!r}; known: {', '.join(sorted(DECODERS))}") from None
    return cls(list(encoder_channels), num_classes, **options)


__all__ = ["DECODERS", "DCFAMDecoder", "UNetFormerDecoder", "create_decoder"]
