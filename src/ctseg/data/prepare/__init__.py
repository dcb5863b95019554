"""``ctseg prepare``: official dataset archives or folders → the prepared layout (:mod:`ctseg.data.layout`).

Preparers are registered by dataset name (:func:`register_preparer`); :func:`prepare` looks one up,
resolves the protocol and runs :func:`ctseg.data.prepare.runner.run_prepare`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ctseg.data.prepare.runner import Preparer, PrepareResult, SourceItem, run_prepare
from ctseg.data.protocols import Protocol, get_protocol
from ctseg.utils.registry import Registry

# Keyed by dataset name: "unknown dataset 'x'; known: ..." is what a user typing `ctseg prepare x` needs.
_PREPARERS: Registry[type[Preparer]] = Registry("dataset")


def register_preparer(name: str) -> Callable[[type[Preparer]], type[Preparer]]:
    """Class decorator registering a :class:`Preparer` under the dataset name ``name``."""
    return _PREPARERS.register(name)


def get_preparer(name: str) -> Preparer:
    return _PREPARERS[name]()  # an unknown name is a ConfigError listing the known ones


def list_preparers() -> list[str]:
    return _PREPARERS.names()


def prepare(
    dataset: str,
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    protocol: str | Protocol | dict[str, Any] | None = None,
    *,
    unknown_colors: str = "error",
    overwrite: bool = False,
    progress: bool = False,
    **overrides: Any,
) -> PrepareResult:
    """Prepare ``dataset`` from ``src`` (folder(s) and/or zip archive(s)) into ``out``.

    ``protocol`` defaults to the dataset's default preset; ``overrides`` change protocol fields
    (e.g. ``mask_interp="bicubic"``, ``val_is_test=True``).
    """
    preparer = get_preparer(dataset)
    proto = get_protocol(protocol or preparer.default_protocol, **overrides)
    srcs = [src] if isinstance(src, str | Path) else list(src)
    return run_prepare(
        preparer, srcs, out, proto, unknown_colors=unknown_colors, overwrite=overwrite, progress=progress
    )


# Importing the dataset modules registers their preparers.
from ctseg.data.prepare import dubai, isprs, loveda  # noqa: E402

__all__ = [
    "PrepareResult",
    "Preparer",
    "SourceItem",
    "dubai",
    "get_preparer",
    "isprs",
    "list_preparers",
    "loveda",
    "prepare",
    "register_preparer",
    "run_prepare",
]
