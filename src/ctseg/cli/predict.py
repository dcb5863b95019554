"""``ctseg predict``: sliding-window prediction of images, folders of images and GeoTIFF scenes.

Example::

    ctseg predict --checkpoint run/best.ckpt --input scene.tif --output pred/ \\
        --window 512 --overlap 128 --batch-size 8 --tta flip --scales 0.75,1,1.25 --probs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ctseg.errors import ConfigError, DataError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def add_window_options(parser: argparse.ArgumentParser) -> None:
    """Sliding-window, TTA and device options shared by ``predict`` and ``evaluate``."""
    from ctseg.inference.sliding import BLEND_WINDOWS
    from ctseg.inference.tta import PRESETS, VIEWS

    g = parser.add_argument_group("sliding window")
    g.add_argument("--window", type=int, default=512, help="window side in pixels (default 512)")
    g.add_argument(
        "--overlap", type=int, default=128, help="pixels shared by neighbouring windows (default 128)"
    )
    g.add_argument(
        "--blend",
        choices=sorted(BLEND_WINDOWS),
        default="spline",
        help="blending profile (default spline: smoothstep ramp over the overlap)",
    )
    g.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    g = parser.add_argument_group("test-time augmentation")
    g.add_argument(
        "--tta",
        default="none",
        help=f"preset ({', '.join(PRESETS)}) or comma-separated views ({', '.join(VIEWS)}); default none",
    )
    g.add_argument("--scales", type=_floats, default=(1.0,), help="multi-scale TTA factors, e.g. 0.75,1,1.25")
    g.add_argument(
        "--size-divisor", type=int, default=32, help="scaled windows are multiples of this (default 32)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def resolve_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return str(dev)


def load_for_inference(args: argparse.Namespace):
    """The checkpoint's bundle, its network wrapped for TTA, and the sliding-window settings."""
    from ctseg.engine.checkpoint import load_inference_model
    from ctseg.inference.sliding import SlidingWindow
    from ctseg.inference.tta import maybe_tta

    settings = SlidingWindow(
        window=args.window, overlap=args.overlap, blend=args.blend, batch_size=args.batch_size
    )
    net_views = None if args.tta == "none" else args.tta
    device = resolve_device(args.device)
    bundle = load_inference_model(args.checkpoint, map_location=device)
    net = maybe_tta(bundle.model, net_views, args.scales, args.size_divisor)
    return bundle, net, settings, device


def progress_bar(disable: bool = False):
    """A rich progress bar on stderr (windows done / total, rate, time left)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=disable,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctseg predict",
        description="Predict an image, a folder of images or a GeoTIFF scene with sliding windows and "
        "blended logits. Writes <stem>_labels.png|.tif, <stem>_color.png and optionally probabilities.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a .ckpt written by `ctseg fit`")
    p.add_argument(
        "--input",
        required=True,
        type=Path,
        help="image (PNG/JPEG/TIFF), GeoTIFF or other GDAL raster (.vrt mosaic, .jp2, .img), or a folder of them",
    )
    p.add_argument("--output", required=True, type=Path, help="output folder (created)")
    p.add_argument(
        "--probs",
        action="store_true",
        help="also write class probabilities (.tif for GeoTIFF input, else .npy)",
    )
    p.add_argument(
        "--input-max", type=float, default=None, help="pixel value of full brightness for non-uint8 input"
    )
    p.add_argument(
        "--bands", type=_ints, default=None, help="three 1-based band numbers, e.g. 1,2,3 of an RGBIR scene"
    )
    p.add_argument(
        "--nodata",
        type=float,
        default=None,
        help="a pixel value that marks nodata in every band, e.g. 0 for the black border of a scene "
        "without a nodata tag (in addition to the scene's own mask)",
    )
    p.add_argument(
        "--no-nodata-mask",
        action="store_true",
        help="classify the scene's nodata pixels too (default: label 255, transparent, NaN probabilities)",
    )
    p.add_argument(
        "--overviews",
        action="store_true",
        help="build internal overviews in the output GeoTIFFs (for GIS viewers; a read-back at the end)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_window_options(p)
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from ctseg.inference.io import check_output_dir, list_inputs
    from ctseg.inference.predict import predict_file

    inputs = list_inputs(args.input)
    stems: dict[str, Path] = {}
    for path in inputs:
        if path.stem in stems:
            raise DataError(
                path, f"same output names as {stems[path.stem].name}; predict them into separate folders"
            )
        stems[path.stem] = path
    check_output_dir(args.output)
    bundle, net, settings, device = load_for_inference(args)
    protocol = bundle.protocol
    print(
        f"ctseg predict: {len(inputs)} input(s), model {bundle.meta.get('model', {}).get('name')}, "
        f"protocol {protocol.name}, device {device}",
        file=sys.stderr,
    )
    with progress_bar(disable=args.no_progress) as bar:
        for path in inputs:
            task = bar.add_task(path.name, total=None)
            result = predict_file(
                net,
                path,
                args.output,
                settings,
                num_classes=protocol.num_classes,
                normalization=bundle.normalization,
                colors=protocol.colors,
                class_names=protocol.classes,
                probs=args.probs,
                input_max=args.input_max,
                bands=args.bands,
                device=device,
                progress=lambda done, total, task=task: bar.update(task, completed=done, total=total),
                mask_nodata=not args.no_nodata_mask,
                nodata=args.nodata,
                overviews=args.overviews,
            )
            written = ", ".join(str(p) for p in result.outputs.values())
            print(f"{path} ({result.height}x{result.width}) -> {written}", flush=True)
    return 0
