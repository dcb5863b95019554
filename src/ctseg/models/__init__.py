"""Segmentation models: a registry of presets, backbones, decoders, export.

Usage::

    import ctseg.models

    model = ctseg.models.create("dcpoolformer-paper", num_classes=6)
    logits = model(x)                                   # (B, 6, H, W) for any (B, 3, H, W)
    logits, features = model(x, return_features=True)   # 4 NCHW maps, strides 4/8/16/32 (padded input)
    ctseg.models.list_models()                          # {name: description}

    model = ctseg.models.create("dcswin-paper", num_classes=6, ct={"ignore_index": 6})  # model.ct_loss
    deployable = model.for_inference()                  # eval mode, no CT heads

See docs/models.md.
"""

from ctseg.models.registry import (
    ModelEntry,
    build_model,
    create,
    list_models,
    register_family,
    register_model,
)
from ctseg.models.segmentor import SegmentationModel, pad_to_multiple

__all__ = [
    "ModelEntry",
    "SegmentationModel",
    "build_model",
    "create",
    "list_models",
    "pad_to_multiple",
    "register_family",
    "register_model",
]
