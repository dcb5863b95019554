"""``ctseg models``: list the model registry (presets and ``<decoder>-<timm name>`` families)."""

from __future__ import annotations

import argparse

from ctseg.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctseg models",
        description="List the registered models. Any hierarchical timm model also works through the "
        "families: dcfam-<timm name>, unetformer-<timm name> (e.g. dcfam-convnext_tiny).",
    )
    parser.add_argument("pattern", nargs="?", default="*", help="shell pattern on the name (default: all)")
    parser.add_argument(
        "--params",
        action="store_true",
        help="build each preset (random init, 6 classes, no CT) and print its parameter count",
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from ctseg.models import create, list_models

    models = list_models(args.pattern)
    if not models:
        raise ConfigError(f"no model matches {args.pattern!r}; `ctseg models` lists them all")
    width = max(len(n) for n in models)
    for name, description in models.items():
        params = ""
        if args.params:
            if "<" in name:
                params = f"{'':>9}  "
            else:
                n = sum(p.numel() for p in create(name, num_classes=6).parameters())
                params = f"{n / 1e6:7.2f} M  "
        print(f"{name:<{width}}  {params}{description}")
    return 0
