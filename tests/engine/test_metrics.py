"""Metrics equal a hand-computed confusion matrix; the 5-class mean follows reference-spec §5."""

from __future__ import annotations

import math

import pytest
import torch

from ctseg.data.protocols import get_protocol
from ctseg.engine.metrics import SegmentationMetrics, flat_metrics, scores_from_confusion

CLASSES = ("a", "b", "c")


def test_confusion_matrix_counts_and_ignore():
    # gt / pred pairs, counted by hand: (0,0)x2 (0,1)x1 (1,1)x2 (2,0)x1 (2,2)x1, ignore pixel dropped.
    target = torch.tensor([[[0, 0, 0, 1], [1, 2, 2, 255]]])
    preds = torch.tensor([[[0, 0, 1, 1], [1, 0, 2, 2]]])
    m = SegmentationMetrics(CLASSES, ignore_index=255)
    m.update(preds, target)
    s = m.scores()
    assert s.confusion == ((2, 1, 0), (0, 2, 0), (1, 0, 1))
    assert s.pixels == 7
    # class a: tp 2, fp 1 (gt c → a), fn 1 (a → b)
    assert s.iou[0] == pytest.approx(2 / 4)
    assert s.precision[0] == pytest.approx(2 / 3)
    assert s.recall[0] == pytest.approx(2 / 3)
    assert s.f1[0] == pytest.approx(2 / 3)
    # class b: tp 2, fp 1, fn 0
    assert s.iou[1] == pytest.approx(2 / 3)
    assert s.f1[1] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    # class c: tp 1, fp 0, fn 1
    assert s.iou[2] == pytest.approx(1 / 2)
    assert s.oa == pytest.approx(5 / 7)
    assert s.miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_logits_and_batches_accumulate_like_one_matrix():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 5, 5, generator=g)
    target = torch.randint(0, 3, (4, 5, 5), generator=g)
    whole = SegmentationMetrics(CLASSES)
    whole.update(logits, target)
    parts = SegmentationMetrics(CLASSES)
    for i in range(4):
        parts.update(logits[i : i + 1].argmax(1), target[i : i + 1])
    assert whole.scores().confusion == parts.scores().confusion


def test_potsdam_style_mean_over_five_classes_excludes_clutter():
    proto = get_protocol("synthetic")  # 6 ISPRS classes, mean over the first 5
    assert proto.mean_class_indices == (0, 1, 2, 3, 4)
    cm = torch.tensor(
        [
            [50, 2, 1, 0, 0, 3],
            [4, 40, 0, 1, 0, 2],
            [2, 0, 30, 5, 0, 1],
            [0, 1, 6, 25, 0, 0],
            [1, 0, 0, 0, 9, 1],
            [5, 3, 2, 0, 1, 4],
        ]
    )
    s = scores_from_confusion(cm, proto.classes, proto.mean_class_indices)
    cmf = cm.double()
    ious = [float(cmf[c, c] / (cmf[c, :].sum() + cmf[:, c].sum() - cmf[c, c])) for c in range(6)]
    assert s.miou == pytest.approx(sum(ious[:5]) / 5)  # spec §5: nanmean(IoU[:-1])
    assert s.miou != pytest.approx(sum(ious) / 6)
    f1 = []
    for c in range(6):
        p = float(cmf[c, c] / cmf[:, c].sum())
        r = float(cmf[c, c] / cmf[c, :].sum())
        f1.append(2 * p * r / (p + r))
    assert s.mf1 == pytest.approx(sum(f1[:5]) / 5)
    assert s.oa == pytest.approx(float(cmf.diag().sum() / cmf.sum()))  # OA over all 6 classes


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    s = scores_from_confusion(cm, CLASSES)
    assert math.isnan(s.iou[2]) and math.isnan(s.f1[2])
    assert s.miou == pytest.approx((3 / 4 + 2 / 3) / 2)
    d = s.to_dict()
    assert d["per_class"]["c"]["IoU"] is None  # strict JSON
    flat = flat_metrics(s, "val")
    assert flat["val/IoU/a"] == pytest.approx(0.75) and "val/mIoU" in flat


def test_predicted_but_never_present_class_has_zero_iou():
    cm = torch.tensor([[3, 1, 1], [0, 2, 0], [0, 0, 0]])
    s = scores_from_confusion(cm, CLASSES)
    assert s.iou[2] == 0.0 and s.precision[2] == 0.0 and math.isnan(s.recall[2])
