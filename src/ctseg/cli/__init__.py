"""The ``ctseg`` command line.

Each sub-command lives in its own module, registered in :data:`COMMANDS` by name. A command module
exposes ``main(argv: list[str]) -> int`` and builds its own parser (``prog="ctseg <name>"``), so that
``ctseg --help`` imports nothing heavy and every command owns its options. User errors
(:class:`ctseg.errors.CtsegError`) are printed as one line without a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from ctseg import __version__
from ctseg.errors import CtsegError
from ctseg.utils.registry import Registry


@dataclass(frozen=True)
class Command:
    module: str
    help: str


#: The sub-commands, listed by ``ctseg --help`` in this (registration) order.
COMMANDS: Registry[Command] = Registry("command")
for _name, _module, _help in (
    ("demo", "ctseg.cli.demo", "generate the synthetic set, train without and with CT, compare"),
    ("prepare", "ctseg.cli.prepare", "prepare a dataset from its official archives into tiles"),
    ("data", "ctseg.cli.data", "inspect prepared data: `data stats`, `data show`"),
    ("fit", "ctseg.cli.train", "train a model from a YAML config (LightningCLI)"),
    ("validate", "ctseg.cli.train", "validate a checkpoint on the validation split"),
    ("test", "ctseg.cli.train", "evaluate a checkpoint on the test split"),
    ("predict", "ctseg.cli.predict", "predict whole images, folders or GeoTIFF scenes"),
    ("evaluate", "ctseg.cli.evaluate", "full-tile evaluation at native resolution"),
    ("export", "ctseg.cli.export", "export the inference network (ONNX)"),
    ("experiment", "ctseg.cli.experiment", "run and report grids of experiments"),
    ("models", "ctseg.cli.models", "list the model registry"),
):
    COMMANDS.add(_name, Command(_module, _help))
del _name, _module, _help


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(n) for n in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="ctseg",
        description="Contrastive Transformer (CT) for semantic segmentation of aerial imagery.",
        epilog=f"commands:\n{listing}\n\nRun `ctseg <command> --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ctseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("command", nargs="?", choices=sorted(COMMANDS), metavar="command")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    # Split global options from the command and its own arguments.
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    top = parser.parse_args(argv[: split + 1])
    if top.command is None:
        parser.print_help()
        return 0
    debug = top.debug or os.environ.get("CTSEG_DEBUG") == "1"
    if debug:
        os.environ["CTSEG_DEBUG"] = "1"
    rest = argv[split + 1 :]
    try:
        module = importlib.import_module(COMMANDS[top.command].module)
    except ModuleNotFoundError as exc:
        if exc.name != COMMANDS[top.command].module:
            raise
        print(f"ctseg {top.command}: not available in ctseg {__version__} yet", file=sys.stderr)
        return 2
    try:
        if getattr(module, "TAKES_COMMAND_NAME", False):
            return int(module.main(top.command, rest) or 0)
        return int(module.main(rest) or 0)
    except CtsegError as exc:
        if debug:
            raise
        print(f"ctseg {top.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"ctseg {top.command}: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """Entry point of the ``ctseg`` command and of ``python -m ctseg``: :func:`main`, then exit."""
    code = main()
    if code == 130:
        # Interrupted (Ctrl-C): the checkpoint is saved and the resume command printed. Leave without
        # the interpreter's teardown, where a native library's background thread still writing to an
        # already closed stream once aborted the process (SIGABRT instead of exit status 130).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
