"""Any hierarchical timm model as a :class:`Backbone`, through ``features_only=True``.

timm returns the last levels of the hierarchy in the model's own layout: NHWC for Swin-like models, NCHW
for CNNs, PoolFormer/MetaFormer and PVT. This adapter returns NCHW always, takes channels and strides
from ``feature_info``, optionally adds a LayerNorm per stage output (on by default for Swin-like models,
whose timm stage outputs are pre-norm while the paper's features are post-norm), and builds Swin-like
models with ``dynamic_img_size=True`` so any input that is a multiple of 32 works.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import is_model_in_modules
from torch import nn

from ctseg.errors import CheckpointError, ConfigError
from ctseg.models.backbones.base import STANDARD_STRIDES, Backbone, LayerNorm2d
from ctseg.models.weights import LoadReport, load_state_dict_report, read_state_dict

#: timm modules whose models take ``img_size`` / ``dynamic_img_size`` and return pre-norm NHWC stage outputs.
SWIN_LIKE_MODULES: tuple[str, ...] = ("swin_transformer", "swin_transformer_v2")
#: Input size Swin-like models are built for; with ``dynamic_img_size`` other sizes work too, the
#: construction size only fixes where windows are clamped (512 = the paper's crops: window 7 in every stage).
DEFAULT_SWIN_IMG_SIZE = 512

_MSG_CHARS = 1500  # how much of a timm/torch error message to quote


def is_swin_like(model_name: str) -> bool:
    return bool(is_model_in_modules(model_name, SWIN_LIKE_MODULES))


def create_timm_model(model_name: str, pretrained: bool | str | Path = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with user-facing errors.

    ``pretrained=True`` uses timm's pretrained tag (Hugging Face cache; offline with ``HF_HUB_OFFLINE=1``
    when cached); ``pretrained="file"`` loads a local checkpoint through timm's own key filters. Unknown
    names and bad arguments raise :class:`ConfigError`, weights that cannot be had raise
    :class:`CheckpointError` saying how to provide a local file.
    """
    if not timm.is_model(model_name):
        raise ConfigError(
            f"timm has no model named {model_name!r} (timm {timm.__version__}); "
            "see `timm.list_models('pattern*')` for the names"
        )
    path: Path | None = None
    if isinstance(pretrained, str | Path) and not isinstance(pretrained, bool):
        path = Path(pretrained)
        if not path.is_file():
            raise CheckpointError(f"{path}: pretrained weights file not found (for timm:{model_name})")
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay["file"] = str(path)
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        return timm.create_model(model_name, pretrained=bool(pretrained), **kwargs)
    except TypeError as exc:
        raise ConfigError(f"timm:{model_name}: invalid argument ({exc})") from exc
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        if not pretrained:
            raise
        detail = str(exc).strip()[:_MSG_CHARS] or type(exc).__name__
        if path is not None:
            raise CheckpointError(f"{path}: cannot be loaded into timm:{model_name}: {detail}") from exc
        raise CheckpointError(
            f"timm:{model_name}: pretrained weights could not be obtained ({type(exc).__name__}: {detail}). "
            "Without internet, either fill the Hugging Face cache elsewhere (run "
            f"`timm.create_model('{model_name}', pretrained=True)` on a connected machine, copy "
            "~/.cache/huggingface, and set HF_HUB_OFFLINE=1 here) or pass a local weights file: "
            'pretrained="path/to/model.safetensors" (or .pth/.bin).'
        ) from exc


# features_only flattens top-level Sequentials: checkpoint "stages.0.x" is "stages_0.x" in the feature net.
_FLATTENED = re.compile(r"^([A-Za-z_]\w*)\.(\d+)\.")


def load_partial(module: nn.Module, path: str | Path) -> LoadReport:
    """Copy the tensors of a timm-format checkpoint that fit ``module`` (a timm model or its
    ``features_only`` wrapper), skipping the rest (classifier, other widths); the report is logged."""
    state_dict, name = read_state_dict(path)
    targets = module.state_dict()
    renamed = {}
    for key, value in state_dict.items():
        alt = _FLATTENED.sub(r"\1_\2.", key)
        renamed[key if key in targets or alt not in targets else alt] = value
    return load_state_dict_report(module, renamed, strict=False, partial=True, source=name)


def is_weights_file(pretrained: bool | str | Path) -> bool:
    return isinstance(pretrained, str | Path) and not isinstance(pretrained, bool)


class TimmBackbone(Backbone):
    """A timm model's last four feature levels as NCHW maps at strides 4, 8, 16, 32.

    ``x`` ``(B, 3, H, W)`` → ``[(B, C_i, H / s_i, W / s_i)]`` with ``C_i`` = ``out_channels[i]`` from
    timm's ``feature_info``. ``stage_norm`` (default: on for Swin-like models) adds a trainable
    LayerNorm over channels on each output. ``img_size`` (Swin-like only) is the construction size;
    other multiples of 32 work at run time. ``partial=True`` with a weights file copies only the tensors
    that fit (report in ``load_report``) instead of timm's strict load. Extra keyword arguments go to
    ``timm.create_model``.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool | str | Path = False,
        partial: bool = False,
        out_indices: int | tuple[int, ...] = 4,
        stage_norm: bool | None = None,
        img_size: int | tuple[int, int] | None = None,
        **timm_kwargs: Any,
    ) -> None:
        swin_like = is_swin_like(model_name)
        kwargs: dict[str, Any] = {"features_only": True, "out_indices": out_indices}
        if swin_like:
            # Masks are rebuilt per input size; the windows stay those of the construction size. Older
            # timm (< 1.0.31) reads only strict_img_size, newer ones either flag.
            kwargs.update(
                img_size=img_size or DEFAULT_SWIN_IMG_SIZE, strict_img_size=False, dynamic_img_size=True
            )
        elif img_size is not None:
            kwargs["img_size"] = img_size
        kwargs.update(timm_kwargs)
        load_later = partial and is_weights_file(pretrained)
        body = create_timm_model(model_name, False if load_later else pretrained, **kwargs)
        channels, strides = body.feature_info.channels(), body.feature_info.reduction()
        if tuple(strides) != STANDARD_STRIDES:
            raise ConfigError(
                f"timm:{model_name}: feature levels {list(out_indices) if isinstance(out_indices, tuple) else out_indices} "
                f"have strides {strides}, the decoders need {list(STANDARD_STRIDES)}; "
                "choose out_indices (timm feature levels) that give those strides"
            )
        super().__init__(channels, strides)
        self.model_name = model_name
        self.body = body
        self.channels_last = getattr(body, "output_fmt", "NCHW") == "NHWC"
        if stage_norm is None:
            stage_norm = swin_like
        norm_cls = nn.LayerNorm if self.channels_last else LayerNorm2d
        self.stage_norms = nn.ModuleList(norm_cls(c) for c in channels) if stage_norm else None
        if load_later:
            self.load_report = load_partial(body, pretrained)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        outs = []
        for i, f in enumerate(feats):
            if self.stage_norms is not None:
                f = self.stage_norms[i](f)  # before the permute: NHWC is LayerNorm's native layout
            if self.channels_last:
                f = f.permute(0, 3, 1, 2)
            # Some NCHW models (ConvNeXt) also hand out permuted views; downstream code may .view() them.
            outs.append(f.contiguous())
        return outs
