"""The model registry: named presets, generic ``<decoder>-<timm name>`` forms, and :func:`create`.

A preset is a factory ``f(num_classes, *, pretrained, **options) -> SegmentationModel`` registered with
:func:`register_model`. A *family* (``dcfam-``, ``unetformer-``) turns any timm model name into a model:
``dcfam-convnext_tiny`` = backbone ``timm:convnext_tiny`` + the DCFAM decoder.

:func:`create` adds what every model shares: backbone weights (``pretrained``, ``partial``),
whole-model weights (``weights``), and the CT heads (``ct``).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctseg.errors import ConfigError
from ctseg.models.decoders import create_decoder
from ctseg.models.segmentor import SegmentationModel
from ctseg.utils.registry import Registry

if TYPE_CHECKING:
    from ctseg.models.backbones import Backbone

Pretrained = bool | str | Path
ModelFactory = Callable[..., SegmentationModel]


@dataclass(frozen=True)
class ModelEntry:
    """A registered preset (``family=False``) or a family prefix taking a timm name (``family=True``)."""

    name: str
    description: str
    factory: ModelFactory
    family: bool = False

    @property
    def display_name(self) -> str:
        return f"{self.name}<timm name>" if self.family else self.name


# The entries carry the description (``list_models``) and the family flag beside the factory.
_MODELS: Registry[ModelEntry] = Registry("model")
_FAMILIES: Registry[ModelEntry] = Registry("model family")


def register_model(name: str, description: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(num_classes, *, pretrained=False, **options) -> SegmentationModel`` as ``name``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        # A preset may start with a family prefix ("unetformer-paper"): presets are resolved first.
        _MODELS.add(name, ModelEntry(name, description, factory))
        return factory

    return deco


def register_family(prefix: str, description: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(timm_name, num_classes, *, pretrained=False, **options)`` for ``<prefix><timm name>``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        _FAMILIES.add(prefix, ModelEntry(prefix, description, factory, family=True))
        return factory

    return deco


def list_models(pattern: str = "*") -> dict[str, str]:
    """``{name: one-line description}`` of the presets (in registration order) and families.

    Families are listed as ``"dcfam-<timm name>"``. ``pattern`` is a shell pattern (``"dc*"``).
    """
    entries = [*_MODELS.values(), *_FAMILIES.values()]
    return {e.display_name: e.description for e in entries if fnmatch.fnmatch(e.display_name, pattern)}


def _resolve(name: str) -> tuple[ModelEntry, tuple[Any, ...]]:
    if name in _MODELS:
        return _MODELS[name], ()
    for prefix, entry in _FAMILIES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            timm_name = name[len(prefix) :]
            _check_timm_name(name, timm_name)
            return entry, (timm_name,)
    candidates = [*_MODELS, *(f"{p}<timm name>" for p in _FAMILIES)]
    close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown model {name!r}{hint} (known: {', '.join(candidates)})")


def _check_timm_name(name: str, timm_name: str) -> None:
    import timm

    if timm.is_model(timm_name):
        return
    base = timm_name.split(".", 1)[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close timm names: {', '.join(close)}" if close else ""
    raise ConfigError(f"unknown model {name!r}: timm {timm.__version__} has no model {timm_name!r}{hint}")


def _attach_ct(model: SegmentationModel, num_classes: int, ct: Mapping[str, Any]) -> None:
    # Imported here: building a model for inference must not need the contrastive package.
    from ctseg.contrastive import PatchContrastiveLoss

    try:
        model.ct_loss = PatchContrastiveLoss(
            in_channels=model.feature_channels, num_classes=num_classes, **dict(ct)
        )
    except TypeError as exc:
        raise ConfigError(f"ct: invalid CT loss options {dict(ct)}: {exc}") from exc


def _is_ct_key(key: str) -> bool:
    return key.startswith("ct_loss.") or ".ct_loss." in key


def _load_whole_model(model: SegmentationModel, weights: str | Path, partial: bool) -> None:
    """Load ``weights`` strictly; CT heads load only when both the model and the checkpoint have them.

    A CT-trained checkpoint into a model without CT: its heads are training-only (``for_inference``
    drops them) and are set aside. A checkpoint without heads into a CT model: the heads keep their
    fresh initialisation. Every other key must fit (unless ``partial``).
    """
    from ctseg.models.weights import load_state_dict_report, read_state_dict

    state, source = read_state_dict(weights)
    ckpt_has_ct = any(_is_ct_key(k) for k in state)
    if ckpt_has_ct and not hasattr(model, "ct_loss"):
        state = {k: v for k, v in state.items() if not _is_ct_key(k)}
    heads = None if ckpt_has_ct else model._modules.pop("ct_loss", None)
    try:
        report = load_state_dict_report(model, state, strict=True, partial=partial, source=source)
    finally:
        if heads is not None:
            model._modules["ct_loss"] = heads
    model.load_report = report


def create(
    name: str,
    num_classes: int,
    *,
    pretrained: Pretrained = False,
    partial: bool = False,
    weights: str | Path | None = None,
    ct: Mapping[str, Any] | None = None,
    **options: Any,
) -> SegmentationModel:
    """Build the registered model ``name`` with ``num_classes`` output classes.

    Args:
        name: a preset (``list_models()``) or ``dcfam-<timm name>`` / ``unetformer-<timm name>``.
        num_classes: ``K`` of the ``(B, K, H, W)`` logits.
        pretrained: backbone weights: ``False`` (random init), ``True`` (the published weights, from the
            Hugging Face cache for timm backbones) or a path to an encoder weights file.
        partial: with a path in ``pretrained`` or ``weights``, copy only the tensors whose name and shape
            fit (the rest is reported in ``load_report``) instead of failing.
        weights: a whole-model checkpoint (ctseg/Lightning ``.ckpt``, ``state_dict`` file), loaded
            strictly through :func:`ctseg.models.weights.load_state_dict_report`; the report is kept in
            ``model.load_report``.
        ct: ``None`` (no CT), or the keyword arguments of
            :class:`ctseg.contrastive.PatchContrastiveLoss`, attached as ``model.ct_loss``.
        options: preset options (``decoder_kwargs``, ``backbone_kwargs``, ``pad_mode``, ...).

    Raises:
        ConfigError: unknown name (with close matches) or invalid options.
        CheckpointError: weights that cannot be read or do not fit.
    """
    entry, args = _resolve(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}")
    try:
        inspect.signature(entry.factory).bind(
            *args, num_classes, pretrained=pretrained, partial=partial, **options
        )
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: {exc}") from exc
    model = entry.factory(*args, num_classes, pretrained=pretrained, partial=partial, **options)
    if ct is not None:
        _attach_ct(model, num_classes, ct)
    if weights is not None:
        _load_whole_model(model, weights, partial)
    return model


# --------------------------------------------------------------------------------------------------
# Building blocks of the presets


def build_backbone(name: str, pretrained: Pretrained, partial: bool, **kwargs: Any) -> Backbone:
    """The encoder ``name``; the backbones load their own weights (incl. ``partial`` and S12 key mapping)."""
    from ctseg.models.backbones import create_backbone

    return create_backbone(name, pretrained=pretrained, partial=partial, **kwargs)


def build_model(
    backbone: str,
    decoder: str,
    num_classes: int,
    *,
    pretrained: Pretrained = False,
    partial: bool = False,
    backbone_kwargs: Mapping[str, Any] | None = None,
    decoder_kwargs: Mapping[str, Any] | None = None,
    decoder_defaults: Mapping[str, Any] | None = None,
    pad_mode: str = "reflect",
) -> SegmentationModel:
    """Backbone ``backbone`` + decoder ``decoder`` (defaults overridden by ``decoder_kwargs``)."""
    bb = build_backbone(backbone, pretrained, partial, **dict(backbone_kwargs or {}))
    dec_options = {**dict(decoder_defaults or {}), **dict(decoder_kwargs or {})}
    try:
        dec = create_decoder(decoder, bb.out_channels, num_classes, **dec_options)
    except TypeError as exc:
        raise ConfigError(f"decoder {decoder!r}: {exc}") from exc
    try:
        return SegmentationModel(bb, dec, num_classes, pad_mode=pad_mode)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


# Decoder settings of the paper-era configs (reference-spec §2.2, §2.3) and of upstream GeoSeg (§2.5).
DCFAM_PAPER = {"dropout": 0.05, "atrous_rates": (6, 12)}
UNETFORMER_PAPER = {"decode_channels": 64, "dropout": 0.05, "window_size": 8}
UNETFORMER_GEOSEG = {"decode_channels": 64, "dropout": 0.1, "window_size": 8, "aux_head": False}


def _preset(backbone: str, decoder: str, defaults: Mapping[str, Any]) -> ModelFactory:
    def factory(num_classes: int, **options: Any) -> SegmentationModel:
        return build_model(backbone, decoder, num_classes, decoder_defaults=defaults, **options)

    # A real signature, so that create() can reject unknown options before building anything.
    factory.__signature__ = inspect.signature(build_model).replace(  # type: ignore[attr-defined]
        parameters=[
            p
            for n, p in inspect.signature(build_model).parameters.items()
            if n not in ("backbone", "decoder", "decoder_defaults")
        ]
    )
    return factory


_PRESETS: list[tuple[str, str, str, Mapping[str, Any], str]] = [
    # name, backbone, decoder, decoder defaults, description
    ("dcswin-paper", "swin-paper", "dcfam", DCFAM_PAPER,
     "CT paper's DCSwin: Swin 64-d [2,2,8,2] encoder (random init) + DCFAM decoder, 21.9 M params"),
    ("unetformer-paper", "swin-paper", "unetformer", UNETFORMER_PAPER,
     "CT paper's UNetFormer: Swin 64-d [2,2,8,2] encoder + UNetFormer decoder (64 ch, no aux), 14.3 M"),
    ("dcpoolformer-paper", "poolformer-paper", "dcfam", DCFAM_PAPER,
     "CT paper's DCPoolFormer: PoolFormer [2,2,8,2] 64-512 encoder + DCFAM decoder, 17.5 M params"),
    ("dcswin-tiny", "timm:swin_tiny_patch4_window7_224", "dcfam", DCFAM_PAPER,
     "GeoSeg DCSwin with timm Swin-T (96-d, [2,2,6,2]) + DCFAM"),
    ("dcswin-small", "timm:swin_small_patch4_window7_224", "dcfam", DCFAM_PAPER,
     "GeoSeg DCSwin with timm Swin-S (96-d, [2,2,18,2]) + DCFAM"),
    ("dcswin-base", "timm:swin_base_patch4_window12_384", "dcfam", DCFAM_PAPER,
     "GeoSeg DCSwin with timm Swin-B (128-d, [2,2,18,2], window 12) + DCFAM"),
    ("unetformer-r18", "timm:resnet18", "unetformer", UNETFORMER_GEOSEG,
     "GeoSeg's original UNetFormer: timm ResNet-18 + UNetFormer decoder (dropout 0.1, aux head optional)"),
    ("dcpoolformer-s12", "timm:poolformer_s12", "dcfam", DCFAM_PAPER,
     "DCFAM on timm PoolFormer-S12 (64-128-320-512; official ImageNet weights with pretrained=True)"),
]  # fmt: skip

for _name, _backbone, _decoder, _defaults, _description in _PRESETS:
    register_model(_name, _description)(_preset(_backbone, _decoder, _defaults))


def _family(decoder: str, defaults: Mapping[str, Any]) -> ModelFactory:
    def factory(timm_name: str, num_classes: int, **options: Any) -> SegmentationModel:
        return build_model(f"timm:{timm_name}", decoder, num_classes, decoder_defaults=defaults, **options)

    preset_sig = inspect.signature(_preset("", decoder, defaults))
    timm_param = inspect.Parameter("timm_name", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)
    factory.__signature__ = preset_sig.replace(  # type: ignore[attr-defined]
        parameters=[timm_param, *preset_sig.parameters.values()]
    )
    return factory


register_family("dcfam-", "DCFAM decoder on any hierarchical timm backbone, e.g. dcfam-convnext_tiny")(
    _family("dcfam", DCFAM_PAPER)
)
register_family(
    "unetformer-", "UNetFormer decoder on any hierarchical timm backbone, e.g. unetformer-resnet50"
)(_family("unetformer", UNETFORMER_PAPER))
