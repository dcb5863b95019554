"""Small inputs for the CT-loss tests: blocky synthetic label maps, stage features, real Dubai crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

CHANNELS = (64, 128, 256, 512)
STRIDES = (4, 8, 16, 32)

# Dubai mask colours actually present in the pixels (shared/data/README.md), in class order.
DUBAI_COLOURS = {
    (60, 16, 152): 0,  # Building
    (132, 41, 246): 1,  # Land (unpaved area)
    (110, 193, 228): 2,  # Road
    (254, 221, 58): 3,  # Vegetation
    (226, 169, 41): 4,  # Water
}
DUBAI_NUM_CLASSES = 5
DUBAI_IGNORE = 5  # Unlabeled (155,155,155), stray black and any other colour


def seeded_calls(loss_fn, features, mask, seed: int, n: int = 3) -> tuple[list[float], list[float]]:
    """The losses of ``n`` calls on the same inputs after ``torch.manual_seed(seed)``, twice: a loss that
    draws afresh at every call and follows the seed gives two equal lists of ``n`` distinct values."""
    runs = []
    for _ in range(2):
        torch.manual_seed(seed)
        runs.append([loss_fn(features, mask)[0].item() for _ in range(n)])
    return runs[0], runs[1]


def blocky_mask(
    batch: int,
    height: int,
    width: int,
    num_classes: int,
    ignore_index: int,
    block: int,
    seed: int,
    ignore_frac=0.05,
) -> torch.Tensor:
    """Piecewise-constant labels (blocks of ``block`` px) with a sprinkle of ignore pixels: ``(B, H, W)``."""
    g = torch.Generator().manual_seed(seed)
    hb, wb = -(-height // block), -(-width // block)
    coarse = torch.randint(0, num_classes, (batch, hb, wb), generator=g)
    mask = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :height, :width].clone()
    sprinkle = torch.rand(batch, height, width, generator=g) < ignore_frac
    mask[sprinkle] = ignore_index
    return mask


def stage_features(
    batch: int, height: int, width: int, seed: int, channels=CHANNELS, strides=STRIDES, requires_grad=True
) -> list[torch.Tensor]:
    """Random ``(B, C_s, ceil(H/p_s), ceil(W/p_s))`` maps (a bottom/right-padding backbone's shapes)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, -(-height // p), -(-width // p), generator=g).requires_grad_(requires_grad)
        for c, p in zip(channels, strides)
    ]


def decode_dubai_mask(path: Path) -> np.ndarray:
    """RGB (or palette) PNG → ``(H, W)`` uint8 class ids; unknown colours → ignore."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    out = np.full(code.shape, DUBAI_IGNORE, dtype=np.uint8)
    for (r, g, b), cls in DUBAI_COLOURS.items():
        out[code == ((r << 16) | (g << 8) | b)] = cls
    return out


def dubai_crops(root: Path, count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` random ``size``² crops of real Dubai label maps (Tiles 1-6): ``(count, size, size)`` long."""
    paths = sorted(root.glob("Tile */masks/*.png"))
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        m = decode_dubai_mask(paths[int(rng.integers(len(paths)))])
        y = int(rng.integers(0, m.shape[0] - size + 1))
        x = int(rng.integers(0, m.shape[1] - size + 1))
        crops.append(torch.from_numpy(m[y : y + size, x : x + size].astype(np.int64)))
    return torch.stack(crops)


class RecordingStandIn:
    """Stands in for ``ctseg.contrastive.graphs.record``, which needs a GPU (a CUDA graph cannot be
    recorded on these CPU machines): returns the unrecorded parts of the loss (the same functions a
    recording captures), or fails like a capture would. Counts recordings (``calls``) and the calls
    that take the recorded path (``replays``, through its sampling part)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls, self.replays, self.fail = 0, 0, fail

    def __call__(self, loss_fn, used, mask, probs, grids):
        import dataclasses

        from ctseg.contrastive.graphs import split_loss

        self.calls += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        parts = split_loss(loss_fn, grids)
        sample = parts.sample

        def counted(*args):
            self.replays += 1
            return sample(*args)

        return dataclasses.replace(parts, sample=counted)
