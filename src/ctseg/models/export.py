"""ONNX export of the deployable network and a parity check with onnxruntime.

:func:`export_onnx` exports ``model.for_inference()`` (no CT heads, eval mode) with the dynamo-based
exporter (``torch.onnx.export(..., dynamo=True)``; the legacy TorchScript exporter fails on some
decoders). With ``dynamic=True`` it tries, in order, and keeps the first that exports:

1. ``"any"``: batch, height and width all free (the graph pads to a multiple of 32 itself);
2. ``"multiple"``: height and width free but multiples of the size the model specialises on
   (a model whose padding/window logic branches on the size cannot keep a fully free size);
3. ``"static"``: the export size only.

:class:`ExportResult` records which one was used and why the others failed. The file is written to a
temporary sibling and renamed (``ctseg.utils.io``), never left half-written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ctseg.errors import OutputError
from ctseg.utils.io import atomic_write_bytes

_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for a single-file model


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        input_size: ``(H, W)`` of the example input used for tracing.
        dynamic: ``"any"``, ``"multiple"`` (H, W multiples of ``size_multiple``) or ``"static"``.
        size_multiple: for ``"multiple"``, the step of H and W; 0 otherwise.
        opset: the ONNX opset of the default domain in the file.
        num_classes: ``K`` of the ``(B, K, H, W)`` output.
        notes: why more dynamic forms were not used (empty when the first attempt worked).
    """

    path: Path
    input_size: tuple[int, int]
    dynamic: str
    size_multiple: int
    opset: int
    num_classes: int
    notes: list[str] = field(default_factory=list)

    def accepts(self, height: int, width: int) -> bool:
        """Whether the exported graph takes an input of this size."""
        if self.dynamic == "any":
            return True
        if self.dynamic == "multiple":
            return height % self.size_multiple == 0 and width % self.size_multiple == 0
        return (height, width) == self.input_size


def _inference_network(model: nn.Module) -> nn.Module:
    net = model.for_inference() if hasattr(model, "for_inference") else model
    return net.eval()


def _dynamic_shapes(mode: str, size: tuple[int, int], multiple: int) -> tuple[dict[int, object], ...] | None:
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=1024)
    if mode == "any":
        return ({0: batch, 2: dim("height", min=32, max=8192), 3: dim("width", min=32, max=8192)},)
    if mode == "multiple":
        h = dim("h_steps", min=1, max=8192 // multiple)
        w = dim("w_steps", min=1, max=8192 // multiple)
        return ({0: batch, 2: multiple * h, 3: multiple * w},)
    return None


def _size_multiple(model: nn.Module) -> int:
    """The step a model's own padding logic needs: 32 for the presets' windowed decoders, × 8 windows."""
    pad = int(getattr(model, "pad_multiple", 32))
    # UNetFormer windows (8) on the stride-32 map make the model branch on H / 32 mod 8.
    return pad * 8


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int] = (256, 256),
    dynamic: bool = True,
    opset: int | None = None,
) -> ExportResult:
    """Export the inference network of ``model`` to ONNX at ``path``; input ``(B, 3, H, W)`` -> ``(B, K, H, W)``.

    Args:
        model: a :class:`~ctseg.models.segmentor.SegmentationModel` (its ``for_inference()`` is exported)
            or any module mapping images to logits.
        path: the ``.onnx`` file to write (atomically).
        input_size: ``(H, W)`` of the tracing input.
        dynamic: try dynamic batch and spatial sizes (see the module docstring); ``False``: static.
        opset: ONNX opset; ``None`` = the exporter's default.

    Raises:
        OutputError: ``path`` cannot be written or the model is too big for a single ``.onnx`` file.
    """
    path = Path(path)
    net = _inference_network(model)
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    multiple = _size_multiple(net)
    modes = ["any", "multiple", "static"] if dynamic else ["static"]
    notes: list[str] = []
    program = None
    used = "static"
    for mode in modes:
        if mode == "multiple" and (input_size[0] % multiple or input_size[1] % multiple):
            notes.append(f"multiple: input_size {input_size} is not a multiple of {multiple}")
            continue
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    net,
                    (example,),
                    dynamo=True,
                    dynamic_shapes=_dynamic_shapes(mode, input_size, multiple),
                    input_names=["image"],
                    output_names=["logits"],
                    opset_version=opset,
                    optimize=True,
                    verbose=False,
                )
        except Exception as exc:
            if mode == "static":
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            notes.append(f"{mode}: {type(exc).__name__}: {first[:300]}")
            continue
        used = mode
        break
    assert program is not None
    proto = program.model_proto
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise OutputError(f"{path}: the model is larger than 2 GB, too big for a single .onnx file")
    atomic_write_bytes(path, proto.SerializeToString())
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    num_classes = int(getattr(net, "num_classes", 0))
    return ExportResult(
        path=path,
        input_size=(int(input_size[0]), int(input_size[1])),
        dynamic=used,
        size_multiple=multiple if used == "multiple" else 0,
        opset=int(opset_used),
        num_classes=num_classes,
        notes=notes,
    )


def run_onnx(path: str | Path, x: Tensor) -> Tensor:
    """Run an exported ``.onnx`` file with onnxruntime (CPU) on ``(B, 3, H, W)``; returns the logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (out,) = session.run(None, {name: x.detach().cpu().float().numpy()})
    return torch.from_numpy(out)


def check_onnx_parity(model: nn.Module, path: str | Path, input: Tensor) -> float:
    """Max abs difference between PyTorch (``model.for_inference()``) and onnxruntime logits on ``input``."""
    net = _inference_network(model)
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        expected = net(input.to(device)).float().cpu()
    got = run_onnx(path, input)
    if got.shape != expected.shape:
        raise ValueError(f"{path}: ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)}")
    return float((got - expected).abs().max())
