"""Encoders: ``create_backbone(name)`` → a :class:`Backbone` returning 4 NCHW maps at strides 4, 8, 16, 32.

Names: ``"swin-paper"`` and ``"poolformer-paper"`` (the paper's encoders, §2.1/§2.4 of the reference
spec), and ``"timm:<timm model name>"`` for any hierarchical timm model (``features_only``) or plain ViT
(simple feature pyramid). New names are added with :func:`register_backbone`.

``pretrained``: ``False`` (random init), ``True`` (the published weights: timm's pretrained tag from the
Hugging Face cache; for ``poolformer-paper`` the official PoolFormer-S12 tensors that fit), or a path to a
local weights file. Files load strictly (every key and shape must fit, else ``CheckpointError``) unless
``partial=True``, which copies what fits; ``poolformer-paper`` always loads partially, since the official
S12 weights fit only 63 of its 156 tensors. What ctseg's loader copied is kept in ``backbone.load_report``.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
from timm.models import is_model_in_modules

from ctseg.errors import ConfigError
from ctseg.models.backbones.base import STANDARD_STRIDES, Backbone, LayerNorm2d
from ctseg.models.backbones.poolformer_paper import PoolFormerPaper, load_poolformer_s12
from ctseg.models.backbones.swin_paper import SwinPaper
from ctseg.models.backbones.timm_adapter import TimmBackbone, create_timm_model, is_swin_like
from ctseg.models.backbones.vit_neck import TimmViTBackbone
from ctseg.models.weights import LoadReport, load_state_dict_report
from ctseg.utils.registry import Registry

__all__ = [
    "STANDARD_STRIDES",
    "Backbone",
    "LayerNorm2d",
    "PoolFormerPaper",
    "SwinPaper",
    "TimmBackbone",
    "TimmViTBackbone",
    "create_backbone",
    "is_plain_vit",
    "is_swin_like",
    "list_backbones",
    "register_backbone",
]

Pretrained = bool | str | Path
BackboneFactory = Callable[..., Backbone]

TIMM_PREFIX = "timm:"
#: timm modules whose models are single-scale ViTs; they go through the simple feature pyramid.
#: (BEiT is left out: it cannot take dynamic input sizes.)
PLAIN_VIT_MODULES: tuple[str, ...] = ("vision_transformer", "deit", "eva", "vision_transformer_relpos")
#: timm name of the official PoolFormer-S12 weights (sail-sg release) used by ``poolformer-paper``.
POOLFORMER_S12_TIMM = "poolformer_s12.sail_in1k"

_REGISTRY: Registry[BackboneFactory] = Registry("backbone", hint=f", or '{TIMM_PREFIX}<timm model name>'")


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register ``factory(pretrained=..., partial=..., **kwargs) -> Backbone`` under ``name``."""
    if name.startswith(TIMM_PREFIX):  # that namespace is timm's: create_backbone never looks it up here
        raise ValueError(f"backbone name {name!r} is taken: {TIMM_PREFIX!r} names are timm models")
    return _REGISTRY.register(name)


def list_backbones(pattern: str = "*", include_timm: bool = False) -> list[str]:
    """Registered names matching the shell ``pattern``; with ``include_timm`` also ``timm:<name>`` for
    every timm architecture."""
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
    if include_timm:
        names += [n for n in (TIMM_PREFIX + m for m in timm.list_models()) if fnmatch.fnmatch(n, pattern)]
    return names


def is_plain_vit(model_name: str) -> bool:
    return bool(is_model_in_modules(model_name, PLAIN_VIT_MODULES))


def create_backbone(
    name: str, pretrained: Pretrained = False, *, partial: bool = False, **kwargs: Any
) -> Backbone:
    """Build the encoder ``name`` (see the module docstring); ``kwargs`` go to its constructor."""
    if name.startswith(TIMM_PREFIX):
        model_name = name[len(TIMM_PREFIX) :]
        if not timm.is_model(model_name):
            raise ConfigError(
                f"unknown backbone {name!r}: timm {timm.__version__} has no model {model_name!r} "
                "(see timm.list_models('pattern*'))"
            )
        cls = TimmViTBackbone if is_plain_vit(model_name) else TimmBackbone
        return cls(model_name, pretrained=pretrained, partial=partial, **kwargs)
    factory = _REGISTRY[name]  # an unknown name is a ConfigError listing the known ones and timm:
    return factory(pretrained=pretrained, partial=partial, **kwargs)


def _check_kwargs(name: str, cls: type, kwargs: dict[str, Any]) -> None:
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"backbone {name!r}: {exc}") from exc


@register_backbone("swin-paper")
def _swin_paper(pretrained: Pretrained = False, partial: bool = False, **kwargs: Any) -> Backbone:
    _check_kwargs("swin-paper", SwinPaper, kwargs)
    if pretrained is True:
        raise ConfigError(
            "swin-paper has no published weights (the paper trained it from random init: its pretrained "
            "load matched 0 tensors). Pass a file saved from this encoder (pretrained='path'), or use "
            "'timm:swin_tiny_patch4_window7_224' for an ImageNet-pretrained standard Swin"
        )
    model = SwinPaper(**kwargs)
    if pretrained:
        model.load_report = load_state_dict_report(model, pretrained, strict=not partial, partial=partial)
    return model


@register_backbone("poolformer-paper")
def _poolformer_paper(pretrained: Pretrained = False, partial: bool = True, **kwargs: Any) -> Backbone:
    del partial  # always partial: the official S12 weights fit only part of this encoder (§2.4)
    _check_kwargs("poolformer-paper", PoolFormerPaper, kwargs)
    model = PoolFormerPaper(**kwargs)
    report: LoadReport | None = None
    if pretrained is True:
        # Official S12 weights via timm (HF cache or a clear error), then the fork's tensor mapping.
        s12 = create_timm_model(POOLFORMER_S12_TIMM, pretrained=True)
        report = load_poolformer_s12(model, s12.state_dict(), source=f"timm:{POOLFORMER_S12_TIMM}")
    elif pretrained:
        report = load_poolformer_s12(model, pretrained)
    model.load_report = report
    return model
