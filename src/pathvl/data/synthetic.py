"""Synthetic whole-slide images with known ground truth.

:func:`write_synthetic_slide` writes a real pyramidal, tiled JPEG TIFF that OpenSlide and tiffslide both
read (an Aperio-style SVS, or a generic tiled TIFF), with H&E-like tissue of named classes in known
regions on a near-white glass background, an optional pen stroke on the glass, and the ground truth
beside it:

- ``<stem>.labels.png``: uint8 label map at ``label_downsample`` level-0 pixels per label pixel
  (0 = background, ``k`` = ``classes[k - 1]``); the pen stroke is background.
- ``<stem>.json``: classes, downsample, mpp, size, levels, flavour, seed, generator version, the mean
  RGB of each class texture and the area fraction of each label.

Textures are drawn in physical units (nuclei of 6-13 um, adipocytes of about 60 um, glands of about
85 um, ...), so a patch looks different at 40x and at 5x, and each class has its own colour and
structure (a colour histogram separates them). They are periodic tiles of ``TEXTURE_PX`` pixels built
once per class from hematoxylin/eosin optical densities (Beer-Lambert) and looked up by level-0
position, so the slide is seamless and every pyramid level is the block mean of level 0 (exact away
from class boundaries). The writer streams tile by tile into :meth:`tifffile.TiffWriter.write`, so
memory stays bounded (tens of MB) whatever the slide size.

Every coordinate here is a level-0 pixel ``(x, y)`` of the top-left corner, as in OpenSlide.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from scipy import fft as sfft
from scipy import ndimage
from scipy.spatial import cKDTree

#: Version of the generator; bumped whenever the same seed would draw a different slide.
GENERATOR_VERSION = 1

#: Class names with a texture, in the order they read well in captions.
DEFAULT_CLASSES: tuple[str, ...] = ("tumor", "stroma", "lymphocytes", "necrosis", "adipose", "mucosa")

#: Side of the periodic texture tile of each class, in level-0 pixels (a power of two).
TEXTURE_PX = 1024

#: Default ground-truth resolution: level-0 pixels per label pixel.
LABEL_DOWNSAMPLE = 32

#: A reduced level is written only when its shorter side has at least this many pixels.
MIN_LEVEL_PX = 32

#: Long side of the Aperio thumbnail page is at most this many pixels.
THUMBNAIL_PX = 1024

_APERIO_HEADER = "Aperio Image Library v12.0.15"

# Stain optical-density directions (R, G, B), after Ruifrok & Johnston (2001), eosin made a little
# pinker; the neutral direction models grey debris and dust.
_HEMATOXYLIN = np.array([0.650, 0.704, 0.286])
_EOSIN = np.array([0.07, 0.88, 0.40])
_NEUTRAL = np.array([1.0, 1.0, 1.0])
_GLASS_RGB = np.array([242.0, 241.0, 245.0])

_PEN_RGB = {"green": (60, 150, 110), "blue": (50, 80, 170), "black": (45, 45, 50)}


@dataclass(frozen=True)
class SyntheticSlide:
    """A synthetic slide on disk and where its ground truth lies.

    Attributes:
        path: The slide file.
        labels_path: The label map PNG (``<stem>.labels.png``).
        meta_path: The ground-truth metadata JSON (``<stem>.json``).
        classes: Class names; label ``k`` is ``classes[k - 1]``.
        mpp: Level-0 microns per pixel written into the file (``None``: none written).
        size: Level-0 ``(width, height)``.
        downsamples: Downsample of each pyramid level, level 0 (1) first.
        flavour: ``"aperio"`` or ``"generic"``.
    """

    path: Path
    labels_path: Path
    meta_path: Path
    classes: tuple[str, ...]
    mpp: float | None
    size: tuple[int, int]
    downsamples: tuple[int, ...] = (1,)
    flavour: str = "aperio"

    def ground_truth(self) -> GroundTruth:
        """Load the ground truth written beside the slide."""
        return load_ground_truth(self.path)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Label map of a synthetic slide.

    Attributes:
        labels: ``(h, w)`` uint8; 0 is background, ``k`` is ``classes[k - 1]``. Label pixel ``(i, j)``
            covers level-0 ``[j * downsample, (j + 1) * downsample) x [i * downsample, ...)``.
        downsample: Level-0 pixels per label pixel.
        classes: Class names.
        size: Level-0 ``(width, height)`` of the slide; ``None`` means the label map's extent.
    """

    labels: np.ndarray
    downsample: float
    classes: tuple[str, ...]
    size: tuple[int, int] | None = None

    @property
    def extent(self) -> tuple[float, float]:
        """Level-0 ``(width, height)`` covered by the slide."""
        if self.size is not None:
            return float(self.size[0]), float(self.size[1])
        h, w = self.labels.shape
        return w * self.downsample, h * self.downsample

    def class_index(self, name: str) -> int:
        """Label value of class ``name``."""
        return self.classes.index(name) + 1

    def fractions(self, x: float, y: float, w: float, h: float) -> np.ndarray:
        """Area fraction of each label in a level-0 box.

        The box is weighted exactly by area, also where it cuts label pixels; any part of it outside
        the slide counts as background.

        Args:
            x: Level-0 left edge.
            y: Level-0 top edge.
            w: Width in level-0 pixels (> 0).
            h: Height in level-0 pixels (> 0).

        Returns:
            ``(K + 1,)`` float64 fractions summing to 1; index 0 is background, ``k`` is
            ``classes[k - 1]``.
        """
        if w <= 0 or h <= 0:
            raise ValueError(f"box width and height must be positive, got {w}x{h}")
        k1 = len(self.classes) + 1
        W, H = self.extent
        ds = float(self.downsample)
        W, H = min(W, self.labels.shape[1] * ds), min(H, self.labels.shape[0] * ds)
        x0, x1 = max(float(x), 0.0), min(float(x + w), W)
        y0, y1 = max(float(y), 0.0), min(float(y + h), H)
        out = np.zeros(k1)
        if x1 > x0 and y1 > y0:
            cols, wx = _coverage(x0 / ds, x1 / ds, self.labels.shape[1])
            rows, wy = _coverage(y0 / ds, y1 / ds, self.labels.shape[0])
            block = self.labels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            weights = np.outer(wy, wx) * ds * ds
            out += np.bincount(block.ravel(), weights=weights.ravel(), minlength=k1)[:k1]
        area = float(w) * float(h)
        out[0] += area - out.sum()
        return np.clip(out / area, 0.0, 1.0)

    def majority(self, x: float, y: float, w: float, h: float) -> int:
        """Label covering most of a level-0 box (ties go to the lower label; 0 is background)."""
        return int(np.argmax(self.fractions(x, y, w, h)))

    def tissue_mask(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """Boolean tissue mask (label > 0), optionally resampled to a thumbnail.

        Args:
            size: ``(width, height)`` of a thumbnail of the whole slide; a thumbnail pixel is tissue
                when at least half its area is. ``None`` returns the mask at the label resolution.
        """
        return self.class_mask(None, size)

    def class_mask(self, label: int | str | None, size: tuple[int, int] | None = None) -> np.ndarray:
        """Boolean mask of one label (an index, a class name, or ``None`` for all tissue).

        Args:
            label: Label value, class name, or ``None`` for any tissue class.
            size: As in :meth:`tissue_mask`.
        """
        if isinstance(label, str):
            label = self.class_index(label)
        m = self.labels > 0 if label is None else self.labels == label
        if size is None:
            return m
        W, H = self.extent
        img = Image.fromarray(m.astype(np.uint8) * 255)
        box = (0.0, 0.0, W / self.downsample, H / self.downsample)
        small = img.resize((int(size[0]), int(size[1])), Image.Resampling.BOX, box=box)
        return np.asarray(small) >= 128


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def _coverage(a: float, b: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the unit cells meeting ``[a, b)`` (clipped to ``[0, n)``) and the length of each overlap."""
    i0 = min(max(math.floor(a), 0), n - 1)
    i1 = min(max(math.ceil(b) - 1, i0), n - 1)
    idx = np.arange(i0, i1 + 1)
    cover = np.minimum(idx + 1, b) - np.maximum(idx, a)
    return idx, np.clip(cover, 0.0, None)


def ground_truth_paths(slide_path: str | Path) -> tuple[Path, Path]:
    """``(labels_path, meta_path)`` of a synthetic slide: ``<stem>.labels.png`` and ``<stem>.json``."""
    p = Path(slide_path)
    return p.with_name(f"{p.stem}.labels.png"), p.with_name(f"{p.stem}.json")


def load_ground_truth(slide_path: str | Path) -> GroundTruth:
    """Load the ground truth written beside a synthetic slide.

    Args:
        slide_path: The slide file (its ``<stem>.labels.png`` and ``<stem>.json`` are read).

    Raises:
        FileNotFoundError: A ground-truth file is missing; the message names it.
    """
    labels_path, meta_path = ground_truth_paths(slide_path)
    for p in (meta_path, labels_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"no ground truth for {slide_path}: expected {p} (written by "
                "pathvl.data.synthetic.write_synthetic_slide beside the slide)"
            )
    meta = json.loads(meta_path.read_text())
    with Image.open(labels_path) as im:
        labels = np.array(im, dtype=np.uint8)
    return GroundTruth(
        labels=labels,
        downsample=float(meta["label_downsample"]),
        classes=tuple(meta["classes"]),
        size=(int(meta["size"][0]), int(meta["size"][1])),
    )


def load_meta(slide_path: str | Path) -> dict:
    """The ground-truth metadata (``<stem>.json``) of a synthetic slide as a dict."""
    _, meta_path = ground_truth_paths(slide_path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"no ground truth for {slide_path}: expected {meta_path}")
    return json.loads(meta_path.read_text())


# --------------------------------------------------------------------------------------------------
# Periodic texture primitives (all arrays P x P, float32, wrap around at the edges)


def _wrapped_coords(P: int) -> tuple[np.ndarray, np.ndarray]:
    d = ((np.arange(P) + P // 2) % P - P // 2).astype(np.float32)
    return d[None, :], d[:, None]  # dx (1, P), dy (P, 1)


def _smooth_noise(
    rng: np.random.Generator, P: int, sigma: float, sigma_across: float | None = None, angle: float = 0.0
) -> np.ndarray:
    """Periodic Gaussian noise with unit std, smoothed by a (possibly anisotropic) Gaussian.

    ``sigma`` is the scale along ``angle`` (radians from the x axis), ``sigma_across`` across it.
    """
    s_across = sigma if sigma_across is None else sigma_across
    white = rng.standard_normal((P, P), dtype=np.float32)
    ky = sfft.fftfreq(P).astype(np.float32)[:, None]
    kx = sfft.rfftfreq(P).astype(np.float32)[None, :]
    ca, sa = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    ku = (kx * ca + ky * sa) * np.float32(sigma)
    kv = (ky * ca - kx * sa) * np.float32(s_across)
    g = np.exp(np.float32(-2.0 * math.pi**2) * (ku * ku + kv * kv))
    out = sfft.irfft2(sfft.rfft2(white) * g, s=(P, P)).astype(np.float32)
    out -= out.mean()
    return out / max(float(out.std()), 1e-8)


def _ellipse_kernel(P: int, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased filled ellipse (semi-axes ``a`` along ``angle``, ``b`` across) centred at the origin."""
    dx, dy = _wrapped_coords(P)
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return np.clip((1.0 - r) * min(a, b) + 0.5, 0.0, 1.0).astype(np.float32)


def _annulus_kernel(P: int, r_in: float, r_out: float) -> np.ndarray:
    dx, dy = _wrapped_coords(P)
    r = np.sqrt(dx**2 + dy**2)
    outer = np.clip(r_out - r + 0.5, 0.0, 1.0)
    inner = np.clip(r_in - r + 0.5, 0.0, 1.0)
    return (outer - inner).astype(np.float32)


def _splat(P: int, pts: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Stamp ``kernel`` (centred at the origin) at each point, periodically; overlaps add up."""
    imp = np.zeros((P, P), np.float32)
    if len(pts):
        ij = np.round(pts).astype(np.int64) % P
        np.add.at(imp, (ij[:, 1], ij[:, 0]), 1.0)
    out = sfft.irfft2(sfft.rfft2(imp) * sfft.rfft2(kernel), s=(P, P))
    return np.clip(out, 0.0, None).astype(np.float32)


def _jittered_grid(rng: np.random.Generator, P: int, spacing: float, jitter: float) -> np.ndarray:
    """Points on a hexagonal grid of ``spacing`` pixels, each moved by up to ``jitter``; ``(n, 2)`` x, y."""
    n = max(round(P / spacing), 1)
    rows = max(round(P / (spacing * 0.866)), 1)
    sx, sy = P / n, P / rows
    gx, gy = np.meshgrid(np.arange(n), np.arange(rows))
    x = (gx + 0.5 * (gy % 2)) * sx
    y = gy * sy
    pts = np.stack([x.ravel(), y.ravel()], 1).astype(np.float64)
    pts += rng.uniform(-jitter, jitter, pts.shape)
    return pts % P


def _poisson(rng: np.random.Generator, P: int, spacing: float) -> np.ndarray:
    """Uniform random points, one per ``spacing x spacing`` pixels on average."""
    n = rng.poisson(P * P / (spacing * spacing))
    return rng.uniform(0, P, (n, 2))


def _voronoi_edge_distance(rng: np.random.Generator, P: int, spacing: float, jitter: float) -> np.ndarray:
    """Approximate distance (pixels) to the nearest edge of a periodic Voronoi tessellation."""
    seeds = _jittered_grid(rng, P, spacing, jitter)
    shifts = np.array([(i * P, j * P) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=np.float64)
    allseeds = (seeds[None, :, :] + shifts[:, None, :]).reshape(-1, 2)
    step = 4 if P % 4 == 0 else 1
    n = P // step
    g = (np.arange(n) * step).astype(np.float64)
    gx, gy = np.meshgrid(g, g)
    d, _ = cKDTree(allseeds).query(np.stack([gx.ravel(), gy.ravel()], 1), k=2)
    edge = ((d[:, 1] - d[:, 0]) / 2.0).reshape(n, n)
    if step > 1:
        edge = ndimage.zoom(edge, step, order=1, mode="grid-wrap", grid_mode=True)
    return edge.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Class textures: each returns hematoxylin, eosin and neutral optical-density maps (P x P).
# ``um`` converts microns to pixels at the rendering mpp.


def _tex_background(rng, P, um):
    # Clean glass: only sensor noise is added later (structure here would repeat visibly at low power).
    z = np.zeros((P, P), np.float32)
    return z, z, np.full((P, P), 0.004, np.float32)


def _tex_tumor(rng, P, um):
    pts = _jittered_grid(rng, P, um(13.0), um(4.0))
    which = rng.integers(0, 3, len(pts))
    shapes = [(5.6, 4.3, 0.0), (6.6, 4.6, 1.1), (4.9, 4.1, 2.2)]
    nuc = sum(_splat(P, pts[which == i], _ellipse_kernel(P, um(a), um(b), t)) for i, (a, b, t) in enumerate(shapes))
    nuc = np.clip(nuc, 0, 1)
    chrom = _smooth_noise(rng, P, um(0.8))
    nucleoli = np.clip(_splat(P, pts + rng.normal(0, um(1.0), pts.shape), _ellipse_kernel(P, um(0.9), um(0.9))), 0, 1)
    H = 0.06 + nuc * (0.78 + 0.14 * chrom) + 0.35 * nucleoli * nuc
    E = 0.17 + 0.03 * _smooth_noise(rng, P, um(3.0)) - 0.05 * nuc
    return H, E, np.zeros_like(H)


def _tex_stroma(rng, P, um):
    fib = _smooth_noise(rng, P, um(14.0), um(1.0), 0.35) + 0.6 * _smooth_noise(rng, P, um(10.0), um(0.9), -0.25)
    fib /= float(fib.std())
    E = 0.24 + 0.07 * fib
    E = np.where(fib < -1.4, E * 0.3, E)  # clefts between collagen bundles
    pts = _poisson(rng, P, um(24.0))
    half = len(pts) // 2
    nuc = _splat(P, pts[:half], _ellipse_kernel(P, um(7.0), um(1.5), 0.35))
    nuc += _splat(P, pts[half:], _ellipse_kernel(P, um(6.0), um(1.4), -0.25))
    nuc = np.clip(nuc, 0, 1)
    H = 0.02 + 0.72 * nuc
    return H, np.clip(E, 0.02, None), np.zeros_like(H)


def _tex_lymphocytes(rng, P, um):
    pts = _jittered_grid(rng, P, um(7.6), um(1.6))
    nuc = np.clip(_splat(P, pts, _ellipse_kernel(P, um(3.2), um(3.0), 0.5)), 0, 1)
    H = 0.08 + nuc * (1.0 + 0.1 * _smooth_noise(rng, P, um(0.7)))
    E = 0.09 + 0.02 * _smooth_noise(rng, P, um(4.0))
    return H, E, np.zeros_like(H)


def _tex_necrosis(rng, P, um):
    E = 0.12 + 0.04 * _smooth_noise(rng, P, um(6.0))
    ghosts = np.clip(_splat(P, _jittered_grid(rng, P, um(14.0), um(5.0)), _ellipse_kernel(P, um(4.6), um(4.0))), 0, 1)
    debris_pts = _poisson(rng, P, um(11.0))
    debris = _splat(P, debris_pts[: len(debris_pts) // 2], _ellipse_kernel(P, um(1.5), um(1.1), 0.4))
    debris += _splat(P, debris_pts[len(debris_pts) // 2 :], _ellipse_kernel(P, um(1.0), um(0.9)))
    debris = np.clip(debris, 0, 1)
    H = 0.02 + 0.08 * ghosts + 0.65 * debris
    E = E + 0.05 * ghosts
    N = 0.06 + 0.02 * _smooth_noise(rng, P, um(12.0))
    return H, np.clip(E, 0.02, None), np.clip(N, 0, None)


def _tex_adipose(rng, P, um):
    edge = _voronoi_edge_distance(rng, P, um(62.0), um(18.0))
    mem = np.clip(um(1.8) - edge + 0.5, 0.0, 1.0)
    nuc_pts = _poisson(rng, P, um(90.0))
    nuc = np.clip(_splat(P, nuc_pts, _ellipse_kernel(P, um(4.5), um(1.4), 0.8)), 0, 1) * mem
    E = 0.045 + 0.30 * mem + 0.01 * _smooth_noise(rng, P, um(20.0))
    H = 0.01 + 0.05 * mem + 0.6 * nuc
    return H, E, np.full_like(E, 0.01)


def _tex_mucosa(rng, P, um):
    E = 0.20 + 0.04 * _smooth_noise(rng, P, um(5.0))
    lp_nuc = np.clip(_splat(P, _poisson(rng, P, um(12.0)), _ellipse_kernel(P, um(3.0), um(2.8))), 0, 1)
    H = 0.05 + 0.75 * lp_nuc
    glands = _jittered_grid(rng, P, um(105.0), um(14.0))
    epi = np.clip(_splat(P, glands, _annulus_kernel(P, um(14.0), um(42.0))), 0, 1)
    band = np.clip(_splat(P, glands, _annulus_kernel(P, um(33.0), um(40.0))), 0, 1)
    lumen = np.clip(_splat(P, glands, _ellipse_kernel(P, um(14.0), um(14.0))), 0, 1)
    beads = (_smooth_noise(rng, P, um(1.6)) > 0.1).astype(np.float32)
    H = H * (1 - epi) + epi * (0.34 + 0.7 * band * beads)  # goblet mucin pale blue, basal nuclei
    E = E * (1 - epi) + epi * 0.09
    H = H * (1 - lumen) + lumen * 0.01
    E = E * (1 - lumen) + lumen * 0.03
    return H, E, np.zeros_like(H)


_TEXTURES = {
    "tumor": _tex_tumor,
    "stroma": _tex_stroma,
    "lymphocytes": _tex_lymphocytes,
    "necrosis": _tex_necrosis,
    "adipose": _tex_adipose,
    "mucosa": _tex_mucosa,
}

#: Every class name :func:`write_synthetic_slide` can draw.
AVAILABLE_CLASSES: tuple[str, ...] = tuple(_TEXTURES)


def _stains(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-slide stain jitter: H and E directions, glass colour, overall intensity."""
    rng = np.random.default_rng([seed, 7])
    h = _HEMATOXYLIN * rng.uniform(0.95, 1.05, 3)
    e = _EOSIN * rng.uniform(0.95, 1.05, 3)
    glass = _GLASS_RGB + rng.uniform(-2, 2, 3)
    return h / np.linalg.norm(h), e / np.linalg.norm(e), glass, float(rng.uniform(0.93, 1.07))


def _class_texture(name: str, mpp: float, seed: int, P: int = TEXTURE_PX) -> np.ndarray:
    """Periodic RGB texture of one class (``"background"`` for glass): float32 ``(P, P, 3)`` in [0, 255]."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])

    def um(v: float) -> float:
        return v / mpp

    fn = _tex_background if name == "background" else _TEXTURES[name]
    H, E, N = fn(rng, P, um)
    h, e, glass, gain = _stains(seed)
    rgb = np.empty((P, P, 3), np.float32)
    ln10 = np.float32(-math.log(10.0))
    for c in range(3):
        od = np.float32(gain * h[c]) * H + np.float32(gain * e[c]) * E + N
        rgb[..., c] = np.exp(od * ln10) * np.float32(glass[c])  # Beer-Lambert
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(1.2)  # sensor noise
    return np.clip(rgb, 0, 255, out=rgb)


@functools.lru_cache(maxsize=24)
def _texture_pyramid(name: str, mpp: float, seed: int) -> tuple[np.ndarray, ...]:
    """uint8 textures of a class at downsamples 1, 2, 4, ... down to one pixel (block means of level 0)."""
    t = _class_texture(name, mpp, seed)
    out = []
    while True:
        u = np.round(t).astype(np.uint8)
        u.setflags(write=False)
        out.append(u)
        n = t.shape[0]
        if n == 1:
            return tuple(out)
        t = t.reshape(n // 2, 2, n // 2, 2, 3).mean((1, 3))


def _level_texture(name: str, mpp: float, seed: int, ds: int) -> np.ndarray:
    pyr = _texture_pyramid(name, mpp, seed)
    return pyr[min(int(ds).bit_length() - 1, len(pyr) - 1)]


def class_texture(name: str, mpp: float = 0.25, seed: int = 0, downsample: int = 1) -> np.ndarray:
    """The periodic texture tile of a class as it appears in a slide of this mpp and seed.

    Args:
        name: A class of :data:`AVAILABLE_CLASSES` or ``"background"``.
        mpp: Microns per level-0 pixel the texture is drawn at.
        seed: Slide seed (stain jitter and texture layout follow it).
        downsample: Pyramid downsample (a power of two); the tile is the block mean of level 0.

    Returns:
        Read-only uint8 ``(P, P, 3)`` with ``P = TEXTURE_PX / downsample`` (at least 1).
    """
    if not _is_pow2(int(downsample)):
        raise ValueError(f"downsample must be a power of two, got {downsample}")
    if name != "background" and name not in _TEXTURES:
        raise ValueError(f"no texture for {name!r}; available: {', '.join(AVAILABLE_CLASSES)}")
    return _level_texture(name, float(mpp), int(seed), int(downsample))


# --------------------------------------------------------------------------------------------------
# Layout


def _resize_field(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a float field to ``(h, w)`` (PIL, float32)."""
    if a.shape == (h, w):
        return a.astype(np.float32)
    return np.array(Image.fromarray(a.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))


def _coarse_noise(rng: np.random.Generator, hc: int, wc: int, sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((hc, wc)), sigma, mode="reflect")
    return (n / max(float(n.std()), 1e-12)).astype(np.float32)


def _blob_layout(rng: np.random.Generator, h: int, w: int, k: int, background_frac: float) -> np.ndarray:
    """Label map: a few irregular tissue pieces, split into warped-Voronoi regions of one class each.

    The random fields are drawn on a grid of at most 256 cells on the short side and resized, so the
    cost does not grow with the sigma of the pieces; the rest works in row chunks to bound memory.
    """
    s = min(h, w)
    scale = min(1.0, 256.0 / s)
    hc, wc = max(round(h * scale), 1), max(round(w * scale), 1)
    sc = min(hc, wc)
    noise = _resize_field(_coarse_noise(rng, hc, wc, 0.09 * sc), h, w)
    warp_x = _resize_field(_coarse_noise(rng, hc, wc, 0.06 * sc), h, w)
    warp_y = _resize_field(_coarse_noise(rng, hc, wc, 0.06 * sc), h, w)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    edge = np.minimum(np.minimum(yy + 0.5, h - yy - 0.5), np.minimum(xx + 0.5, w - xx - 0.5))
    noise -= 4.0 * (1.0 - np.clip(edge / np.float32(0.14 * s), 0.0, 1.0)) ** 2
    del edge
    tissue = noise > np.quantile(noise, background_frac)
    del noise
    lab, n = ndimage.label(tissue)
    if n > 1:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes >= 0.03 * sizes.sum()
        tissue = keep[lab]
    del lab
    tissue = ndimage.binary_fill_holes(tissue)
    labels = np.zeros((h, w), np.uint8)
    n_tissue = int(tissue.sum())
    if n_tissue == 0:
        return labels
    # seeds: uniform among tissue pixels
    n_seeds = min(2 * k, n_tissue)
    flat = np.sort(rng.choice(n_tissue, n_seeds, replace=False))
    ty, tx = np.divmod(np.flatnonzero(tissue)[flat], w)
    amp = np.float32(0.06 * s)
    seeds = np.stack([tx + amp * warp_x[ty, tx], ty + amp * warp_y[ty, tx]], 1).astype(np.float32)
    owner = np.zeros((h, w), np.uint8)
    rows = max(1, 2**20 // max(w, 1))
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        px = xx + amp * warp_x[r0:r1]
        py = yy[r0:r1] + amp * warp_y[r0:r1]
        best = np.full(px.shape, np.inf, np.float32)
        for i, (sx, sy) in enumerate(seeds):
            d = (px - sx) ** 2 + (py - sy) ** 2
            closer = d < best
            best[closer] = d[closer]
            owner[r0:r1][closer] = i
    areas = np.bincount(owner[tissue], minlength=n_seeds)
    order = np.argsort(-areas, kind="stable")
    seed_class = np.zeros(n_seeds, np.uint8)
    first = min(k, n_seeds)
    seed_class[order[:first]] = rng.permutation(k)[:first] + 1
    seed_class[order[first:]] = rng.integers(1, k + 1, n_seeds - first)
    labels[tissue] = seed_class[owner[tissue]]
    return labels


def _grid_layout(h: int, w: int, k: int, background_frac: float) -> np.ndarray:
    """Label map: one rectangle per class on a grid, classes in order, separated by glass."""
    cols = max(1, math.ceil(math.sqrt(k * w / max(h, 1))))
    rows = math.ceil(k / cols)
    labels = np.zeros((h, w), np.uint8)
    # Shrink each grid cell so that (with the empty cells) about background_frac is glass.
    fill = (1.0 - background_frac) * rows * cols / k
    side = math.sqrt(min(max(fill, 0.01), 1.0))
    for i in range(k):
        r, c = divmod(i, cols)
        y0, y1 = r * h / rows, (r + 1) * h / rows
        x0, x1 = c * w / cols, (c + 1) * w / cols
        my, mx = (y1 - y0) * (1 - side) / 2, (x1 - x0) * (1 - side) / 2
        labels[round(y0 + my):round(y1 - my), round(x0 + mx):round(x1 - mx)] = i + 1
    return labels


def _pen_path(rng: np.random.Generator, W: int, H: int) -> tuple[np.ndarray, float]:
    """A wavy stroke along the top or bottom margin: level-0 polyline ``(n, 2)`` and half-width."""
    n = 48
    xs = np.linspace(rng.uniform(0.08, 0.25) * W, rng.uniform(0.7, 0.92) * W, n)
    yc = rng.uniform(0.05, 0.08) * H
    if rng.random() < 0.5:
        yc = H - yc
    ys = yc + 0.02 * H * np.sin(2 * math.pi * (xs / W) * rng.uniform(1.0, 2.5) + rng.uniform(0, 2 * math.pi))
    return np.stack([xs, ys], 1), max(0.012 * min(W, H), 3.0)


def _distance_to_path(px: np.ndarray, py: np.ndarray, path: np.ndarray) -> np.ndarray:
    """Distance from points (broadcastable arrays) to a polyline."""
    best = np.full(np.broadcast(px, py).shape, np.inf)
    for (ax, ay), (bx, by) in itertools.pairwise(path):
        vx, vy = bx - ax, by - ay
        t = np.clip(((px - ax) * vx + (py - ay) * vy) / max(vx * vx + vy * vy, 1e-12), 0.0, 1.0)
        d = np.hypot(px - ax - t * vx, py - ay - t * vy)
        np.minimum(best, d, out=best)
    return best


def _path_coverage(
    x0: int, y0: int, w: int, h: int, cell: float, path: np.ndarray, halfwidth: float
) -> np.ndarray:
    """Anti-aliased coverage (0-1, float32 ``(h, w)``) of a stroke of ``halfwidth`` along a polyline on the
    grid cells ``[x0, x0 + w) x [y0, y0 + h)`` of ``cell`` level-0 pixels each.

    Each segment is evaluated only inside its own bounding box, so the cost follows the stroke's area.
    """
    out = np.zeros((h, w), np.float32)
    reach = halfwidth + cell
    for a, b in itertools.pairwise(path):
        lo = np.minimum(a, b) - reach
        hi = np.maximum(a, b) + reach
        c0, c1 = max(int(lo[0] // cell) - x0, 0), min(int(hi[0] // cell) + 1 - x0, w)
        r0, r1 = max(int(lo[1] // cell) - y0, 0), min(int(hi[1] // cell) + 1 - y0, h)
        if c1 <= c0 or r1 <= r0:
            continue
        px = ((x0 + np.arange(c0, c1) + 0.5) * cell)[None, :]
        py = ((y0 + np.arange(r0, r1) + 0.5) * cell)[:, None]
        d = _distance_to_path(px, py, np.stack([a, b]))
        cov = np.clip((halfwidth - d) / cell + 0.5, 0.0, 1.0).astype(np.float32)
        np.maximum(out[r0:r1, c0:c1], cov, out=out[r0:r1, c0:c1])
    return out


def _cells_near_path(shape: tuple[int, int], cell: float, path: np.ndarray, radius: float) -> np.ndarray:
    """Cells of a grid (``cell`` level-0 pixels each) that a stroke of half-width ``radius`` touches."""
    return _path_coverage(0, 0, shape[1], shape[0], cell, path, radius) > 0


# --------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Renderer:
    labels: np.ndarray
    label_ds: int
    names: tuple[str, ...]  # index 0 is "background"
    mpp: float
    seed: int
    pen_path: np.ndarray | None = None
    pen_halfwidth: float = 0.0
    pen_od: np.ndarray | None = None
    _pen_box: tuple[float, float, float, float] = field(default=(0, 0, 0, 0))

    def __post_init__(self) -> None:
        if self.pen_path is not None:
            r = self.pen_halfwidth + 2
            x0, y0 = self.pen_path.min(0) - r
            x1, y1 = self.pen_path.max(0) + r
            self._pen_box = (x0, y0, x1, y1)

    def _tex(self, k: int, ds: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        t = _level_texture(self.names[k], self.mpp, self.seed, ds)
        Q = t.shape[0]
        ox, oy = x0 % Q, y0 % Q
        if ox + w <= Q and oy + h <= Q:
            return t[oy:oy + h, ox:ox + w]
        rows = (oy + np.arange(h)) % Q
        cols = (ox + np.arange(w)) % Q
        return t[rows[:, None], cols[None, :]]

    def _label_block(self, r0: int, c0: int, nr: int, nc: int) -> np.ndarray:
        """Labels ``[r0, r0 + nr) x [c0, c0 + nc)``, background outside the map."""
        hl, wl = self.labels.shape
        if r0 >= 0 and c0 >= 0 and r0 + nr <= hl and c0 + nc <= wl:
            return self.labels[r0:r0 + nr, c0:c0 + nc]
        out = np.zeros((nr, nc), np.uint8)
        ra, rb = max(r0, 0), min(r0 + nr, hl)
        ca, cb = max(c0, 0), min(c0 + nc, wl)
        if rb > ra and cb > ca:
            out[ra - r0:rb - r0, ca - c0:cb - c0] = self.labels[ra:rb, ca:cb]
        return out

    def render(self, ds: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of level ``ds`` pixels ``[x0, x0 + w) x [y0, y0 + h)``."""
        L = self.label_ds
        if ds <= L:
            r = L // ds
            c0, r0 = x0 // r, y0 // r
            block = self._label_block(r0, c0, (y0 + h - 1) // r - r0 + 1, (x0 + w - 1) // r - c0 + 1)
            lo, hi = int(block.min()), int(block.max())
            if lo == hi:
                out = self._tex(lo, ds, x0, y0, w, h)
            else:
                lab = np.repeat(np.repeat(block, r, 0), r, 1)
                lab = lab[y0 - r0 * r:y0 - r0 * r + h, x0 - c0 * r:x0 - c0 * r + w]
                out = np.array(self._tex(lo, ds, x0, y0, w, h))
                for k in np.unique(block)[1:]:
                    np.copyto(out, self._tex(int(k), ds, x0, y0, w, h), where=(lab == k)[..., None])
        else:
            f = ds // L
            block = self._label_block(y0 * f, x0 * f, h * f, w * f)
            lo, hi = int(block.min()), int(block.max())
            if lo == hi:
                out = self._tex(lo, ds, x0, y0, w, h)
            else:
                acc = np.zeros((h, w, 3), np.float32)
                for k in np.unique(block):
                    wk = (block == k).reshape(h, f, w, f).mean((1, 3), dtype=np.float32)
                    acc += wk[..., None] * self._tex(int(k), ds, x0, y0, w, h)
                out = np.round(acc).astype(np.uint8)
        if self.pen_path is not None:
            out = self._draw_pen(out, ds, x0, y0, w, h)
        return out

    def _draw_pen(self, out: np.ndarray, ds: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        bx0, by0, bx1, by1 = self._pen_box
        if (x0 + w) * ds < bx0 or x0 * ds > bx1 or (y0 + h) * ds < by0 or y0 * ds > by1:
            return out
        alpha = _path_coverage(x0, y0, w, h, ds, self.pen_path, self.pen_halfwidth)
        if not alpha.any():
            return out
        trans = np.power(10.0, -alpha[..., None] * self.pen_od)
        return np.clip(np.round(out * trans), 0, 255).astype(np.uint8)

    def tiles(self, ds: int, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
        """Tiles of a level in row-major order, each ``(tile, tile, 3)`` (edge tiles drawn in full)."""
        for ty in range(0, height, tile):
            for tx in range(0, width, tile):
                t = self.render(ds, tx, ty, tile, tile)
                yield t if t.flags.c_contiguous else np.ascontiguousarray(t)


# --------------------------------------------------------------------------------------------------
# Writing


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp")


def _level_plan(W: int, H: int, downsamples: Sequence[int]) -> list[tuple[int, int, int]]:
    levels = [(1, W, H)]
    for ds in sorted({int(d) for d in downsamples}):
        if ds <= 1:
            continue
        if not _is_pow2(ds):
            raise ValueError(f"downsamples must be powers of two, got {ds}")
        if min(W, H) // ds >= MIN_LEVEL_PX:
            levels.append((ds, W // ds, H // ds))
    return levels


def write_synthetic_slide(
    path: str | Path,
    size: tuple[int, int] = (4096, 3072),
    *,
    mpp: float | None = 0.25,
    classes: Sequence[str] = DEFAULT_CLASSES,
    seed: int = 0,
    flavour: Literal["aperio", "generic"] = "aperio",
    tile_px: int = 256,
    jpeg_quality: int = 80,
    downsamples: Sequence[int] = (4, 16, 64),
    background_frac: float = 0.5,
    pen_mark: bool | Literal["green", "blue", "black"] = False,
    objective_power: float | None = None,
    layout: Literal["blobs", "grid"] = "blobs",
    label_downsample: int = LABEL_DOWNSAMPLE,
    workers: int | None = None,
) -> SyntheticSlide:
    """Write a synthetic pyramidal whole-slide image and its ground truth.

    The slide streams to disk tile by tile (memory stays at tens of MB for any size); the TIFF, the
    label map and the metadata are each written under a temporary name in the same folder and renamed
    when complete, the slide last.

    Args:
        path: Slide file to write (e.g. ``slide.svs`` or ``slide.tiff``); ``<stem>.labels.png`` and
            ``<stem>.json`` go beside it.
        size: Level-0 ``(width, height)`` in pixels.
        mpp: Level-0 microns per pixel written into the file; textures are drawn at this scale.
            ``None`` writes no mpp (``"generic"``: no resolution tags; ``"aperio"``: no ``MPP`` field,
            then ``objective_power`` is required) and draws textures at ``10 / objective_power`` or
            0.25.
        classes: Tissue class names, each in :data:`AVAILABLE_CLASSES`; label ``k`` is
            ``classes[k - 1]``.
        seed: Everything (layout, textures, stain jitter, pen) follows it; the same arguments give the
            same bytes.
        flavour: ``"aperio"``: Aperio SVS-like (ImageDescription with ``AppMag`` and ``MPP``, a
            thumbnail page, reduced levels with subfiletype 0). ``"generic"``: generic tiled TIFF, mpp
            only in the resolution tags, reduced levels with subfiletype 1, no objective power.
        tile_px: TIFF tile side (a multiple of 16).
        jpeg_quality: JPEG quality of the tiles.
        downsamples: Reduced levels (powers of two); one is written only when its shorter side keeps at
            least :data:`MIN_LEVEL_PX` pixels.
        background_frac: Target fraction of the slide that is bare glass, in ``[0.05, 0.95]``.
        pen_mark: Draw a pen stroke on the glass (``True``: green or blue by seed, or a colour name).
            The ground truth labels it background.
        objective_power: ``AppMag`` of an Aperio slide; default ``round(10 / mpp)``.
        layout: ``"blobs"``: irregular tissue pieces split into class regions; ``"grid"``: one
            rectangle per class in order.
        label_downsample: Level-0 pixels per label-map pixel (a power of two).
        workers: Threads tifffile compresses tiles with (``None``: tifffile's default).

    Returns:
        The paths and geometry of what was written.

    Raises:
        ValueError: An argument is out of range (the message says which).
    """
    path = Path(path)
    W, H = int(size[0]), int(size[1])
    classes = tuple(classes)
    if W < 64 or H < 64:
        raise ValueError(f"size must be at least 64x64 pixels, got {W}x{H}")
    if not classes or len(classes) > 255:
        raise ValueError(f"classes: give 1 to 255 names, got {len(classes)}")
    unknown = [c for c in classes if c not in _TEXTURES]
    if unknown:
        raise ValueError(f"classes: no texture for {unknown}; available: {', '.join(AVAILABLE_CLASSES)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes: names must be unique, got {classes}")
    if flavour not in ("aperio", "generic"):
        raise ValueError(f"flavour must be 'aperio' or 'generic', got {flavour!r}")
    if mpp is not None and not (mpp > 0):
        raise ValueError(f"mpp must be positive or None, got {mpp}")
    if flavour == "aperio" and mpp is None and objective_power is None:
        raise ValueError("an aperio slide without mpp needs objective_power (AppMag)")
    if not (0.05 <= background_frac <= 0.95):
        raise ValueError(f"background_frac must be within [0.05, 0.95], got {background_frac}")
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if not _is_pow2(label_downsample):
        raise ValueError(f"label_downsample must be a power of two, got {label_downsample}")
    if layout not in ("blobs", "grid"):
        raise ValueError(f"layout must be 'blobs' or 'grid', got {layout!r}")
    if pen_mark not in (False, True, "green", "blue", "black"):
        raise ValueError(f"pen_mark must be a bool or one of green, blue, black; got {pen_mark!r}")

    render_mpp = float(mpp) if mpp is not None else (10.0 / objective_power if objective_power else 0.25)
    levels = _level_plan(W, H, downsamples)
    rng = np.random.default_rng([seed, 1])

    hl, wl = math.ceil(H / label_downsample), math.ceil(W / label_downsample)
    if layout == "grid":
        labels = _grid_layout(hl, wl, len(classes), background_frac)
    else:
        labels = _blob_layout(rng, hl, wl, len(classes), background_frac)

    pen_info = None
    pen_path = pen_od = None
    pen_hw = 0.0
    if pen_mark:
        prng = np.random.default_rng([seed, 2])
        colour = pen_mark if isinstance(pen_mark, str) else ("green", "blue")[int(prng.integers(0, 2))]
        pen_path, pen_hw = _pen_path(prng, W, H)
        near = _cells_near_path((hl, wl), label_downsample, pen_path, pen_hw + label_downsample)
        labels[near] = 0  # no tissue under or beside the pen: the ground truth stays exact
        pen_od = -np.log10(np.asarray(_PEN_RGB[colour], float) / _GLASS_RGB) * prng.uniform(0.9, 1.1)
        pen_info = {"colour": colour, "halfwidth_px": pen_hw, "path": np.round(pen_path, 2).tolist()}

    names = ("background", *classes)
    renderer = _Renderer(labels, label_downsample, names, render_mpp, seed, pen_path, pen_hw, pen_od)

    labels_path, meta_path = ground_truth_paths(path)
    gt = GroundTruth(labels, label_downsample, classes, (W, H))
    label_fracs = gt.fractions(0, 0, W, H)
    stats = {}
    for k, name in enumerate(names):
        t = _level_texture(name, render_mpp, seed, 1).reshape(-1, 3).astype(np.float64)
        stats[name] = {"rgb_mean": np.round(t.mean(0), 2).tolist(), "rgb_std": np.round(t.std(0), 2).tolist()}
        stats[name]["area_fraction"] = round(float(label_fracs[k]), 6)
    mag = objective_power if objective_power is not None else (round(10.0 / mpp) if mpp else None)
    meta = {
        "generator": "pathvl.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "slide": path.name,
        "flavour": flavour,
        "size": [W, H],
        "mpp": mpp,
        "render_mpp": render_mpp,
        "objective_power": mag if flavour == "aperio" else None,
        "seed": seed,
        "classes": list(classes),
        "labels": labels_path.name,
        "label_downsample": label_downsample,
        "levels": [{"downsample": ds, "size": [w, h]} for ds, w, h in levels],
        "tile_px": tile_px,
        "jpeg_quality": jpeg_quality,
        "layout": layout,
        "background_frac_requested": background_frac,
        "texture_px": TEXTURE_PX,
        "class_stats": stats,
        "pen": pen_info,
    }

    # Everything is written under temporary names first and renamed when all three are complete, the
    # slide last: an interrupted run leaves no file under a final name (and never a slide without truth).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmps = [_tmp_path(p) for p in (labels_path, meta_path, path)]
    try:
        Image.fromarray(labels).save(tmps[0], format="PNG")
        tmps[1].write_text(json.dumps(meta, indent=2) + "\n")
        _write_tiff(tmps[2], renderer, levels, flavour=flavour, mpp=mpp, mag=mag, tile_px=tile_px,
                    quality=jpeg_quality, workers=workers)
        for tmp, final in zip(tmps, (labels_path, meta_path, path)):
            os.replace(tmp, final)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return SyntheticSlide(
        path=path,
        labels_path=labels_path,
        meta_path=meta_path,
        classes=classes,
        mpp=mpp,
        size=(W, H),
        downsamples=tuple(ds for ds, _, _ in levels),
        flavour=flavour,
    )


def _write_tiff(
    tmp: Path,
    renderer: _Renderer,
    levels: list[tuple[int, int, int]],
    *,
    flavour: str,
    mpp: float | None,
    mag: float | None,
    tile_px: int,
    quality: int,
    workers: int | None,
) -> None:
    import tifffile

    W, H = levels[0][1], levels[0][2]
    bigtiff = W * H * 3 > 2**31
    common = {
        "dtype": np.uint8,
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": int(quality)},
        "metadata": None,
        "maxworkers": workers,
        "buffersize": 16 * 2**20,
    }
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for i, (ds, w, h) in enumerate(levels):
            kw = dict(common, shape=(h, w, 3), tile=(tile_px, tile_px))
            if flavour == "aperio":
                if i == 0:
                    desc = f"{_APERIO_HEADER} \r\n{W}x{H} [0,0 {W}x{H}] ({tile_px}x{tile_px}) JPEG/RGB Q={quality}"
                    if mag is not None:
                        desc += f"|AppMag = {mag:g}"
                    if mpp is not None:
                        desc += f"|MPP = {mpp:.10g}"
                    kw["description"] = desc
                kw["subfiletype"] = 0
            else:
                kw["subfiletype"] = 0 if i == 0 else 1
                if mpp is not None:
                    res = 1e4 / (mpp * ds)
                    kw["resolution"] = (res, res)
                    kw["resolutionunit"] = "CENTIMETER"
            tif.write(renderer.tiles(ds, w, h, tile_px), **kw)
            if flavour == "aperio" and i == 0:
                tds = 1
                while max(W, H) / tds > THUMBNAIL_PX:
                    tds *= 2
                tw, th = max(W // tds, 1), max(H // tds, 1)
                thumb = renderer.render(tds, 0, 0, tw, th)
                tif.write(
                    np.ascontiguousarray(thumb),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": 90},
                    metadata=None,
                    description=f"{_APERIO_HEADER} \r\n{W}x{H} -> {tw}x{th} - ",
                    subfiletype=0,
                )
