"""Loading weights into a module with a full account of what fitted.

``torch``'s own ``load_state_dict(strict=False)`` silently skips keys, and GeoSeg-style loaders also skip
shape mismatches, which is how the paper's Swin ended up trained from scratch without anyone noticing.
Here every load returns a :class:`LoadReport` (loaded / missing / unexpected / mis-shaped keys); strict
loads raise :class:`~ctseg.errors.CheckpointError` naming the file and the offending keys, and partial
loads copy what fits and log the rest.

Checkpoints are read with ``torch.load(weights_only=True)`` (no arbitrary code from pickles); wrappers
(``state_dict``, ``model``, Lightning checkpoints) and ``module.`` / ``_orig_mod.`` prefixes are removed,
and when the keys carry an extra prefix (``model.backbone.`` in a whole-model Lightning checkpoint) the
sub-tree that fits the module is selected automatically.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctseg.errors import CheckpointError

log = logging.getLogger(__name__)

StateDictSource = str | Path | Mapping[str, Any]

# Keys under which trainers nest the weights: Lightning/mmcv/timm ("state_dict"), official Swin and
# DeiT ("model"), common training scripts ("model_state_dict"), DeepSpeed ("module").
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Prefixes added by nn.DataParallel / DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 10  # keys named per category in messages


@dataclass
class LoadReport:
    """What a load did. ``mismatched`` holds ``(key, expected shape, checkpoint shape)``."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    total: int = 0  # tensors in the module's state dict (0: count loaded + missing + mismatched)
    prefix: str = ""  # checkpoint prefix that was stripped to reach the module's keys
    ignored: list[str] = field(default_factory=list)  # checkpoint keys outside that prefix

    @property
    def complete(self) -> bool:
        """Every tensor of the module came from the checkpoint and every checkpoint tensor was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        total = self.total or len(self.loaded) + len(self.missing) + len(self.mismatched)
        parts = [f"loaded {len(self.loaded)}/{total} tensors from {self.source}"]
        if self.prefix:
            parts.append(f"prefix {self.prefix!r} stripped ({len(self.ignored)} keys outside it ignored)")
        parts += [
            f"{len(self.mismatched)} shape mismatches",
            f"{len(self.missing)} missing",
            f"{len(self.unexpected)} unexpected",
        ]
        return ", ".join(parts)

    def problems(self, limit: int = _SHOWN) -> list[str]:
        """One line per non-empty category, naming its first ``limit`` keys."""
        lines = []
        if self.mismatched:
            shown = "; ".join(
                f"{k} (expected {list(e)}, got {list(g)})" for k, e, g in self.mismatched[:limit]
            )
            lines.append(f"shape mismatch: {shown}{_more(self.mismatched, limit)}")
        if self.missing:
            lines.append(f"missing: {', '.join(self.missing[:limit])}{_more(self.missing, limit)}")
        if self.unexpected:
            lines.append(f"unexpected: {', '.join(self.unexpected[:limit])}{_more(self.unexpected, limit)}")
        return lines

    def __str__(self) -> str:
        return "\n  ".join([self.summary(), *self.problems()])


def _more(items: list[Any], limit: int) -> str:
    return f" … and {len(items) - limit} more" if len(items) > limit else ""


def read_state_dict(
    source: StateDictSource, *, weights_only: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint file (or take a mapping) and return ``(flat tensor dict, name for messages)``.

    Unwraps ``state_dict`` / ``model`` / ``model_state_dict`` / ``module`` sub-dicts and strips
    ``module.`` and ``_orig_mod.`` key prefixes. ``.safetensors`` files are read with safetensors.
    """
    if isinstance(source, Mapping):
        return _flatten(source, "<state_dict>"), "<state_dict>"
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _flatten(load_file(str(path), device="cpu"), str(path)), str(path)
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused the file because it stores Python objects "
            f"besides tensors ({first}). If you trust its origin, pass weights_only=False, or re-save only "
            "its state_dict: torch.save(torch.load(f, weights_only=False)['state_dict'], 'weights.pt')"
        ) from exc
    except Exception as exc:  # garbage makes the unpickler fail in many ways (IndexError, EOFError, …)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return _flatten(obj, str(path)), str(path)


def _flatten(obj: Mapping[str, Any], name: str) -> dict[str, torch.Tensor]:
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            keys = ", ".join(map(str, list(obj)[:_SHOWN]))
            raise CheckpointError(f"{name}: holds no tensors (top-level keys: {keys or 'none'})")
        obj = inner
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. metadata beside the tensors
        k = str(key)
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = value
    return out


def _apply_prefix_map(
    state_dict: dict[str, torch.Tensor], prefix_map: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    # Longest prefix first so {"model.": "", "model.backbone.": ""} does what it says.
    ordered = sorted(prefix_map.items(), key=lambda kv: len(kv[0]), reverse=True)
    out = {}
    for key, value in state_dict.items():
        for old, new in ordered:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def _detect_prefix(keys: list[str], targets: Mapping[str, Any]) -> str:
    """The prefix ``p`` maximising ``#{k : k = p + t, t a module key}``, if it beats no prefix at all."""
    direct = sum(k in targets for k in keys)
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in targets:
                counts[".".join(parts[:i]) + "."] += 1
    if not counts:
        return ""
    prefix, best = counts.most_common(1)[0]
    return prefix if best > direct else ""


def load_state_dict_report(
    module: nn.Module,
    state_dict_or_path: StateDictSource,
    strict: bool = True,
    partial: bool = False,
    prefix_map: Mapping[str, str] | None = None,
    *,
    weights_only: bool = True,
    source: str | None = None,
) -> LoadReport:
    """Load a checkpoint into ``module`` and account for every key.

    Modes: ``strict=True`` (default) loads only if every key and shape fits, else raises
    :class:`CheckpointError` naming the file and the first offending keys; ``strict=False`` tolerates
    missing and unexpected keys but not shape mismatches; ``partial=True`` copies every tensor whose
    name and shape fit and skips the rest (the report is logged). Nothing is copied when an error is
    raised. ``prefix_map`` renames key prefixes (``{"model.backbone.": ""}``) before matching; without it
    a common extra prefix is detected and stripped. ``source`` names a mapping in messages.
    """
    state_dict, name = read_state_dict(state_dict_or_path, weights_only=weights_only)
    name = source or name
    targets = module.state_dict()
    report = LoadReport(source=name, total=len(targets))
    if prefix_map:
        state_dict = _apply_prefix_map(state_dict, prefix_map)
    elif prefix := _detect_prefix(list(state_dict), targets):
        report.prefix = prefix
        report.ignored = [k for k in state_dict if not k.startswith(prefix)]
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

    fitting: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        target = targets.get(key)
        if target is None:
            report.unexpected.append(key)
        elif target.shape != value.shape:
            report.mismatched.append((key, tuple(target.shape), tuple(value.shape)))
        else:
            fitting[key] = value
    report.missing = [k for k in targets if k not in state_dict]

    if not partial and (report.mismatched or (strict and not report.complete)):
        what = "strict load" if strict else "load"
        raise CheckpointError(
            f"{name}: does not fit {type(module).__name__} ({what}: {report.summary()}):\n  "
            + "\n  ".join(report.problems())
            + "\n  pass partial=True to load only the tensors that fit"
        )
    module.load_state_dict(fitting, strict=False)
    report.loaded = list(fitting)
    if partial and not report.complete:
        log.warning("partial load: %s", report)
    else:
        log.info("%s", report.summary())
    return report
