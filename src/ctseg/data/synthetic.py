"""Procedural aerial-like scenes with the six ISPRS classes: the embedded dataset of the demo and the tests.

A scene is a small piece of a town seen from above at ``gsd_m`` metres per pixel (default 0.15 m, so a
512² scene covers about 77 m): a street grid with carriageways, lane markings and paved sidewalks;
parking lots with stall lines; paved yards and garden paths; rectilinear buildings (some L-shaped) with
gable, hip or flat roofs, ridge lines, facet shading by the sun, chimneys, solar panels and rooftop units;
lawns and meadows (per-block colour, mowing stripes); tree canopies as lumpy, textured, sun-lit blobs
(street-tree rows and overlapping clusters, overhanging lawns and pavement); cars as small oriented
rounded rectangles with windows, parked along kerbs, driving in lanes and in parking stalls; and clutter
(containers, dumpsters, bins, tarps, piles, bare soil, pools, odd small objects). Everything taller than the
ground casts a shadow from a per-scene sun; shadows darken whatever they fall on and never change its label.
Each scene has a district character (residential, mixed or commercial: roof styles, building sizes,
parking). The town grid is rotated by a random angle, then mild blur, sensor noise and a colour cast are added.

Confusable classes overlap in colour on purpose, as in Potsdam: grey and anthracite roofs vs asphalt and
pavers, red roofs vs red pavers, dark lawns vs light trees, dry meadows vs bare soil (clutter), and every
class in shadow. A per-pixel colour classifier is therefore far from perfect; shape and texture are needed.

Class shares are steered towards per-scene targets while the scene is built (each step adds objects until its
class reaches its target), so they vary little between scenes. Guaranteed, and tested, for the pixel shares
summed over 20 scenes of 512² at the default ``gsd_m`` (:data:`SHARE_RANGES`):

============================  ===========
impervious surfaces            25 - 35 %
building                       20 - 30 %
low vegetation                 20 - 30 %
tree                           10 - 20 %
car                             1 -  3 %
clutter                         1 -  5 %
============================  ===========

Single scenes stay close to these (a 512² scene covers only a few buildings, so expect a few points of spread);
much smaller scenes (e.g. 64²) show only a fragment of the town and can miss classes.

Determinism: a scene depends only on ``(height, width, seed, gsd_m)``; all randomness comes from one
``numpy.random.default_rng(seed)``. :func:`write_synthetic_dataset` derives each scene's seed from
``(seed, split, index)``, so a scene does not depend on how many scenes are generated.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from ctseg.data.layout import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    TileEntry,
    read_manifest,
    tile_paths,
    write_manifest,
)
from ctseg.data.protocols import get_protocol
from ctseg.errors import ConfigError, DataError, OutputError
from ctseg.utils.io import atomic_write_bytes

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_GSD_M",
    "GENERATOR_VERSION",
    "SHARE_RANGES",
    "generate_scene",
    "generator_fingerprint",
    "scene_seed",
    "write_synthetic_dataset",
]

IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR, CLUTTER = range(6)
CLASS_NAMES: tuple[str, ...] = (
    "impervious_surfaces",
    "building",
    "low_vegetation",
    "tree",
    "car",
    "clutter",
)
NUM_CLASSES = len(CLASS_NAMES)
DEFAULT_GSD_M = 0.15
# Bump whenever the scenes a seed produces change: recorded in manifests, so that an old folder is not reused.
GENERATOR_VERSION = 1

# Pixel shares over 20 scenes of 512² at DEFAULT_GSD_M (tested in tests/data/test_synthetic.py).
SHARE_RANGES: dict[str, tuple[float, float]] = {
    "impervious_surfaces": (0.25, 0.35),
    "building": (0.20, 0.30),
    "low_vegetation": (0.20, 0.30),
    "tree": (0.10, 0.20),
    "car": (0.01, 0.03),
    "clutter": (0.01, 0.05),
}

# Per-scene targets the builder steers to (uniform in these ranges); low vegetation is what remains.
_TARGETS: dict[int, tuple[float, float]] = {
    BUILDING: (0.23, 0.27),
    TREE: (0.13, 0.16),
    CAR: (0.017, 0.023),
    CLUTTER: (0.022, 0.032),
    IMPERVIOUS: (0.28, 0.32),
}

# Surface kinds under the labels: where cars park, where clutter may stand.
_GROUND, _CARRIAGEWAY, _SIDEWALK, _PARKING, _YARD = range(5)

Box = tuple[slice, slice]


# --------------------------------------------------------------------------------------------- noise


def _upsample_axis(grid: np.ndarray, n_out: int, cell: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` from nodes ``cell`` px apart onto ``n_out`` pixels."""
    pos = np.arange(n_out, dtype=np.float32) / cell
    lo = np.minimum(pos.astype(np.int64), grid.shape[axis] - 2)
    frac = pos - lo
    if axis == 0:
        return grid[lo] * (1.0 - frac)[:, None] + grid[lo + 1] * frac[:, None]
    return grid[:, lo] * (1.0 - frac) + grid[:, lo + 1] * frac


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Value noise with feature size ``cell`` px: a normal grid, bilinearly upsampled. (H, W) float32."""
    h, w = shape
    grid = rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32)
    return _upsample_axis(_upsample_axis(grid, h, cell, 0), w, cell, 1)


# --------------------------------------------------------------------------------------------- palettes


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], spread: float) -> np.ndarray:
    """A colour near ``rgb``: common brightness change plus small per-channel changes. (3,) float32."""
    base = np.asarray(rgb, dtype=np.float32)
    gain = 1.0 + spread * rng.uniform(-1.0, 1.0)
    return np.clip(base * gain + rng.uniform(-0.3, 0.3, 3).astype(np.float32) * spread * 0.3, 0.0, 1.0)


def _green(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A vegetation green with green channel in [lo, hi]; lawns and trees draw from overlapping ranges."""
    g = rng.uniform(lo, hi)
    return np.array([g * rng.uniform(0.55, 0.9), g, g * rng.uniform(0.3, 0.6)], dtype=np.float32)


def _grey(rng: np.random.Generator, lo: float, hi: float, warm: float = 0.0) -> np.ndarray:
    g = rng.uniform(lo, hi)
    tint = rng.uniform(-0.02, 0.02) + warm
    return np.array([g + tint, g, g - tint], dtype=np.float32)


_ROOF_COLOURS: dict[str, tuple[tuple[float, float, float], float]] = {
    # name: (rgb, brightness spread)
    "terracotta": ((0.62, 0.33, 0.25), 0.15),
    "brown": ((0.42, 0.31, 0.26), 0.15),
    "anthracite": ((0.30, 0.30, 0.32), 0.2),
    "grey": ((0.52, 0.52, 0.52), 0.2),
    "light": ((0.74, 0.73, 0.70), 0.12),
}
_PITCHED_ROOFS = (("terracotta", 0.5), ("brown", 0.15), ("anthracite", 0.25), ("grey", 0.1))
_FLAT_ROOFS = (("grey", 0.5), ("light", 0.3), ("anthracite", 0.2))

_CAR_COLOURS = (
    ((0.90, 0.90, 0.90), 0.25),
    ((0.68, 0.69, 0.70), 0.2),
    ((0.45, 0.45, 0.46), 0.15),
    ((0.10, 0.10, 0.11), 0.2),
    ((0.15, 0.22, 0.45), 0.07),
    ((0.60, 0.12, 0.10), 0.07),
    ((0.35, 0.40, 0.30), 0.06),
)

_CLUTTER_COLOURS = (
    (0.65, 0.25, 0.15),
    (0.20, 0.35, 0.60),
    (0.85, 0.55, 0.15),
    (0.25, 0.45, 0.30),
    (0.80, 0.75, 0.20),
    (0.55, 0.55, 0.58),
    (0.90, 0.90, 0.88),
)


def _pick(rng: np.random.Generator, weighted: tuple[tuple[Any, float], ...]) -> Any:
    """One item of ``((item, weight), ...)``, drawn with probability proportional to its weight."""
    total = sum(w for _, w in weighted)
    draw = rng.random() * total
    for item, weight in weighted:
        draw -= weight
        if draw < 0:
            return item
    return weighted[-1][0]


# --------------------------------------------------------------------------------------------- districts


@dataclass(frozen=True)
class _District:
    """The character of the town in one scene: roof styles, building sizes, how much is parking."""

    roofs: tuple[tuple[str, float], ...]  # roof style weights
    front: tuple[float, float]  # building frontage, m
    depth: tuple[float, float]  # building depth, m
    parking: float  # weight of parking lots among the paved areas


_DISTRICTS: dict[str, tuple[_District, float]] = {
    "residential": (
        _District((("gable", 0.55), ("hip", 0.3), ("flat", 0.15)), (9.0, 20.0), (8.0, 13.0), 0.15),
        0.4,
    ),
    "mixed": (
        _District((("gable", 0.45), ("hip", 0.2), ("flat", 0.35)), (10.0, 30.0), (8.0, 16.0), 0.3),
        0.4,
    ),
    "commercial": (
        _District((("gable", 0.15), ("hip", 0.1), ("flat", 0.75)), (18.0, 45.0), (12.0, 24.0), 0.6),
        0.2,
    ),
}


# --------------------------------------------------------------------------------------------- the canvas


@dataclass
class _Road:
    """A straight street across the canvas. ``axis`` 0: runs along x at row ``centre``; 1: along y."""

    axis: int
    centre: float
    half: float  # half width of the carriageway, px
    sidewalk: float  # width of each sidewalk, px


@dataclass
class _Scene:
    """The scene under construction, on an axis-aligned canvas that is rotated into the output at the end.

    ``inside`` marks canvas pixels that land in the output; ``counts`` are per-class pixel counts there, kept
    up to date by :meth:`paint` so that every builder step can steer towards its class target.
    """

    rng: np.random.Generator
    out_shape: tuple[int, int]
    px: float  # pixels per metre
    angle: float  # rotation of the output in the canvas, radians
    shape: tuple[int, int]
    label: np.ndarray  # (Hc, Wc) uint8
    rgb: np.ndarray  # (Hc, Wc, 3) float32 in [0, 1]
    height: np.ndarray  # (Hc, Wc) float32, metres above ground
    surface: np.ndarray  # (Hc, Wc) uint8 surface kind
    inside: np.ndarray  # (Hc, Wc) bool
    n_inside: int
    counts: np.ndarray  # (NUM_CLASSES,) int64
    sun: tuple[float, float]  # unit (dy, dx) on the canvas, pointing towards the sun
    noise: dict[str, np.ndarray]
    district: _District
    roads: list[_Road] = field(default_factory=list)
    buildings: list[tuple[float, float, float, float]] = field(default_factory=list)
    stalls: list[tuple[float, float, float]] = field(default_factory=list)

    @classmethod
    def create(cls, height: int, width: int, rng: np.random.Generator, gsd_m: float) -> _Scene:
        angle = float(rng.uniform(0.0, math.pi / 2))
        c, s = math.cos(angle), math.sin(angle)
        hc = math.ceil(height * c + width * s) + 4
        wc = math.ceil(height * s + width * c) + 4
        yy = np.arange(hc, dtype=np.float32)[:, None] - (hc - 1) / 2
        xx = np.arange(wc, dtype=np.float32)[None, :] - (wc - 1) / 2
        oy = c * yy + s * xx + (height - 1) / 2
        ox = -s * yy + c * xx + (width - 1) / 2
        inside = (oy >= -0.5) & (oy < height - 0.5) & (ox >= -0.5) & (ox < width - 0.5)
        n_inside = max(int(np.count_nonzero(inside)), 1)
        azimuth = rng.uniform(0.0, 2 * math.pi)
        shape = (hc, wc)
        noise = {
            "fine": rng.standard_normal(shape, dtype=np.float32),
            "clump": _smooth_noise(rng, shape, 3),
            "medium": _smooth_noise(rng, shape, 9),
            "coarse": _smooth_noise(rng, shape, 40),
        }
        counts = np.zeros(NUM_CLASSES, dtype=np.int64)
        counts[LOW_VEGETATION] = n_inside
        district = _DISTRICTS[_pick(rng, tuple((name, w) for name, (_, w) in _DISTRICTS.items()))][0]
        return cls(
            rng=rng,
            out_shape=(height, width),
            px=1.0 / gsd_m,
            angle=angle,
            shape=shape,
            label=np.full(shape, LOW_VEGETATION, dtype=np.uint8),
            rgb=np.zeros((*shape, 3), dtype=np.float32),
            height=np.zeros(shape, dtype=np.float32),
            surface=np.zeros(shape, dtype=np.uint8),
            inside=inside,
            n_inside=n_inside,
            counts=counts,
            sun=(math.sin(azimuth), math.cos(azimuth)),
            noise=noise,
            district=district,
        )

    # -- geometry ------------------------------------------------------------------------------------

    def random_point(self, margin: float = 0.0) -> tuple[float, float]:
        """A canvas point that lands in the output, or up to ``margin`` px beyond its border."""
        h, w = self.out_shape
        oy = self.rng.uniform(-margin, h + margin) - (h - 1) / 2
        ox = self.rng.uniform(-margin, w + margin) - (w - 1) / 2
        c, s = math.cos(self.angle), math.sin(self.angle)
        return (self.shape[0] - 1) / 2 + c * oy - s * ox, (self.shape[1] - 1) / 2 + s * oy + c * ox

    def box(self, y0: float, y1: float, x0: float, x1: float) -> Box | None:
        """Pixel slices covering [y0, y1) x [x0, x1), clipped to the canvas; None when empty."""
        iy0, iy1 = max(math.floor(y0), 0), min(math.ceil(y1), self.shape[0])
        ix0, ix1 = max(math.floor(x0), 0), min(math.ceil(x1), self.shape[1])
        if iy0 >= iy1 or ix0 >= ix1:
            return None
        return slice(iy0, iy1), slice(ix0, ix1)

    @staticmethod
    def grid(box: Box) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates of a box: y (h, 1) and x (1, w), float32."""
        ys, xs = box
        return (
            np.arange(ys.start, ys.stop, dtype=np.float32)[:, None] + 0.5,
            np.arange(xs.start, xs.stop, dtype=np.float32)[None, :] + 0.5,
        )

    def rect(self, y0: float, y1: float, x0: float, x1: float) -> tuple[Box, np.ndarray] | None:
        """An axis-aligned rectangle: its box and mask (h, w) bool."""
        box = self.box(y0, y1, x0, x1)
        if box is None:
            return None
        y, x = self.grid(box)
        return box, (y >= y0) & (y < y1) & (x >= x0) & (x < x1)

    def oriented(
        self, cy: float, cx: float, length: float, width: float, angle: float, power: float = 0.0
    ) -> tuple[Box, np.ndarray, np.ndarray, np.ndarray] | None:
        """A rectangle of ``length`` along direction ``angle`` (radians from +x) centred at (cy, cx).

        Returns box, mask, and local coordinates u (along the length) and v (across), each (h, w). With
        ``power`` > 0 the shape is the superellipse |2u/L|^p + |2v/W|^p <= 1 (rounded corners).
        """
        r = 0.5 * math.hypot(length, width) + 1
        box = self.box(cy - r, cy + r, cx - r, cx + r)
        if box is None:
            return None
        y, x = self.grid(box)
        y, x = y - cy, x - cx
        c, s = math.cos(angle), math.sin(angle)
        u = x * c + y * s
        v = -x * s + y * c
        if power:
            mask = np.abs(2 * u / length) ** power + np.abs(2 * v / width) ** power <= 1.0
        else:
            mask = (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)
        return box, mask, u, v

    def blob(
        self, cy: float, cx: float, radius: float, rough: float
    ) -> tuple[Box, np.ndarray, np.ndarray] | None:
        """An irregular round shape: a union of 3-5 overlapping discs with a noisy edge.

        Returns box, mask and the normalised distance to the nearest disc centre, ~0 at centres and 1 at the
        edge (h, w) float32.
        """
        rng = self.rng
        k = int(rng.integers(3, 6))
        ang = rng.uniform(0, 2 * math.pi, k)
        off = rng.uniform(0.15, 0.4, k) * radius
        sub = rng.uniform(0.55, 0.75, k) * radius
        oy, ox = off * np.sin(ang), off * np.cos(ang)
        reach = radius * (1.0 + 0.5 * rough)
        box = self.box(cy - reach, cy + reach, cx - reach, cx + reach)
        if box is None:
            return None
        y, x = self.grid(box)
        dist = np.full((y.shape[0], x.shape[1]), np.inf, dtype=np.float32)
        for i in range(k):
            d2 = ((y - cy - oy[i]) ** 2 + (x - cx - ox[i]) ** 2) / sub[i] ** 2
            np.minimum(dist, d2, out=dist)
        dist = np.sqrt(dist)
        edge = 1.0 + rough * (0.25 * self.noise["medium"][box] + 0.2 * self.noise["clump"][box])
        return box, dist < edge, dist

    def texture(
        self, box: Box, colour: np.ndarray, fine: float, clump: float, medium: float, coarse: float
    ) -> np.ndarray:
        """``colour`` modulated by the scene's noise fields in ``box``. (h, w, 3) float32."""
        n = self.noise
        mod = 1.0 + fine * n["fine"][box] + clump * n["clump"][box] + medium * n["medium"][box]
        if coarse:
            mod = mod + coarse * n["coarse"][box]
        return mod[..., None] * colour

    # -- state ---------------------------------------------------------------------------------------

    def allowed(self, box: Box, mask: np.ndarray, labels: tuple[int, ...], avoid_road: bool = False) -> bool:
        """Whether every masked pixel currently has one of ``labels`` (and, optionally, is off carriageways)."""
        ok = np.zeros(256, dtype=bool)
        ok[list(labels)] = True
        if not ok[self.label[box][mask]].all():
            return False
        return not (avoid_road and (self.surface[box][mask] == _CARRIAGEWAY).any())

    def paint(
        self,
        box: Box,
        mask: np.ndarray,
        cls: int,
        colour: np.ndarray,
        height: np.ndarray | float | None = None,
        surface: int | None = None,
    ) -> None:
        """Set label, colour and optionally height and surface kind on ``mask`` (h, w) bool of ``box``."""
        lab = self.label[box]
        old = lab[mask & self.inside[box]]
        self.counts -= np.bincount(old, minlength=NUM_CLASSES)
        self.counts[cls] += old.size
        lab[mask] = cls
        rgb = self.rgb[box]
        rgb[mask] = colour[mask] if colour.ndim == 3 else colour
        if height is not None:
            hgt = self.height[box]
            hgt[mask] = height[mask] if isinstance(height, np.ndarray) else height
        if surface is not None:
            self.surface[box][mask] = surface

    def shade(self, box: Box, mask: np.ndarray, factor: np.ndarray | float) -> None:
        """Multiply the colour on ``mask`` by ``factor`` (markings, ridge lines) without touching labels."""
        rgb = self.rgb[box]
        rgb[mask] *= factor[mask][:, None] if isinstance(factor, np.ndarray) else factor

    def missing(self, cls: int, share: float) -> int:
        """Pixels that ``cls`` still lacks to reach ``share`` of the output."""
        return int(share * self.n_inside) - int(self.counts[cls])


# --------------------------------------------------------------------------------------------- ground and roads


def _lay_ground(scene: _Scene) -> None:
    """Lawns and meadows everywhere; colour and mowing stripes vary per block of the street grid."""
    rng, hc, wc = scene.rng, *scene.shape
    cuts_y = sorted({0, hc, *(int(r.centre) for r in scene.roads if r.axis == 0 and 0 < r.centre < hc)})
    cuts_x = sorted({0, wc, *(int(r.centre) for r in scene.roads if r.axis == 1 and 0 < r.centre < wc)})
    coarse = scene.noise["coarse"]
    for y0, y1 in itertools.pairwise(cuts_y):
        for x0, x1 in itertools.pairwise(cuts_x):
            box = (slice(y0, y1), slice(x0, x1))
            meadow = rng.random() < 0.25
            if meadow:  # dry, yellowish grass: close to bare soil (clutter)
                a = _jitter(rng, (0.50, 0.50, 0.30), 0.15)
                b = _jitter(rng, (0.40, 0.45, 0.25), 0.15)
            else:
                a, b = _green(rng, 0.28, 0.62), _green(rng, 0.28, 0.62)
            mix = np.clip(0.5 + 0.7 * coarse[box], 0.0, 1.0)
            grain = 1.0 + 0.06 * scene.noise["fine"][box] + 0.08 * scene.noise["medium"][box]
            if not meadow and rng.random() < 0.4:  # mowing stripes, ~2.5 m wide
                y, x = scene.grid(box)
                period = rng.uniform(2.0, 3.5) * scene.px
                along = x if rng.random() < 0.5 else y
                grain = grain * (1.0 + 0.07 * np.sign(np.sin(2 * math.pi * along / period)))
            out = scene.rgb[box]
            for ch in range(3):
                out[..., ch] = (a[ch] + (b[ch] - a[ch]) * mix) * grain


def _plan_roads(scene: _Scene) -> None:
    """A street grid: streets along x every 50-80 m, cross streets along y every 70-120 m (some dropped)."""
    rng, px = scene.rng, scene.px
    for axis, (lo, hi), keep in ((0, (50.0, 80.0), 1.0), (1, (70.0, 120.0), 0.65)):
        extent = scene.shape[axis]
        pos = rng.uniform(0.0, hi * px)
        while pos < extent + 20 * px:
            if rng.random() < keep:
                half = rng.uniform(2.6, 4.0) * px
                scene.roads.append(_Road(axis, pos, half, rng.uniform(1.5, 3.0) * px))
            pos += rng.uniform(lo, hi) * px


def _road_band(scene: _Scene, road: _Road, half: float) -> tuple[Box, np.ndarray] | None:
    hc, wc = scene.shape
    if road.axis == 0:
        return scene.rect(road.centre - half, road.centre + half, 0, wc)
    return scene.rect(0, hc, road.centre - half, road.centre + half)


def _pave_roads(scene: _Scene) -> None:
    """Sidewalks (slab grid) first, then carriageways (asphalt), then dashed centre lines off crossings."""
    rng, px = scene.rng, scene.px
    for road in scene.roads:
        band = _road_band(scene, road, road.half + road.sidewalk)
        if band is None:
            continue
        box, mask = band
        colour = scene.texture(box, _grey(rng, 0.5, 0.72, warm=0.02), 0.04, 0.03, 0.04, 0.04)
        y, x = scene.grid(box)
        slab = rng.uniform(0.5, 0.8) * px
        joints = ((y % slab) < 1.0) | ((x % slab) < 1.0)
        colour *= np.where(joints, 0.92, 1.0)[..., None]
        scene.paint(box, mask, IMPERVIOUS, colour, 0.0, _SIDEWALK)
    for road in scene.roads:
        band = _road_band(scene, road, road.half)
        if band is None:
            continue
        box, mask = band
        colour = scene.texture(box, _grey(rng, 0.26, 0.46, warm=-0.01), 0.05, 0.03, 0.05, 0.06)
        scene.paint(box, mask, IMPERVIOUS, colour, 0.0, _CARRIAGEWAY)
    crossing = {axis: np.zeros(scene.shape[1 - axis], dtype=bool) for axis in (0, 1)}
    for road in scene.roads:
        lo, hi = (
            int(max(road.centre - road.half - road.sidewalk, 0)),
            int(road.centre + road.half + road.sidewalk),
        )
        crossing[1 - road.axis][lo : max(hi, lo)] = True  # streets of the other axis cross here
    for road in scene.roads:
        band = _road_band(scene, road, 0.08 * px + 0.5)
        if band is None:
            continue
        box, mask = band
        along = scene.grid(box)[1 - road.axis].ravel()
        dash = (along % (9.0 * px)) < 3.0 * px
        dash &= ~crossing[road.axis][(box[1] if road.axis == 0 else box[0])]
        dash = dash[None, :] if road.axis == 0 else dash[:, None]
        scene.shade(box, mask & dash, 2.2)


# --------------------------------------------------------------------------------------------- buildings


def _two_smallest(dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and second smallest of (2 or 4, h, w) along axis 0, without a full sort."""
    a, b = np.minimum(dist[0], dist[1]), np.maximum(dist[0], dist[1])
    if len(dist) == 2:
        return a, b
    c, d = np.minimum(dist[2], dist[3]), np.maximum(dist[2], dist[3])
    return np.minimum(a, c), np.minimum(np.maximum(a, c), np.minimum(b, d))


def _roof_part(
    scene: _Scene, y0: float, y1: float, x0: float, x1: float, style: str, colour: np.ndarray, eave: float
) -> None:
    """One rectangular wing of a building: facets lit by the sun, ridge/hip lines, eaves, roof furniture."""
    rng, px = scene.rng, scene.px
    hit = scene.rect(y0, y1, x0, x1)
    if hit is None:
        return
    box, mask = hit
    y, x = scene.grid(box)
    # Distances (px) to the four eaves; the nearest eave decides which roof facet a pixel is on.
    dist = np.stack(np.broadcast_arrays(y - y0, y1 - y, x - x0, x1 - x))
    if style == "gable":  # only the two long sides carry facets
        dist = dist[:2] if (x1 - x0) >= (y1 - y0) else dist[2:]
        normals = np.array(
            [(-1, 0), (1, 0)] if (x1 - x0) >= (y1 - y0) else [(0, -1), (0, 1)], dtype=np.float32
        )
    else:
        normals = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)], dtype=np.float32)
    nearest = np.argmin(dist, axis=0)
    first, second = _two_smallest(dist)
    texture = scene.texture(box, colour, 0.05, 0.04, 0.05, 0.05)
    if style == "flat":
        shade = np.ones(mask.shape, dtype=np.float32)
        shade[first < 0.5 * px] = 1.12  # parapet
        roof_h = np.full(mask.shape, eave, dtype=np.float32)
    else:
        facing = normals[:, 0] * scene.sun[0] + normals[:, 1] * scene.sun[1]
        shade = (1.0 + rng.uniform(0.2, 0.35) * facing[nearest]).astype(np.float32)
        shade[(second - first) < 0.7] *= 1.15  # ridge and hips
        pitch = rng.uniform(0.5, 0.8)
        roof_h = eave + pitch * np.minimum(first, 6 * px) / px
    shade[first < 0.6] *= 0.8  # dark eave line
    scene.paint(box, mask, BUILDING, texture * shade[..., None], roof_h)
    if style != "flat" and rng.random() < 0.2:  # solar panels on one facet
        facet = int(rng.integers(len(normals)))
        panel = mask & (nearest == facet) & (first > 0.8 * px) & (second - first > 0.8 * px)
        if panel.any():
            y_ok = panel & ((y.astype(np.int32) % 7) != 0)
            scene.paint(
                box, y_ok, BUILDING, scene.texture(box, _jitter(rng, (0.1, 0.12, 0.2), 0.3), 0.03, 0, 0, 0)
            )
    # Roof furniture: chimneys, dormers, AC units; they stand above the roof and cast small shadows.
    for _ in range(int(rng.integers(0, 4 if style == "flat" else 3))):
        size = rng.uniform(0.7, 2.5 if style == "flat" else 1.3) * px
        if (y1 - y0) < size + 2 * px or (x1 - x0) < size + 2 * px:
            break
        cy = rng.uniform(y0 + px + size / 2, y1 - px - size / 2)
        cx = rng.uniform(x0 + px + size / 2, x1 - px - size / 2)
        part = scene.rect(cy - size / 2, cy + size / 2, cx - size / 2, cx + size / 2)
        if part is None:
            continue
        pbox, pmask = part
        tone = _grey(rng, 0.2, 0.85) if style == "flat" else colour * rng.uniform(0.6, 0.9)
        top = float(scene.height[pbox].max()) + rng.uniform(0.6, 1.5)
        scene.paint(pbox, pmask, BUILDING, scene.texture(pbox, tone, 0.04, 0, 0, 0), top)


def _building_parts(scene: _Scene, limit: float) -> list[tuple[float, float, float, float]]:
    """Footprint rectangles (y0, y1, x0, x1) of one building, street-front or free-standing; some L-shaped."""
    rng, px = scene.rng, scene.px
    depth = rng.uniform(*scene.district.depth) * px
    front = rng.uniform(*scene.district.front) * px
    front = max(min(front, limit / depth), 6.0 * px)  # stay near the class target
    if scene.roads and rng.random() < 0.65:
        road = scene.roads[int(rng.integers(len(scene.roads)))]
        side = 1 if rng.random() < 0.5 else -1
        near = road.centre + side * (road.half + road.sidewalk + rng.uniform(0.5, 5.0) * px)
        far = near + side * depth
        py, px_ = scene.random_point(margin=10 * px)
        along = px_ if road.axis == 0 else py
        a0, a1 = along - front / 2, along + front / 2
        n0, n1 = min(near, far), max(near, far)
        parts = [(n0, n1, a0, a1) if road.axis == 0 else (a0, a1, n0, n1)]
        back = far
        back_dir = side
    else:
        cy, cx = scene.random_point(margin=10 * px)
        if rng.random() < 0.5:
            depth, front = front, depth
        parts = [(cy - depth / 2, cy + depth / 2, cx - front / 2, cx + front / 2)]
        road = None
        back_dir = 1 if rng.random() < 0.5 else -1
        back = cy + back_dir * depth / 2
    if rng.random() < 0.35:  # L-shape: a wing from one end of the back side
        wing_w = rng.uniform(6.0, 10.0) * px
        wing_l = rng.uniform(5.0, 12.0) * px
        y0, y1, x0, x1 = parts[0]
        horizontal = road is None or road.axis == 0
        if horizontal:
            w0 = x0 if rng.random() < 0.5 else x1 - wing_w
            b0, b1 = sorted((back - back_dir * 1.0, back + back_dir * wing_l))
            parts.append((b0, b1, w0, w0 + wing_w))
        else:
            w0 = y0 if rng.random() < 0.5 else y1 - wing_w
            b0, b1 = sorted((back - back_dir * 1.0, back + back_dir * wing_l))
            parts.append((w0, w0 + wing_w, b0, b1))
    return parts


def _place_buildings(scene: _Scene, share: float) -> None:
    rng, px = scene.rng, scene.px
    for _ in range(300):
        missing = scene.missing(BUILDING, share)
        if missing <= 0:
            return
        parts = _building_parts(scene, limit=max(missing * 1.15, 60.0 * px * px))
        gap = 0.2 * px if rng.random() < 0.3 else rng.uniform(1.5, 4.0) * px  # row houses touch
        clear = True
        for y0, y1, x0, x1 in parts:
            hit = scene.rect(y0 - gap, y1 + gap, x0 - gap, x1 + gap)
            if hit is None or not scene.allowed(*hit, (LOW_VEGETATION,)):
                clear = False
                break
        if not clear:
            continue
        style = _pick(rng, scene.district.roofs)
        name = _pick(rng, _FLAT_ROOFS if style == "flat" else _PITCHED_ROOFS)
        rgb, spread = _ROOF_COLOURS[name]
        colour = _jitter(rng, rgb, spread)
        eave = rng.uniform(6.0, 20.0) if style == "flat" else rng.uniform(6.0, 12.0)
        for part in parts:
            _roof_part(scene, *part, style, colour, eave)
            scene.buildings.append(part)


# --------------------------------------------------------------------------------------------- paved areas


def _pave_parking(scene: _Scene) -> bool:
    """An asphalt lot with one or two rows of stalls along an aisle; stalls are remembered for cars."""
    rng, px = scene.rng, scene.px
    rows = int(rng.integers(1, 3))
    depth = (rows * 5.0 + 6.0) * px
    length = rng.uniform(10.0, 30.0) * px
    cy, cx = scene.random_point()
    vertical = rng.random() < 0.5
    dy, dx = (length, depth) if vertical else (depth, length)
    hit = scene.rect(cy - dy / 2, cy + dy / 2, cx - dx / 2, cx + dx / 2)
    if hit is None or not scene.allowed(*hit, (LOW_VEGETATION,)):
        return False
    box, mask = hit
    colour = scene.texture(box, _grey(rng, 0.32, 0.55), 0.05, 0.03, 0.05, 0.05)
    scene.paint(box, mask, IMPERVIOUS, colour, 0.0, _PARKING)
    stall = 2.5 * px
    for row in range(rows):
        # Stall row: 5 m deep, on the lot's edge; the aisle is in the middle (one row) or between (two rows).
        r0 = -depth / 2 + row * (depth - 5.0 * px)
        for k in range(int(length // stall)):
            a = -length / 2 + (k + 0.5) * stall
            n = r0 + 2.5 * px
            sy, sx = (cy + a, cx + n) if vertical else (cy + n, cx + a)
            scene.stalls.append((sy, sx, 0.0 if vertical else math.pi / 2))
            line_a = a - stall / 2
            ly, lx = (cy + line_a, cx + n) if vertical else (cy + n, cx + line_a)
            line = (
                scene.rect(ly - 0.5, ly + 0.6, lx - 2.5 * px, lx + 2.5 * px)
                if vertical
                else scene.rect(ly - 2.5 * px, ly + 2.5 * px, lx - 0.5, lx + 0.6)
            )
            if line is not None:
                scene.shade(*line, 1.9)
    return True


def _pave_yard(scene: _Scene) -> bool:
    """Pavers beside a building (court, terrace, driveway apron); laid only on lawn, around what stands."""
    rng, px = scene.rng, scene.px
    if scene.buildings and rng.random() < 0.8:
        y0, y1, x0, x1 = scene.buildings[int(rng.integers(len(scene.buildings)))]
        cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
        side = int(rng.integers(4))
        cy = (y0, y1, cy, cy)[side]
        cx = (cx, cx, x0, x1)[side]
    else:
        cy, cx = scene.random_point()
    h, w = rng.uniform(4.0, 14.0, 2) * px
    hit = scene.rect(cy - h / 2, cy + h / 2, cx - w / 2, cx + w / 2)
    if hit is None:
        return False
    box, mask = hit
    mask &= scene.label[box] == LOW_VEGETATION
    if not mask.any():
        return False
    kind = rng.random()
    if kind < 0.2:  # red concrete pavers, close to terracotta roofs
        base = _jitter(rng, (0.58, 0.40, 0.35), 0.15)
    else:
        base = _grey(rng, 0.42, 0.78, warm=0.03)
    colour = scene.texture(box, base, 0.06, 0.04, 0.04, 0.03)
    y, x = scene.grid(box)
    brick = rng.uniform(0.25, 0.5) * px
    colour *= np.where(((y % brick) < 0.8) | ((x % (2 * brick)) < 0.8), 0.93, 1.0)[..., None]
    scene.paint(box, mask, IMPERVIOUS, colour, 0.0, _YARD)
    return True


def _pave_path(scene: _Scene) -> bool:
    """A garden path or driveway: a narrow strip of gravel or concrete across lawn."""
    rng, px = scene.rng, scene.px
    cy, cx = scene.random_point()
    if (
        scene.label[int(min(max(cy, 0), scene.shape[0] - 1)), int(min(max(cx, 0), scene.shape[1] - 1))]
        != LOW_VEGETATION
    ):
        return False
    width = rng.uniform(1.2, 3.0) * px
    length = rng.uniform(8.0, 30.0) * px
    dy, dx = (length, width) if rng.random() < 0.5 else (width, length)
    hit = scene.rect(cy - dy / 2, cy + dy / 2, cx - dx / 2, cx + dx / 2)
    if hit is None:
        return False
    box, mask = hit
    mask &= scene.label[box] == LOW_VEGETATION
    base = _grey(rng, 0.5, 0.75, warm=rng.uniform(0.0, 0.06))
    scene.paint(box, mask, IMPERVIOUS, scene.texture(box, base, 0.1, 0.05, 0.03, 0.0), 0.0, _YARD)
    return True


_PAVERS: dict[str, tuple[Callable[[_Scene], bool], float]] = {
    "parking": (_pave_parking, 0.3),
    "yard": (_pave_yard, 0.5),
    "path": (_pave_path, 0.2),
}


def _place_paving(scene: _Scene, share: float, attempts: int = 200) -> None:
    weights = {name: weight for name, (_, weight) in _PAVERS.items()} | {"parking": scene.district.parking}
    names = tuple(weights.items())
    for _ in range(attempts):
        if scene.missing(IMPERVIOUS, share) <= 0:
            return
        _PAVERS[_pick(scene.rng, names)][0](scene)


# --------------------------------------------------------------------------------------------- trees


def _crown(scene: _Scene, cy: float, cx: float, radius: float, colour: np.ndarray, top: float) -> int:
    """Paint one canopy: lumpy outline, leaf clumps, lit towards the sun, darker rim. Returns pixels painted."""
    hit = scene.blob(cy, cx, radius, rough=0.6)
    if hit is None:
        return 0
    box, mask, r = hit
    mask &= np.isin(scene.label[box], (LOW_VEGETATION, IMPERVIOUS, TREE))
    if not mask.any():
        return 0
    y, x = scene.grid(box)
    lit = ((y - cy) * scene.sun[0] + (x - cx) * scene.sun[1]) / radius
    shade = 1.0 + 0.25 * lit - 0.2 * np.minimum(r, 1.2) ** 2
    colour = scene.texture(box, colour, 0.08, 0.28, 0.12, 0.0) * shade[..., None]
    crown_h = top * (0.7 + 0.3 * np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0)))
    scene.paint(box, mask, TREE, colour, crown_h)
    return int(mask.sum())


def _tree_colour(rng: np.random.Generator) -> np.ndarray:
    return _green(rng, 0.18, 0.48)


def _plant_street_row(scene: _Scene, budget: int) -> None:
    rng, px = scene.rng, scene.px
    if not scene.roads:
        return
    road = scene.roads[int(rng.integers(len(scene.roads)))]
    side = 1 if rng.random() < 0.5 else -1
    offset = road.centre + side * (road.half + road.sidewalk * 0.5)
    spacing = rng.uniform(7.0, 12.0) * px
    radius = rng.uniform(2.5, 3.8) * px
    colour = _tree_colour(rng)
    py, px_ = scene.random_point()
    start = (px_ if road.axis == 0 else py) - rng.uniform(10.0, 40.0) * px
    painted = 0
    for k in range(int(rng.integers(3, 9))):
        along = start + k * spacing
        cy, cx = (offset, along) if road.axis == 0 else (along, offset)
        painted += _crown(
            scene, cy, cx, radius * rng.uniform(0.85, 1.15), _jitter(rng, colour, 0.08), rng.uniform(7, 12)
        )
        if painted > budget:
            return


def _plant_cluster(scene: _Scene, budget: int) -> None:
    rng, px = scene.rng, scene.px
    cy, cx = scene.random_point()
    iy, ix = int(min(max(cy, 0), scene.shape[0] - 1)), int(min(max(cx, 0), scene.shape[1] - 1))
    if scene.label[iy, ix] != LOW_VEGETATION:
        return
    colour = _tree_colour(rng)
    spread = rng.uniform(2.0, 6.0) * px
    painted = 0
    for _ in range(int(rng.integers(1, 8))):
        radius = rng.uniform(2.0, 6.0) * px
        ty, tx = cy + rng.normal(0, spread), cx + rng.normal(0, spread)
        painted += _crown(scene, ty, tx, radius, _jitter(rng, colour, 0.15), rng.uniform(5.0, 16.0))
        if painted > budget:
            return


def _place_trees(scene: _Scene, share: float) -> None:
    for _ in range(200):
        missing = scene.missing(TREE, share)
        if missing <= 0:
            return
        if scene.rng.random() < 0.3:
            _plant_street_row(scene, missing)
        else:
            _plant_cluster(scene, missing)


# --------------------------------------------------------------------------------------------- cars


def _car(scene: _Scene, cy: float, cx: float, angle: float) -> bool:
    """A car of 4-5 m x 1.7-2 m along ``angle``, only where everything under it is free pavement."""
    rng, px = scene.rng, scene.px
    iy, ix = int(cy), int(cx)
    if not (0 <= iy < scene.shape[0] and 0 <= ix < scene.shape[1]) or scene.label[iy, ix] != IMPERVIOUS:
        return False
    length, width = rng.uniform(3.9, 5.0) * px, rng.uniform(1.7, 2.0) * px
    hit = scene.oriented(cy, cx, length, width, angle + rng.normal(0, 0.03), power=4.0)
    if hit is None:
        return False
    box, mask, u, v = hit
    if not mask.any() or not scene.allowed(box, mask, (IMPERVIOUS,)):
        return False
    body = _jitter(rng, _pick(rng, _CAR_COLOURS), 0.1)
    un, vn = 2 * u / length, 2 * v / width  # in [-1, 1] over the body
    glass = np.array([0.07, 0.08, 0.10], dtype=np.float32)
    windows = ((un > 0.1) & (un < 0.35) | (un > -0.62) & (un < -0.45)) & (np.abs(vn) < 0.82)
    colour = np.where(windows[..., None], glass, body)
    shade = 1.0 - 0.25 * np.abs(vn) ** 3 + 0.1 * ((un > -0.45) & (un < 0.1))  # curved sides, lit roof
    colour = colour * shade[..., None] * (1.0 + 0.03 * scene.noise["fine"][box])[..., None]
    scene.paint(box, mask, CAR, colour, 1.5)
    return True


def _park_street(scene: _Scene) -> None:
    rng, px = scene.rng, scene.px
    if not scene.roads:
        return
    road = scene.roads[int(rng.integers(len(scene.roads)))]
    angle = 0.0 if road.axis == 0 else math.pi / 2
    if rng.random() < 0.25:  # driving in a lane
        offset = road.centre + (1 if rng.random() < 0.5 else -1) * road.half * 0.5
        count, gap = 1, 0.0
    else:  # parked along a kerb
        offset = road.centre + (1 if rng.random() < 0.5 else -1) * (road.half - rng.uniform(1.1, 1.4) * px)
        count, gap = int(rng.integers(1, 7)), rng.uniform(5.0, 8.0) * px
    py, px_ = scene.random_point()
    along = px_ if road.axis == 0 else py
    for k in range(count):
        a = along + k * gap
        _car(
            scene,
            *((offset, a) if road.axis == 0 else (a, offset)),
            angle + (math.pi if rng.random() < 0.5 else 0),
        )


def _park_lot(scene: _Scene) -> None:
    rng = scene.rng
    if not scene.stalls:
        return
    for _ in range(int(rng.integers(1, 6))):
        cy, cx, angle = scene.stalls[int(rng.integers(len(scene.stalls)))]
        _car(scene, cy, cx, angle + (math.pi if rng.random() < 0.5 else 0))


def _park_yard(scene: _Scene) -> None:
    """A car standing in a paved yard or driveway, square to the town grid."""
    cy, cx = scene.random_point()
    iy, ix = int(cy), int(cx)
    if 0 <= iy < scene.shape[0] and 0 <= ix < scene.shape[1] and scene.surface[iy, ix] == _YARD:
        _car(scene, cy, cx, float(scene.rng.integers(4)) * math.pi / 2)


def _place_cars(scene: _Scene, share: float) -> None:
    for attempt in range(300):
        if scene.missing(CAR, share) <= 0:
            return
        if attempt % 75 == 74:
            # Streets may be few or hidden under tree rows: give the remaining cars a parking lot.
            for _ in range(20):
                if _pave_parking(scene):
                    break
        draw = scene.rng.random()
        if scene.stalls and draw < 0.4:
            _park_lot(scene)
        elif draw > 0.85 or attempt > 150:
            _park_yard(scene)
        else:
            _park_street(scene)


# --------------------------------------------------------------------------------------------- clutter


def _clutter_box(
    scene: _Scene, length: float, width: float, colour: np.ndarray, top: float, ribs: float = 0.0
) -> bool:
    """A boxy object (container, dumpster, crate, tarp) on lawn or pavement off the carriageway."""
    rng, px = scene.rng, scene.px
    cy, cx = scene.random_point()
    angle = (
        rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.05)
        if rng.random() < 0.7
        else rng.uniform(0, math.pi)
    )
    hit = scene.oriented(cy, cx, length * px, width * px, angle)
    if hit is None:
        return False
    box, mask, u, v = hit
    if not mask.any() or not scene.allowed(box, mask, (LOW_VEGETATION, IMPERVIOUS), avoid_road=True):
        return False
    texture = scene.texture(box, colour, 0.04, 0.04, 0.03, 0)
    if ribs:
        texture *= (1.0 + ribs * np.sign(np.sin(2 * math.pi * u / (0.5 * px))))[..., None]
    rim = (np.abs(u) > length * px / 2 - 0.7) | (np.abs(v) > width * px / 2 - 0.7)
    texture *= np.where(rim, 0.8, 1.0)[..., None]
    scene.paint(box, mask, CLUTTER, texture, top)
    return True


def _clutter_container(scene: _Scene) -> bool:
    colour = _jitter(scene.rng, _CLUTTER_COLOURS[int(scene.rng.integers(5))], 0.15)
    return _clutter_box(scene, float(scene.rng.choice([6.0, 12.0])), 2.4, colour, 2.6, ribs=0.08)


def _clutter_dumpster(scene: _Scene) -> bool:
    colour = _jitter(scene.rng, _CLUTTER_COLOURS[int(scene.rng.integers(len(_CLUTTER_COLOURS)))], 0.2)
    return _clutter_box(scene, scene.rng.uniform(2.5, 4.0), scene.rng.uniform(1.5, 2.2), colour, 1.5)


def _clutter_small(scene: _Scene) -> bool:
    """Bins, crates, garden furniture: small boxes in odd colours."""
    rng = scene.rng
    colour = np.asarray(rng.uniform(0.05, 0.95, 3), dtype=np.float32)
    return _clutter_box(scene, rng.uniform(0.6, 2.0), rng.uniform(0.6, 1.5), colour, rng.uniform(0.5, 1.2))


def _clutter_tarp(scene: _Scene) -> bool:
    rng = scene.rng
    colour = _jitter(
        rng,
        ((0.15, 0.35, 0.75), (0.85, 0.85, 0.85), (0.3, 0.5, 0.3), (0.9, 0.5, 0.1))[int(rng.integers(4))],
        0.1,
    )
    return _clutter_box(scene, rng.uniform(2.0, 6.0), rng.uniform(1.5, 4.0), colour, 0.3)


def _clutter_blob(scene: _Scene, radius: float, colour: np.ndarray, top: float, grain: float) -> bool:
    cy, cx = scene.random_point()
    hit = scene.blob(cy, cx, radius * scene.px, rough=0.5)
    if hit is None:
        return False
    box, mask, r = hit
    if not mask.any() or not scene.allowed(box, mask, (LOW_VEGETATION, IMPERVIOUS), avoid_road=True):
        return False
    texture = scene.texture(box, colour, grain, grain, 0.06, 0)
    heights = top * np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
    scene.paint(box, mask, CLUTTER, texture, heights)
    return True


def _clutter_pile(scene: _Scene) -> bool:
    """Gravel, sand or rubble heaps."""
    rng = scene.rng
    colour = _jitter(
        rng, ((0.62, 0.55, 0.42), (0.5, 0.5, 0.5), (0.45, 0.35, 0.25))[int(rng.integers(3))], 0.15
    )
    return _clutter_blob(scene, rng.uniform(1.5, 4.0), colour, rng.uniform(0.8, 2.0), 0.12)


def _clutter_soil(scene: _Scene) -> bool:
    """Bare soil (building sites, flower beds): flat, brownish, close to dry meadow."""
    rng = scene.rng
    colour = _jitter(rng, (0.46, 0.38, 0.28), 0.2)
    return _clutter_blob(scene, rng.uniform(2.5, 6.0), colour, 0.0, 0.08)


def _clutter_pool(scene: _Scene) -> bool:
    """A garden pool: water with a light rim (water is clutter in the ISPRS classes)."""
    rng, px = scene.rng, scene.px
    cy, cx = scene.random_point()
    length, width = rng.uniform(3.0, 8.0) * px, rng.uniform(2.5, 4.5) * px
    hit = scene.oriented(cy, cx, length, width, float(rng.choice([0.0, math.pi / 2])), power=6.0)
    if hit is None:
        return False
    box, mask, u, v = hit
    if not mask.any() or not scene.allowed(box, mask, (LOW_VEGETATION,)):
        return False
    water = _jitter(rng, (0.25, 0.55, 0.70), 0.15)
    colour = scene.texture(box, water, 0.02, 0.0, 0.08, 0)
    rim = np.abs(2 * u / length) ** 6 + np.abs(2 * v / width) ** 6 > 0.6
    colour[rim] = np.array([0.82, 0.82, 0.8], dtype=np.float32)
    scene.paint(box, mask, CLUTTER, colour, 0.0)
    return True


_CLUTTER: dict[str, tuple[Callable[[_Scene], bool], float]] = {
    "container": (_clutter_container, 0.12),
    "dumpster": (_clutter_dumpster, 0.12),
    "small": (_clutter_small, 0.3),
    "tarp": (_clutter_tarp, 0.1),
    "pile": (_clutter_pile, 0.12),
    "soil": (_clutter_soil, 0.14),
    "pool": (_clutter_pool, 0.1),
}


def _place_clutter(scene: _Scene, share: float) -> None:
    names = tuple((name, weight) for name, (_, weight) in _CLUTTER.items())
    for _ in range(400):
        if scene.missing(CLUTTER, share) <= 0:
            return
        _CLUTTER[_pick(scene.rng, names)][0](scene)


# --------------------------------------------------------------------------------------------- light and sensor


def _shadow_strength(height: np.ndarray, sun: tuple[float, float], rise: float) -> np.ndarray:
    """How much each pixel is in shadow, in [0, 1]. (H, W) float32.

    A sun ray climbs ``rise`` metres per pixel of horizontal travel. Sweeping the grid row by row along
    the shadow direction, each pixel receives the highest ray arriving from its upstream neighbour
    (``max(height, ray) - rise``); a pixel is shaded when that ray passes above it. This is exact for shadow
    directions on the pixel grid and a one-pixel-per-row Bresenham walk otherwise: O(H W), no per-offset loop.
    """
    transpose = abs(sun[1]) > abs(sun[0])
    z = height.T if transpose else height
    travel_row, travel_col = (-sun[1], -sun[0]) if transpose else (-sun[0], -sun[1])
    slope = travel_col / abs(travel_row)  # columns moved per row, |slope| <= 1
    drop = rise * math.hypot(1.0, slope)
    rows = range(z.shape[0]) if travel_row > 0 else range(z.shape[0] - 1, -1, -1)
    ray = np.full(z.shape, -1e6, dtype=np.float32)
    prev = None
    for n, r in enumerate(rows):
        if prev is not None:
            src = np.maximum(z[prev], ray[prev]) - drop
            shift = round(n * slope) - round((n - 1) * slope)
            if shift > 0:
                ray[r, shift:] = src[:-shift]
            elif shift < 0:
                ray[r, :shift] = src[-shift:]
            else:
                ray[r] = src
        prev = r
    strength = np.clip((ray - z - 0.05) / 0.4, 0.0, 1.0)
    return strength.T if transpose else strength


def _apply_shadows(scene: _Scene) -> None:
    rng = scene.rng
    elevation = rng.uniform(math.radians(42), math.radians(65))
    rise = math.tan(elevation) / scene.px
    strength = _shadow_strength(scene.height, scene.sun, rise)
    darkness = rng.uniform(0.35, 0.5)
    tint = np.array([0.92, 0.97, 1.12], dtype=np.float32)  # shade is lit by blue sky
    scene.rgb *= 1.0 - strength[..., None] * (1.0 - darkness * tint)


def _to_output(scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the canvas into the output frame. Image bilinear (H, W, 3) float32, labels nearest (H, W) uint8.

    Pillow's affine warp is used for speed (several times faster than ``ndimage.affine_transform``); label
    and image go through the same mapping, so they stay aligned.
    """
    h, w = scene.out_shape
    hc, wc = scene.shape
    c, s = math.cos(scene.angle), math.sin(scene.angle)
    # Output point (X, Y) -> canvas point, both in continuous coordinates (pixel centres at +0.5).
    coeffs = (c, s, wc / 2 - c * w / 2 - s * h / 2, -s, c, hc / 2 + s * w / 2 - c * h / 2)
    warp = Image.Transform.AFFINE
    label = Image.fromarray(scene.label).transform((w, h), warp, coeffs, resample=Image.Resampling.NEAREST)
    image = np.empty((h, w, 3), dtype=np.float32)
    for ch in range(3):
        channel = Image.fromarray(np.ascontiguousarray(scene.rgb[..., ch]), mode="F")
        image[..., ch] = np.asarray(
            channel.transform((w, h), warp, coeffs, resample=Image.Resampling.BILINEAR)
        )
    return image, np.asarray(label).copy()


def _sensor(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Optics blur, colour cast, haze, gamma and sensor noise; quantised to uint8. (H, W, 3)."""
    sigma = rng.uniform(0.5, 0.9)
    image = ndimage.gaussian_filter(image, (sigma, sigma, 0.0), mode="nearest")
    gain = rng.uniform(0.92, 1.08, 3).astype(np.float32) * rng.uniform(0.9, 1.1)
    image = image * gain + rng.uniform(0.0, 0.04)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.9, 1.1)
    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.008, 0.02)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- public API


def _check_size(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"synthetic data: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def generate_scene(
    height: int = 512, width: int = 512, seed: int = 0, *, gsd_m: float = DEFAULT_GSD_M
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one aerial-like scene.

    Args:
        height, width: size in pixels (any size >= 1; see the module docstring for the class shares).
        seed: the scene's seed; the same (height, width, seed, gsd_m) always gives identical arrays.
        gsd_m: ground sampling distance, metres per pixel (objects keep their metric size).

    Returns:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) uint8 class indices 0..5 in the order of protocol ``"synthetic"``
        (impervious surfaces, building, low vegetation, tree, car, clutter); no ignore pixels.
    """
    height, width = _check_size("height", height), _check_size("width", width)
    if not (isinstance(gsd_m, int | float) and 0.02 <= gsd_m <= 2.0):
        raise ConfigError(
            f"synthetic data: gsd_m must be a number of metres per pixel in [0.02, 2], got {gsd_m!r}"
        )
    rng = np.random.default_rng(_check_size("seed", seed, 0))
    targets = {cls: float(rng.uniform(lo, hi)) for cls, (lo, hi) in _TARGETS.items()}
    scene = _Scene.create(height, width, rng, float(gsd_m))
    _plan_roads(scene)
    _lay_ground(scene)
    _pave_roads(scene)
    _place_buildings(scene, targets[BUILDING])
    # Trees will cover some pavement and cars and clutter stand on it: pave more now, top up after the trees.
    paved = targets[IMPERVIOUS] + targets[CAR] + 0.4 * targets[CLUTTER]
    _place_paving(scene, paved + 0.02)
    _place_trees(scene, targets[TREE])
    _place_paving(scene, paved, attempts=100)
    _place_cars(scene, targets[CAR])
    _place_clutter(scene, targets[CLUTTER])
    _apply_shadows(scene)
    image, mask = _to_output(scene)
    return _sensor(rng, image), mask


@functools.cache
def generator_fingerprint() -> str:
    """A short hash of a reference scene: changes whenever the generator's output changes.

    Recorded in manifests beside :data:`GENERATOR_VERSION`, so that a folder written by another version of
    the code (or of numpy / scipy / Pillow, should they change the pixels) is never silently reused.
    """
    image, mask = generate_scene(48, 48, seed=0)
    return _sha256(image.tobytes() + mask.tobytes())[:16]


def scene_seed(seed: int, split: str, index: int) -> int:
    """The seed of scene ``index`` of ``split``: independent of how many scenes a set has."""
    if split not in SPLITS:
        raise ConfigError(f"synthetic data: unknown split {split!r}; known: {', '.join(SPLITS)}")
    seed, index = _check_size("seed", seed, 0), _check_size("index", index, 0)
    entropy = np.random.SeedSequence([seed, SPLITS.index(split), index])
    return int(entropy.generate_state(1, dtype=np.uint64)[0] >> 1)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB" if array.ndim == 3 else "L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str | None:
    try:
        return _sha256(path.read_bytes())
    except OSError:
        return None


def _same_pixels(path: Path, expected: np.ndarray) -> bool:
    try:
        with Image.open(path) as im:
            got = np.asarray(im)
    except (OSError, ValueError):
        return False
    return got.shape == expected.shape and got.dtype == expected.dtype and bool(np.array_equal(got, expected))


def _expected_files(counts: dict[str, int]) -> set[str]:
    names: set[str] = set()
    for split, n in counts.items():
        for i in range(n):
            names.update(tile_paths(split, _tile_id(split, i)))
    return names


def _tile_id(split: str, index: int) -> str:
    return f"synthetic_{split}_{index:05d}"


def _check_foreign_content(root: Path, allowed: set[str]) -> None:
    """A non-empty folder without our manifest may only hold tiles of this very set (an interrupted run)."""
    for dirpath, _dirs, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if rel in allowed or (name.startswith(".") and name.endswith(".tmp")):
                continue
            raise OutputError(
                f"{root}: not empty and not a synthetic set written with these arguments ({rel} is not ours); "
                "choose another folder or delete it"
            )


def write_synthetic_dataset(
    root: str | Path,
    n_train: int = 16,
    n_val: int = 4,
    n_test: int = 4,
    size: int = 512,
    seed: int = 0,
    *,
    gsd_m: float = DEFAULT_GSD_M,
) -> Manifest:
    """Write a synthetic set in the prepared layout of :mod:`ctseg.data.layout` and return its manifest.

    Files: ``<root>/<split>/images/<id>.png`` (RGB), ``<root>/<split>/masks/<id>.png`` (L, class indices),
    ``<root>/manifest.json`` (protocol ``"synthetic"``; the generator arguments in ``extra["synthetic"]``;
    each tile's seed, class pixel counts and file hashes in its ``extra``). All writes are atomic.

    Idempotent: re-running with the same arguments keeps every tile whose files exist and match (by the
    hashes in the manifest, or, after an interrupted run without manifest, by regenerating and comparing
    pixels) and rewrites the others. A folder that holds anything else, or a set made with other
    arguments, raises :class:`~ctseg.errors.OutputError`.
    """
    counts = {
        "train": _check_size("n_train", n_train, 0),
        "val": _check_size("n_val", n_val, 0),
        "test": _check_size("n_test", n_test, 0),
    }
    size, seed = _check_size("size", size), _check_size("seed", seed, 0)
    if sum(counts.values()) == 0:
        raise ConfigError("synthetic data: n_train + n_val + n_test must be at least 1")
    params: dict[str, Any] = {
        "generator": "ctseg.data.synthetic",
        "version": GENERATOR_VERSION,
        "fingerprint": generator_fingerprint(),
        "size": size,
        "seed": int(seed),
        "gsd_m": float(gsd_m),
        "n_train": counts["train"],
        "n_val": counts["val"],
        "n_test": counts["test"],
    }
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root}: exists and is not a folder")
    known: dict[tuple[str, str], dict[str, Any]] = {}
    if (root / MANIFEST_NAME).is_file():
        try:
            previous = read_manifest(root, check_files=False)
        except DataError as exc:
            raise OutputError(
                f"{root}: holds an unreadable manifest ({exc.problem}); choose another folder"
            ) from exc
        if previous.extra.get("synthetic") != params:
            theirs = previous.extra.get("synthetic")
            what = "other data" if not isinstance(theirs, dict) else _describe_difference(theirs, params)
            raise OutputError(f"{root}: holds {what}; choose another folder or delete it")
        known = {(t.split, t.id): t.extra for t in previous.tiles}
    elif root.is_dir() and any(root.iterdir()):
        _check_foreign_content(root, _expected_files(counts))

    tiles: list[TileEntry] = []
    for split, n in counts.items():
        for index in range(n):
            tiles.append(
                _write_tile(
                    root,
                    split,
                    index,
                    size,
                    int(seed),
                    float(gsd_m),
                    known.get((split, _tile_id(split, index))),
                )
            )
    manifest = Manifest(
        # The JSON form (lists, not tuples), so that the returned manifest equals the one read back.
        protocol=json.loads(json.dumps(get_protocol("synthetic").to_dict())),
        tiles=tiles,
        sources=[{"name": "synthetic", "generator": "ctseg.data.synthetic", "version": GENERATOR_VERSION}],
        extra={"synthetic": params},
    )
    write_manifest(root, manifest)
    return manifest


def _describe_difference(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    """'a synthetic set made with seed=0, size=512 (asked: seed=1, size=256)', naming only what differs."""
    keys = [k for k in ours if theirs.get(k) != ours[k]] or list(ours)
    made = ", ".join(f"{k}={theirs.get(k)}" for k in keys)
    asked = ", ".join(f"{k}={ours[k]}" for k in keys)
    return f"a synthetic set made with {made} (asked: {asked})"


def _write_tile(
    root: Path, split: str, index: int, size: int, seed: int, gsd_m: float, previous: dict[str, Any] | None
) -> TileEntry:
    tile_id = _tile_id(split, index)
    image_rel, mask_rel = tile_paths(split, tile_id)
    image_path, mask_path = root / image_rel, root / mask_rel
    if previous is not None and previous.get("sha256") is not None:
        hashes = previous["sha256"]
        if _file_sha256(image_path) == hashes.get("image") and _file_sha256(mask_path) == hashes.get("mask"):
            return TileEntry(split, tile_id, image_rel, mask_rel, size, size, "synthetic", dict(previous))
    s = scene_seed(seed, split, index)
    image, mask = generate_scene(size, size, s, gsd_m=gsd_m)
    hashes = {}
    for path, array, key in ((image_path, image, "image"), (mask_path, mask, "mask")):
        if path.is_file() and _same_pixels(path, array):
            hashes[key] = _file_sha256(path)
        else:
            data = _png_bytes(array)
            atomic_write_bytes(path, data)
            hashes[key] = _sha256(data)
    extra = {
        "scene_seed": s,
        "class_pixels": np.bincount(mask.ravel(), minlength=NUM_CLASSES).tolist(),
        "sha256": hashes,
    }
    return TileEntry(split, tile_id, image_rel, mask_rel, size, size, "synthetic", extra)
