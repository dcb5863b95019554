"""``ctseg fit`` arguments shared by the engine and reliability tests: a 1-epoch run of a narrow, shallow
variant of the lightest paper preset on a tiny synthetic prepared set (same code paths as the preset, a
fraction of the CPU time)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAST = "unetformer-paper"  # the lightest paper preset
TINY = {
    "backbone_kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]},
    "decoder_kwargs": {"decode_channels": 16, "num_heads": 2},
}


def fit_args(data: Path, run: Path, *extra: str) -> list[str]:
    """``ctseg fit`` arguments (without the command) for a 1-epoch tiny run on ``data`` into ``run``."""
    return [
        "--config", str(REPO / "configs/synthetic/unetformer-cl.yaml"),
        "--data.root", str(data),
        "--data.crop_size", "64",
        "--data.batch_size", "2",
        "--data.val_batch_size", "2",
        "--data.num_workers", "0",
        "--trainer.default_root_dir", str(run),
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--tensorboard", "false",
        "--model.model_kwargs", json.dumps(TINY),
        *extra,
    ]  # fmt: skip
