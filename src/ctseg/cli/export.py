"""``ctseg export``: the inference network of a checkpoint (no CT heads) as ONNX, with a parity check.

Example::

    ctseg export --checkpoint run/best.ckpt --format onnx --out model.onnx --input-size 512
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ctseg.errors import ConfigError

EXPORT_HINT = "ONNX export needs onnx, onnxscript and onnxruntime: pip install ctseg[export]"


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected H or H,W, got {text!r}") from exc
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W, got {text!r}")
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctseg export",
        description="Export the inference network (without CT heads) of a checkpoint. Input 'image' "
        "(B, 3, H, W) normalised as recorded in the checkpoint, output 'logits' (B, K, H, W). The spatial "
        "size is dynamic where the model allows it; onnxruntime parity with PyTorch is printed.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a .ckpt written by `ctseg fit`")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (onnx)")
    p.add_argument("--out", required=True, type=Path, help="the file to write, e.g. model.onnx")
    p.add_argument("--input-size", type=_size, default=(512, 512), help="tracing size H or H,W (default 512)")
    p.add_argument("--static", action="store_true", help="fixed batch 1 and input size (no dynamic axes)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="max |onnxruntime - PyTorch| logits accepted (default 1e-3)",
    )
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    import torch

    from ctseg.engine.checkpoint import load_inference_model

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401

        from ctseg.models.export import check_onnx_parity, export_onnx
    except ImportError as exc:
        raise ConfigError(f"{EXPORT_HINT} ({exc})") from exc

    bundle = load_inference_model(args.checkpoint, map_location="cpu")
    result = export_onnx(bundle.model, args.out, input_size=args.input_size, dynamic=not args.static)
    print(f"wrote {result.path}: opset {result.opset}, input 'image' (B, 3, H, W) -> 'logits' (B, K, H, W)")
    h, w = args.input_size
    print(f"input size: {'batch, height and width free' if result.dynamic else f'static (1, 3, {h}, {w})'}")
    for note in result.notes:
        print(f"  note: {note}")
    norm = bundle.normalization
    print(f"normalisation (0-1 pixels): mean {norm['mean']} std {norm['std']}")
    print(f"classes ({bundle.protocol.name}): {', '.join(bundle.protocol.classes)}")
    sizes = [(1, h, w)]
    if result.dynamic:
        sizes.append((2, h + 37, w + 5))  # another batch and an odd size
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for b, hh, ww in sizes:
        if not result.accepts(b, hh, ww):
            continue
        x = torch.randn(b, 3, hh, ww, generator=gen)
        diff = check_onnx_parity(bundle.model, result.path, x)
        worst = max(worst, diff)
        print(f"onnxruntime parity at ({b}, 3, {hh}, {ww}): max |ORT - PyTorch| = {diff:.3g}")
    if worst > args.tolerance:
        print(f"parity check FAILED: {worst:.3g} > tolerance {args.tolerance:g}")
        return 1
    print(f"parity check passed (tolerance {args.tolerance:g})")
    return 0
