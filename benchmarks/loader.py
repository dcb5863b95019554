"""Loader throughput with the training augmentations vs. what a training step consumes, side by side.

    .venv/bin/python benchmarks/loader.py                      # 512², 2 workers, B = 8 (docs/benchmarks.md)
    .venv/bin/python benchmarks/loader.py --size 128 --batches 4 --model-steps 1   # quick look
    .venv/bin/python benchmarks/loader.py --skip-model        # loader half only
    .venv/bin/python benchmarks/loader.py --skip-model --profile   # + ms per sample of each step

One process, in this order: (1) the loader: ``SegmentationDataModule`` on a synthetic prepared folder
(``write_synthetic_dataset``, protocol "synthetic", tiles of ``--size`` px) with the default training
augmentation (mosaic 0.25, random scale {0.75, 1, 1.25, 1.5}, SmartCrop to ``--size``, flips, rot90,
normalise) and, as a second row, the same plus colour jitter; images/s over ``--batches`` batches after
one warm-up batch (worker start-up excluded); the main process only iterates. (2) the consumer:
``ctseg.models.create("dcpoolformer-paper", num_classes=6)``, random init, one training step = forward,
cross-entropy (ignore 255), backward, AdamW step on a batch from the loader; images/s over
``--model-steps`` steps after one warm-up step. The loader must be >= 3x faster than the step consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def time_loader(
    root: Path, size: int, batch: int, workers: int, batches: int, augment: dict[str, Any]
) -> dict:
    from ctseg.data.datamodule import SegmentationDataModule

    dm = SegmentationDataModule(
        root=root, batch_size=batch, num_workers=workers, crop_size=size, augment=augment, seed=0
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    first = next(it)  # worker start-up and first batch, not timed
    n = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        n += b["image"].shape[0]
    seconds = time.perf_counter() - start
    del it
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "batch": first}


def profile_steps(root: Path, size: int, repeats: int = 10) -> dict[str, float]:
    """Milliseconds per 512² sample for loading and each augmentation step, one thread, main process."""
    from ctseg.data.datasets import SegmentationDataset
    from ctseg.data.transforms import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        AugmentConfig,
        TransformContext,
        build_transform,
        normalize_transform,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = SegmentationDataset(root, "train")
    ctx = TransformContext(
        num_classes=ds.protocol.num_classes,
        ignore_index=ds.protocol.ignore_index,
        crop_size=size,
        crop_window=size,
    )
    # Probabilities 1 so each step always does its work; scale 1.25 (a real resize).
    cfg = AugmentConfig(
        scales=(1.25,), hflip_p=1.0, vflip_p=1.0, rot90_p=1.0, color_jitter=(0.3, 0.3, 0.3, 0.05)
    )

    def ms(fn: Any) -> float:
        start = time.perf_counter()
        for i in range(repeats):
            fn(i)
        return 1000 * (time.perf_counter() - start) / repeats

    out = {"load (decode image + mask, checks)": ms(lambda i: ds.load(i % len(ds)))}
    sample = ds.load(0)
    for name in ("random_scale", "smart_crop", "hflip", "vflip", "rot90", "color_jitter"):
        step = build_transform(name, cfg, ctx)
        out[name] = ms(lambda i, step=step: step(dict(sample)))
    norm = normalize_transform(IMAGENET_MEAN, IMAGENET_STD)
    out["normalize"] = ms(lambda i: norm(dict(sample)))
    torch.set_num_threads(threads)
    return out


def time_model(batch: dict, steps: int) -> dict:
    import ctseg.models

    torch.manual_seed(0)
    model = ctseg.models.create("dcpoolformer-paper", num_classes=6)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=8e-5, weight_decay=0.01)
    x, y = batch["image"], batch["mask"]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=255)
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    n = steps * x.shape[0]
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="tile and crop side (px)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tiles", type=int, default=24, help="synthetic training tiles")
    p.add_argument("--batches", type=int, default=12, help="timed loader batches per row")
    p.add_argument("--model-steps", type=int, default=2, help="timed training steps")
    p.add_argument("--skip-model", action="store_true", help="loader half only")
    p.add_argument("--profile", action="store_true", help="also time loading and each step per sample")
    p.add_argument("--data", type=Path, default=None, help="reuse/keep the synthetic folder here")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    from ctseg.data.synthetic import write_synthetic_dataset

    tmp = None
    root = args.data
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctseg-loader-bench-")
        root = Path(tmp.name) / "data"
    write_synthetic_dataset(root, n_train=args.tiles, n_val=0, n_test=0, size=args.size, seed=0)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; protocol: synthetic, {args.size}² tiles, B = {args.batch}"
    )
    rows: dict[str, Any] = {}
    if args.profile:
        rows["profile_ms_per_sample"] = profile_steps(root, args.size)
        for name, value in rows["profile_ms_per_sample"].items():
            print(f"  per sample, 1 thread: {name:36s} {value:7.2f} ms")
    configs = {
        "loader, default augmentation": {},
        "loader, default + colour jitter": {"color_jitter": (0.3, 0.3, 0.3, 0.05)},
    }
    batch = None
    for name, augment in configs.items():
        r = time_loader(root, args.size, args.batch, args.workers, args.batches, augment)
        batch = batch if batch is not None else r.pop("batch")
        r.pop("batch", None)
        rows[name] = r
        print(
            f"{name:42s} {r['images_per_s']:8.1f} images/s  ({r['images']} images in {r['seconds']:.2f} s, {args.workers} workers)"
        )

    if not args.skip_model:
        try:
            r = time_model(batch, args.model_steps)
        except (ImportError, AttributeError) as exc:
            print(f"model half skipped: ctseg.models.create('dcpoolformer-paper') unavailable ({exc})")
        else:
            rows["train step, dcpoolformer-paper"] = r
            print(
                f"{'train step, dcpoolformer-paper':42s} {r['images_per_s']:8.1f} images/s  "
                f"({r['seconds'] / args.model_steps:.2f} s/step at B = {args.batch})"
            )
            for name in configs:
                ratio = rows[name]["images_per_s"] / r["images_per_s"]
                rows[name]["ratio_to_step"] = ratio
                verdict = "ok" if ratio >= 3 else "LOADER IS A BOTTLENECK"
                print(f"ratio {name} / train step: {ratio:.1f}x  ({verdict}, need >= 3x)")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
