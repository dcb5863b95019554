"""Grid specs: (model preset × CT setting × seed) over one protocol, and the cells they expand to.

A grid file (YAML)::

    name: dubai-cpu
    protocol: dubai                  # recorded and passed as data.protocol (null = the data's own)
    data:
      root: data/dubai               # prepared folder (relative to the working directory)
      prepare:                       # optional: how `experiment run` makes it when missing
        dataset: dubai
        src: ../shared/data/dubai/Semantic segmentation dataset
    configs: [../dubai/base.yaml]    # training recipe for every cell (relative to this file)
    overrides: {trainer: {max_epochs: 12}}
    models:                          # rows
      unetformer: {model: {model: unetformer}}
    settings:                        # CT settings; each a mapping of config values, `config:` files
      baseline: {model: {ct: null}}  # and/or `extends: <other setting>`
      cl: {config: ../potsdam-paper/ct-cl.yaml}
    baseline: baseline               # the setting every other one is compared with
    seeds: [0, 1, 2]
    output: runs/experiments/dubai-cpu

A cell's config is one mapping, deep-merged in this order: the grid's ``configs`` files (each with its
``__base__`` chain), ``overrides``, the model entry, the setting entry, then what the runner owns
(``seed_everything``, ``data.seed``, ``data.root``, ``data.protocol``, ``trainer.default_root_dir``).
Deep-merged means nested mappings combine key by key (``model.ct.temperature`` alone changes only the
temperature of an inherited ``model.ct``), and ``null`` or a non-mapping value replaces. The merged
mapping is written to ``<cell>/cell.yaml`` and is the only ``--config`` of the cell's ``ctseg fit``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctseg.errors import ConfigError
from ctseg.utils.io import read_yaml_mapping

BASE_KEY = "__base__"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_GRID_KEYS = {
    "name",
    "description",
    "protocol",
    "data",
    "configs",
    "overrides",
    "models",
    "settings",
    "baseline",
    "seeds",
    "output",
    "test",
}
_PART_KEYS = {"config", "extends", "label"}


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``: mappings merge key by key, anything else (``None`` included) replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = _copy(value)
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (empty file = ``{}``)."""
    return read_yaml_mapping(path, "file")


def load_config_chain(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A training config with its ``__base__`` files applied first (same order as ``ctseg fit``)."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"{path}: circular {BASE_KEY} chain: {chain}")
    data = load_yaml_mapping(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_config_chain(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


@dataclass(frozen=True)
class PrepareSpec:
    """How to make the grid's data folder when it is missing.

    ``dataset`` is a ``ctseg prepare`` dataset (``src``: its official files, relative to the working
    directory) or ``synthetic`` (``options``: arguments of ``write_synthetic_dataset``, no ``src``).
    """

    dataset: str
    src: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One training run of the grid: a model row, a CT setting, a seed.

    ``id`` is ``<model>/<setting>/seed<seed>``, also the run folder relative to the grid's output.
    """

    model: str
    setting: str
    seed: int
    run_dir: Path
    config: dict[str, Any] = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.model}/{self.setting}/seed{self.seed}"

    @property
    def config_hash(self) -> str:
        """Hash of the cell's config, to notice a finished cell whose grid entry has since changed."""
        text = json.dumps(self.config, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid file (see the module docstring)."""

    name: str
    path: Path
    description: str
    protocol: str | None
    data_root: Path
    prepare: PrepareSpec | None
    base: dict[str, Any]
    models: dict[str, dict[str, Any]]
    settings: dict[str, dict[str, Any]]
    labels: dict[str, str]
    baseline: str | None
    seeds: tuple[int, ...]
    output: Path
    test: str = "auto"

    def cells(self) -> list[Cell]:
        """Every cell, in row order (model, then setting, then seed)."""
        out = []
        for m, model_part in self.models.items():
            for s, setting_part in self.settings.items():
                for seed in self.seeds:
                    run_dir = self.output / m / s / f"seed{seed}"
                    cfg = deep_merge(deep_merge(self.base, model_part), setting_part)
                    cfg = deep_merge(
                        cfg,
                        {
                            "seed_everything": seed,
                            "trainer": {"default_root_dir": str(run_dir)},
                            "data": {"root": str(self.data_root), "seed": seed},
                        },
                    )
                    if self.protocol is not None:
                        cfg = deep_merge(cfg, {"data": {"protocol": self.protocol}})
                    out.append(Cell(m, s, seed, run_dir, cfg))
        return out

    def select(self, patterns: Sequence[str] | None) -> list[Cell]:
        """Cells whose id matches any of ``patterns`` (exact or shell-style ``*``); all when ``None``."""
        cells = self.cells()
        if not patterns:
            return cells
        chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c.id, p) for c in cells)]
        if unmatched:
            raise ConfigError(
                f"{self.path}: no cell matches {', '.join(repr(p) for p in unmatched)}; "
                f"cells are <model>/<setting>/seed<N>, e.g. {cells[0].id!r} (`ctseg experiment list`)"
            )
        return chosen

    def to_dict(self) -> dict[str, Any]:
        """What the report needs to know about the grid (written to ``<output>/grid.json``)."""
        return {
            "name": self.name,
            "file": str(self.path),
            "description": self.description,
            "protocol": self.protocol,
            "data_root": str(self.data_root),
            "models": list(self.models),
            "settings": list(self.settings),
            "labels": self.labels,
            "baseline": self.baseline,
            "seeds": list(self.seeds),
            "cells": [c.id for c in self.cells()],
        }


def _check_name(path: Path, what: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{path}: {what} name {name!r} must be letters, digits and _.+- (it becomes a folder name)"
        )
    return name


def _resolve_part(
    path: Path, what: str, name: str, raw: Any, others: Mapping[str, Any], _seen: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A model / setting entry as one config mapping (``extends`` and ``config`` files resolved)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: {what} {name!r} must be a mapping of config values, got {raw!r}")
    raw = dict(raw)
    raw.pop("label", None)
    merged: dict[str, Any] = {}
    parent = raw.pop("extends", None)
    if parent is not None:
        if parent not in others:
            raise ConfigError(f"{path}: {what} {name!r} extends unknown {what} {parent!r}")
        if parent in (*_seen, name):
            raise ConfigError(
                f"{path}: {what} {name!r}: circular extends ({' -> '.join((*_seen, name, parent))})"
            )
        merged = _resolve_part(path, what, parent, others[parent], others, (*_seen, name))
    files = raw.pop("config", [])
    for f in [files] if isinstance(files, str) else files:
        merged = deep_merge(merged, load_config_chain(path.parent / f))
    return deep_merge(merged, raw)


def load_grid(
    path: str | Path, *, output: str | Path | None = None, data_root: str | Path | None = None
) -> GridSpec:
    """Parse a grid file; ``output`` / ``data_root`` override the file's (e.g. to run it on other data)."""
    path = Path(path)
    raw = load_yaml_mapping(path)
    unknown = set(raw) - _GRID_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_GRID_KEYS)}")
    name = _check_name(path, "grid", raw.get("name", path.stem))

    data = raw.get("data") or {}
    if not isinstance(data, Mapping) or ("root" not in data and data_root is None):
        raise ConfigError(f"{path}: data.root (the prepared folder) is required")
    prep = None
    if data.get("prepare") is not None:
        p = data["prepare"]
        if not isinstance(p, Mapping) or "dataset" not in p:
            raise ConfigError(f"{path}: data.prepare needs 'dataset' (and 'src' or 'options'), got {p!r}")
        src = p.get("src") or []
        options = p.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{path}: data.prepare.options must be a mapping, got {options!r}")
        if p["dataset"] != "synthetic" and not src:
            raise ConfigError(f"{path}: data.prepare.src (the dataset's official files) is required")
        prep = PrepareSpec(
            str(p["dataset"]), tuple(str(s) for s in ([src] if isinstance(src, str) else src)), dict(options)
        )

    base: dict[str, Any] = {}
    configs = raw.get("configs") or []
    for f in [configs] if isinstance(configs, str) else configs:
        base = deep_merge(base, load_config_chain(path.parent / f))
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{path}: overrides must be a mapping of config values")
    base = deep_merge(base, overrides)
    # The engine's progress bar is noise in a cell log; the one-line epoch summary remains.
    base = deep_merge({"trainer": {"enable_progress_bar": False}}, base)

    parts: dict[str, dict[str, dict[str, Any]]] = {}
    labels: dict[str, str] = {}
    for what in ("models", "settings"):
        entries = raw.get(what)
        if not isinstance(entries, Mapping) or not entries:
            raise ConfigError(f"{path}: '{what}' must be a non-empty mapping of name -> config values")
        for n, entry in entries.items():
            _check_name(path, what[:-1], n)
            if isinstance(entry, Mapping) and entry.get("label"):
                labels[n] = str(entry["label"])
            unknown_part = {k for k in (entry or {}) if k not in _PART_KEYS} - {
                "trainer",
                "model",
                "data",
                "seed_everything",
            }
            if unknown_part:
                raise ConfigError(
                    f"{path}: {what[:-1]} {n!r} has unknown keys {sorted(unknown_part)}; allowed: "
                    "trainer, model, data, seed_everything, config, extends, label"
                )
        parts[what] = {n: _resolve_part(path, what[:-1], n, e, entries) for n, e in entries.items()}

    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(
            f"{path}: seeds must be a non-empty list of integers >= 0 (or a count), got {seeds!r}"
        )
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds repeat: {seeds}")

    baseline = raw.get("baseline")
    if baseline is not None and baseline not in parts["settings"]:
        raise ConfigError(
            f"{path}: baseline {baseline!r} is not one of the settings {list(parts['settings'])}"
        )
    test = str(raw.get("test", "auto"))
    if test not in ("auto", "never"):
        raise ConfigError(
            f"{path}: test must be 'auto' (evaluate when test labels exist) or 'never', got {test!r}"
        )
    return GridSpec(
        name=name,
        path=path,
        description=str(raw.get("description", "")).strip(),
        protocol=None if raw.get("protocol") is None else str(raw["protocol"]),
        data_root=Path(data_root if data_root is not None else data["root"]),
        prepare=prep,
        base=base,
        models=parts["models"],
        settings=parts["settings"],
        labels=labels,
        baseline=baseline,
        seeds=tuple(seeds),
        output=Path(output if output is not None else raw.get("output", f"runs/experiments/{name}")),
        test=test,
    )
