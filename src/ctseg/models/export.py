"""ONNX export of the deployable network and a parity check with onnxruntime.

:func:`export_onnx` exports ``model.for_inference()`` (no CT heads, eval mode) with the dynamo-based
exporter (``torch.onnx.export(..., dynamo=True)``; the legacy TorchScript exporter fails on some
decoders). With ``dynamic=True`` batch, height and width are free (the graph pads to a multiple of 32
itself, like the PyTorch model). The exporter can silently bake a traced size into the graph when a
model branches on its input size, so the dynamic graph is *verified*: it is run with onnxruntime on a
probe input of another batch and an odd size and compared with PyTorch. If export or probe fails, the
model is exported static (the tracing size only) and :class:`ExportResult` says why.

The file is written to a temporary sibling and renamed (``ctseg.utils.io``), never left half-written.
"""

from __future__ import annotations

import tempfile
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
        dynamic: ``True`` when batch, height and width are free (verified on a probe input);
            ``False``: the graph takes ``(1, 3, *input_size)`` only.
        opset: the ONNX opset of the default domain in the file.
        num_classes: ``K`` of the ``(B, K, H, W)`` output.
        notes: why a requested dynamic export fell back to static (empty otherwise).
    """

    path: Path
    input_size: tuple[int, int]
    dynamic: bool
    opset: int
    num_classes: int
    notes: list[str] = field(default_factory=list)

    def accepts(self, batch: int, height: int, width: int) -> bool:
        """Whether the exported graph takes a ``(batch, 3, height, width)`` input."""
        return self.dynamic or (batch, height, width) == (1, *self.input_size)


def _check_writable(path: Path) -> None:
    """Fail before a minutes-long export, not after it."""
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected an .onnx file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot write here ({exc.strerror or exc})") from exc


def _inference_network(model: nn.Module) -> nn.Module:
    net = model.for_inference() if hasattr(model, "for_inference") else model
    return net.eval()


def _device(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _example(batch: int, size: tuple[int, int], seed: int, device: torch.device) -> Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(device)


def _export_program(net: nn.Module, example: Tensor, dynamic: bool, opset: int | None):
    dim = torch.export.Dim
    shapes = (
        (
            {
                0: dim("batch", min=1, max=1024),
                2: dim("height", min=32, max=8192),
                3: dim("width", min=32, max=8192),
            },
        )
        if dynamic
        else None
    )
    with torch.no_grad():
        return torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset,
            verbose=False,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _probe(net: nn.Module, proto_bytes: bytes, size: tuple[int, int], device: torch.device) -> str | None:
    """Run the graph on another batch and size; ``None`` if it matches PyTorch, else what went wrong."""
    import onnxruntime as ort

    probe_size = (size[0] + 37, size[1] + 13)  # not multiples of 32: exercises the padding too
    x = _example(2, probe_size, 1, device)
    try:
        session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    except Exception as exc:
        return f"probe at (2, 3, {probe_size[0]}, {probe_size[1]}) failed: {_first_line(exc)}"
    with torch.no_grad():
        expected = net(x).float().cpu()
    got_t = torch.from_numpy(got)
    if got_t.shape != expected.shape:
        return f"probe output shape {tuple(got_t.shape)} != PyTorch {tuple(expected.shape)}"
    diff = float((got_t - expected).abs().max())
    tol = 1e-3 * max(1.0, float(expected.abs().max()))
    return None if diff <= tol else f"probe max abs diff {diff:.3g} > {tol:.3g}"


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
        dynamic: free batch and spatial sizes (verified; falls back to static with a note).
        opset: ONNX opset; ``None`` = the exporter's default.

    Raises:
        OutputError: ``path`` cannot be written or the model is too big for a single ``.onnx`` file.
    """
    path = Path(path)
    _check_writable(path)
    net = _inference_network(model)
    device = _device(net)
    size = (int(input_size[0]), int(input_size[1]))
    example = _example(1, size, 0, device)
    notes: list[str] = []
    data: bytes | None = None
    if dynamic:
        try:
            data = _serialize(_export_program(net, example, True, opset), path)
            problem = _probe(net, data, size, device)
        except OutputError:
            raise
        except Exception as exc:
            problem = f"dynamic export failed: {_first_line(exc)}"
        if problem is not None:
            notes.append(problem)
            data = None
    if data is None:
        data = _serialize(_export_program(net, example, False, opset), path)
    atomic_write_bytes(path, data)
    import onnx

    proto = onnx.load_model_from_string(data)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportResult(
        path=path,
        input_size=size,
        dynamic=dynamic and not notes,
        opset=int(opset_used),
        num_classes=int(getattr(net, "num_classes", 0)),
        notes=notes,
    )


def _serialize(program: object, path: Path) -> bytes:
    proto = program.model_proto  # type: ignore[attr-defined]
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise OutputError(f"{path}: the model is larger than 2 GB, too big for a single .onnx file")
    return proto.SerializeToString()


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
    with torch.no_grad():
        expected = net(input.to(_device(net))).float().cpu()
    got = run_onnx(path, input)
    if got.shape != expected.shape:
        raise ValueError(f"{path}: ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)}")
    return float((got - expected).abs().max())
