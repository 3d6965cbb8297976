"""Reading the pixels of a bag: a fast path and the plain per-patch path it must equal.

The plain path (:func:`read_patch`) does what the field's extractors do for every patch: read its level-0
footprint from the best pyramid level and resize it to ``patch_px``. A bag of 85 patches then costs 85
reads, most of them re-decoding the same JPEG tiles.

The fast path (:meth:`BagReader.read`) reads the root's footprint once per distinct pyramid level that the
bag's magnifications need, resizes that region to the finest magnification it serves, derives each coarser
magnification from the finer mosaic (exact 2x box reductions where possible) and cuts the mosaics into
patches. Every magnification then covers the same level-0 square, so parent and children stay aligned.
``tests/test_bags.py`` checks pixel parity with the plain path (see ``PARITY_*``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image

from pathvl.slide.geometry import best_level
from pathvl.slide.reader import Slide
from pathvl.slide.tiling import TilePlan, target_downsample

#: Parity of the fast path against the plain path, in 8-bit intensity: mean absolute difference over a
#: bag, and the 99th percentile of the absolute difference. Differences come only from resampling at
#: patch borders (the plain path resamples each patch alone, the fast path the whole mosaic).
PARITY_MEAN_ABS = 1.5
PARITY_P99_ABS = 12


def resize_rgb(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 array to ``(width, height)``.

    Area averaging when shrinking (``Image.reduce`` for exact integer factors, ``BOX`` otherwise), bicubic
    when enlarging; the same rule on both paths so that they stay comparable.
    """
    h, w = arr.shape[:2]
    tw, th = size
    if (w, h) == (tw, th):
        return arr
    img = Image.fromarray(arr)
    if tw <= w and th <= h:
        if w % tw == 0 and h % th == 0 and w // tw == h // th:
            return np.asarray(img.reduce(w // tw))
        return np.asarray(img.resize((tw, th), Image.Resampling.BOX))
    return np.asarray(img.resize((tw, th), Image.Resampling.BICUBIC))


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


def _tile(mosaic: np.ndarray, n: int, p: int) -> np.ndarray:
    """Cut an ``(n*p, n*p, 3)`` mosaic into ``(n*n, p, p, 3)`` patches, row-major."""
    return mosaic.reshape(n, p, n, p, 3).transpose(0, 2, 1, 3, 4).reshape(n * n, p, p, 3)


class BagReader:
    """Reads whole bags of a :class:`TilePlan` with as few slide reads as the pyramid allows.

    Args:
        slide: Open slide the plan was made for.
        plan: The slide's plan.
    """

    def __init__(self, slide: Slide, plan: TilePlan) -> None:
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

    def read(self, root_xy: tuple[int, int] | np.ndarray) -> np.ndarray:
        """All patches of the bag rooted at ``root_xy`` (level-0), in the plan's bag order.

        Returns:
            ``(B, patch_px, patch_px, 3)`` uint8.
        """
        plan, p = self.plan, self.plan.spec.patch_px
        x, y = int(root_xy[0]), int(root_xy[1])
        per_mag: dict[float, np.ndarray] = {}
        for level, mags in self.groups.items():
            region = _read_square(self.slide, x, y, plan.root_footprint, level)
            prev = None
            for m in mags:  # finest first: each coarser mosaic is derived from the finer one
                side = self._sides[m]
                # derive from the finer mosaic unless that one was upsampled (then from the real pixels)
                src = prev if prev is not None and prev.shape[0] <= region.shape[0] else region
                mosaic = resize_rgb(src, (side, side))
                per_mag[m] = _tile(mosaic, plan.grid_side(m), p)
                prev = mosaic
        return np.concatenate([per_mag[m] for m in plan.mags], axis=0)

    def read_plain(self, root_xy: tuple[int, int] | np.ndarray) -> np.ndarray:
        """The same bag through the plain per-patch path (the reference for parity and benchmarks)."""
        plan, p = self.plan, self.plan.spec.patch_px
        x, y = int(root_xy[0]), int(root_xy[1])
        out = np.empty((plan.bag_size, p, p, 3), dtype=np.uint8)
        for i, ((dx, dy), m) in enumerate(zip(plan.rel_coords, plan.bag_mags)):
            out[i] = read_patch(self.slide, x + int(dx), y + int(dy), plan.footprints[m], p,
                                target_downsample(plan, m))
        return out
