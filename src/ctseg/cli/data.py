"""``ctseg data stats <dir>``, ``ctseg data show <dir>`` and ``ctseg data protocols [NAME]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctseg.data.protocols import list_protocols, load_protocol
from ctseg.utils.io import atomic_write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctseg data", description="Inspect prepared data.")
    sub = parser.add_subparsers(dest="action", required=True)

    stats = sub.add_parser("stats", help="class shares per split, tile sizes")
    stats.add_argument("root", metavar="DIR", help="prepared folder (with manifest.json)")
    stats.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")

    show = sub.add_parser("show", help="PNG grid of images with colour overlays")
    show.add_argument("root", metavar="DIR", help="prepared folder (with manifest.json)")
    show.add_argument("--split", default=None, help="train, val or test (default: all)")
    show.add_argument("-n", "--num", type=int, default=8, help="number of tiles (default 8)")
    show.add_argument("--size", type=int, default=256, help="cell size in px (default 256)")
    show.add_argument("--seed", type=int, default=0, help="which tiles are drawn")
    show.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    show.add_argument("--out", metavar="FILE.png", help="default: DIR/preview-<split>.png")

    protocols = sub.add_parser("protocols", help="list protocol presets or print one as JSON")
    protocols.add_argument("name", nargs="?", help="preset name or protocol file")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "stats":
        from ctseg.data.stats import compute_stats, format_stats

        stats = compute_stats(args.root)
        print(format_stats(stats))
        if args.json:
            atomic_write_json(args.json, stats.to_dict())
        return 0
    if args.action == "show":
        from ctseg.data.preview import make_grid, save_png

        grid = make_grid(args.root, args.split, n=args.num, size=args.size, seed=args.seed, alpha=args.alpha)
        out = Path(args.out) if args.out else Path(args.root) / f"preview-{args.split or 'all'}.png"
        save_png(grid, out)
        print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]} px)")
        return 0
    if args.name:
        proto = load_protocol(args.name)
        print(json.dumps(proto.to_dict(), indent=2))
        print(f"# {proto.summary()}")
        return 0
    for name, desc in list_protocols().items():
        print(f"{name:<18} {desc}")
    return 0
