"""Heatmap overlays for the viewer: patch scores rasterised at the slide's level-0 geometry.

An overlay is an RGBA PNG covering the whole slide: a pixel of an overlay of downsample ``(sx, sy)``
covers level-0 pixels ``[x * sx, (x + 1) * sx)``; its colour is the colour map of
:func:`pathvl.eval.heatmap.colorize` applied to the mean score of the patches covering it, scaled to the
slide's score range; where no patch lies it is transparent. The rasteriser is the summed-area form of
:meth:`pathvl.eval.heatmap.Heatmap.raster` (same boxes, same means; a parity test guards it), linear in
patches plus pixels instead of one slice per patch.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image

from pathvl.eval.heatmap import colorize

__all__ = ["LUT_SIZE", "colorbar_png", "overlay_png", "overlay_size", "raster_mean"]

#: Entries of the colour table overlays are drawn with.
LUT_SIZE = 4096


def overlay_size(slide_size: tuple[int, int], min_footprint: int, max_px: int = 2048, hard_max_px: int = 4096
                 ) -> tuple[int, int]:
    """``(width, height)`` of an overlay covering the slide.

    Its downsample (level-0 pixels per overlay pixel) is the smallest patch's footprint divided by a power
    of two (so that grid-aligned patches fall on whole pixels), fine enough that this patch spans at least
    4 pixels and the long side at least 512, but no finer than level 0 and, while the smallest patch keeps
    2 pixels, no more than ``max_px`` on the long side; never more than ``hard_max_px``.
    """
    W, H = int(slide_size[0]), int(slide_size[1])
    long, fp = max(W, H), max(int(min_footprint), 1)
    scale = float(fp)
    while scale > 1 and (fp / scale < 4 or long / scale < 512):
        scale /= 2
    while long / scale > max_px and fp / scale > 2:
        scale *= 2
    scale = max(scale, long / hard_max_px, 1.0)
    return max(1, math.ceil(W / scale)), max(1, math.ceil(H / scale))


def raster_mean(coords: np.ndarray, footprint: np.ndarray, scores: np.ndarray, slide_size: tuple[int, int],
                size: tuple[int, int]) -> np.ndarray:
    """Mean score of the patches covering each pixel of a ``(width, height)`` grid over the slide.

    Args:
        coords: ``(N, 2)`` level-0 top-left corners.
        footprint: ``(N,)`` level-0 sides.
        scores: ``(N,)``; non-finite scores are left out.
        slide_size: Level-0 ``(width, height)``.
        size: Grid ``(width, height)``.

    Returns:
        ``(height, width)`` float32, NaN where no patch lies.
    """
    w, h = int(size[0]), int(size[1])
    sx, sy = slide_size[0] / w, slide_size[1] / h
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    fp = np.asarray(footprint, np.float64).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(-1)
    x0, y0 = np.floor(c[:, 0] / sx).astype(np.int64), np.floor(c[:, 1] / sy).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.ceil((c[:, 0] + fp) / sx).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.ceil((c[:, 1] + fp) / sy).astype(np.int64))
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    keep = np.isfinite(s) & (x0 < x1) & (y0 < y1)
    x0, x1, y0, y1, s = x0[keep], x1[keep], y0[keep], y1[keep], s[keep]
    acc = np.zeros((h + 1, w + 1), np.float64)
    cnt = np.zeros((h + 1, w + 1), np.int64)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(acc, (ys, xs), sign * s)
        np.add.at(cnt, (ys, xs), sign)
    acc = acc.cumsum(0).cumsum(1)[:h, :w]
    cnt = cnt.cumsum(0).cumsum(1)[:h, :w]
    out = np.full((h, w), np.nan, np.float32)
    m = cnt > 0
    out[m] = (acc[m] / cnt[m]).astype(np.float32)
    return out


@functools.cache
def _lut() -> np.ndarray:
    """:func:`colorize` sampled at :data:`LUT_SIZE` points of [0, 1]: ``(LUT_SIZE, 3)`` uint8."""
    return colorize(np.linspace(0.0, 1.0, LUT_SIZE))


def overlay_png(raster: np.ndarray, vmin: float, vmax: float, alpha: int = 255) -> bytes:
    """The raster coloured with the heatmap colour map as an RGBA PNG (transparent where NaN).

    Colours come from a table of :func:`colorize` (:data:`LUT_SIZE` entries, within one 8-bit level of
    it), several times faster than evaluating the ramp at every pixel.
    """
    m = np.isfinite(raster)
    idx = np.rint((raster[m] - vmin) * ((LUT_SIZE - 1) / max(vmax - vmin, 1e-12)))
    rgba = np.zeros((*raster.shape, 4), np.uint8)
    rgba[m, :3] = _lut()[np.clip(idx, 0, LUT_SIZE - 1).astype(np.intp)]
    rgba[m, 3] = alpha
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def colorbar_png(width: int = 256, height: int = 12) -> bytes:
    """The colour scale, low (left) to high (right), as a PNG."""
    row = colorize(np.linspace(0.0, 1.0, width))
    buf = io.BytesIO()
    Image.fromarray(np.repeat(row[None], height, axis=0)).save(buf, format="PNG")
    return buf.getvalue()
