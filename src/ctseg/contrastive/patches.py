"""Ground-truth patches: per-stage, per-class pixel counts of every feature patch.

A feature map of shape ``(B, C_s, H_s, W_s)`` computed from an input of ``(H, W)`` pixels has a patch
size ``p_s = ceil(H / H_s)`` (the same for ``W``); feature patch ``(i, j)`` covers pixels
``[i·p_s, (i+1)·p_s) × [j·p_s, (j+1)·p_s)`` because backbones pad their inputs bottom/right. The
mask is therefore padded bottom/right with ``ignore_index`` to ``(H_s·p_s, W_s·p_s)``; a padded pixel
counts for no class, so a patch that reaches into the padding is never a positive (it is not
homogeneous) but can be a negative.

All stages come from one pooling of the (bit-packed) one-hot mask at the finest common patch size
``g = gcd(p_s)``; coarser stages are sums of those counts (exact, integer-valued).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctseg.contrastive.constants import device_constant
from ctseg.errors import ConfigError


@dataclass(frozen=True)
class StageGrid:
    """Geometry of one stage: feature-map size ``(h, w)`` and square patch size ``p`` in pixels."""

    h: int
    w: int
    p: int

    @property
    def num_patches_per_image(self) -> int:
        return self.h * self.w

    @property
    def patch_pixels(self) -> int:
        return self.p * self.p


def infer_patch_size(
    mask_hw: tuple[int, int], feature_hw: tuple[int, int], stage: int, stride: int | None = None
) -> int:
    """Patch size of a stage from shapes: ``p = ceil(H / H_s)`` (and ``ceil(W / W_s)``).

    When both differ (tiny maps: a 1-row map fits any ``p ≥ H``) the larger is taken, the smallest
    size consistent with both axes. ``stride`` (the backbone's, when known) is checked instead.

    Raises ConfigError when the feature map cannot come from this mask by a bottom/right-padded
    strided backbone: no square patch size gives ``ceil(H / p) = H_s`` and ``ceil(W / p) = W_s``
    (e.g. a padding of a whole patch or more).
    """
    (H, W), (hs, ws) = mask_hw, feature_hw
    if hs <= 0 or ws <= 0:
        raise ConfigError(f"CT loss: stage {stage} feature map has an empty spatial size {hs}×{ws}")
    ph, pw = math.ceil(H / hs), math.ceil(W / ws)
    p = max(ph, pw) if stride is None else stride
    if math.ceil(H / p) != hs or math.ceil(W / p) != ws:
        detail = f"stride {stride}" if stride is not None else f"patch size {ph} along H but {pw} along W"
        raise ConfigError(
            f"CT loss: stage {stage} feature map {hs}×{ws} does not tile a {H}×{W} mask with square patches "
            f"({detail}; a bottom/right-padded backbone gives ceil(H/p)×ceil(W/p), and padding of a "
            f"whole patch or more is not possible)"
        )
    return p


def stage_grids(
    mask_hw: tuple[int, int],
    feature_hws: Sequence[tuple[int, int]],
    stages: Sequence[int],
    strides: Sequence[int | None] | None = None,
) -> list[StageGrid]:
    """One :class:`StageGrid` per entry of ``feature_hws`` (``stages`` only names them in errors)."""
    strides = [None] * len(feature_hws) if strides is None else strides
    return [
        StageGrid(h, w, infer_patch_size(mask_hw, (h, w), s, st))
        for (h, w), s, st in zip(feature_hws, stages, strides, strict=True)
    ]


def _base_size(grids: Sequence[StageGrid], g: int) -> tuple[int, int]:
    # The base grid (cells of g×g pixels) must cover every stage's padded extent.
    return max(gr.h * gr.p for gr in grids) // g, max(gr.w * gr.p for gr in grids) // g


def _pool_to_stage(base: torch.Tensor, grid: StageGrid, g: int) -> torch.Tensor:
    """Sum base cells ``(B, K, Hb, Wb)`` into stage patches ``(B, K, h, w)``; cells beyond the stage's
    padded extent lie entirely in the padding (zero counts), so cropping them is exact."""
    k = grid.p // g
    x = base[:, :, : grid.h * k, : grid.w * k]
    if k == 1:
        return x.contiguous()
    B, K = x.shape[:2]
    return x.reshape(B, K, grid.h, k, grid.w, k).sum(dim=(3, 5))


def _class_word_lut(num_classes: int, bits: int, word: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(K + 2,)`` table over ``clamp(label, -1, K)``: class k ↦ ``1 << (bits·k)``, label K (every
    label ≥ K) and label -1 (the last entry, by negative indexing) ↦ 0."""
    lut = torch.zeros(num_classes + 2, dtype=word, device=device)
    lut[:num_classes] = torch.ones((), dtype=word, device=device) << (
        bits * torch.arange(num_classes, dtype=word, device=device)
    )
    return lut


def _base_counts_packed(mask: torch.Tensor, num_classes: int, g: int, Hb: int, Wb: int) -> torch.Tensor:
    """Per-class pixel counts of every g×g cell, packing all classes into one integer per pixel.

    Pixel of class k ↦ ``1 << (bits·k)`` (anything else ↦ 0); summing a cell adds the per-class
    counts in separate bit fields (a count ≤ g² never carries into the next field), so the pooling
    reads B·H·W values instead of a K-times larger one-hot. The packed word is int32 when the K fields
    fit in 31 bits (the usual case: 6 classes of 16-pixel cells take 30), else int64. Per-pixel
    temporaries: the int64 index and the word (a CUDA-graph pool keeps the peak of what the graph
    allocates, so it matters beyond the moment).
    Returns ``(B, K, Hb, Wb)`` int32.
    """
    B, H, W = mask.shape
    bits = (g * g).bit_length()
    word = torch.int32 if bits * num_classes <= 31 else torch.int64
    lut = device_constant(
        ("class-word-lut", num_classes, bits, word),
        mask.device,
        lambda: _class_word_lut(num_classes, bits, word, mask.device),
    )
    # int64 index: an int32 one is widened to int64 inside the indexing anyway (one more temporary).
    # Label -1 (and every negative one, clamped to it) indexes the table's last entry, 0.
    index = mask.clamp(-1, num_classes).to(torch.int64)
    packed = lut[index]
    del index
    if (Hb * g, Wb * g) != (H, W):
        packed = F.pad(packed, (0, Wb * g - W, 0, Hb * g - H))
    # Two contiguous reductions (along W, then H) are faster than one over both cell axes.
    cells = packed.reshape(B, Hb * g, Wb, g).sum(-1, dtype=word).reshape(B, Hb, g, Wb).sum(2, dtype=word)
    shifts = device_constant(
        ("class-word-shifts", num_classes, bits, word),
        mask.device,
        lambda: bits * torch.arange(num_classes, dtype=word, device=mask.device),
    )
    return ((cells[:, None] >> shifts[None, :, None, None]) & ((1 << bits) - 1)).to(torch.int32)


def _base_counts_onehot(mask: torch.Tensor, num_classes: int, g: int, Hb: int, Wb: int) -> torch.Tensor:
    """Same as :func:`_base_counts_packed` through a bool one-hot (when K fields do not fit 63 bits)."""
    B, H, W = mask.shape
    padded = F.pad(mask, (0, Wb * g - W, 0, Hb * g - H), value=-1)
    classes = torch.arange(num_classes, device=mask.device, dtype=mask.dtype)
    onehot = padded[:, None] == classes[None, :, None, None]
    return onehot.reshape(B, num_classes, Hb, g, Wb, g).sum(dim=(3, 5), dtype=torch.int32)


def patch_class_counts(
    mask: torch.Tensor, num_classes: int, grids: Sequence[StageGrid]
) -> list[torch.Tensor]:
    """Pixel count of every class in every patch of every stage.

    Args:
        mask: ``(B, H, W)`` integer labels; values outside ``[0, num_classes)`` (the ignore index,
            padding) count for no class.
        num_classes: K.
        grids: stage geometries from :func:`stage_grids`.

    Returns:
        one ``(B, K, h_s, w_s)`` int32 tensor per stage with values in ``[0, p_s²]``.
        Positive for class c ⇔ ``count == p_s²``; negative ⇔ ``count == 0``.
    """
    g = math.gcd(*[gr.p for gr in grids])
    Hb, Wb = _base_size(grids, g)
    if (g * g).bit_length() * num_classes <= 63:
        base = _base_counts_packed(mask, num_classes, g, Hb, Wb)
    else:
        base = _base_counts_onehot(mask, num_classes, g, Hb, Wb)
    return [_pool_to_stage(base, gr, g) for gr in grids]


def patch_class_means(probs: torch.Tensor, grids: Sequence[StageGrid]) -> list[torch.Tensor]:
    """Mean class probability over every patch: ``(B, K, H, W)`` → per stage ``(B, K, h_s, w_s)``.

    Padding pixels count as probability 0 (the mean divides by ``p_s²``), matching the counts above.
    """
    _B, _K, H, W = probs.shape
    g = math.gcd(*[gr.p for gr in grids])
    Hb, Wb = _base_size(grids, g)
    x = F.pad(probs.to(torch.float32), (0, Wb * g - W, 0, Hb * g - H))
    base = F.avg_pool2d(x, g, g, divisor_override=1) if g > 1 else x
    return [_pool_to_stage(base, gr, g) / gr.patch_pixels for gr in grids]
