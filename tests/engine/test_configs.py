"""Every shipped config parses with the real CLI parser and names things that exist."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from ctseg.engine.cli import BASE_KEY, expand_argv, expand_config, parse_config
from ctseg.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# LightningCLI configs of `ctseg fit`; configs/experiments/ holds `ctseg experiment` grids (their own schema).
FIT_FOLDERS = ("potsdam-paper", "dubai", "synthetic")


def _all_files() -> list[Path]:
    return sorted(p for folder in FIT_FOLDERS for p in (CONFIGS / folder).rglob("*.yaml"))


def test_no_unknown_config_folders():
    known = {*FIT_FOLDERS, "experiments"}
    assert {p.name for p in CONFIGS.iterdir() if p.is_dir()} <= known


def _bases() -> set[Path]:
    out: set[Path] = set()
    for f in _all_files():
        data = yaml.safe_load(f.read_text()) or {}
        bases = data.get(BASE_KEY, [])
        for b in [bases] if isinstance(bases, str) else bases:
            out.add((f.parent / b).resolve())
    return out


def _rows() -> list[Path]:
    bases = _bases()
    return [f for f in _all_files() if f.resolve() not in bases]


def test_every_file_is_a_row_or_a_base():
    rows, bases = _rows(), _bases()
    assert rows and bases
    for b in bases:
        assert b.is_file(), f"missing base {b}"
    assert {p.resolve() for p in _all_files()} == {r.resolve() for r in rows} | bases


def test_potsdam_paper_has_the_nine_table1_rows():
    names = {p.stem for p in (CONFIGS / "potsdam-paper").glob("*.yaml") if p.resolve() not in _bases()}
    assert names == {
        f"{m}{ct}" for m in ("dcswin", "unetformer", "dcpoolformer") for ct in ("", "-cl", "-infonce")
    }


@pytest.mark.parametrize("path", _rows(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_row_config_parses_and_names_existing_things(path):
    import ctseg.models
    from ctseg.contrastive import PatchContrastiveLoss
    from ctseg.data.protocols import get_protocol
    from ctseg.engine.losses import list_seg_losses
    from ctseg.engine.schedulers import list_schedules

    cfg = parse_config("fit", ["--config", str(path)])
    assert cfg.model.model in ctseg.models.list_models(), cfg.model.model
    assert cfg.model.seg_loss in list_seg_losses()
    assert cfg.model.scheduler in list_schedules()
    get_protocol(cfg.data.protocol)
    assert cfg.trainer.default_root_dir, "every row writes its own run folder"
    if cfg.model.ct is not None:
        accepted = set(inspect.signature(PatchContrastiveLoss).parameters)
        assert set(cfg.model.ct) <= accepted, set(cfg.model.ct) - accepted
    if path.parent.name == "potsdam-paper":
        # the paper's hyper-parameters (reference-spec §3, Table 1)
        assert cfg.data.batch_size == 32 and cfg.trainer.max_epochs == 50
        assert cfg.model.lr == pytest.approx(8e-5) and cfg.model.scheduler == "constant"
        assert cfg.model.weight_decay == pytest.approx(0.01)
        assert cfg.trainer.gradient_clip_val == pytest.approx(1.0)
        assert cfg.model.ct_group_size == 16
        if cfg.model.ct is not None:
            assert cfg.model.ct["clip"] == pytest.approx(1.0)
            if cfg.model.ct["loss"] == "cl":
                assert cfg.model.ct["smoothing"] == pytest.approx(0.1)
            else:
                assert cfg.model.ct["temperature"] == pytest.approx(0.1)


def test_command_line_overrides_win(tmp_path):
    row = CONFIGS / "potsdam-paper" / "unetformer-cl.yaml"
    cfg = parse_config("fit", ["--config", str(row), "--model.lr", "0.001", "--trainer.max_epochs", "2"])
    assert cfg.model.lr == pytest.approx(0.001) and cfg.trainer.max_epochs == 2
    assert cfg.model.ct["loss"] == "cl"  # the base chain still applies


def test_base_chain_order_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  lr: 0.1\n")
    (tmp_path / "b.yaml").write_text(f"{BASE_KEY}: a.yaml\nmodel:\n  lr: 0.2\n")
    items = expand_config(tmp_path / "b.yaml")
    assert items[0].endswith("a.yaml") and "0.2" in items[1] and BASE_KEY not in items[1]
    assert expand_argv(["--config", str(tmp_path / "a.yaml"), "--x", "1"]) == [
        "--config",
        str((tmp_path / "a.yaml").resolve()),
        "--x",
        "1",
    ]
    (tmp_path / "c.yaml").write_text(f"{BASE_KEY}: d.yaml\n")
    (tmp_path / "d.yaml").write_text(f"{BASE_KEY}: c.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        expand_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not found"):
        expand_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        expand_config(tmp_path / "bad.yaml")
