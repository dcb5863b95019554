"""Grid files: parsing, merging, cells, selection, and the shipped grids."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctseg.errors import ConfigError
from ctseg.experiments.grid import deep_merge, load_config_chain, load_grid

REPO = Path(__file__).resolve().parents[2]
GRIDS = REPO / "configs" / "experiments"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def grid_file(tmp_path: Path) -> Path:
    _write(tmp_path / "base.yaml", "trainer: {max_epochs: 3}\nmodel: {lr: 0.001, ct: null}\n")
    _write(tmp_path / "row.yaml", "__base__: base.yaml\nmodel: {lr: 0.002}\n")
    _write(tmp_path / "ct.yaml", "model: {ct: {loss: cl, clip: 1.0, clip_mode: clamp}}\n")
    return _write(
        tmp_path / "g.yaml",
        """
name: toy
protocol: synthetic
data: {root: data/toy}
configs: [row.yaml]
overrides: {trainer: {limit_train_batches: 2}}
models:
  m1: {model: {model: unetformer-paper}}
  m2: {label: Two, model: {model: dcswin-paper}}
settings:
  baseline: {}
  cl: {config: ct.yaml}
  cl-free: {extends: cl, model: {ct: {clip_mode: none}}}
baseline: baseline
seeds: [0, 5]
output: out/toy
""",
    )


def test_cells_expand_models_settings_seeds(grid_file: Path):
    g = load_grid(grid_file)
    cells = g.cells()
    assert len(cells) == 2 * 3 * 2
    assert cells[0].id == "m1/baseline/seed0" and cells[-1].id == "m2/cl-free/seed5"
    assert cells[-1].run_dir == Path("out/toy/m2/cl-free/seed5")
    assert g.labels == {"m2": "Two"}


def test_cell_config_is_the_deep_merge(grid_file: Path):
    g = load_grid(grid_file)
    cfg = {c.id: c.config for c in g.cells()}
    base = cfg["m1/baseline/seed0"]
    assert base["model"] == {"lr": 0.002, "ct": None, "model": "unetformer-paper"}  # __base__ then row file
    assert base["trainer"]["max_epochs"] == 3 and base["trainer"]["limit_train_batches"] == 2
    assert base["trainer"]["default_root_dir"] == "out/toy/m1/baseline/seed0"
    assert base["seed_everything"] == 0 and base["data"] == {
        "root": "data/toy",
        "seed": 0,
        "protocol": "synthetic",
    }
    assert cfg["m2/cl/seed5"]["model"]["ct"] == {"loss": "cl", "clip": 1.0, "clip_mode": "clamp"}
    # extends + a partial ct mapping changes one key of the inherited ct
    assert cfg["m2/cl-free/seed5"]["model"]["ct"] == {"loss": "cl", "clip": 1.0, "clip_mode": "none"}
    assert cfg["m2/cl-free/seed5"]["seed_everything"] == 5
    hashes = {c.config_hash for c in g.cells()}
    assert len(hashes) == 12


def test_select_by_id_and_pattern(grid_file: Path):
    g = load_grid(grid_file)
    assert [c.id for c in g.select(["m1/cl/seed5"])] == ["m1/cl/seed5"]
    assert len(g.select(["*/baseline/*"])) == 4
    with pytest.raises(ConfigError, match="no cell matches 'm3/cl/seed0'"):
        g.select(["m3/cl/seed0"])


def test_overrides_of_output_and_data(grid_file: Path):
    g = load_grid(grid_file, output="elsewhere", data_root="mydata")
    c = g.cells()[0]
    assert c.run_dir == Path("elsewhere/m1/baseline/seed0") and c.config["data"]["root"] == "mydata"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("bogus: 1\n", "unknown keys"),
        ("baseline: nope\n", "baseline 'nope' is not one of the settings"),
        ("seeds: [1, 1]\n", "seeds repeat"),
        ("seeds: []\n", "seeds must be"),
        ("test: always\n", "test must be"),
        ("models: {'a b': {}}\n", "must be letters"),
        ("settings: {x: {extends: y}}\n", "extends unknown"),
        ("settings: {x: {extends: y}, y: {extends: x}}\n", "circular extends"),
        ("settings: {x: {modle: {}}}\n", "unknown keys"),
        ("data: {prepare: {dataset: dubai}}\n", "data.root"),
    ],
)
def test_bad_grids_name_the_file_and_problem(grid_file: Path, patch: str, message: str):
    bad = grid_file.parent / "bad.yaml"
    bad.write_text(grid_file.read_text() + patch)
    with pytest.raises(ConfigError, match=message) as err:
        load_grid(bad)
    assert "bad.yaml" in str(err.value)


def test_circular_base_and_missing_files(tmp_path: Path):
    _write(tmp_path / "a.yaml", "__base__: b.yaml\n")
    _write(tmp_path / "b.yaml", "__base__: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config_chain(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_grid(tmp_path / "missing.yaml")


def test_deep_merge_replaces_with_none_and_scalars():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    assert deep_merge({"a": {"b": 1}}, {"a": None}) == {"a": None}
    assert deep_merge({"a": None}, {"a": {"b": 1}}) == {"a": {"b": 1}}


@pytest.mark.parametrize(
    ("name", "cells", "settings"),
    [
        ("potsdam-paper-table1", 27, ["baseline", "cl", "infonce"]),
        ("dubai-cpu", 9, ["baseline", "cl", "infonce"]),
        ("dubai-cpu-ct-sweep", 24, None),
        ("synthetic-smoke", 4, ["baseline", "cl"]),
    ],
)
def test_shipped_grids_parse(name: str, cells: int, settings: list[str] | None):
    g = load_grid(GRIDS / f"{name}.yaml")
    assert g.name == name and len(g.cells()) == cells and g.baseline == "baseline"
    if settings is not None:
        assert list(g.settings) == settings
    for c in g.cells():
        ct = c.config["model"].get("ct")
        assert (ct is None) == (c.setting == "baseline")
        assert c.config["trainer"]["default_root_dir"].endswith(c.id)


def test_dubai_grid_matches_its_description():
    g = load_grid(GRIDS / "dubai-cpu.yaml")
    cfg = g.cells()[0].config
    assert cfg["data"]["crop_size"] == 256 and cfg["data"]["batch_size"] == 4
    assert cfg["trainer"]["max_epochs"] * cfg["trainer"]["limit_train_batches"] == 240
    assert cfg["model"]["model"] == "unetformer-paper" and g.protocol == "dubai"
    assert g.prepare is not None and g.prepare.dataset == "dubai"
    # the sweep changes only CT: same recipe, data and seeds
    sweep = load_grid(GRIDS / "dubai-cpu-ct-sweep.yaml")
    strip = lambda c: {k: v for k, v in c.items() if k != "trainer"} | {"model": {**c["model"], "ct": None}}  # noqa: E731
    assert strip(sweep.cells()[0].config) == strip(cfg)
    assert sweep.seeds == g.seeds
