"""Reading the pixels of a bag: a fast path and the plain per-patch path it must equal.

The plain path (:func:`read_patch`) does what the field's extractors do for every patch: read its level-0
footprint from the best pyramid level and resize it to ``patch_px``. A bag of 85 patches then costs 85
reads, most of them re-decoding the same JPEG tiles.

The fast path (:meth:`BagReader.read`) reads the root's footprint once per distinct pyramid level that the
bag's magnifications need, resizes that region to the finest magnification it serves, derives each coarser
magnification from the finer mosaic (exact 2x box reductions where possible) and cuts the mosaics into
patches. Every magnification then covers the same level-0 square, so parent and children stay aligned.
``tests/test_tile.py::test_fast_path_equals_plain_path`` checks pixel parity with the plain path (see
``PARITY_*``).

Where the slide is a TIFF whose levels are plain tile grids (Aperio SVS, generic tiled TIFF), the fast
path also skips OpenSlide's region painting: :class:`~pathvl.slide.reader.TiffLevels` decodes the stored
tiles covering the region straight into an RGB array with tifffile (no RGBA). OpenSlide spends most of a
large ``read_region`` outside the JPEG decoder, so this is 5-9x faster for a 4096 px region
(benchmarks/RESULTS.md) and gives the same pixels (each level is checked against the slide reader once
before it is used). The slide keeps one such reader open with a bounded cache of the tiles a region cuts,
so that on a grid that does not align with the tiles (240 px Aperio tiles under 256 px patches) every tile
is decoded once. Where a level's finest magnification is an integer 2x, 4x or 8x coarser than the level
(a 20x grid read from a 40x level 0), JPEG tiles are decoded at that scale in the DCT domain instead of in
full and then reduced (``DCT_PARITY_*`` bounds the difference; ``BagReader(..., dct=False)`` turns it off).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image

from pathvl.slide.geometry import best_level
from pathvl.slide.reader import Slide
from pathvl.slide.tiff import DIRECT_CHECK_MEAN_ABS, DIRECT_VENDORS, TiffLevels
from pathvl.slide.tiling import TilePlan, target_downsample

__all__ = [
    "DCT_PARITY_MEAN_ABS", "DCT_PARITY_P99_ABS", "DIRECT_CHECK_MEAN_ABS", "DIRECT_VENDORS", "PARITY_MEAN_ABS",
    "PARITY_P99_ABS", "BagReader", "TiffLevels", "read_patch", "resize_rgb",
]

#: Parity of the fast path against the plain path, in 8-bit intensity: mean absolute difference over a
#: bag, and the 99th percentile of the absolute difference. Differences come only from resampling at
#: patch borders (the plain path resamples each patch alone, the fast path the whole mosaic).
PARITY_MEAN_ABS = 1.5
PARITY_P99_ABS = 12

#: The same parity where a level is decoded at reduced DCT scale (``dct=True``) and the plain path decodes
#: it in full and reduces it by area averaging: libjpeg's scaled inverse DCT is a slightly different low-pass
#: than a box average. Measured per bag (25 bags each, generated 40x slides): 20x at 1/2 from level 0, mean
#: at most 0.77 and p99 at most 5; 5x at 1/2 from level 1 (whose tiles hold more fine detail), 1.75 and 10;
#: CMU (RGB JPEG, --mpp 0.5) at 1/4 and 1/2, 0.1 and 2.
DCT_PARITY_MEAN_ABS = 2.5
DCT_PARITY_P99_ABS = 12


def resize_rgb(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 array to ``(width, height)``.

    Area averaging when shrinking (``Image.reduce`` for exact integer factors, ``BOX`` otherwise), bicubic
    when enlarging; the same rule on both paths so that they stay comparable.
    """
    h, w = arr.shape[:2]
    tw, th = size
    if (w, h) == (tw, th):
        return arr
    if tw <= w and th <= h and w % tw == 0 and h % th == 0 and w // tw == h // th:
        if w // tw == 2 and arr.ndim == 3 and arr.shape[2] == 3:
            return _reduce2(arr)
        return np.asarray(Image.fromarray(arr).reduce(w // tw))
    img = Image.fromarray(arr)
    if tw <= w and th <= h:
        return np.asarray(img.resize((tw, th), Image.Resampling.BOX))
    return np.asarray(img.resize((tw, th), Image.Resampling.BICUBIC))


def _reduce2(arr: np.ndarray) -> np.ndarray:
    """2x2 box average of an even-sized RGB uint8 array, rounding half up: the same pixels as
    ``Image.reduce(2)`` without converting to and from a Pillow image (the conversions cost more than the
    reduction on a 4096 px mosaic)."""
    h, w = arr.shape[0] // 2, arr.shape[1] // 2
    rows = np.add(arr[0::2], arr[1::2], dtype=np.uint16).reshape(h, w, 6)  # two pixels side by side
    out = rows[..., :3] + rows[..., 3:]
    out += 2
    out >>= 2
    return out.astype(np.uint8)


def _read_square(slide: Slide, x: int, y: int, footprint: int, level: int) -> np.ndarray:
    """Read a level-0 square ``(x, y, footprint)`` from ``level`` at that level's resolution."""
    d = slide.level_downsamples[level]
    side = max(1, round(footprint / d))
    return slide.read_region((x, y), level, (side, side))


def read_patch(slide: Slide, x: int, y: int, footprint: int, patch_px: int, downsample: float) -> np.ndarray:
    """The plain path: one patch, read from its best level and resized.

    Args:
        slide: Open slide.
        x: Level-0 left edge.
        y: Level-0 top edge.
        footprint: Level-0 side of the patch.
        patch_px: Output side in pixels.
        downsample: Level-0 pixels per output pixel (picks the level).

    Returns:
        ``(patch_px, patch_px, 3)`` uint8.
    """
    level = best_level(slide.level_downsamples, downsample)
    region = _read_square(slide, x, y, footprint, level)
    return resize_rgb(region, (patch_px, patch_px))


class BagReader:
    """Reads whole bags of a :class:`TilePlan` with as few slide reads as the pyramid allows.

    Args:
        slide: Open slide the plan was made for.
        plan: The slide's plan.
        direct: Read TIFF tiles directly where the format allows (:meth:`Slide.tiff_levels`, shared by every
            reader of the slide and its tile cache); ``False`` keeps every read in :meth:`Slide.read_region`.
        dct: Decode JPEG tiles at reduced DCT scale where a level's finest magnification is an integer
            2x, 4x or 8x coarser than the level (a 20x grid from a 40x level 0; direct reads only).

    Attributes:
        scales: Level -> DCT scale of its reads (1: full decode).
    """

    def __init__(self, slide: Slide, plan: TilePlan, direct: bool = True, dct: bool = True) -> None:
        self.slide = slide
        self.plan = plan
        p = plan.spec.patch_px
        groups: dict[int, list[float]] = defaultdict(list)
        for m in plan.mags:
            groups[best_level(slide.level_downsamples, target_downsample(plan, m))].append(m)
        #: level -> magnifications it serves, finest first
        self.groups = {lvl: sorted(ms, reverse=True) for lvl, ms in groups.items()}
        self._sides = {m: plan.grid_side(m) * p for m in plan.mags}
        self.reads_per_bag = len(self.groups)
        starts = np.cumsum([0] + [plan.grid_side(m) ** 2 for m in plan.mags])
        self._start = {m: int(s) for m, s in zip(plan.mags, starts)}
        #: direct tile reader of the levels in use (``levels`` is empty when the format does not allow it)
        self.tiff = slide.tiff_levels(sorted(self.groups)) if direct else None
        self.scales = {lvl: 1 for lvl in self.groups}
        if self.tiff is not None and dct:
            for lvl, ms in self.groups.items():
                d = slide.level_downsamples[lvl]
                side = round(plan.root_footprint / d)
                # the reduced region must become the finest mosaic by an integer reduction (or none):
                # resampling it by a fraction would move the box filter's grid against the plain path's
                mosaic = self._sides[ms[0]]
                fits = [s for s in self.tiff.scales(lvl) if side % s == 0 and (side // s) % mosaic == 0]
                self.scales[lvl] = max(fits, default=1)
        self._scratch: dict[int, np.ndarray] = {}  # per level: the region buffer, reused by every bag

    def _region(self, x: int, y: int, level: int) -> np.ndarray:
        """The root's level-0 square read from ``level`` (directly from the TIFF tiles when possible, at
        the level's DCT scale when the corner allows it).

        A direct read lands in this reader's scratch buffer for the level: valid until the next read.
        """
        if self.tiff is not None:
            d = self.slide.level_downsamples[level]
            origin = self.tiff.region_origin(level, x, y, d)
            if origin is not None:
                side = max(1, round(self.plan.root_footprint / d))
                s = self.scales[level]
                if origin[0] % s or origin[1] % s:
                    s = 1
                n = side // s
                buf = self._scratch.get(level)
                if buf is None or buf.shape != (n, n, 3):
                    buf = self._scratch[level] = np.empty((n, n, 3), dtype=np.uint8)
                return self.tiff.read(level, origin[0] // s, origin[1] // s, n, n, out=buf, scale=s)
        return _read_square(self.slide, x, y, self.plan.root_footprint, level)

    def read(self, root_xy: tuple[int, int] | np.ndarray) -> np.ndarray:
        """All patches of the bag rooted at ``root_xy`` (level-0), in the plan's bag order.

        Returns:
            ``(B, patch_px, patch_px, 3)`` uint8.
        """
        plan, p = self.plan, self.plan.spec.patch_px
        x, y = int(root_xy[0]), int(root_xy[1])
        out = np.empty((plan.bag_size, p, p, 3), dtype=np.uint8)
        for level, mags in self.groups.items():
            region = self._region(x, y, level)
            prev = None
            for m in mags:  # finest first: each coarser mosaic is derived from the finer one
                side, n = self._sides[m], plan.grid_side(m)
                # derive from the finer mosaic unless that one was upsampled (then from the real pixels)
                src = prev if prev is not None and prev.shape[0] <= region.shape[0] else region
                mosaic = resize_rgb(src, (side, side))
                # cut the mosaic into patches, row-major, straight into their rows of the bag (one copy)
                dst = out[self._start[m]:self._start[m] + n * n].reshape(n, n, p, p, 3)
                dst[...] = mosaic.reshape(n, p, n, p, 3).transpose(0, 2, 1, 3, 4)
                prev = mosaic
        return out

    def read_plain(self, root_xy: tuple[int, int] | np.ndarray) -> np.ndarray:
        """The same bag through the plain per-patch path (the reference for parity and benchmarks)."""
        plan, p = self.plan, self.plan.spec.patch_px
        x, y = int(root_xy[0]), int(root_xy[1])
        out = np.empty((plan.bag_size, p, p, 3), dtype=np.uint8)
        for i, ((dx, dy), m) in enumerate(zip(plan.rel_coords, plan.bag_mags)):
            out[i] = read_patch(self.slide, x + int(dx), y + int(dy), plan.footprints[m], p,
                                target_downsample(plan, m))
        return out
