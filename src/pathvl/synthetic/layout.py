"""Where the classes lie on a synthetic slide: blob and grid layouts, pen strokes on the glass."""


from __future__ import annotations

import itertools
import math

import numpy as np
from PIL import Image
from scipy import ndimage


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
