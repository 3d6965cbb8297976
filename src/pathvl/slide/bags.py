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
path also skips OpenSlide's region painting: :class:`TiffLevels` decodes the stored tiles covering the
region straight into an RGB array with tifffile (each tile once, no RGBA). OpenSlide spends most of a
large ``read_region`` outside the JPEG decoder, so this is 5-9x faster for a 4096 px region
(benchmarks/RESULTS.md) and gives the same pixels (each level is checked against the slide reader once
before it is used).
"""

from __future__ import annotations

import math
import os
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


#: Slide formats (OpenSlide vendors) whose levels are each one TIFF page holding a plain, non-overlapping
#: tile grid at the origin, so that :class:`TiffLevels` can read them. Others (Leica SCN, Ventana BIF,
#: Philips, NDPI, MRXS, DICOM, ...) always go through the slide reader.
DIRECT_VENDORS = ("aperio", "generic-tiff")

#: A level is read directly only if one of its tiles decodes to the slide reader's pixels within this
#: mean absolute difference (8-bit); otherwise it stays with the slide reader.
DIRECT_CHECK_MEAN_ABS = 0.5


class TiffLevels:
    """Tile-aligned reads of the TIFF pages behind a slide's pyramid levels.

    A region is assembled from the stored tiles that cover it, each decoded once by tifffile (JPEG through
    libjpeg-turbo, or any other TIFF codec) straight to RGB; pixels outside the level are white, as the
    slide reader returns them. Only 8-bit RGB/YCbCr tiled pages of the vendors in :data:`DIRECT_VENDORS`
    qualify, and each level is checked once against :meth:`Slide.read_region` on one tile.

    Args:
        slide: The open slide (its path, backend, vendor and level geometry are used).
        levels: Levels to prepare (default: all).

    Attributes:
        levels: Level index -> page geometry, for the levels that passed; empty when none did.
    """

    def __init__(self, slide: Slide, levels: list[int] | None = None) -> None:
        self.path = str(slide.path)
        self.levels: dict[int, dict] = {}
        if slide.backend != "openslide" or slide.vendor not in DIRECT_VENDORS:
            return
        try:
            import tifffile

            with tifffile.TiffFile(self.path) as tf:
                pages = [pg for pg in tf.pages if pg.is_tiled]
                for level in range(slide.level_count) if levels is None else levels:
                    info = self._page_info(pages, slide.level_dimensions[level])
                    if info is not None:
                        self.levels[level] = info
        except Exception:  # not a TIFF tifffile can parse: everything stays with the slide reader
            self.levels = {}
            return
        for level in list(self.levels):
            if not self._check(slide, level):
                del self.levels[level]

    @staticmethod
    def _page_info(pages: list, size: tuple[int, int]) -> dict | None:
        w, h = size
        for pg in pages:
            if (pg.imagewidth, pg.imagelength) != (w, h):
                continue
            if (pg.samplesperpixel != 3 or pg.bitspersample != 8 or pg.planarconfig != 1 or pg.imagedepth != 1
                    or int(pg.photometric) not in (2, 6)):  # contiguous 8-bit RGB or YCbCr
                return None
            return {
                "width": w, "height": h, "tw": pg.tilewidth, "th": pg.tilelength,
                "across": -(-w // pg.tilewidth),
                "offsets": np.asarray(pg.dataoffsets, dtype=np.int64),
                "counts": np.asarray(pg.databytecounts, dtype=np.int64),
                "tables": pg.jpegtables, "decode": pg.decode,
            }
        return None

    def _check(self, slide: Slide, level: int) -> bool:
        info = self.levels[level]
        tw, th = info["tw"], info["th"]
        # a tile near the middle of the level (tissue is likelier there than at the corner)
        lx = min(info["width"] // 2 // tw * tw, max(0, info["width"] - tw))
        ly = min(info["height"] // 2 // th * th, max(0, info["height"] - th))
        d = slide.level_downsamples[level]
        x0, y0 = round(lx * d), round(ly * d)
        if not (math.isclose(x0 / d, lx, abs_tol=1e-6) and math.isclose(y0 / d, ly, abs_tol=1e-6)):
            return False
        try:
            mine = self.read(level, lx, ly, tw, th)
        except Exception:  # a codec tifffile lacks, a truncated tile, ...
            return False
        ref = slide.read_region((x0, y0), level, (tw, th))
        return float(np.abs(mine.astype(np.int16) - ref.astype(np.int16)).mean()) <= DIRECT_CHECK_MEAN_ABS

    def region_origin(self, level: int, x: int, y: int, downsample: float) -> tuple[int, int] | None:
        """Level pixel of level-0 ``(x, y)`` when the level is read directly and the point falls exactly on
        a level pixel (the slide reader interpolates fractional positions), else ``None``."""
        if level not in self.levels:
            return None
        lx, ly = x / downsample, y / downsample
        ix, iy = round(lx), round(ly)
        if abs(lx - ix) > 1e-6 or abs(ly - iy) > 1e-6:
            return None
        return ix, iy

    def read(self, level: int, lx: int, ly: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read ``(w, h)`` pixels of ``level`` from level pixel ``(lx, ly)``.

        Args:
            level: Pyramid level (one of :attr:`levels`).
            lx: Left edge in pixels of that level.
            ly: Top edge in pixels of that level.
            w: Width in pixels.
            h: Height in pixels.
            out: An ``(h, w, 3)`` uint8 array to fill (reusing one spares the page faults of a fresh
                allocation on every read).

        Returns:
            ``(h, w, 3)`` uint8 (``out`` when given); white outside the level.
        """
        info = self.levels[level]
        W, H, tw, th, across = info["width"], info["height"], info["tw"], info["th"], info["across"]
        offsets, counts, tables, decode = info["offsets"], info["counts"], info["tables"], info["decode"]
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
        if out is None:
            out = np.empty((h, w, 3), dtype=np.uint8)
        if (x0, y0, x1, y1) != (lx, ly, lx + w, ly + h):
            out[...] = 255
        if x0 >= x1 or y0 >= y1:
            return out
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for ty in range(y0 // th, (y1 - 1) // th + 1):
                for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                    i = ty * across + tx
                    # the part of this tile inside both the level and the region, in level pixels
                    ax, ay = max(tx * tw, x0), max(ty * th, y0)
                    bx, by = min((tx + 1) * tw, x1), min((ty + 1) * th, y1)
                    sx, sy = tx * tw, ty * th
                    if counts[i] == 0:  # a tile never written: blank, as the slide reader paints it
                        out[ay - ly:by - ly, ax - lx:bx - lx] = 255
                        continue
                    tile, _, _ = decode(os.pread(fd, int(counts[i]), int(offsets[i])), i, jpegtables=tables)
                    tile = tile.reshape(tile.shape[-3:])
                    out[ay - ly:by - ly, ax - lx:bx - lx] = tile[ay - sy:by - sy, ax - sx:bx - sx, :3]
        finally:
            os.close(fd)
        return out


class BagReader:
    """Reads whole bags of a :class:`TilePlan` with as few slide reads as the pyramid allows.

    Args:
        slide: Open slide the plan was made for.
        plan: The slide's plan.
        direct: Read TIFF tiles directly where the format allows (:class:`TiffLevels`); ``False`` keeps
            every read in :meth:`Slide.read_region`.
    """

    def __init__(self, slide: Slide, plan: TilePlan, direct: bool = True) -> None:
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
        self.tiff = TiffLevels(slide, sorted(self.groups)) if direct else None
        self._scratch: dict[int, np.ndarray] = {}  # per level: the region buffer, reused by every bag

    def _region(self, x: int, y: int, level: int) -> np.ndarray:
        """The root's level-0 square read from ``level`` (directly from the TIFF tiles when possible).

        A direct read lands in this reader's scratch buffer for the level: valid until the next read.
        """
        if self.tiff is not None:
            d = self.slide.level_downsamples[level]
            origin = self.tiff.region_origin(level, x, y, d)
            if origin is not None:
                side = max(1, round(self.plan.root_footprint / d))
                buf = self._scratch.get(level)
                if buf is None or buf.shape != (side, side, 3):
                    buf = self._scratch[level] = np.empty((side, side, 3), dtype=np.uint8)
                return self.tiff.read(level, origin[0], origin[1], side, side, out=buf)
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
