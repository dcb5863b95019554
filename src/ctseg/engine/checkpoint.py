"""The ctseg checkpoint format and loading a deployable model from it.

A checkpoint written by :class:`ctseg.engine.module.SegmentationModule` is an ordinary Lightning
checkpoint (so ``--ckpt_path`` resume works) with one extra block::

    checkpoint["ctseg"] = {
        "version": ctseg.__version__,
        "model": {"name": str, "num_classes": int, "kwargs": dict},
        "protocol": Protocol.to_dict(),
        "normalization": {"mean": [m0, m1, m2], "std": [s0, s1, s2]},
        "ct": dict | None,          # the CT config the model was trained with
    }

and the model weights under ``state_dict`` keys ``model.<...>``. The block is everything needed to
rebuild the network without the training config; :func:`load_inference_model` does that and returns
the model without its CT heads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctseg.data.protocols import Protocol
from ctseg.errors import CheckpointError

CTSEG_KEY = "ctseg"
MODEL_PREFIX = "model."
FORMAT_KEYS = ("version", "model", "protocol", "normalization", "ct")


@dataclass
class InferenceBundle:
    """A model ready for prediction and what is needed to feed it.

    Attributes:
        model: the network in eval mode, without CT heads; ``model(x)`` maps ``(B, 3, H, W)`` normalised
            images to ``(B, K, H, W)`` logits.
        protocol: the protocol the model was trained under (classes, colours, ignore index).
        normalization: ``{"mean": [3 floats], "std": [3 floats]}`` in the 0-1 pixel range.
        meta: the whole ``checkpoint["ctseg"]`` block plus ``epoch`` / ``global_step`` when present.
    """

    model: nn.Module
    protocol: Protocol
    normalization: dict[str, list[float]]
    meta: dict[str, Any] = field(default_factory=dict)


def make_ctseg_block(
    *,
    model_name: str,
    num_classes: int,
    model_kwargs: dict[str, Any] | None,
    protocol: Protocol,
    normalization: dict[str, Any],
    ct: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``checkpoint["ctseg"]`` block; plain Python types only so ``torch.load(weights_only=True)`` reads it."""
    from ctseg import __version__

    return {
        "version": __version__,
        "model": {
            "name": str(model_name),
            "num_classes": int(num_classes),
            "kwargs": dict(model_kwargs or {}),
        },
        "protocol": protocol.to_dict(),
        "normalization": {
            "mean": [float(v) for v in normalization["mean"]],
            "std": [float(v) for v in normalization["std"]],
        },
        "ct": None if ct is None else copy.deepcopy(dict(ct)),
    }


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file as a dict, raising :class:`CheckpointError` naming the file on any failure.

    ``weights_only=True`` first (safe for untrusted files); Lightning checkpoints of this package
    contain only tensors and plain containers, so the fallback is never needed for them.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many types on garbage (IndexError, RuntimeError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot read checkpoint (corrupt, truncated or not a torch file: {first})"
        ) from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(ckpt).__name__}, expected a dict)")
    return ckpt


def read_ctseg_block(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Validate and return ``ckpt["ctseg"]``."""
    block = ckpt.get(CTSEG_KEY)
    if not isinstance(block, dict):
        raise CheckpointError(
            f"{path}: not a ctseg checkpoint (no '{CTSEG_KEY}' block; was it written by `ctseg fit`?)"
        )
    missing = [k for k in FORMAT_KEYS if k not in block]
    if missing:
        raise CheckpointError(f"{path}: ctseg block lacks {missing}")
    model = block["model"]
    if not isinstance(model, dict) or "name" not in model or "num_classes" not in model:
        raise CheckpointError(f"{path}: ctseg block has no model name / num_classes")
    if "state_dict" not in ckpt or not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"{path}: checkpoint has no state_dict")
    return block


def model_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``model.``-prefixed weights of a Lightning state dict, with the prefix removed."""
    n = len(MODEL_PREFIX)
    return {k[n:]: v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def _protocol_name(p: str | Protocol | dict[str, Any]) -> str:
    if isinstance(p, Protocol):
        return p.name
    if isinstance(p, dict):
        return str(p.get("name"))
    return str(p)


def build_model_from_block(block: dict[str, Any], path: str | Path) -> nn.Module:
    """Create the network described by the ``ctseg`` block (random init, CT heads included when trained with CT)."""
    import ctseg.models

    spec = block["model"]
    try:
        return ctseg.models.create(
            spec["name"],
            num_classes=int(spec["num_classes"]),
            ct=block.get("ct"),
            pretrained=False,
            **dict(spec.get("kwargs") or {}),
        )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot build model {spec['name']!r} recorded in the checkpoint: {exc}"
        ) from exc


def load_inference_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    expect_model: str | None = None,
    expect_protocol: str | Protocol | dict[str, Any] | None = None,
) -> InferenceBundle:
    """Rebuild the trained network from a ctseg checkpoint, ready for prediction.

    Args:
        path: a ``.ckpt`` written by ``ctseg fit``.
        map_location: device for the weights.
        expect_model: when given, the checkpoint must hold this model preset.
        expect_protocol: when given (name, :class:`Protocol` or dict), the checkpoint's protocol must have
            this name and, for a full protocol, the same classes and ignore index.

    Raises:
        CheckpointError: missing / unreadable / non-ctseg file, weights that do not fit the recorded
            model, or another model / protocol than expected.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location)
    block = read_ctseg_block(ckpt, path)
    name = block["model"]["name"]
    if expect_model is not None and name != expect_model:
        raise CheckpointError(f"{path}: checkpoint holds model {name!r}, expected {expect_model!r}")
    try:
        protocol = Protocol.from_dict(block["protocol"])
    except Exception as exc:
        raise CheckpointError(f"{path}: invalid protocol in checkpoint: {exc}") from exc
    if expect_protocol is not None:
        want = _protocol_name(expect_protocol)
        if protocol.name != want:
            raise CheckpointError(
                f"{path}: checkpoint was trained under protocol {protocol.name!r}, expected {want!r}"
            )
        if not isinstance(expect_protocol, str):
            other = (
                expect_protocol
                if isinstance(expect_protocol, Protocol)
                else Protocol.from_dict(expect_protocol)
            )
            if other.classes != protocol.classes or other.ignore_index != protocol.ignore_index:
                raise CheckpointError(
                    f"{path}: protocol {protocol.name!r} in the checkpoint has classes {list(protocol.classes)} / "
                    f"ignore {protocol.ignore_index}, expected {list(other.classes)} / ignore {other.ignore_index}"
                )
    if int(block["model"]["num_classes"]) != protocol.num_classes:
        raise CheckpointError(
            f"{path}: model has {block['model']['num_classes']} classes but its protocol {protocol.num_classes}"
        )

    model = build_model_from_block(block, path)
    weights = model_state_dict(ckpt)
    if not weights:
        raise CheckpointError(f"{path}: state_dict has no '{MODEL_PREFIX}' weights")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mis_shaped = [k for k, v in weights.items() if k in expected and expected[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(
            f"{path}: weights do not fit model {name!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, mis-shaped {mis_shaped[:5]}"
        )
    model.load_state_dict(weights, strict=True)
    infer = model.for_inference() if hasattr(model, "for_inference") else model
    infer = infer.to(map_location).eval()
    meta = dict(block)
    for key in ("epoch", "global_step"):
        if key in ckpt:
            meta[key] = ckpt[key]
    return InferenceBundle(
        model=infer, protocol=protocol, normalization=dict(block["normalization"]), meta=meta
    )
