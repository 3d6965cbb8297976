"""Tissue detection on a slide thumbnail.

The detector follows the CLAM recipe (HSV saturation, median blur, threshold, morphology) with guards for
what breaks it on real slides. The saturation threshold sits just above the glass: the median
saturation of bright pixels plus a margin, never below a floor (so pale tissue and adipose count on
clean glass), never above Otsu's split (so a slide that is mostly tissue keeps its pale tissue) and
never above a cap; a tinted slide thus gets a higher threshold than a clean one. Near-white pixels,
green/blue pen ink and black ink or dark debris are rejected, then come morphological closing, hole
filling, opening and removal of pieces smaller than a physical area. Only numpy, scipy.ndimage and PIL
are used.

Cost (issue 17): a 2048 px thumbnail is detected in a small fraction of a second. Saturation and value
come from lookup tables on the channel maximum and chroma (the same float32 values :func:`hsv` gives), pen
hues from a table on (dominant channel, difference, chroma); the median filter is never run over the
whole thumbnail: a median exceeds the threshold exactly when more than half of its window does, so the
mask is a box count of one binary image, and the threshold's statistics (glass level, Otsu) come from
the exact median at a regular subsample of at most ``TissueParams.threshold_samples`` pixels (all pixels,
through Pillow's median filter, with ``threshold_samples=None``: the plain path). Morphology runs as
shifted boolean operations and hole filling as one labelling of the background.

Masks are thumbnail-sized booleans; a thumbnail pixel ``(i, j)`` of a thumbnail at downsample ``ds``
covers level-0 pixels ``[j * ds, (j + 1) * ds) x [i * ds, (i + 1) * ds)``.
"""

from __future__ import annotations

import functools
import math
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
        threshold_samples: The threshold's statistics come from the median-filtered saturation at a
            regular subsample of at most this many pixels (every pixel of a thumbnail up to that size);
            ``None`` median-filters the whole thumbnail for them (the plain path, slower). The mask
            itself is exact either way.
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
    threshold_samples: int | None = 65_536

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
        if self.threshold_samples is not None and self.threshold_samples < 1:
            raise ValueError(f"threshold_samples must be >= 1 or None, got {self.threshold_samples}")


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


@functools.lru_cache(maxsize=1)
def _sv_tables() -> tuple[np.ndarray, np.ndarray]:
    """``(s_table, v_table)``: float32 saturation indexed by ``max * 256 + chroma`` and value by ``max``,
    computed with the very operations of :func:`hsv` (so the same values)."""
    k = np.float32(1 / 255)
    mx = np.arange(256, dtype=np.float32)[:, None]
    mn = np.clip(np.arange(256)[:, None] - np.arange(256)[None, :], 0, 255).astype(np.float32)
    v = np.broadcast_to(mx * k, (256, 256))
    c = v - mn * k
    s = np.where(v > 0, c / np.maximum(v, 1e-6), 0.0).astype(np.float32)
    return s.reshape(-1), (np.arange(256, dtype=np.float32) * k)


@functools.lru_cache(maxsize=16)
def _pen_hue_table(pen_hues: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Whether a hue is in ``pen_hues``, indexed by ``(sector * 511 + difference + 255) * 256 + chroma``.

    The sector is the dominant channel (0 red, 1 green, 2 blue, ties in that order), the difference the
    one :func:`hsv` divides by the chroma (green - blue, blue - red, red - green); the hue is computed in
    float64 from these integers, so it can differ from :func:`hsv`'s float32 only in the last bits."""
    d = np.arange(-255, 256, dtype=np.float64)[:, None]
    c = np.maximum(np.arange(256, dtype=np.float64)[None, :], 1.0)
    out = np.zeros((3, 511, 256), bool)
    for sector, base in enumerate((0.0, 2.0, 4.0)):
        h = (d / c + base) % 6.0 * 60.0
        for lo, hi in pen_hues:
            out[sector] |= (h >= lo) & (h <= hi)
    out[:, :, 0] = False  # no chroma: hue 0 (grey), as in hsv()
    for lo, hi in pen_hues:
        if lo <= 0.0 <= hi:
            out[:, :, 0] = True
    return out.reshape(-1)


def _box_count(m: np.ndarray, size: int) -> np.ndarray:
    """How many pixels of each ``size x size`` window (centred, edges replicated) are set, as uint8."""
    r = size // 2
    p = np.pad(m.view(np.uint8), r, mode="edge")
    h, w = m.shape
    rows = p[:, 0:w].copy()
    for j in range(1, size):
        rows += p[:, j:j + w]
    out = rows[0:h].copy()
    for i in range(1, size):
        out += rows[i:i + h]
    return out


def _window_run(m: np.ndarray, size: int, axis: int, op: str) -> np.ndarray:
    """OR (``dilate``, zeros outside) or AND (``erode``, edges replicated) over the window of ``size``
    along ``axis`` that scipy.ndimage's filters use (``size // 2`` before the pixel), by doubling: a run of
    ``2w`` is two runs of ``w``, so a window of 7 takes 3 operations instead of 6."""
    lo = size // 2
    hi = size - 1 - lo
    pad = [(0, 0), (0, 0)]
    pad[axis] = (lo, hi)
    p = np.pad(m, pad, mode="constant", constant_values=False) if op == "dilate" else np.pad(m, pad, mode="edge")
    f = np.logical_or if op == "dilate" else np.logical_and
    n = p.shape[axis]

    def shift(a: np.ndarray, j: int) -> np.ndarray:  # a[j:] along the axis
        return a[j:] if axis == 0 else a[:, j:]

    def head(a: np.ndarray, k: int) -> np.ndarray:  # a[:k] along the axis
        return a[:k] if axis == 0 else a[:, :k]

    run, width = p, 1  # run[i] combines p[i .. i + width - 1]
    while 2 * width <= size:
        k = n - 2 * width + 1
        run, width = f(head(run, k), head(shift(run, width), k)), 2 * width
    if width < size:  # the rest: one more run, overlapping
        k = n - size + 1
        run = f(head(run, k), head(shift(run, size - width), k))
    return np.ascontiguousarray(head(run, m.shape[axis]))


def _square(mask: np.ndarray, size: int, op: str) -> np.ndarray:
    """Binary dilation/erosion by a ``size x size`` square: the pixels of scipy.ndimage's
    ``maximum_filter`` (zeros outside) / ``minimum_filter`` (``mode="nearest"``), as separable shifted
    boolean operations."""
    if size <= 1 or mask.size == 0:
        return mask
    m = np.asarray(mask, bool)
    return _window_run(_window_run(m, size, 0, op), size, 1, op)


def _set_labels(mask: np.ndarray, lab: np.ndarray, chosen: np.ndarray, value: bool) -> np.ndarray:
    """``mask`` with the pixels of the chosen labels (a boolean per label, 0 = none) set to ``value``:
    piece by piece inside each one's bounding box when they are few, else by one gather."""
    ids = np.flatnonzero(chosen)
    if ids.size == 0:
        return mask
    if ids.size > 256:
        return (mask | chosen[lab]) if value else (mask & ~chosen[lab])
    out = mask.copy()
    boxes = ndimage.find_objects(lab, max_label=int(ids[-1]))
    for k in ids:
        sl = boxes[k - 1]
        out[sl][lab[sl] == k] = value
    return out


def _fill_holes(mask: np.ndarray, max_hole_px: float | None) -> np.ndarray:
    """Fill the background pieces (4-connected) that do not reach the border, up to ``max_hole_px`` pixels
    each (all when ``None``): the holes ``ndimage.binary_fill_holes`` fills, found by one labelling."""
    lab, n = ndimage.label(~mask)
    if n == 0:
        return mask
    hole = np.ones(n + 1, bool)
    hole[lab[0]] = hole[lab[-1]] = hole[lab[:, 0]] = hole[lab[:, -1]] = False  # touching the border
    hole[0] = False
    if max_hole_px is not None and hole.any():
        hole &= np.bincount(lab.ravel(), minlength=n + 1) <= max_hole_px
    return _set_labels(mask, lab, hole, True)


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    if min_px <= 1:
        return mask
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    small = np.bincount(lab.ravel(), minlength=n + 1) < min_px
    small[0] = False
    return _set_labels(mask, lab, small, False)


def pen_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Pixels of pen ink (green/blue hues) or black ink/dark debris, grown by ``pen_dilate_px``.

    Args:
        rgb: ``(H, W, 3)`` uint8 thumbnail.
        params: Detection settings (the ``pen_*`` and ``black_*`` fields are used).
    """
    rgb = _as_rgb(rgb)
    return _Channels(rgb).ink(params)


class _Channels:
    """Per-pixel quantities of a thumbnail, each computed once: channel max/min, chroma, saturation
    (float32 and 8-bit, as :func:`hsv` and ``round(255 s)``)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.mx, self.mn = _channel_max_min(rgb)
        self.chroma = self.mx - self.mn
        self.index = self.mx.astype(np.uint16) << 8 | self.chroma  # max * 256 + chroma
        s_table, self.v_table = _sv_tables()
        self._s_table = s_table
        self.s8 = np.round(s_table * 255.0).astype(np.uint8)[self.index]

    def sat_at_least(self, t: float) -> np.ndarray:
        return (self._s_table >= t)[self.index]

    def ink(self, params: TissueParams) -> np.ndarray:
        rgb, mx, c = self.rgb, self.mx, self.chroma
        table = _pen_hue_table(tuple(tuple(map(float, h)) for h in params.pen_hues))
        # hues only where the saturation allows ink, and (as with the default hues) not where red
        # dominates when no red hue is ink: on the few candidate pixels, flattened
        cand = self.sat_at_least(params.pen_min_saturation)
        is_r = mx == rgb[..., 0]
        if not table[:511 * 256].any():
            cand &= ~is_r
        sel = np.flatnonzero(cand)
        ink = np.zeros(mx.shape, bool)
        if sel.size:
            px = np.take(rgb.reshape(-1, 3), sel, axis=0).astype(np.int32)  # one gather of pixels
            r, g, b = px[:, 0], px[:, 1], px[:, 2]
            m, cs, rs = mx.ravel()[sel], c.ravel()[sel], is_r.ravel()[sel]
            # sector as hsv() picks it: red when it is the maximum, else green, else blue
            gs = ~rs & (m == g)
            idx = np.where(rs, g - b, np.where(gs, 511 + b - r, 2 * 511 + r - g)) + 255
            idx *= 256
            idx += cs
            ink.ravel()[sel] = table[idx]
        ink |= (mx <= params.black_level) & (c <= params.black_max_chroma)
        if not ink.any():
            return ink
        return _vote_and_grow(ink, params.pen_dilate_px)


def _vote_and_grow(ink: np.ndarray, dilate_px: int) -> np.ndarray:
    """A majority vote in 3 x 3 (edges replicated, as ``uniform_filter(mode="nearest") > 0.5``) that drops
    isolated pixels (dark nuclei, noise), then a dilation by ``2 * dilate_px + 1`` (zeros outside)."""
    vote = _box_count(ink, 3) >= 5  # mean of 9 above one half
    if dilate_px > 0 and vote.any():
        vote = _square(vote, 2 * dilate_px + 1, "dilate")
    return vote


def _median_at(s8: np.ndarray, size: int, step: int) -> np.ndarray:
    """The ``size x size`` median (edges replicated, as Pillow's ``MedianFilter``) at every ``step``-th
    pixel of each row and column, flattened."""
    if step == 1:
        return np.asarray(Image.fromarray(s8).filter(ImageFilter.MedianFilter(size))).ravel()
    r = size // 2
    p = np.pad(s8, r, mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(p, (size, size))[::step, ::step]
    flat = win.reshape(-1, size * size)
    k = size * size // 2
    return np.partition(flat, k, axis=1)[:, k]


def _median_from_counts(counts: np.ndarray) -> float:
    """``np.median`` of the integers a histogram counts (the mean of the two middle ones when even)."""
    n = int(counts.sum())
    cum = np.cumsum(counts)
    lo = int(np.searchsorted(cum, (n - 1) // 2, side="right"))
    hi = int(np.searchsorted(cum, n // 2, side="right"))
    return (lo + hi) / 2.0


def _threshold_from(sv: np.ndarray, bright: np.ndarray, total: int, params: TissueParams) -> float:
    """The threshold from the filtered saturation of the non-ink samples (``sv``), which of them are
    bright (``bright``) and the number of samples in all (``total``)."""
    if sv.size == 0:
        return params.max_saturation
    t = params.min_saturation
    if int(bright.sum()) >= params.glass_min_frac * total:
        t = max(t, _median_from_counts(np.bincount(sv[bright], minlength=256)) / 255.0 + params.glass_margin)
    k = _otsu_from_counts(np.bincount(sv, minlength=256))
    if k is not None and k / 255.0 > params.min_saturation:
        t = min(t, k / 255.0)
    return float(min(max(t, params.min_saturation), params.max_saturation))


def _threshold(ch: _Channels, ink: np.ndarray, params: TissueParams) -> float:
    H, W = ch.s8.shape
    n = params.threshold_samples
    step = 1 if n is None or n >= H * W else math.ceil(math.sqrt(H * W / n))
    if params.median_px > 1:
        if n is None:
            step = 1
        sv = _median_at(ch.s8, params.median_px, step)
    else:
        sv = ch.s8[::step, ::step].ravel()
    valid = ~ink[::step, ::step].ravel()
    bright = (ch.v_table >= params.glass_min_value)[ch.mx[::step, ::step].ravel()]
    return _threshold_from(sv[valid], bright[valid], sv.size, params)


def saturation_threshold(thumb: np.ndarray, params: TissueParams = TissueParams()) -> float:
    """The saturation threshold :func:`detect_tissue` uses on a thumbnail (0-1), for inspection."""
    ch = _Channels(_as_rgb(thumb))
    return _threshold(ch, ch.ink(params), params)


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
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    ch = _Channels(rgb)
    ink = ch.ink(params)
    t8 = round(_threshold(ch, ink, params) * 255.0)
    above = ch.s8 > t8
    if params.median_px > 1:  # median > t exactly when more than half of the window is above t
        above = _box_count(above, params.median_px) > params.median_px ** 2 // 2
    mask = above & (ch.mn < params.white_level) & ~ink

    if mpp is not None:
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
    out = rgb.copy()
    tint = np.array([0, 200, 60], np.uint16)
    out[mask] = (3 * rgb[mask].astype(np.uint16) + tint) // 4  # 0.75 image + 0.25 tint, rounded down
    width = max(1, round(max(mask.shape) / 600))
    edge = mask & ~_square(mask, 2 * width + 1, "erode")
    out[edge] = (0, 170, 0)
    return Image.fromarray(out)


def save_overlay(thumb: np.ndarray, mask: np.ndarray, path: str | Path, compress_level: int = 1) -> Path:
    """Write :func:`tissue_overlay` as a PNG, atomically (temporary name in the same folder, then rename).

    Writing it costs about as much as detecting the tissue (a 2048 px PNG: 0.2-0.3 s), so callers write it
    when a person asked for it or when the mask needs explaining (no tissue found), not on every slide.

    Args:
        thumb: ``(H, W, 3|4)`` uint8 thumbnail.
        mask: ``(H, W)`` boolean tissue mask.
        path: The PNG to write.
        compress_level: zlib level (0-9); 1 is about 1.5x faster than Pillow's default 6 for a file a few
            percent larger.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        tissue_overlay(thumb, mask).save(tmp, format="PNG", compress_level=compress_level)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
