"""Periodic H&E-like class textures in physical units (Beer-Lambert stain mixing)."""


from __future__ import annotations

import functools
import math
import zlib

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.spatial import cKDTree

from pathvl.synthetic.constants import _EOSIN, _GLASS_RGB, _HEMATOXYLIN, TEXTURE_PX
from pathvl.synthetic.truth import _is_pow2


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


