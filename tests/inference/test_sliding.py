"""Window grid, blending weights and the blended sliding-window prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctseg.errors import ConfigError
from ctseg.inference.io import ArrayReader
from ctseg.inference.sliding import (
    MIN_WEIGHT,
    SlidingWindow,
    _accumulate,
    _first_strip_halves,
    _load_strip,
    axis_grid,
    blend_weights,
    iter_blended_rows,
    predict_large,
    reflect_index,
)
from tests.inference.conftest import conv_net, pointwise_net, whole_image_logits, write_geotiff


@given(n=st.integers(1, 40), lo=st.integers(-150, 0), span=st.integers(1, 200))
@settings(max_examples=60, deadline=None)
def test_reflect_index_matches_numpy_reflect_pad(n: int, lo: int, span: int) -> None:
    base = np.arange(n)
    before, after = -lo, max(0, lo + span - n)
    padded = np.pad(base, (before, after), mode="reflect") if n > 1 else np.zeros(before + n + after, int)
    idx = np.arange(lo, lo + span)
    np.testing.assert_array_equal(reflect_index(idx, n), padded[idx + before])


@given(length=st.integers(1, 500), window=st.integers(8, 128), frac=st.floats(0, 0.9))
@settings(max_examples=80, deadline=None)
def test_axis_grid_covers_the_scene_with_full_windows(length: int, window: int, frac: float) -> None:
    overlap = min(int(window * frac), window - 1)
    g = axis_grid(length, window, overlap)
    assert g.starts[0] == 0
    assert all(b - a == window - overlap for a, b in zip(g.starts, g.starts[1:]))
    assert g.pad_before == overlap // 2
    # The last window reaches past the scene plus its margin, and not a whole stride further.
    assert g.padded >= length + 2 * g.pad_before
    assert len(g.starts) == 1 or g.starts[-1] < length + 2 * g.pad_before - overlap
    assert g.source_index().min() >= 0 and g.source_index().max() < length


@pytest.mark.parametrize("kind", ["gaussian", "spline", "flat"])
def test_blend_weights_positive_symmetric_max_one(kind: str) -> None:
    w = blend_weights(64, 16, kind)
    assert w.shape == (64, 64) and w.dtype == torch.float32
    assert float(w.min()) >= MIN_WEIGHT**2 * (1 - 1e-6) and float(w.max()) == pytest.approx(1.0)
    torch.testing.assert_close(w, w.flip(0))
    torch.testing.assert_close(w, w.T)


def test_spline_blend_is_a_partition_of_unity_over_the_overlap() -> None:
    window, overlap = 64, 24
    w = blend_weights(window, overlap, "spline")[window // 2]  # 1-D profile through the centre row
    stride = window - overlap
    total = torch.zeros(stride * 3 + window)
    for s in range(0, stride * 4, stride):
        total[s : s + window] += w
    # Away from the outermost rims every pixel's weights sum to exactly 1.
    torch.testing.assert_close(
        total[overlap : stride * 3 + window - overlap], torch.ones(stride * 3 + window - 2 * overlap)
    )


def test_unknown_blend_and_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="blend"):
        SlidingWindow(blend="hann2")
    with pytest.raises(ConfigError, match="overlap"):
        SlidingWindow(window=32, overlap=32)
    with pytest.raises(ConfigError, match="batch_size"):
        SlidingWindow(batch_size=0)


@pytest.mark.parametrize("blend", ["gaussian", "spline", "flat"])
@pytest.mark.parametrize(
    ("h", "w", "window", "overlap", "batch"),
    [(77, 101, 32, 8, 3), (77, 101, 48, 20, 1), (20, 13, 32, 8, 4), (64, 64, 32, 0, 2), (33, 120, 40, 31, 5)],
)
def test_sliding_equals_whole_image_for_a_translation_equivariant_model(
    rng: np.random.Generator, blend: str, h: int, w: int, window: int, overlap: int, batch: int
) -> None:
    # A per-pixel network gives every pixel the same logits in every window, so any mistake in window
    # placement, reflection padding, weighting or normalisation shows up as a difference.
    model = pointwise_net()
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pred = predict_large(
        model,
        image,
        window=window,
        overlap=overlap,
        blend=blend,
        batch_size=batch,
        return_logits=True,
        return_probs=True,
    )
    ref = whole_image_logits(model, image)
    np.testing.assert_allclose(pred.logits, ref, atol=1e-5)
    np.testing.assert_array_equal(pred.labels, ref.argmax(0))
    np.testing.assert_allclose(pred.probs.sum(0), 1.0, atol=1e-5)


def test_normalization_is_applied_as_recorded_in_checkpoints(rng: np.random.Generator) -> None:
    model = pointwise_net()
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    norm = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    pred = predict_large(model, image, window=32, overlap=8, normalization=norm, return_logits=True)
    x = (
        torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        - torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    ) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(x)[0].numpy()
    np.testing.assert_allclose(pred.logits, ref, atol=1e-5)


class CountingReader(ArrayReader):
    """Records the row ranges asked for."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__(array)
        self.requests: list[tuple[int, int]] = []

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        self.requests.append((y0, y1))
        return super().read_rows(y0, y1)


def test_rows_stream_in_order_and_memory_is_one_strip(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (150, 90, 3), dtype=np.uint8)
    reader = CountingReader(image)
    settings_ = SlidingWindow(window=32, overlap=8, batch_size=2)
    calls: list[tuple[int, int]] = []
    blocks = list(
        iter_blended_rows(pointwise_net(), reader, settings_, progress=lambda d, t: calls.append((d, t)))
    )
    starts = [y for y, _ in blocks]
    heights = [b.shape[1] for _, b in blocks]
    assert starts[0] == 0 and sum(heights) == 150
    assert all(s + h == n for s, h, n in zip(starts, heights, starts[1:]))  # contiguous, top to bottom
    assert max(heights) <= 32 and all(b.shape[2] == 90 for _, b in blocks)
    # The reader is asked for one window of rows at a time, never the scene.
    assert max(y1 - y0 for y0, y1 in reader.requests) <= 32
    assert calls[-1] == (settings_.num_windows(150, 90),) * 2


def _row_gradient(logits: np.ndarray) -> np.ndarray:
    """Mean |d logits / dy| between row y and y+1, ``(H - 1,)``."""
    return np.abs(np.diff(logits, axis=1)).mean(axis=(0, 2))


def _seam_rows(height: int, window: int, overlap: int) -> list[int]:
    """Scene rows y such that a window border lies between y and y + 1."""
    g = axis_grid(height, window, overlap)
    edges = {s - g.pad_before for s in g.starts} | {s + window - g.pad_before for s in g.starts}
    return sorted(e - 1 for e in edges if 1 <= e < height)


def _seam_ratio(logits: np.ndarray, window: int, overlap: int) -> float:
    """Largest row gradient across a window border over the largest one elsewhere."""
    grad = _row_gradient(logits)
    seams = _seam_rows(logits.shape[1], window, overlap)
    return float(grad[seams].max() / np.delete(grad, seams).max())


@pytest.mark.parametrize(
    ("blend", "window", "overlap"), [("spline", 48, 16), ("spline", 64, 32), ("gaussian", 64, 32)]
)
def test_no_seam_at_window_borders_on_a_real_image(blend: str, window: int, overlap: int) -> None:
    from PIL import Image

    from tests.conftest import shared_data_path

    path = shared_data_path("isprs_samples", "potsdam", "img", "2_10_0_0_512_512.png")
    image = np.asarray(Image.open(path).convert("RGB"))[:128, :128]
    model = conv_net(depth=3)
    # Inputs offset to [1, 2]: zero padding is then a strong edge at every window rim, as for trained
    # networks, so stitching without blending leaves seams.
    norm = {"mean": [-1.0, -1.0, -1.0], "std": [1.0, 1.0, 1.0]}

    def ratio(kind: str) -> float:
        pred = predict_large(
            model, image, window=window, overlap=overlap, blend=kind, normalization=norm, return_logits=True
        )
        return _seam_ratio(pred.logits, window, overlap)

    # The check can fail: plain averaging of overlapping windows shows a jump at window borders larger
    # than any change of the output inside the windows.
    assert ratio("flat") > 1.05
    # Blended windows: the output changes across window borders no more than anywhere inside.
    assert ratio(blend) <= 1.0


@pytest.mark.parametrize("source", ["array", "geotiff"])
@pytest.mark.parametrize("height", [23, 3, 1])
@pytest.mark.parametrize("width", [1, 2, 7, 50, 131])
@pytest.mark.parametrize(("window", "overlap"), [(32, 8), (16, 15), (8, 0)])
def test_strips_are_reflect_padded_like_numpy(
    rng: np.random.Generator, tmp_path, source: str, height: int, width: int, window: int, overlap: int
) -> None:
    # Strips are assembled in place (into pinned memory on CUDA) instead of by np.pad: same pixels. A
    # GeoTIFF's rows are decoded by GDAL straight into the strip's (strided) scene columns; scenes far
    # shorter than the window (reflected several times) take the read-and-gather path.
    from ctseg.inference.io import RasterioReader

    image = rng.integers(0, 65535, (height, width, 3), dtype=np.uint16)
    gy, gx = SlidingWindow(window=window, overlap=overlap).grids(height, width)
    chw = image.transpose(2, 0, 1)
    rows = np.pad(
        chw, ((0, 0), (gy.pad_before, gy.pad_after), (0, 0)), mode="reflect" if height > 1 else "edge"
    )
    mode = "reflect" if width > 1 else "edge"
    ref = np.pad(rows, ((0, 0), (0, 0), (gx.pad_before, gx.pad_after)), mode=mode)
    if source == "geotiff":
        reader = RasterioReader(write_geotiff(tmp_path / "s.tif", image), input_max=65535.0)
    else:
        reader = ArrayReader(image, input_max=65535.0)
    with reader:
        for y in gy.starts:
            strip = _load_strip(reader, gy, gx, y).numpy()
            assert strip.dtype == np.uint16
            np.testing.assert_array_equal(strip, ref[:, y : y + window])
            for a, b in [(0, 5), (5, window)]:  # row ranges, as the first strip is read
                np.testing.assert_array_equal(
                    _load_strip(reader, gy, gx, y, False, a, b).numpy(), ref[:, y + a : y + b]
                )


@pytest.mark.parametrize(
    ("window", "overlap", "batch"),
    [(32, 8, 3), (32, 0, 4), (40, 30, 5), (24, 12, 16), (16, 15, 2), (9, 4, 1)],
)
def test_batched_blending_equals_the_per_window_loop_bit_for_bit(
    window: int, overlap: int, batch: int
) -> None:
    # One addcmul_ per column segment and batch must add exactly what one addcmul_ per window added, in
    # the same order per element (also where three or more windows overlap: overlap > window / 2).
    stride, n = window - overlap, 7
    gen = torch.Generator().manual_seed(0)
    acc0 = torch.randn(3, window, (n - 1) * stride + window, generator=gen)  # rows carried from above
    logits = torch.randn(n, 3, window, window, generator=gen)
    weight = blend_weights(window, overlap, "gaussian")
    ref = acc0.clone()
    for i in range(n):
        ref[:, :, i * stride : i * stride + window].addcmul_(logits[i], weight)
    got = acc0.clone()
    for b0 in range(0, n, batch):
        _accumulate(got, logits[b0 : b0 + batch], weight, b0 * stride, stride)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("final_rows", [1, 5, 64])
def test_last_strip_in_smaller_blocks_covers_the_scene_once_with_the_same_values(
    rng: np.random.Generator, final_rows: int
) -> None:
    img = rng.integers(0, 256, (77, 101, 3), dtype=np.uint8)
    net = conv_net(4)
    settings_ = SlidingWindow(window=32, overlap=8, batch_size=3)
    whole = list(iter_blended_rows(net, ArrayReader(img), settings_))
    split = list(iter_blended_rows(net, ArrayReader(img), settings_, final_block_rows=final_rows))
    y = 0
    for y0, block in split:  # contiguous, in order, each row once
        assert y0 == y
        y += block.shape[1]
    assert y == 77
    # Only the last strip is split, into blocks of at most final_rows rows.
    assert [y0 for y0, _ in split[: len(whole) - 1]] == [y0 for y0, _ in whole[:-1]]
    last = [b for y0, b in split if y0 >= whole[-1][0]]
    assert len(last) == -(-whole[-1][1].shape[1] // final_rows)
    assert all(b.shape[1] <= final_rows for b in last)
    assert torch.equal(torch.cat([b for _, b in split], 1), torch.cat([b for _, b in whole], 1))


@pytest.mark.parametrize("height", [20, 77])
def test_strip_read_in_parts_equals_the_whole_strip(rng: np.random.Generator, height: int) -> None:
    img = rng.integers(0, 256, (height, 33, 3), dtype=np.uint8)
    gy, gx = SlidingWindow(window=32, overlap=8).grids(height, 33)
    reader = ArrayReader(img)
    for y in (gy.starts[0], gy.starts[-1]):  # reflected rows at the top and at the bottom
        whole = _load_strip(reader, gy, gx, y)
        for ranges in (_first_strip_halves(32), [(0, 7), (7, 32)]):
            parts = [_load_strip(reader, gy, gx, y, False, a, b) for a, b in ranges]
            assert torch.equal(torch.cat(parts, 1), whole)
    assert _first_strip_halves(1) == [(0, 1)]
