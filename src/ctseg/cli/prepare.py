"""``ctseg prepare <dataset> --src <folder or zip> --out <dir> [--protocol NAME]``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter

from ctseg.data.prepare import get_preparer, list_preparers, run_prepare
from ctseg.data.protocols import list_protocols, load_protocol


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctseg prepare",
        description=(
            "Read a dataset's official archives (or their extracted folders), decode its labels and "
            "write tiles + uint8 masks + manifest.json. Re-running skips verified tiles (resumable)."
        ),
    )
    parser.add_argument("dataset", nargs="?", choices=list_preparers(), help="dataset to prepare")
    parser.add_argument(
        "--src",
        action="append",
        metavar="PATH",
        help="folder or zip archive with the official files; repeat for several (e.g. image and label zips)",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (created; resumable)")
    parser.add_argument(
        "--protocol",
        metavar="NAME|FILE",
        help="protocol preset or JSON/YAML file (default: the dataset's own preset)",
    )
    parser.add_argument(
        "--unknown-colors",
        choices=("error", "ignore"),
        default="error",
        help="label colours/values outside the protocol: stop with an error (default) or map them to ignore",
    )
    parser.add_argument(
        "--mask-interp",
        choices=("nearest", "bicubic"),
        help="mask resizing; 'bicubic' reproduces the CT paper's quirk (invents labels at edges)",
    )
    parser.add_argument(
        "--val-is-test", action="store_true", help="validate on the test tiles, as the CT paper did"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="prepare again into a folder holding other data"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list datasets and protocol presets, then exit")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print("datasets: " + ", ".join(list_preparers()))
        for name, desc in list_protocols().items():
            print(f"  {name:<18} {desc}")
        return 0
    if not args.dataset or not args.src or not args.out:
        parser.error("dataset, --src and --out are required")
    preparer = get_preparer(args.dataset)
    proto = load_protocol(args.protocol or preparer.default_protocol)
    changes = {}
    if args.mask_interp:
        changes["mask_interp"] = args.mask_interp
    if args.val_is_test:
        changes["val_is_test"] = True
    proto = proto.with_overrides(**changes) if changes else proto
    print(f"protocol: {proto.summary()}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_prepare(
            preparer,
            args.src,
            args.out,
            proto,
            unknown_colors=args.unknown_colors,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    for w in caught:
        print(f"ctseg prepare: warning: {w.message}", file=sys.stderr)
    per_split = Counter(t.split for t in result.manifest.tiles)
    counts = ", ".join(f"{s} {per_split.get(s, 0)}" for s in ("train", "val", "test"))
    print(
        f"prepared {len(result.manifest.tiles)} tiles ({counts}) into {result.out}: "
        f"{result.written} source images processed, {result.skipped} already verified and skipped"
    )
    for path, counts_by_value in result.unknown.items():
        print(f"  unknown label values mapped to ignore in {path}: {counts_by_value}")
    return 0
