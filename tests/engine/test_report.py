from __future__ import annotations

import json

import torch

from ctseg.data.protocols import get_protocol
from ctseg.engine.callbacks import format_epoch_line
from ctseg.engine.metrics import scores_from_confusion
from ctseg.engine.report import best_epoch, write_report


def _scores(seed: int):
    g = torch.Generator().manual_seed(seed)
    proto = get_protocol("synthetic")
    cm = torch.randint(0, 50, (6, 6), generator=g) + torch.eye(6, dtype=torch.int64) * 100
    return scores_from_confusion(cm, proto.classes, proto.mean_class_indices).to_dict()


def _history():
    return [
        {
            "epoch": e,
            "train_loss": 2.0 - e / 10,
            "val_loss": 1.0,
            "seconds": 1.5,
            "val": _scores(e),
            "ct": {"active": 1.0, "clipped": 0.25, "stage0/positives": 10.0},
        }
        for e in range(3)
    ]


def test_best_epoch_is_highest_val_miou():
    hist = _history()
    best = best_epoch(hist)
    assert best["val"]["mIoU"] == max(h["val"]["mIoU"] for h in hist)
    assert best_epoch([{"epoch": 0, "val": None}]) is None


def test_fit_report_files_name_protocol_and_best_epoch(tmp_path):
    proto = get_protocol("synthetic")
    paths = write_report(
        tmp_path,
        stage="fit",
        protocol=proto.to_dict(),
        protocol_summary=proto.summary(),
        model={"name": "unetformer", "ct": {"loss": "cl"}},
        scores=None,
        history=_history(),
        config={"model": {"lr": 1e-3}},
        seconds=12.0,
    )
    data = json.loads(paths["metrics"].read_text())
    best = best_epoch(_history())
    assert data["protocol"] == "synthetic" and data["best_epoch"] == best["epoch"]
    assert data["scores"]["mIoU"] == best["val"]["mIoU"]
    assert set(data["scores"]["per_class"]) == set(proto.classes)
    md = paths["report"].read_text()
    assert proto.summary() in md and "| car |" in md and "CT statistics" in md and "lr: 0.001" in md
    assert paths["curves"].read_bytes()[:4] == b"\x89PNG"


def test_test_report_prefix_and_strict_json(tmp_path):
    proto = get_protocol("synthetic")
    cm = torch.zeros(6, 6, dtype=torch.int64)
    cm[0, 0] = 5  # every other class NaN
    scores = scores_from_confusion(cm, proto.classes, proto.mean_class_indices).to_dict()
    paths = write_report(
        tmp_path,
        stage="test",
        protocol=proto.to_dict(),
        protocol_summary=proto.summary(),
        model={"name": "m", "ct": None},
        scores=scores,
        split="test",
    )
    assert paths["metrics"].name == "test_metrics.json"
    text = paths["metrics"].read_text()

    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    data = json.loads(text, parse_constant=no_constants)
    assert data["scores"]["per_class"]["car"]["IoU"] is None


def test_epoch_line_is_one_concise_line():
    rec = _history()[1]
    line = format_epoch_line(rec, 3)
    assert (
        "\n" not in line
        and "epoch 2/3" in line
        and "val mIoU" in line
        and "CT active 100% clipped 25%" in line
    )
