"""``ctseg evaluate``: full-tile evaluation of a checkpoint at native resolution, per-class table.

Example::

    ctseg evaluate --checkpoint run/best.ckpt --data data/potsdam-paper --split test --output eval/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ctseg.cli.predict import add_window_options, load_for_inference, progress_bar
from ctseg.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctseg evaluate",
        description="Predict every tile of a prepared split whole (sliding window, native resolution) and "
        "score it against the split's labels (the protocol's evaluation labels): per-class IoU / F1 / "
        "precision / recall, mIoU and mF1 over the protocol's mean classes, OA.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a .ckpt written by `ctseg fit`")
    p.add_argument("--data", required=True, type=Path, help="prepared data folder (with manifest.json)")
    p.add_argument(
        "--protocol",
        default=None,
        help="score under this registered protocol (same classes as the model; default: the checkpoint's)",
    )
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--output", type=Path, default=None, help="folder for eval.json and eval.md (optional)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_window_options(p)
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from ctseg.data.protocols import get_protocol
    from ctseg.inference.evaluate import evaluate_tiles
    from ctseg.inference.io import check_output_dir
    from ctseg.utils.io import atomic_write_json, atomic_write_text

    if args.output is not None:
        check_output_dir(args.output)
    bundle, net, settings, device = load_for_inference(args)
    protocol = bundle.protocol
    if args.protocol is not None:
        protocol = get_protocol(args.protocol)
        if protocol.classes != bundle.protocol.classes:
            raise ConfigError(
                f"--protocol {args.protocol}: classes {list(protocol.classes)} differ from the model's "
                f"{list(bundle.protocol.classes)} (checkpoint protocol {bundle.protocol.name!r})"
            )
    with progress_bar(disable=args.no_progress) as bar:
        task = bar.add_task(f"evaluate {args.split}", total=None)
        report = evaluate_tiles(
            net,
            args.data,
            protocol,
            split=args.split,
            settings=settings,
            normalization=bundle.normalization,
            device=device,
            tta=None
            if args.tta == "none" and args.scales == (1.0,)
            else f"{args.tta} scales {list(args.scales)}",
            on_tile=lambda i, n, _tid: bar.update(task, completed=i, total=n),
        )
    table = report.to_markdown()
    print(table)
    if args.output is not None:
        out = dict(report.to_dict(), checkpoint=str(args.checkpoint), data=str(args.data))
        atomic_write_json(args.output / "eval.json", out)
        atomic_write_text(args.output / "eval.md", table + "\n")
        print(f"wrote {args.output / 'eval.json'} and {args.output / 'eval.md'}", file=sys.stderr)
    return 0
