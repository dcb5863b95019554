"""``ctseg fit | validate | test | predict``: LightningCLI over :class:`SegmentationModule` and
:class:`SegmentationDataModule`.

What this adds to a plain LightningCLI:

* the run folder is ``trainer.default_root_dir`` (one per experiment, no ``version_N``): the resolved
  ``config.yaml``, ``metrics.csv`` (CSV logger), ``tensorboard/``, ``checkpoints/`` (``best-*.ckpt`` by
  val mIoU, ``last.ckpt``), ``metrics.json`` / ``report.md`` / ``curves.png``; so ``--ckpt_path last``
  resumes the run in place;
* always-on callbacks: exact sampling and per-step seeding (resume-exact), the one-line epoch summary,
  the run report, a rich progress bar;
* config files may start with ``__base__: <file or list of files>`` (paths relative to the file):
  the bases are applied first, so a per-row config only states what differs
  (``--config`` may still be repeated; later files and command-line overrides win).
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ctseg.data.datamodule import SegmentationDataModule
from ctseg.engine.checkpoint import CTSEG_KEY, read_checkpoint
from ctseg.engine.guards import NONFINITE_POLICIES, with_atomic_checkpoint_io
from ctseg.engine.module import SegmentationModule
from ctseg.engine.runner import run_callbacks, run_loggers
from ctseg.errors import CheckpointError, ConfigError, OutputError
from ctseg.utils.io import read_yaml_mapping

BASE_KEY = "__base__"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_ROOT = "runs/default"
#: ``--ckpt_path`` values Lightning resolves itself (not file names)
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")


def _load_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "config file")


def expand_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> list[str]:
    """``--config`` values for one file: its ``__base__`` chain (recursively) first, then the file itself.

    Files without ``__base__`` are passed by path (so jsonargparse resolves relative paths against them);
    a file with one is passed as its YAML text without the key.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular {BASE_KEY} chain: {' -> '.join(str(p) for p in (*_seen, path))}")
    data = _load_yaml(path)
    if BASE_KEY not in data:
        return [str(path)]
    bases = data.pop(BASE_KEY)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of file names")
    out: list[str] = []
    for base in bases:
        out += expand_config(path.parent / base, (*_seen, path))
    out.append(yaml.safe_dump(data, sort_keys=False) if data else "{}")
    return out


def expand_argv(argv: list[str]) -> list[str]:
    """Replace every ``--config FILE`` / ``--config=FILE`` / ``-c FILE`` by its expanded chain."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if Path(value).suffix in (".yaml", ".yml") or Path(value).is_file():
            for item in expand_config(value):
                out += ["--config", item]
        else:
            out += ["--config", value]
    return out


class CtsegCLI(LightningCLI):
    """LightningCLI with the ctseg run layout and callbacks (see module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--tensorboard", type=bool, default=True, help="also log to TensorBoard (<run>/tensorboard)"
        )
        parser.add_argument(
            "--save_top_k", type=int, default=1, help="how many best checkpoints (by val/mIoU) to keep"
        )
        parser.add_argument(
            "--nonfinite",
            type=str,
            default="skip",
            choices=sorted(NONFINITE_POLICIES),
            help="on a NaN/Inf loss or gradient: skip the step (counted) or stop with the last good weights",
        )
        parser.add_argument(
            "--nonfinite_max_skips",
            type=int,
            default=10,
            help="'skip' stops the run after this many non-finite steps in a row",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model section by the checkpoint's hyper-parameters: a checkpoint of
        # another model would silently win over the config, and an unreadable one raises a raw traceback.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_ALIASES:
            ckpt = read_checkpoint(ckpt_path)  # CheckpointError naming the file: missing, corrupt, truncated
            block = ckpt.get(CTSEG_KEY)
            have = block.get("model", {}).get("name") if isinstance(block, dict) else None
            want = self.config[sub].get("model.model")
            if have and want and have != want:
                raise CheckpointError(
                    f"{ckpt_path}: checkpoint holds model {have!r} but the config asks for {want!r}"
                )
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self._get(self.config_init, "trainer", default={})
        root = Path(cfg.get("default_root_dir") or DEFAULT_ROOT)
        cfg["default_root_dir"] = str(root)
        check_trainer_flags(cfg)
        ensure_run_dir(root)
        sub = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if cfg.get("logger") in (None, True):
            fresh_fit = self.subcommand == "fit" and not sub.get("ckpt_path")
            cfg["logger"] = run_loggers(
                root,
                fresh_fit=fresh_fit,
                command=str(self.subcommand),
                tensorboard=bool(sub.get("tensorboard", True)),
            )
        progress = cfg.get("enable_progress_bar", True) is not False
        extra = run_callbacks(
            root,
            save_top_k=int(sub.get("save_top_k", 1)),
            progress=progress,
            nonfinite=str(sub.get("nonfinite", "skip")),
            nonfinite_max_skips=int(sub.get("nonfinite_max_skips", 10)),
        )
        cfg["plugins"] = with_atomic_checkpoint_io(cfg.get("plugins"))
        if cfg.get("logger") is not False and self.subcommand == "fit":
            extra.append(LearningRateMonitor(logging_interval="epoch"))
        extra += [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        return self._instantiate_trainer({**cfg, **kwargs}, extra)


def run_cli(command: str, argv: list[str], *, run: bool = True) -> CtsegCLI:
    """Run ``ctseg <command> argv`` (``command`` in fit / validate / test / predict)."""
    if command not in SUBCOMMANDS:
        raise ConfigError(f"unknown command {command!r}; expected one of {', '.join(SUBCOMMANDS)}")
    return _cli(CtsegCLI, command, argv, save_config_kwargs={"overwrite": True}, run=run)


def _cli(cls: type[CtsegCLI], command: str, argv: list[str], **kwargs: Any) -> CtsegCLI:
    """Build ``cls`` with argparse errors raised (not printed + exit) and turned into one-line ConfigErrors."""
    try:
        return cls(
            SegmentationModule,
            SegmentationDataModule,
            # without run, LightningCLI has no sub-commands: the arguments are the command's own
            args=[command, *expand_argv(list(argv))] if kwargs.get("run", True) else expand_argv(list(argv)),
            seed_everything_default=0,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "ctseg", "exit_on_error": False},
            **kwargs,
        )
    except argparse.ArgumentError as exc:
        raise ConfigError(config_error_message(str(exc), argv)) from exc


_KEY_PATTERNS = (
    re.compile(r"does not accept (?:nested )?(?:option|key)s? '([\w.]+)'"),
    re.compile(r'[Kk]ey "([\w.]+)"'),
    re.compile(r"argument --([\w.]+)"),
)


def config_error_message(message: str, argv: list[str]) -> str:
    """One line: where the offending key was given (config file(s) or the command line) and the problem."""
    text = " ".join(message.split())
    key = next((m.group(1) for pat in _KEY_PATTERNS if (m := pat.search(text))), None)
    where = [str(f) for f in _config_files(argv) if key is not None and _has_key(_load_yaml(f), key)]
    if key is not None and any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv):
        where.append("command line")
    return f"invalid configuration ({', '.join(where) or 'config'}): {text}"


def _config_files(argv: list[str]) -> list[Path]:
    """The ``--config`` files of ``argv`` with their ``__base__`` chains (files only)."""
    out: list[Path] = []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is None or not Path(value).is_file():
            continue
        stack = [Path(value).resolve()]
        while stack:
            path = stack.pop()
            if path in out or not path.is_file():
                continue
            out.append(path)
            bases = _load_yaml(path).get(BASE_KEY) or []
            stack += [path.parent / b for b in ([bases] if isinstance(bases, str) else bases)]
    return out


def _has_key(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_trainer_flags(cfg: dict[str, Any]) -> None:
    """Refuse trainer flags that contradict each other (before anything runs)."""
    if cfg.get("deterministic") not in (None, False) and cfg.get("benchmark") is True:
        raise ConfigError(
            "trainer.deterministic and trainer.benchmark: true contradict each other (cuDNN benchmarking "
            "picks kernels by timing, so results change from run to run); drop one of them"
        )


def ensure_run_dir(root: Path) -> None:
    """Create the run folder now, so an unwritable location fails with one line before any work."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the run folder ({exc.strerror or exc})") from exc


class _ParseOnlyCLI(CtsegCLI):
    """Parses and validates a configuration without building the model, data or trainer."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


@functools.cache
def _parse_only_parser() -> LightningArgumentParser:
    # Building LightningCLI's parsers costs seconds; build them once and re-use them for validation.
    cli = _ParseOnlyCLI(
        SegmentationModule,
        SegmentationDataModule,
        args=["fit", "--data.root", "."],
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "ctseg"},
    )
    return cli.parser


def parse_config(command: str, argv: list[str]) -> Any:
    """The resolved config (a jsonargparse ``Namespace`` of the sub-command) of ``ctseg <command> argv``.

    Validates types and keys like ``ctseg <command>`` does, without building model, data or trainer.
    """
    if command not in SUBCOMMANDS:
        raise ConfigError(f"unknown command {command!r}; expected one of {', '.join(SUBCOMMANDS)}")
    return _parse_only_parser().parse_args([command, *expand_argv(list(argv))])[command]
