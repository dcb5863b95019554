"""The grid report is computed from run folders: fake fit outputs in the engine's metrics.json format."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from ctseg.errors import DataError
from ctseg.experiments.report import collect_runs, write_report

CLASSES = ["building", "land", "road"]
SUMMARY = "toy (mean over all of 3 classes)"


def _scores(miou: float, ious: list[float], cm: list[list[int]] | None = None) -> dict:
    return {
        "mIoU": miou,
        "mF1": miou + 0.1,
        "OA": miou + 0.2,
        "mean_classes": CLASSES,
        "pixels": 100,
        "per_class": {
            c: {"IoU": v, "F1": None, "precision": None, "recall": None} for c, v in zip(CLASSES, ious)
        },
        "confusion_matrix": cm or [[10, 1, 0], [2, 20, 1], [0, 3, 30]],
    }


def fake_run(
    root: Path,
    model: str,
    setting: str,
    seed: int,
    mious: list[float | None],
    *,
    status: str = "finished",
    test: float | None = None,
    protocol: str = SUMMARY,
) -> Path:
    """A run folder as ``ctseg fit`` + the runner leave it; per-class IoU of epoch e = miou + e/100 … ."""
    run = root / model / setting / f"seed{seed}"
    run.mkdir(parents=True)
    history = []
    for e, m in enumerate(mious):
        val = None if m is None else _scores(m, [m + 0.01 * e, m, m - 0.01 * e])
        history.append({"epoch": e, "train_loss": 1.0 / (e + 1), "val": val, "ct": None, "seconds": 1.0})
    metrics = {
        "stage": "fit",
        "protocol": "toy",
        "protocol_summary": protocol,
        "model": {"name": f"{model}-preset", "ct": None if setting == "baseline" else {"loss": setting}},
        "history": history,
        "hardware": {"cpu": "x86_64", "cpu_count": 2, "gpus": [], "torch": "2.x", "lightning": "2.x"},
        "seconds": 12.0,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    record = {
        "model": model,
        "setting": setting,
        "seed": seed,
        "status": status,
        "wall_seconds": 60.0 * (seed + 1),
    }
    (run / "cell.json").write_text(json.dumps(record))
    if test is not None:
        (run / "test").mkdir()
        (run / "test" / "test_metrics.json").write_text(
            json.dumps({"stage": "test", "split": "test", "scores": _scores(test, [test, test, test])})
        )
    return run


@pytest.fixture
def two_rows(tmp_path: Path) -> Path:
    root = tmp_path / "grid"
    # best epochs: baseline seed0 epoch 1 (0.50), seed1 epoch 2 (0.54); cl seed0 epoch 0 (0.60), seed1 epoch 1 (0.58)
    fake_run(root, "unet", "baseline", 0, [0.40, 0.50, 0.45], test=0.45)
    fake_run(root, "unet", "baseline", 1, [0.30, None, 0.54], test=0.47)
    fake_run(root, "unet", "cl", 0, [0.60, 0.60, 0.59], test=0.52)
    fake_run(root, "unet", "cl", 1, [0.50, 0.58, 0.58], test=0.56)
    (root / "grid.json").write_text(
        json.dumps({"name": "toy-grid", "models": ["unet"], "settings": ["baseline", "cl"], "baseline": "baseline",
                    "labels": {"cl": "CL"}, "cells": ["unet/baseline/seed0", "unet/baseline/seed1", "unet/cl/seed0",
                                                      "unet/cl/seed1", "unet/cl/seed2"]})
    )  # fmt: skip
    return root


def test_report_numbers_match_hand_computed_values(two_rows: Path, tmp_path: Path):
    rep = write_report(two_rows, tmp_path / "out")
    base, cl = rep.rows
    assert (base.setting, cl.setting) == ("baseline", "cl") and base.is_baseline
    assert [r.best_epoch for r in base.runs] == [1, 2] and [r.best_epoch for r in cl.runs] == [0, 1]
    # Hand-computed: baseline (0.50, 0.54) mean 0.52, s = 0.028284; CL (0.60, 0.58) mean 0.59, s = 0.014142.
    # t = 0.07 / sqrt(0.0008/2 + 0.0002/2) = 3.1305; df = 0.0005² / (0.0004² + 0.0001²) = 1.4706.
    assert cl.welch is not None
    assert cl.welch.diff == pytest.approx(0.07)
    assert cl.welch.t == pytest.approx(3.1305, abs=1e-4)
    assert cl.welch.df == pytest.approx(1.4706, abs=1e-4)
    assert cl.p_holm == pytest.approx(cl.welch.p)  # one comparison: Holm changes nothing

    rows = {r["setting"]: r for r in csv.DictReader((tmp_path / "out" / "table.csv").open())}
    assert float(rows["baseline"]["mIoU_mean"]) == pytest.approx(0.52)
    assert float(rows["baseline"]["mIoU_std"]) == pytest.approx(math.sqrt(0.0008))
    assert float(rows["cl"]["mIoU_std"]) == pytest.approx(math.sqrt(0.0002))
    assert float(rows["cl"]["welch_t"]) == pytest.approx(3.1305, abs=1e-4)
    assert rows["baseline"]["welch_t"] == ""
    # Per-class IoU from each run's best epoch (not the last): baseline building = mean(0.51, 0.56).
    assert float(rows["baseline"]["iou_building_mean"]) == pytest.approx((0.50 + 0.01 + 0.54 + 0.02) / 2)
    assert float(rows["cl"]["iou_road_mean"]) == pytest.approx((0.60 + 0.58 - 0.01) / 2)
    assert rows["cl"]["best_epochs"] == "0 1"

    md = (tmp_path / "out" / "report.md").read_text()
    assert SUMMARY in md  # the protocol is stated
    assert "| unet | CL | 2 | 0.5900 ± 0.0141 |" in md
    assert "+0.0700" in md and "+3.13" in md and "1.5" in md
    assert "`unet/cl/seed2`: not finished" in md  # a grid cell without a run is listed, not averaged
    assert "x86_64 (2 CPUs" in md and "cell time" in md
    for name in ("curves.png", "per_class.png", "confusion.png", "report.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_test_split_table_is_separate_and_uses_the_selected_checkpoints(two_rows: Path, tmp_path: Path):
    write_report(two_rows, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Test split (checkpoint selected on validation only)" in md
    test_part = md.split("## Test split")[1].split("## Figures")[0]
    assert "| unet | CL | 2 | 0.5400 ± 0.0283 |" in test_part
    assert "Welch" not in test_part.split("|---")[0]  # no significance hunting on the test split
    rows = {r["setting"]: r for r in csv.DictReader((tmp_path / "out" / "test_table.csv").open())}
    assert float(rows["baseline"]["mIoU_mean"]) == pytest.approx(0.46)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows"][1]["test_stats"]["mIoU"]["mean"] == pytest.approx(0.54)


def test_unfinished_runs_are_left_out_with_a_note(two_rows: Path, tmp_path: Path):
    fake_run(two_rows, "unet", "cl", 2, [0.9, 0.95], status="running")
    rep = write_report(two_rows, tmp_path / "out")
    assert len(rep.rows[1].runs) == 2
    assert any("unet/cl/seed2" in n and "running" in n for n in rep.notes)


def test_single_seed_rows_print_na(tmp_path: Path):
    root = tmp_path / "g"
    fake_run(root, "unet", "baseline", 0, [0.5])
    fake_run(root, "unet", "cl", 0, [0.6])
    rep = write_report(root)
    assert rep.rows[1].welch is None
    md = (root / "report" / "report.md").read_text()
    assert "0.6000 ± n/a" in md and "| n/a | n/a |" in md


def test_plain_fit_folders_without_runner_records(tmp_path: Path):
    root = tmp_path / "g"
    for seed, m in ((0, 0.5), (1, 0.6)):
        run = fake_run(root, "unet", "baseline", seed, [m])
        (run / "cell.json").unlink()
    runs, _ = collect_runs(root)
    assert {(r.model, r.setting) for r in runs} == {("unet-preset", "baseline")}


def test_mixed_protocols_and_empty_folders_are_refused(tmp_path: Path):
    with pytest.raises(DataError, match="no finished run"):
        write_report(tmp_path)
    fake_run(tmp_path / "g", "unet", "baseline", 0, [0.5])
    fake_run(tmp_path / "g", "unet", "cl", 0, [0.5], protocol="other protocol")
    with pytest.raises(DataError, match="different protocols"):
        write_report(tmp_path / "g")
