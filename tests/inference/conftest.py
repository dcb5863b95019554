"""Tiny networks and file fixtures for the inference tests (random init, CPU, images of 32-128 px)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn


def pointwise_net(num_classes: int = 5, seed: int = 0) -> nn.Module:
    """Per-pixel MLP (1x1 convs): translation-equivariant with no border effect, and flip/rot-equivariant."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, num_classes, 1)).eval()


def conv_net(num_classes: int = 4, seed: int = 0, depth: int = 4) -> nn.Module:
    """3x3 convs with zero padding: a receptive field of 2*depth+1 px and real window-border artefacts."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    ch = 3
    for _ in range(depth - 1):
        layers += [nn.Conv2d(ch, 16, 3, padding=1), nn.GELU()]
        ch = 16
    layers.append(nn.Conv2d(ch, num_classes, 3, padding=1))
    return nn.Sequential(*layers).eval()


def whole_image_logits(model: nn.Module, image: np.ndarray, input_max: float = 255.0) -> np.ndarray:
    """``(K, H, W)`` logits of one forward pass over the whole ``(H, W, 3)`` image."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / input_max
    with torch.no_grad():
        return model(x)[0].numpy()


def write_geotiff(
    path: Path,
    array: np.ndarray,
    crs: str | None = "EPSG:32632",
    origin: tuple[float, float] = (500000.0, 5800000.0),
    gsd: float = 0.5,
    **profile: Any,
) -> Path:
    """Write an ``(H, W, C)`` array as a GeoTIFF with a UTM CRS and a north-up transform (``profile``:
    more creation options, e.g. ``nodata=0``)."""
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    h, w, c = array.shape
    profile = {
        **profile,
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": c,
        "dtype": array.dtype.name,
        "transform": Affine(gsd, 0.0, origin[0], 0.0, -gsd, origin[1]),
    }
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.moveaxis(array, -1, 0))
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def smooth_image(rng: np.random.Generator) -> np.ndarray:
    """A 77x101 RGB uint8 image with structure (smoothed noise), odd sizes on purpose."""
    from scipy.ndimage import gaussian_filter

    noise = rng.normal(size=(77, 101, 3))
    img = np.stack([gaussian_filter(noise[..., c], 3) for c in range(3)], -1)
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img.astype(np.uint8)
