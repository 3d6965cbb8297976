"""Tissue detection on a slide thumbnail.

The detector follows the CLAM recipe (HSV saturation, median blur, threshold, morphology) with guards for
what breaks it on real slides. The saturation threshold sits just above the glass: the median
saturation of bright pixels plus a margin, never below a floor (so pale tissue and adipose count on
clean glass), never above Otsu's split (so a slide that is mostly tissue keeps its pale tissue) and
never above a cap; a tinted slide thus gets a higher threshold than a clean one. Near-white pixels,
green/blue pen ink and black ink or dark debris are rejected, then come morphological closing, hole
filling, opening and removal of pieces smaller than a physical area. Only numpy, scipy.ndimage and PIL
are used.

Masks are thumbnail-sized booleans; a thumbnail pixel ``(i, j)`` of a thumbnail at downsample ``ds``
covers level-0 pixels ``[j * ds, (j + 1) * ds) x [i * ds, (i + 1) * ds)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage


@dataclass(frozen=True)
class TissueParams:
    """Settings of :func:`detect_tissue`. Sizes in pixels are thumbnail pixels.

    Attributes:
        median_px: Side of the median filter applied to the saturation (odd; 0 or 1 disables). Removes
            thin lines and speckle.
        min_saturation: Lowest saturation threshold (HSV saturation, 0-1); pale tissue and adipose
            stay above it, clean glass (about 0.01-0.03) below.
        glass_margin: The threshold is at least the glass level plus this, the glass level being the
            median saturation of bright pixels (value >= ``glass_min_value``) when they cover at least
            ``glass_min_frac`` of the thumbnail; a tinted slide thus gets a higher threshold.
        glass_min_value: See ``glass_margin`` (0-1).
        glass_min_frac: See ``glass_margin``.
        max_saturation: Highest threshold ever used. The threshold is also never above Otsu's split of
            the saturation histogram (when that is above ``min_saturation``), so a slide that is
            mostly tissue keeps its pale tissue.
        white_level: A pixel whose every channel is at least this (0-255) is glass, never tissue.
        black_level: A pixel whose brightest channel is at most this (0-255) and whose chroma (max
            minus min channel) is at most ``black_max_chroma`` is black ink or dark debris, never tissue.
        black_max_chroma: See ``black_level``; dark hematoxylin (blue-purple) has more chroma.
        pen_hues: Hue ranges in degrees (``(lo, hi)``, inclusive) of pen ink: green and blue markers.
            Hematoxylin (about 240-300 degrees) and eosin (300-360 and 0-20) are outside the defaults.
        pen_min_saturation: A pixel in a pen hue is ink only when at least this saturated.
        pen_dilate_px: Ink (after dropping isolated ink pixels) is grown by this many pixels so that its
            blurred rim is rejected too.
        close_px: Side of the square closing that bridges small gaps (0 disables).
        open_px: Side of the square opening that removes thin bridges and specks (0 disables).
        min_area_um2: With a thumbnail mpp, tissue pieces smaller than this (square microns) are
            dropped (10,000 um2 is a 100 um square).
        min_area_frac: Without an mpp, pieces smaller than this fraction of the thumbnail are dropped.
        max_hole_um2: With an mpp, holes up to this area (square microns) are filled; ``None`` fills
            every hole.
        max_hole_frac: Without an mpp, holes up to this fraction of the thumbnail are filled.
    """

    median_px: int = 5
    min_saturation: float = 0.04
    glass_margin: float = 0.025
    glass_min_value: float = 0.8
    glass_min_frac: float = 0.05
    max_saturation: float = 0.15
    white_level: int = 225
    black_level: int = 80
    black_max_chroma: int = 15
    pen_hues: tuple[tuple[float, float], ...] = ((75.0, 180.0), (180.0, 236.0))
    pen_min_saturation: float = 0.04
    pen_dilate_px: int = 3
    close_px: int = 5
    open_px: int = 3
    min_area_um2: float = 10_000.0
    min_area_frac: float = 0.001
    max_hole_um2: float | None = 250_000.0
    max_hole_frac: float | None = 0.02

    def __post_init__(self) -> None:
        if not (0.0 <= self.min_saturation <= self.max_saturation <= 1.0):
            raise ValueError(
                f"need 0 <= min_saturation <= max_saturation <= 1, got {self.min_saturation}, "
                f"{self.max_saturation}"
            )
        for name in ("median_px", "close_px", "open_px", "pen_dilate_px"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.median_px > 1 and self.median_px % 2 == 0:
            raise ValueError(f"median_px must be odd, got {self.median_px}")


def _as_rgb(thumb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8; transparent pixels of an RGBA image (outside the slide) become white."""
    a = np.asarray(thumb)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be an RGB(A) array of shape (H, W, 3|4), got {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"thumbnail must be uint8, got {a.dtype}")
    if a.shape[2] == 4:
        rgb = a[..., :3].copy()
        rgb[a[..., 3] == 0] = 255
        return rgb
    return a


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees, 0-360), saturation (0-1) and value (0-1) of a uint8 RGB image, as float32."""
    r, g, b = (rgb[..., i].astype(np.float32) * np.float32(1 / 255) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    c = v - np.minimum(np.minimum(r, g), b)
    s = np.where(v > 0, c / np.maximum(v, 1e-6), 0.0).astype(np.float32)
    cs = np.maximum(c, 1e-6)
    h = np.where(v == r, ((g - b) / cs) % 6.0, np.where(v == g, (b - r) / cs + 2.0, (r - g) / cs + 4.0))
    h = np.where(c > 0, h * 60.0, 0.0).astype(np.float32)
    return h, s, v


def _channel_max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _otsu_from_counts(counts: np.ndarray) -> float | None:
    """Otsu's threshold on a histogram of integer values ``0..len(counts) - 1``: values above it are the
    upper class (``None`` when the histogram has fewer than two distinct values)."""
    p = counts.astype(np.float64) / max(counts.sum(), 1)
    levels = np.arange(len(counts), dtype=np.float64)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * levels)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between = np.nan_to_num(between, nan=0.0, posinf=0.0, neginf=0.0)
    between[w1 <= 1e-12] = 0.0
    return float(np.argmax(between)) if between.max() > 0 else None



def _square(mask: np.ndarray, size: int, op: str) -> np.ndarray:
    """Binary dilation/erosion by a ``size x size`` square (separable, so fast on large thumbnails)."""
    if size <= 1:
        return mask
    m = mask.view(np.uint8)
    if op == "dilate":
        return ndimage.maximum_filter(m, size=size, mode="constant", cval=0).astype(bool)
    return ndimage.minimum_filter(m, size=size, mode="nearest").astype(bool)


def _fill_holes(mask: np.ndarray, max_hole_px: float | None) -> np.ndarray:
    filled = ndimage.binary_fill_holes(mask)
    if max_hole_px is None:
        return filled
    holes = filled & ~mask
    lab, n = ndimage.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    small = sizes <= max_hole_px
    small[0] = False
    return mask | small[lab]


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    if min_px <= 1:
        return mask
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def pen_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Pixels of pen ink (green/blue hues) or black ink/dark debris, grown by ``pen_dilate_px``.

    Args:
        rgb: ``(H, W, 3)`` uint8 thumbnail.
        params: Detection settings (the ``pen_*`` and ``black_*`` fields are used).
    """
    rgb = _as_rgb(rgb)
    h, s, _ = hsv(rgb)
    return _pen_mask(rgb, h, s, params)


def _pen_mask(rgb: np.ndarray, h: np.ndarray, s: np.ndarray, params: TissueParams) -> np.ndarray:
    ink = np.zeros(h.shape, bool)
    for lo, hi in params.pen_hues:
        ink |= (h >= lo) & (h <= hi)
    ink &= s >= params.pen_min_saturation
    mx, mn = _channel_max_min(rgb)
    ink |= (mx <= params.black_level) & (mx - mn <= params.black_max_chroma)
    if ink.any():  # a majority vote in 3 x 3 drops isolated pixels (dark nuclei, noise)
        ink = ndimage.uniform_filter(ink.astype(np.float32), 3, mode="nearest") > 0.5
    if params.pen_dilate_px > 0 and ink.any():
        ink = _square(ink, 2 * params.pen_dilate_px + 1, "dilate")
    return ink


def _threshold(s8: np.ndarray, v: np.ndarray, ink: np.ndarray, params: TissueParams) -> float:
    valid = ~ink
    sv = s8[valid]
    if sv.size == 0:
        return params.max_saturation
    t = params.min_saturation
    bright = sv[v[valid] >= params.glass_min_value]
    if bright.size >= params.glass_min_frac * s8.size:
        t = max(t, float(np.median(bright)) / 255.0 + params.glass_margin)
    k = _otsu_from_counts(np.bincount(sv, minlength=256))
    if k is not None and k / 255.0 > params.min_saturation:
        t = min(t, k / 255.0)
    return float(min(max(t, params.min_saturation), params.max_saturation))


def saturation_threshold(thumb: np.ndarray, params: TissueParams = TissueParams()) -> float:
    """The saturation threshold :func:`detect_tissue` uses on a thumbnail (0-1), for inspection."""
    rgb = _as_rgb(thumb)
    h, s, v = hsv(rgb)
    s8 = np.round(s * 255.0).astype(np.uint8)
    if params.median_px > 1:
        s8 = np.asarray(Image.fromarray(s8).filter(ImageFilter.MedianFilter(params.median_px)))
    return _threshold(s8, v, _pen_mask(rgb, h, s, params), params)


def detect_tissue(
    thumb: np.ndarray, params: TissueParams = TissueParams(), *, mpp: float | None = None
) -> np.ndarray:
    """Tissue mask of a slide thumbnail.

    Steps: saturation and median blur; a threshold just above the glass (at least ``min_saturation``,
    at most Otsu's split and ``max_saturation``, all computed without pen pixels); rejection of
    near-white, pen and black pixels; closing, hole filling, opening, removal of small pieces.
    See :func:`saturation_threshold`.

    Args:
        thumb: ``(H, W, 3)`` (or RGBA, transparent = glass) uint8 thumbnail of the whole slide, e.g.
            1-4k pixels on a side.
        params: Detection settings.
        mpp: Microns per *thumbnail* pixel (slide mpp times the thumbnail downsample). With it, the
            minimum piece and maximum hole areas are physical; without it they are fractions of the
            thumbnail.

    Returns:
        Boolean ``(H, W)`` mask, all ``False`` when there is no tissue (callers decide whether that is
        an error).
    """
    rgb = _as_rgb(thumb)
    H, W = rgb.shape[:2]
    if H == 0 or W == 0:
        return np.zeros((H, W), bool)
    h, s, v = hsv(rgb)
    s8 = np.round(s * 255.0).astype(np.uint8)
    if params.median_px > 1:
        s8 = np.asarray(Image.fromarray(s8).filter(ImageFilter.MedianFilter(params.median_px)))

    ink = _pen_mask(rgb, h, s, params)
    white = _channel_max_min(rgb)[1] >= params.white_level
    t = _threshold(s8, v, ink, params)
    mask = (s8 > round(t * 255.0)) & ~white & ~ink

    if mpp is not None:
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        px_area = float(mpp) ** 2
        min_px = params.min_area_um2 / px_area
        max_hole = None if params.max_hole_um2 is None else params.max_hole_um2 / px_area
    else:
        min_px = params.min_area_frac * H * W
        max_hole = None if params.max_hole_frac is None else params.max_hole_frac * H * W

    if params.close_px > 1:
        mask = _square(_square(mask, params.close_px, "dilate"), params.close_px, "erode")
        mask &= ~ink  # closing must not bridge into ink
    mask = _fill_holes(mask, max_hole) & ~ink  # ink circled by tissue is still ink
    if params.open_px > 1:
        mask = _square(_square(mask, params.open_px, "erode"), params.open_px, "dilate")
    return _remove_small(mask, min_px)


def tissue_overlay(thumb: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The thumbnail with tissue tinted green and outlined, for a person to check the mask.

    Args:
        thumb: ``(H, W, 3|4)`` uint8 thumbnail.
        mask: ``(H, W)`` boolean tissue mask.

    Returns:
        RGB image of the thumbnail's size.
    """
    rgb = _as_rgb(thumb)
    mask = np.asarray(mask, bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match thumbnail {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    tint = np.array([0.0, 200.0, 60.0], np.float32)
    out[mask] = 0.75 * out[mask] + 0.25 * tint
    width = max(1, round(max(mask.shape) / 600))
    edge = mask & ~_square(mask, 2 * width + 1, "erode")
    out[edge] = (0.0, 170.0, 0.0)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def save_overlay(thumb: np.ndarray, mask: np.ndarray, path: str | Path) -> Path:
    """Write :func:`tissue_overlay` as a PNG, atomically (temporary name in the same folder, then rename).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        tissue_overlay(thumb, mask).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
