"""Inference at scale: sliding-window prediction with blended logits, TTA, file I/O, evaluation.

* :func:`predict_large` — predict an array, image or GeoTIFF in memory (label map, optional probabilities).
* :func:`predict_file` — predict an image or GeoTIFF scene into files with bounded memory.
* :class:`SlidingWindow`, :func:`iter_blended_rows` — the streaming core.
* :class:`TTA` — flips / rot90 / multi-scale test-time augmentation around any network.
* :func:`evaluate_tiles` — full-tile evaluation of prepared data at native resolution.
"""

from ctseg.inference.io import NODATA_LABEL
from ctseg.inference.predict import PredictedFile, predict_file
from ctseg.inference.sliding import (
    BLEND_WINDOWS,
    Prediction,
    SlidingWindow,
    blend_weights,
    iter_blended_rows,
    predict_large,
)
from ctseg.inference.tta import TTA, maybe_tta


def __getattr__(name: str) -> object:
    # Evaluation pulls in the engine's metrics (torchmetrics); only import it when asked for.
    if name in ("EvalReport", "evaluate_tiles"):
        from ctseg.inference import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BLEND_WINDOWS",
    "NODATA_LABEL",
    "TTA",
    "EvalReport",
    "PredictedFile",
    "Prediction",
    "SlidingWindow",
    "blend_weights",
    "evaluate_tiles",
    "iter_blended_rows",
    "maybe_tta",
    "predict_file",
    "predict_large",
]
