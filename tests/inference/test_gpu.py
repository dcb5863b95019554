"""GPU checks: the sliding window on CUDA gives the CPU result (run by the GPU check, skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ctseg.inference.predict import predict_file
from ctseg.inference.sliding import SlidingWindow, predict_large
from tests.inference.conftest import conv_net, pointwise_net, write_geotiff

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_matches_cpu_and_whole_image(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    net = conv_net(5)
    cpu = predict_large(net, image, window=64, overlap=16, batch_size=6, tta="flip", return_logits=True)
    gpu = predict_large(
        net.cuda(), image, window=64, overlap=16, batch_size=6, tta="flip", return_logits=True
    )
    np.testing.assert_allclose(gpu.logits, cpu.logits, atol=1e-3)
    pw = pointwise_net().cuda()
    whole = predict_large(pw, image, window=300, overlap=0, return_logits=True).logits
    slid = predict_large(pw, image, window=64, overlap=24, return_logits=True).logits
    np.testing.assert_allclose(slid, whole, atol=1e-4)


def test_cuda_geotiff_prediction(tmp_path: Path, rng: np.random.Generator) -> None:
    rasterio = pytest.importorskip("rasterio")
    image = rng.integers(0, 256, (520, 700, 3), dtype=np.uint8)
    src = write_geotiff(tmp_path / "s.tif", image)
    net = pointwise_net(6)
    res = predict_file(
        net.cuda(), src, tmp_path / "o", SlidingWindow(128, 32, batch_size=8), num_classes=6, probs=True
    )
    ref = predict_large(net.cpu(), image, window=128, overlap=32)
    with rasterio.open(res.outputs["labels"]) as d, rasterio.open(src) as s:
        assert d.crs == s.crs and d.transform == s.transform
        assert (d.read(1) == ref.labels).mean() > 0.999  # TF32/cuDNN may flip near-ties


def test_cuda_prediction_never_waits_for_the_device(tmp_path: Path, rng: np.random.Generator) -> None:
    # The host must queue strip after strip: a synchronising call in the loop (a copy from pageable
    # memory, .cpu(), .item()) drains the device once per strip and serialises reading, forward and
    # writing, which is what made full prediction cost 6x the bare forward on an H100. Writers wait
    # for their own block with a CUDA event in their threads, which this mode does not flag.
    rasterio = pytest.importorskip("rasterio")
    image = rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)
    src = write_geotiff(tmp_path / "s.tif", image)
    net = conv_net(6).cuda()
    with torch.inference_mode():
        net(torch.zeros(8, 3, 128, 128, device="cuda"))  # cuDNN / cuBLAS set-up (same batch shape) first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = predict_file(net, src, tmp_path / "o", SlidingWindow(128, 32, batch_size=8), num_classes=6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = predict_large(net.cpu(), image, window=128, overlap=32)
    with rasterio.open(res.outputs["labels"]) as d:
        assert (d.read(1) == ref.labels).mean() > 0.999  # TF32/cuDNN may flip near-ties


def test_strips_uploaded_ahead_of_a_lagging_device_give_the_same_logits(rng: np.random.Generator) -> None:
    # Strips are copied from pinned host buffers without waiting: a buffer must not be reused for the
    # next strip while its copy is still queued. A slow model keeps the host many strips ahead of the
    # device, so a reused buffer would show as wrong strips. Several strips of a tall scene.
    image = rng.integers(0, 256, (1100, 300, 3), dtype=np.uint8)
    net = conv_net(5).cuda()

    class Slow(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.cuda._sleep(2_000_000)  # ≈ 1 ms of device time per batch: the device lags the host
            return net(x)

    results = [
        predict_large(
            model, image, window=64, overlap=16, batch_size=4, device="cuda", return_logits=True
        ).logits
        for model in (Slow(), net)
    ]
    np.testing.assert_array_equal(results[0], results[1])


def test_cuda_nodata_masks_the_pinned_blocks_without_waiting(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    # The nodata mask is applied in the write lanes to the pinned host blocks, after their copy's
    # event: on CUDA the labels must be those of the CPU run with 255 at the nodata pixels, and the
    # prediction loop still makes no synchronising call.
    rasterio = pytest.importorskip("rasterio")
    image = rng.integers(1, 256, (600, 700, 3), dtype=np.uint8)
    nodata = np.zeros(image.shape[:2], dtype=bool)
    nodata[:, :40] = True
    nodata[250:420, 300:380] = True
    image[nodata] = 0
    src = write_geotiff(tmp_path / "s.tif", image, nodata=0)
    net = conv_net(6).cuda()
    with torch.inference_mode():
        net(torch.zeros(8, 3, 128, 128, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = predict_file(
            net, src, tmp_path / "o", SlidingWindow(128, 32, batch_size=8), num_classes=6, probs=True
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = predict_large(net.cpu(), image, window=128, overlap=32)
    with rasterio.open(res.outputs["labels"]) as d, rasterio.open(res.outputs["probs"]) as p:
        labels, probs = d.read(1), p.read()
    assert (labels[nodata] == 255).all() and np.isnan(probs[:, nodata]).all()
    assert (labels[~nodata] == ref.labels[~nodata]).mean() > 0.999  # TF32/cuDNN may flip near-ties
    assert np.isfinite(probs[:, ~nodata]).all()
