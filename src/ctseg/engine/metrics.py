"""Dataset-level segmentation metrics from one confusion matrix (reference-spec §5).

One confusion matrix is accumulated over *all* evaluated pixels (ignore pixels dropped) and summed
across processes (torchmetrics state sync), so per-class numbers do not depend on batch size or on the
number of GPUs. With ``tp = diag``, ``fp = colsum - tp``, ``fn = rowsum - tp``:
``IoU = tp/(tp+fp+fn)``, ``P = tp/(tp+fp)``, ``R = tp/(tp+fn)``, ``F1 = 2PR/(P+R)``,
``OA = Σtp/Σcm`` over all classes; mIoU / mF1 = NaN-mean over the protocol's mean classes
(a class with 0/0 is NaN and left out of the mean, as in the reference evaluator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


@dataclass(frozen=True)
class SegmentationScores:
    """Per-class and summary scores; per-class lists are in class-index order (NaN = undefined)."""

    classes: tuple[str, ...]
    mean_classes: tuple[str, ...]
    iou: tuple[float, ...]
    f1: tuple[float, ...]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    oa: float
    miou: float
    mf1: float
    pixels: int
    confusion: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if v != v else v  # NaN → null in JSON

        return {
            "mIoU": clean(self.miou),
            "mF1": clean(self.mf1),
            "OA": clean(self.oa),
            "mean_classes": list(self.mean_classes),
            "pixels": self.pixels,
            "per_class": {
                c: {
                    "IoU": clean(self.iou[i]),
                    "F1": clean(self.f1[i]),
                    "precision": clean(self.precision[i]),
                    "recall": clean(self.recall[i]),
                }
                for i, c in enumerate(self.classes)
            },
            "confusion_matrix": [list(r) for r in self.confusion],
        }


def _div(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b > 0, a / b.clamp_min(1e-300), torch.full_like(a, float("nan")))


def scores_from_confusion(
    cm: Tensor, classes: Sequence[str], mean_indices: Sequence[int] | None = None
) -> SegmentationScores:
    """Scores of a ``(K, K)`` confusion matrix (rows = ground truth, columns = prediction)."""
    cm = cm.detach().to("cpu", torch.float64)
    k = cm.shape[0]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for a {k}×{k} confusion matrix")
    idx = list(range(k)) if mean_indices is None else list(mean_indices)
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    iou = _div(tp, tp + fp + fn)
    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn)
    f1 = _div(2 * precision * recall, precision + recall)
    # Both P and R defined but zero → F1 is 0, not NaN.
    f1 = torch.where(precision.isfinite() & recall.isfinite() & f1.isnan(), torch.zeros_like(f1), f1)
    total = cm.sum()
    oa = float(tp.sum() / total) if total > 0 else float("nan")
    return SegmentationScores(
        classes=tuple(classes),
        mean_classes=tuple(classes[i] for i in idx),
        iou=tuple(iou.tolist()),
        f1=tuple(f1.tolist()),
        precision=tuple(precision.tolist()),
        recall=tuple(recall.tolist()),
        oa=oa,
        miou=float(iou[idx].nanmean()),
        mf1=float(f1[idx].nanmean()),
        pixels=int(total),
        confusion=tuple(tuple(int(v) for v in row) for row in cm.to(torch.int64).tolist()),
    )


class SegmentationMetrics(Metric):
    """Accumulates a confusion matrix over pixels whose target is a class index; synced by summation.

    ``update(preds, target)``: ``preds`` either ``(B, K, H, W)`` logits or ``(B, H, W)`` class indices,
    ``target`` ``(B, H, W)`` long with ``ignore_index`` for pixels to skip.
    ``compute()`` returns the synced ``(K, K)`` confusion matrix (rows = ground truth); :meth:`scores`
    the :class:`SegmentationScores` computed from it.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        classes: Sequence[str],
        ignore_index: int = 255,
        mean_indices: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.classes = tuple(classes)
        self.num_classes = len(self.classes)
        self.ignore_index = ignore_index
        self.mean_indices = None if mean_indices is None else tuple(mean_indices)
        # int64: a 6000² tile set overflows int32 counts long before an epoch ends.
        self.add_state(
            "confmat",
            default=torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} != target shape {tuple(target.shape)}")
        target = target.reshape(-1)
        preds = preds.reshape(-1)
        keep = (target >= 0) & (target < self.num_classes)
        k = self.num_classes
        flat = target[keep].long() * k + preds[keep].long().clamp(0, k - 1)
        self.confmat += torch.bincount(flat, minlength=k * k).reshape(k, k).to(self.confmat.device)

    def compute(self) -> Tensor:
        return self.confmat.clone()

    def scores(self) -> SegmentationScores:
        """Scores of the confusion matrix accumulated so far (synced across processes)."""
        return scores_from_confusion(self.compute(), self.classes, self.mean_indices)


def flat_metrics(scores: SegmentationScores, prefix: str) -> dict[str, float]:
    """Scalar view for loggers: ``{prefix}/mIoU``, ``{prefix}/mF1``, ``{prefix}/OA``, ``{prefix}/IoU/<class>``."""
    out = {f"{prefix}/mIoU": scores.miou, f"{prefix}/mF1": scores.mf1, f"{prefix}/OA": scores.oa}
    for i, c in enumerate(scores.classes):
        out[f"{prefix}/IoU/{c}"] = scores.iou[i]
        out[f"{prefix}/F1/{c}"] = scores.f1[i]
    return out
