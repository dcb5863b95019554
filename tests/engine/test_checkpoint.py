"""Checkpoint errors that need no model; loading real checkpoints is covered in test_training.py."""

from __future__ import annotations

import pytest
import torch

from ctseg.engine.checkpoint import load_inference_model, read_checkpoint
from ctseg.errors import CheckpointError


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as exc:
        load_inference_model(tmp_path / "nope.ckpt")
    assert "nope.ckpt" in str(exc.value)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: cannot read"):
        read_checkpoint(bad)


def test_truncated_file(tmp_path):
    good = tmp_path / "t.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1000)}}, good)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t\.ckpt"):
        load_inference_model(good)


def test_not_a_ctseg_checkpoint(tmp_path):
    p = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "epoch": 1}, p)
    with pytest.raises(CheckpointError, match="not a ctseg checkpoint"):
        load_inference_model(p)
    q = tmp_path / "list.ckpt"
    torch.save([1, 2], q)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_inference_model(q)


def test_incomplete_block(tmp_path):
    p = tmp_path / "partial.ckpt"
    torch.save({"state_dict": {}, "ctseg": {"version": "0", "model": {"name": "x"}}}, p)
    with pytest.raises(CheckpointError, match="lacks"):
        load_inference_model(p)
