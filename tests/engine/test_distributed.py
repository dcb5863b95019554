"""Distributed evaluation is exact: 2 processes (gloo, CPU) give the same confusion matrix as one.

The default test checks the metric sync + unpadded sharding directly (2 spawned processes, no model);
the slow one runs `ctseg fit` with 2 DDP processes and compares its final validation with a 1-process
`ctseg validate` of the same checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctseg.engine.metrics import SegmentationMetrics
from ctseg.engine.sampling import UnpaddedDistributedSampler

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("a", "b", "c", "d")
N = 7  # odd: a padded DistributedSampler would count one sample twice


def _data():
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 4, (N, 8, 8), generator=g)
    target = torch.randint(0, 4, (N, 8, 8), generator=g)
    target[:, 0, 0] = 255
    return preds, target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    preds, target = _data()
    metric = SegmentationMetrics(CLASSES, ignore_index=255)
    for i in UnpaddedDistributedSampler(range(N), world, rank):
        metric.update(preds[i : i + 1], target[i : i + 1])
    if rank == 1:
        metric.update(preds[:0], target[:0])  # an empty batch is harmless
    cm = metric.compute()
    if rank == 0:
        torch.save(cm, out)
    dist.destroy_process_group()


def test_two_process_confusion_matrix_equals_one_process(tmp_path):
    out = tmp_path / "cm.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    preds, target = _data()
    single = SegmentationMetrics(CLASSES, ignore_index=255)
    single.update(preds, target)
    assert torch.equal(torch.load(out), single.compute())


def _ctseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "ctseg", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_ddp_fit_metrics_equal_single_process_validate(tmp_path):
    # In the default suite (about 25 s on 2 idle cores): the training issue asks for it in CI.
    from ctseg.data.synthetic import write_synthetic_dataset

    root = tmp_path / "data"
    write_synthetic_dataset(root, n_train=4, n_val=3, n_test=1, size=64, seed=0)
    run = tmp_path / "run"
    tiny = json.dumps(
        {
            "backbone_kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]},
            "decoder_kwargs": {"decode_channels": 16, "num_heads": 2},
        }
    )
    common = [
        "--config", str(REPO / "configs/synthetic/unetformer-cl.yaml"),
        "--data.root", str(root), "--data.crop_size", "64", "--data.batch_size", "1",
        "--data.val_batch_size", "2", "--model.model_kwargs", tiny,
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--tensorboard", "false",
    ]  # fmt: skip
    fit = _ctseg(
        "fit", *common, "--trainer.max_epochs", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        # The paper CT config records CUDA graphs, which cannot hold the gather's collectives.
        "--model.ct_gather_negatives", "true", "--model.ct.cuda_graph", "false", cwd=tmp_path,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    fitted = json.loads((run / "metrics.json").read_text())
    assert fitted["hardware"]["world_size"] == 2
    val = _ctseg("validate", *common, "--ckpt_path", str(run / "checkpoints/last.ckpt"), cwd=tmp_path)
    assert val.returncode == 0, val.stderr[-3000:]
    single = json.loads((run / "validate_metrics.json").read_text())
    assert single["hardware"]["world_size"] == 1
    ddp_scores = fitted["history"][-1]["val"]
    assert ddp_scores["confusion_matrix"] == single["scores"]["confusion_matrix"]
    assert ddp_scores["per_class"] == single["scores"]["per_class"]
    assert ddp_scores["pixels"] == 3 * 64 * 64
