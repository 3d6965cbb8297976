"""Reading whole-slide images.

OpenSlide first (the PyPI packages ``openslide-python`` and ``openslide-bin``: Aperio SVS, generic tiled
TIFF, DICOM WSI, NDPI, MRXS, ...), tiffslide as the fallback for TIFFs OpenSlide refuses and wsidicom (optional,
``pip install wsidicom``) for DICOM WSIs OpenSlide refuses (e.g. RLE or other transfer syntaxes it lacks).
Every coordinate in this module is a level-0 pixel ``(x, y)`` of the top-left corner, as in OpenSlide's
``read_region``.

DICOM: one slide is one series (``SeriesInstanceUID``); its instances (levels, label, overview) are files of
one folder, and a folder may hold several series. :func:`find_slides` returns one file per series (its
largest pyramid level) and :func:`slide_id_for` names it (see there); nothing in a folder is dropped or
merged silently.

The slide's microns per pixel come from, in order: a user override (``mpp=``), the scanner metadata
(``openslide.mpp-x``/``tiffslide.mpp-x``/``wsidicom.mpp-x``), the objective power (``mpp = 10 / power``). Where it came
from is kept in :attr:`Slide.mpp_source` and written into every dataset.

Where a slide is a TIFF whose levels are plain tile grids (Aperio SVS, generic tiled TIFF), pixels can skip
OpenSlide's region painting: :class:`TiffLevels` decodes the stored tiles straight to RGB, each tile once
(a bounded :class:`TileCache` keeps the tiles a region uses only in part, which the next region of a grid
needs), JPEG tiles optionally at 1/2, 1/4 or 1/8 scale in the DCT domain. :meth:`Slide.thumbnail` and the
bag reader (:mod:`pathvl.slide.bags`) use it; every level is checked against the slide reader once.
"""

from __future__ import annotations

import functools
import io
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pathvl.errors import UserError

#: File extensions a folder scan picks up as slides.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm",
)


class SlideError(UserError, ValueError):
    """A slide could not be used; the message names the file and what to do."""


@dataclass
class Slide:
    """An open whole-slide image with its physical scale resolved.

    Attributes:
        path: The file opened.
        slide_id: Stable identifier (the file stem; for DICOM see :func:`slide_id_for`).
        backend: ``"openslide"``, ``"tiffslide"`` or ``"wsidicom"``.
        dimensions: Level-0 ``(width, height)``.
        level_dimensions: ``(width, height)`` of each pyramid level.
        level_downsamples: Level-0 pixels per level pixel, per level.
        mpp: Level-0 microns per pixel, or ``None`` when unknown (see :func:`open_slide`).
        mpp_source: ``"user"``, ``"metadata"``, ``"objective-power"`` or ``"unknown"``.
        objective_power: Scanner objective power when the metadata has one.
        vendor: Format reported by the backend (``aperio``, ``generic-tiff``, ``dicom``, ...).
    """

    path: Path
    slide_id: str
    backend: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str
    objective_power: float | None
    vendor: str | None
    _handle: object = field(repr=False, default=None)
    _tiff: TiffLevels | None = field(repr=False, default=None)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def magnification(self) -> float | None:
        """Physical magnification of level 0 (``10 / mpp``)."""
        return None if self.mpp is None else 10.0 / self.mpp

    def require_mpp(self) -> float:
        """The slide mpp, or a :class:`SlideError` telling the user how to pass it."""
        if self.mpp is None:
            raise SlideError(
                f"{self.path}: no microns-per-pixel in the metadata and no objective power; pass --mpp "
                "(level-0 microns per pixel, e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x)"
            )
        return self.mpp

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read an RGB region.

        Args:
            location: Top-left ``(x, y)`` in level-0 pixels.
            level: Pyramid level to read from.
            size: ``(width, height)`` in pixels of that level.

        Returns:
            ``(height, width, 3)`` uint8; pixels outside the slide are white.
        """
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if self.backend == "openslide":
            rgba = np.asarray(self._handle.read_region((x, y), level, (w, h)))
        else:
            rgba = self._handle.read_region((x, y), level, (w, h), as_array=True)
        return _to_rgb(rgba)

    def tiff_levels(self, levels: list[int] | None = None) -> TiffLevels:
        """The slide's direct tile reader (:class:`TiffLevels`), opened once and kept until :meth:`close`.

        Args:
            levels: Levels to check now (the rest are checked when first used).

        Returns:
            The reader; its :attr:`TiffLevels.levels` is empty when the format does not allow direct reads.
        """
        if self._tiff is None:
            self._tiff = TiffLevels(self)
        for level in levels or ():
            self._tiff.usable(level)
        return self._tiff

    def thumbnail(self, max_size: int = 2048, direct: bool = True, min_size: int | None = None
                  ) -> tuple[np.ndarray, float]:
        """A thumbnail no larger than ``max_size`` on its long side.

        With ``min_size``, any long side from ``min_size`` to ``max_size`` will do: when a pyramid level (or
        a reduced DCT decode of one, see below) falls in that range, the coarsest such level is returned
        as it is, without resampling. This is how tissue detection reads a 1/4/16/64 pyramid's smallest
        level instead of painting the next larger one (issue 17).

        Otherwise the pyramid level is the one OpenSlide's ``get_thumbnail`` uses (the coarsest at least as
        large as the thumbnail). Where that level can be read directly (:class:`TiffLevels`), its tiles are
        decoded one by one, JPEG tiles at the coarsest DCT scale (1/2, 1/4, 1/8) not coarser than the
        thumbnail, and the result is resized as ``get_thumbnail`` resizes (Lanczos with a reducing gap of
        2); memory then stays within a few times the thumbnail whatever the slide size, where
        ``get_thumbnail`` paints the whole level as RGBA.

        Args:
            max_size: Long side in pixels (at most).
            direct: ``False`` always uses the backend's ``get_thumbnail`` at ``max_size`` (the plain path).
            min_size: Long side accepted at least, to read a level without resampling (default: exactly
                ``max_size``, or the slide itself when it is smaller).

        Returns:
            ``(rgb, downsample)``: the uint8 image and level-0 pixels per thumbnail pixel.
        """
        w, h = self.dimensions
        scale = max(w, h) / max_size if max(w, h) > max_size else 1.0
        tw, th = max(1, round(w / scale)), max(1, round(h / scale))
        rgb = None
        if direct and min_size is not None and min_size < max(tw, th):
            rgb = self._level_thumbnail(int(min_size), max(tw, th))
        if rgb is None and direct:
            rgb = self._direct_thumbnail(tw, th)
        if rgb is None:
            img = self._handle.get_thumbnail((tw, th))
            rgb = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else _to_rgb(np.asarray(img))
        return rgb, w / rgb.shape[1]

    def _level_thumbnail(self, lo: int, hi: int) -> np.ndarray | None:
        """The coarsest level (or DCT scale of one) whose long side is within ``[lo, hi]``, read whole, or
        ``None`` when there is none."""
        small = [i for i, (lw, lh) in enumerate(self.level_dimensions) if lo <= max(lw, lh) <= hi
                 and lw * lh <= _SMALL_LEVEL_PX]
        if small and self._tiff is None:  # the slide reader paints a small level as fast as it is decoded
            level = small[-1]            # directly, without opening the TIFF for it
            return self.read_region((0, 0), level, self.level_dimensions[level])
        tiff = self.tiff_levels() if self.backend == "openslide" else None
        options = []  # (level pixels to decode, -output pixels, level, scale)
        for level, (lw, lh) in enumerate(self.level_dimensions):
            for sc in tiff.candidate_scales(level) if tiff is not None else (1,):
                side = -(-max(lw, lh) // sc)
                if lo <= side <= hi:
                    options.append((lw * lh, -side, level, sc))
        for _, _, level, sc in sorted(options):
            lw, lh = self.level_dimensions[level]
            if tiff is not None and tiff.usable(level) and sc in tiff.scales(level):
                return tiff.read(level, 0, 0, -(-lw // sc), -(-lh // sc), scale=sc, cache=False)
            if sc == 1:  # the slide reader paints one small level
                return self.read_region((0, 0), level, (lw, lh))
        return None

    def _direct_thumbnail(self, tw: int, th: int) -> np.ndarray | None:
        """The thumbnail through :class:`TiffLevels`, or ``None`` when its level cannot be read directly."""
        w, h = self.dimensions
        want = max(w / tw, h / th)  # what get_thumbnail asks OpenSlide for
        level = max((i for i, d in enumerate(self.level_downsamples) if d <= want * (1 + 1e-9)), default=0,
                    key=lambda i: self.level_downsamples[i])
        if self.backend != "openslide" or not self.tiff_levels().usable(level):
            return None
        lw, lh = self.level_dimensions[level]
        size = _fit_size(lw, lh, tw, th)
        if size is None:  # the level is no larger than the thumbnail: get_thumbnail returns it as it is
            size = (lw, lh)
        s = 1
        for cand in self._tiff.scales(level):
            if self.level_downsamples[level] * cand <= want * (1 + 1e-9) and lw // cand >= size[0] \
                    and lh // cand >= size[1]:
                s = max(s, cand)
        mw, mh = -(-lw // s), -(-lh // s)
        if (mw, mh) == size:
            return self._tiff.read(level, 0, 0, mw, mh, scale=s, cache=False)
        # decoded band by band (one row of tiles) straight into the image to resize: no second full copy
        img = Image.new("RGB", (mw, mh))
        band = self._tiff.levels[level]["th"] // s
        for y in range(0, mh, band):
            img.paste(Image.fromarray(self._tiff.read(level, 0, y, mw, min(band, mh - y), scale=s, cache=False)),
                      (0, y))
        # the box is the level itself: at scale s its last pixel row/column may be partly outside
        return np.asarray(img.resize(size, Image.Resampling.LANCZOS, box=(0, 0, lw / s, lh / s), reducing_gap=2.0))

    @property
    def associated_images(self) -> dict[str, Image.Image]:
        """Label, macro and thumbnail images stored beside the pyramid, as RGB PIL images."""
        out = {}
        for name, img in self._handle.associated_images.items():
            out[name] = img.convert("RGB") if isinstance(img, Image.Image) else Image.fromarray(img)
        return out

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._handle.properties)

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        """Human-readable summary (used by ``pathvl info``)."""
        lines = [
            f"slide      {self.path}",
            f"id         {self.slide_id}",
            f"backend    {self.backend} ({self.vendor or 'unknown format'})",
            f"size       {self.dimensions[0]} x {self.dimensions[1]} px (level 0)",
        ]
        if self.mpp is None:
            lines.append("mpp        unknown (pass --mpp)")
        else:
            lines.append(f"mpp        {self.mpp:.4f} um/px = {10 / self.mpp:.1f}x (from {self.mpp_source})")
        if self.objective_power is not None:
            lines.append(f"objective  {self.objective_power:g}x (as reported by the scanner)")
        lines.append("levels")
        for i, ((lw, lh), d) in enumerate(zip(self.level_dimensions, self.level_downsamples)):
            mag = "" if self.mpp is None else f"  {10 / (self.mpp * d):.2f}x"
            lines.append(f"  {i}: {lw} x {lh}  downsample {d:.3f}{mag}")
        assoc = sorted(self._handle.associated_images.keys())
        lines.append(f"associated {', '.join(assoc) if assoc else 'none'}")
        return "\n".join(lines)


def _to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA onto white (OpenSlide gives alpha 0 outside the slide)."""
    if rgba.ndim == 2:
        return np.repeat(rgba[..., None], 3, axis=2)
    if rgba.shape[2] == 3:
        return np.ascontiguousarray(rgba)
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def _fit_size(w: int, h: int, tw: int, th: int) -> tuple[int, int] | None:
    """The size Pillow's ``Image.thumbnail((tw, th))`` gives a ``w x h`` image (``None``: left as it is)."""
    if tw >= w and th >= h:
        return None
    aspect = w / h

    def round_aspect(number: float, key) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if tw / th >= aspect:
        tw = round_aspect(th * aspect, key=lambda n: abs(aspect - n / th))
    else:
        th = round_aspect(tw / aspect, key=lambda n: 0 if n == 0 else abs(aspect - tw / n))
    return tw, th


# ------------------------------------------------------------------------------------ direct tile reads
#: Slide formats (OpenSlide vendors) whose levels are each one TIFF page holding a plain, non-overlapping
#: tile grid at the origin, so that :class:`TiffLevels` can read them. Others (Leica SCN, Ventana BIF,
#: Philips, NDPI, MRXS, DICOM, ...) always go through the slide reader.
DIRECT_VENDORS = ("aperio", "generic-tiff")

#: A level is read directly only if one of its tiles decodes to the slide reader's pixels within this
#: mean absolute difference (8-bit); otherwise it stays with the slide reader.
DIRECT_CHECK_MEAN_ABS = 0.5

#: JPEG tiles of a level are decoded at reduced DCT scales only if a tile at 1/2 scale is within this mean
#: absolute difference (8-bit) of its full decode reduced 2x2; otherwise only full decodes are used.
DCT_CHECK_MEAN_ABS = 3.0

#: DCT scale factors libjpeg offers for a reduced decode (1/2, 1/4, 1/8).
DCT_SCALES = (2, 4, 8)

#: A whole level up to this many pixels is read for a thumbnail through the slide reader when the TIFF is
#: not open yet (OpenSlide paints 0.3 Mpx in about 3 ms; opening the TIFF costs more than that).
_SMALL_LEVEL_PX = 2**19

#: Default bound of a :class:`TiffLevels` tile cache in bytes of decoded pixels.
TILE_CACHE_BYTES = 64 * 2**20

_JPEG = 7  # TIFF compression tag value of (new-style) JPEG
#: An Adobe APP14 segment with transform 0: tells libjpeg the 3 components are RGB, not YCbCr (Aperio
#: writes RGB JPEG tiles without a JFIF marker; tifffile passes the same colour space to its decoder).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class TileCache:
    """A least-recently-used store of decoded tiles bounded by their bytes (thread-safe).

    Args:
        max_bytes: The bound; a tile larger than it is never kept, and 0 keeps nothing.

    Attributes:
        nbytes: Bytes held now (never above ``max_bytes``).
        hits: Lookups that found their tile.
        misses: Lookups that did not.
    """

    def __init__(self, max_bytes: int = TILE_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key: tuple, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = arr
            self.nbytes += arr.nbytes
            while self.nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


class TiffLevels:
    """Tile-aligned reads of the TIFF pages behind a slide's pyramid levels.

    A region is assembled from the stored tiles that cover it, each decoded by tifffile (JPEG through
    libjpeg-turbo, or any other TIFF codec) straight to RGB; pixels outside the level are white, as the
    slide reader returns them. Only 8-bit RGB/YCbCr tiled pages of the vendors in :data:`DIRECT_VENDORS`
    qualify, and each level is checked against :meth:`Slide.read_region` on one tile when first used.

    The file stays open (one descriptor, read with ``pread``, so threads and forked workers may share it)
    until :meth:`close`. Tiles that a region uses only in part are kept in a bounded :class:`TileCache`:
    on a grid of regions that do not align with the tiles (a 20x grid of 256 px patches over 240 px Aperio
    tiles) the neighbouring region reads the rest, so each tile is decoded once; tiles used whole are not
    kept, since a grid of non-overlapping regions never reads them again.

    JPEG tiles can be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's reduced DCT, through Pillow's ``draft``):
    a region at scale ``s`` covers ``s x s`` level pixels per output pixel, for a fraction of the cost of a
    full decode and a box reduction (``DCT_CHECK_MEAN_ABS`` bounds the difference on each level).

    Args:
        slide: The open slide (its path, backend, vendor and level geometry are used).
        levels: Levels to check now (default: none; each is checked when first used).
        cache_bytes: Bound of the tile cache.

    Attributes:
        levels: Level index -> page geometry, for the levels checked and usable so far.
        cache: The tile cache.
        decoded: Tiles decoded so far, by level (cache hits not counted).
    """

    def __init__(self, slide: Slide, levels: list[int] | None = None, cache_bytes: int = TILE_CACHE_BYTES) -> None:
        self.path = str(slide.path)
        self.levels: dict[int, dict] = {}
        self.cache = TileCache(cache_bytes)
        self.decoded: dict[int, int] = {}
        self._slide = slide
        self._pages: dict[int, dict] = {}
        self._checked: dict[int, bool] = {}
        self._fd: int | None = None
        self._lock = threading.RLock()  # re-entered: a level's check reads through read()
        if slide.backend == "openslide" and slide.vendor in DIRECT_VENDORS:
            try:
                import tifffile

                with tifffile.TiffFile(self.path) as tf:
                    pages = [pg for pg in tf.pages if pg.is_tiled]
                    for level in range(slide.level_count):
                        info = self._page_info(pages, slide.level_dimensions[level])
                        if info is not None:
                            self._pages[level] = info
            except Exception:  # not a TIFF tifffile can parse: everything stays with the slide reader
                self._pages = {}
        for level in levels or ():
            self.usable(level)

    @staticmethod
    def _page_info(pages: list, size: tuple[int, int]) -> dict | None:
        w, h = size
        for pg in pages:
            if (pg.imagewidth, pg.imagelength) != (w, h):
                continue
            if (pg.samplesperpixel != 3 or pg.bitspersample != 8 or pg.planarconfig != 1 or pg.imagedepth != 1
                    or int(pg.photometric) not in (2, 6)):  # contiguous 8-bit RGB or YCbCr
                return None
            jpeg = int(pg.compression) == _JPEG
            from tifffile.tifffile import jpeg_decode_colorspace

            return {
                "width": w, "height": h, "tw": pg.tilewidth, "th": pg.tilelength,
                "across": -(-w // pg.tilewidth),
                "offsets": np.asarray(pg.dataoffsets, dtype=np.int64),
                "counts": np.asarray(pg.databytecounts, dtype=np.int64),
                "tables": pg.jpegtables, "jpeg": jpeg, "scales": (1,),
                # JPEG: decoded here with the colour spaces tifffile would pass, without keeping the page
                # (whose tile tables, as Python tuples, are several times the size of these arrays)
                "decode": None if jpeg else pg.decode,
                "colorspaces": jpeg_decode_colorspace(pg.photometric, pg.planarconfig, pg.extrasamples,
                                                      pg.is_jfif) if jpeg else None,
            }
        return None

    def usable(self, level: int) -> bool:
        """Whether ``level`` is read directly (checked once against the slide reader)."""
        ok = self._checked.get(level)
        if ok is None:
            with self._lock:
                ok = self._checked.get(level)
                if ok is None:
                    ok = level in self._pages and self._check(level)
                    if ok:
                        self.levels[level] = self._pages[level]
                    self._checked[level] = ok
        return ok

    def candidate_scales(self, level: int) -> tuple[int, ...]:
        """The decode scales ``level`` would offer if its check passes (no check, no read)."""
        info = self._pages.get(level)
        if info is None or not info["jpeg"] or info["tw"] % 2 or info["th"] % 2:
            return (1,)
        return (1, *(s for s in DCT_SCALES if info["tw"] % s == 0 and info["th"] % s == 0))

    def scales(self, level: int) -> tuple[int, ...]:
        """Decode scales ``s`` (1 and, for checked JPEG levels, 2, 4, 8) that :meth:`read` accepts."""
        return self.levels[level]["scales"] if self.usable(level) else (1,)

    def _descriptor(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        """Close the file and drop the cached tiles (a later read reopens the file)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self.cache.clear()

    def _check(self, level: int) -> bool:
        info = self._pages[level]
        slide = self._slide
        tw, th = info["tw"], info["th"]
        # a tile near the middle of the level (tissue is likelier there than at the corner), whose corner
        # is a level-0 pixel (the slide reader shifts fractional positions); else the first tile, which
        # still tells a wrong colour space (glass decoded as YCbCr-for-RGB is pink)
        d = slide.level_downsamples[level]
        mid = (min(info["width"] // 2 // tw * tw, max(0, info["width"] - tw)),
               min(info["height"] // 2 // th * th, max(0, info["height"] - th)))
        lx, ly = next(((x, y) for x, y in (mid, (0, 0))
                       if math.isclose(round(x * d) / d, x, abs_tol=1e-6)
                       and math.isclose(round(y * d) / d, y, abs_tol=1e-6)), (0, 0))
        x0, y0 = round(lx * d), round(ly * d)
        self.levels[level] = info  # read() needs it; removed again below when the check fails
        try:
            mine = self.read(level, lx, ly, tw, th, cache=False)
            ref = slide.read_region((x0, y0), level, (tw, th))
            if float(np.abs(mine.astype(np.int16) - ref.astype(np.int16)).mean()) > DIRECT_CHECK_MEAN_ABS:
                return False
            if len(self.candidate_scales(level)) > 1:
                info["scales"] = self.candidate_scales(level)
                try:
                    half = self.read(level, lx // 2, ly // 2, tw // 2, th // 2, scale=2, cache=False)
                    box = mine.reshape(th // 2, 2, tw // 2, 2, 3).mean(axis=(1, 3))
                    ok = float(np.abs(half.astype(np.float32) - box).mean()) <= DCT_CHECK_MEAN_ABS
                except Exception:  # Pillow refuses the stream: full decodes only
                    ok = False
                if not ok:
                    info["scales"] = (1,)
            return True
        except Exception:  # a codec tifffile lacks, a truncated tile, ...
            return False
        finally:
            del self.levels[level]

    def region_origin(self, level: int, x: int, y: int, downsample: float) -> tuple[int, int] | None:
        """Level pixel of level-0 ``(x, y)`` when the level is read directly and the point falls exactly on
        a level pixel (the slide reader interpolates fractional positions), else ``None``."""
        if not self.usable(level):
            return None
        lx, ly = x / downsample, y / downsample
        ix, iy = round(lx), round(ly)
        if abs(lx - ix) > 1e-6 or abs(ly - iy) > 1e-6:
            return None
        return ix, iy

    def _decode(self, level: int, info: dict, i: int, scale: int, fd: int) -> np.ndarray:
        """Tile ``i`` of ``level`` as ``(th / scale, tw / scale, 3)`` uint8 (not cached here)."""
        data = os.pread(fd, int(info["counts"][i]), int(info["offsets"][i]))
        self.decoded[level] = self.decoded.get(level, 0) + 1
        if scale == 1:
            if info["decode"] is None:
                import imagecodecs

                colorspace, outcolorspace = info["colorspaces"]
                return imagecodecs.jpeg_decode(data, bitspersample=8, tables=info["tables"], colorspace=colorspace,
                                               outcolorspace=outcolorspace, shape=(info["th"], info["tw"]))[..., :3]
            tile, _, _ = info["decode"](data, i, jpegtables=info["tables"])
            return tile.reshape(tile.shape[-3:])[..., :3]
        tables = info["tables"]
        if tables:  # an abbreviated stream: splice the shared tables in (their EOI, the tile's SOI dropped)
            data = tables[:-2] + data[2:]
        if info["colorspaces"] and info["colorspaces"][0] == 2:  # RGB components, as tifffile decodes them
            data = data[:2] + _ADOBE_RGB + data[2:]
        tw, th = info["tw"] // scale, info["th"] // scale
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (tw, th))
            arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
        if arr.shape[:2] != (th, tw):
            raise ValueError(f"{self.path}: level {level} tile {i} decoded to {arr.shape[:2]} at 1/{scale}")
        return arr

    def read(self, level: int, lx: int, ly: int, w: int, h: int, out: np.ndarray | None = None, *,
             scale: int = 1, cache: bool = True) -> np.ndarray:
        """Read ``(w, h)`` pixels of ``level`` from pixel ``(lx, ly)``, at ``1 / scale`` resolution.

        Args:
            level: Pyramid level (one that :meth:`usable` accepts).
            lx: Left edge, in pixels of that level divided by ``scale``.
            ly: Top edge, likewise.
            w: Width in output pixels.
            h: Height in output pixels.
            out: An ``(h, w, 3)`` uint8 array to fill (reusing one spares the page faults of a fresh
                allocation on every read).
            scale: 1, or one of :meth:`scales` (an output pixel covers ``scale x scale`` level pixels).
            cache: Keep (and look up) the tiles this region uses only in part in :attr:`cache`.

        Returns:
            ``(h, w, 3)`` uint8 (``out`` when given); white outside the level.
        """
        info = self.levels[level]
        if scale != 1 and scale not in info["scales"]:
            raise ValueError(f"{self.path}: level {level} cannot be decoded at 1/{scale} (scales {info['scales']})")
        tw, th, across, counts = info["tw"] // scale, info["th"] // scale, info["across"], info["counts"]
        W, H = -(-info["width"] // scale), -(-info["height"] // scale)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
        if out is None:
            out = np.empty((h, w, 3), dtype=np.uint8)
        if (x0, y0, x1, y1) != (lx, ly, lx + w, ly + h):
            out[...] = 255
        if x0 >= x1 or y0 >= y1:
            return out
        fd = self._descriptor()
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                i = ty * across + tx
                # the part of this tile inside both the level and the region, in output pixels
                ax, ay = max(tx * tw, x0), max(ty * th, y0)
                bx, by = min((tx + 1) * tw, x1), min((ty + 1) * th, y1)
                sx, sy = tx * tw, ty * th
                if counts[i] == 0:  # a tile never written: blank, as the slide reader paints it
                    out[ay - ly:by - ly, ax - lx:bx - lx] = 255
                    continue
                # a tile cut by the region's edge (not the level's) is needed again by the next region
                partial = cache and ((ax > sx or ay > sy) or (bx < min(sx + tw, W)) or (by < min(sy + th, H)))
                key = (level, i, scale)
                tile = self.cache.get(key) if partial else None
                if tile is None:
                    tile = self._decode(level, info, i, scale, fd)
                    if partial:
                        self.cache.put(key, tile)
                out[ay - ly:by - ly, ax - lx:bx - lx] = tile[ay - sy:by - sy, ax - sx:bx - sx]
        return out


def _float_prop(props, *keys: str) -> float | None:
    for k in keys:
        v = props.get(k)
        if v in (None, ""):
            continue
        try:
            f = float(v)
        except ValueError:
            continue
        if math.isfinite(f) and f > 0:
            return f
    return None


# ----------------------------------------------------------------------------------------------- DICOM
#: SOP class of VL Whole Slide Microscopy images, the only DICOM objects that are slides.
DICOM_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_DICOM_TAGS = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"]


@dataclass(frozen=True)
class DicomSeries:
    """The ``.dcm`` files of one folder that share a ``SeriesInstanceUID``: one slide.

    Attributes:
        folder: The folder holding the files.
        uid: The ``SeriesInstanceUID`` (``""`` for a file pydicom cannot parse: a series of its own).
        files: The series' files, sorted.
        main: The file to open: the largest ``VOLUME`` instance (the pyramid's base), else the first file.
        is_wsi: Whether a file is a VL Whole Slide Microscopy image (or unparsable, so that opening it says
            why); other DICOM objects (annotations, CT...) are not slides.
        slide_id: The slide id (see :func:`slide_id_for`).
    """

    folder: Path
    uid: str
    files: tuple[Path, ...]
    main: Path
    is_wsi: bool
    slide_id: str


@dataclass(frozen=True)
class _DicomHeader:
    sop: str
    uid: str
    flavour: str
    pixels: int


def _dicom_header(path: Path) -> _DicomHeader | None:
    """The few tags that group a file into its series, or None when it is not a readable DICOM file."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_DICOM_TAGS))
    except Exception:  # pydicom raises many types for foreign or truncated files
        return None
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else "") or "")
    kind = ds.get("ImageType") or []
    kind = [kind] if isinstance(kind, str) else list(kind)
    pixels = int(ds.get("TotalPixelMatrixColumns") or 0) * int(ds.get("TotalPixelMatrixRows") or 0)
    return _DicomHeader(sop=sop, uid=str(ds.get("SeriesInstanceUID") or "").strip(),
                        flavour=str(kind[2]).upper() if len(kind) > 2 else "", pixels=pixels)


def _dcm_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == ".dcm" and f.is_file())


def dicom_series(folder: str | Path) -> list[DicomSeries]:
    """The DICOM series of a folder, one per ``SeriesInstanceUID``, in order of their first file.

    Headers are read once per folder state (file names, sizes and times), so naming and opening the
    slides of a folder reads each header once.

    Raises:
        SlideError: Several ``.dcm`` files and pydicom is not installed (it groups them).
    """
    folder = Path(folder)
    files = _dcm_files(folder)
    state = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return list(_series_of_folder(str(folder), state))


@functools.lru_cache(maxsize=256)
def _series_of_folder(folder_str: str, state: tuple) -> tuple[DicomSeries, ...]:
    folder = Path(folder_str)
    files = [folder / name for name, _, _ in state]
    try:
        headers = [_dicom_header(f) for f in files]
    except ImportError:
        if len(files) > 1:
            raise SlideError(
                f"{folder}: {len(files)} DICOM files; grouping them into slides (one per SeriesInstanceUID) "
                "needs pydicom: pip install pydicom"
            ) from None
        headers = [None] * len(files)
    groups: dict[str, list[tuple[Path, _DicomHeader | None]]] = {}
    for f, h in zip(files, headers):
        key = h.uid if h is not None and h.uid else f"file:{f.name}"
        groups.setdefault(key, []).append((f, h))
    out = []
    for key, members in groups.items():
        paths = tuple(f for f, _ in members)
        uid = "" if key.startswith("file:") else key
        volumes = [i for i, (_, h) in enumerate(members) if h is not None and h.flavour == "VOLUME"]
        main = paths[max(volumes, key=lambda i: (members[i][1].pixels, -i))] if volumes else paths[0]
        is_wsi = any(h is None or h.sop == DICOM_WSI_SOP_CLASS for _, h in members)
        if len(paths) == 1:  # a lone .dcm (single-file WSI): its own name
            candidates = [paths[0].stem, uid]
        elif len(groups) == 1:  # the folder is the series' own: its name, as for a one-slide folder
            candidates = [folder.resolve().name, uid, main.stem]
        else:
            candidates = [uid, main.stem]
        sid = next(c for c in candidates if c)
        out.append(DicomSeries(folder=folder, uid=uid, files=paths, main=main, is_wsi=is_wsi, slide_id=sid))
    return tuple(out)


def _series_of(path: Path) -> DicomSeries:
    """The series a ``.dcm`` file belongs to."""
    for s in dicom_series(path.parent):
        if any(f.name == path.name for f in s.files):
            return s
    return DicomSeries(folder=path.parent, uid="", files=(path,), main=path, is_wsi=True, slide_id=path.stem)


def _only_series(folder: Path) -> DicomSeries:
    """The one DICOM WSI series of a folder.

    Raises:
        SlideError: No ``.dcm`` file, no WSI among them, or several series (naming them).
    """
    if not _dcm_files(folder):
        raise SlideError(f"{folder}: a folder but not a DICOM WSI series (no .dcm files)")
    series = [s for s in dicom_series(folder) if s.is_wsi]
    if not series:
        raise SlideError(f"{folder}: its .dcm files hold no VL Whole Slide Microscopy image")
    if len(series) > 1:
        ids = ", ".join(s.slide_id for s in series)
        raise SlideError(f"{folder}: holds {len(series)} DICOM WSI series ({ids}); open one of their files "
                         f"(e.g. {series[0].main}) or tile the folder, which gives one slide per series")
    return series[0]


def slide_id_for(path: str | Path) -> str:
    """Identifier of a slide, never empty.

    A slide file: its stem. A DICOM slide is a series (``SeriesInstanceUID``) of ``.dcm`` files in one
    folder: a single-file series gets the file stem; a series that is alone in its folder gets the folder
    name (the usual one-folder-per-slide layout); a series sharing its folder with others gets its
    ``SeriesInstanceUID``. A folder holding one series is named as that series.

    Raises:
        SlideError: ``path`` is a folder holding several DICOM series, or none.
    """
    p = Path(path)
    if p.is_dir():
        return _only_series(p).slide_id
    if p.suffix.lower() == ".dcm" and p.is_file():
        return _series_of(p).slide_id
    return p.stem or p.name


class _WsiDicomSlide:
    """An OpenSlide-shaped view of a :class:`wsidicom.WsiDicom`.

    ``read_region`` takes a level-0 location and a level index (0 = base) as OpenSlide does and returns an
    ``(h, w, 3)`` uint8 array, white outside the image (``as_array`` is accepted for the tiffslide call
    shape); wsidicom itself wants the location in the level's own pixels, names levels by their
    power of two and refuses regions past the edge.
    """

    def __init__(self, wsi) -> None:
        self._wsi = wsi
        levels = sorted(wsi.levels, key=lambda lv: lv.level)
        self._level_ids = [lv.level for lv in levels]
        w0, h0 = levels[0].size.width, levels[0].size.height
        self.dimensions = (int(w0), int(h0))
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in levels)
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions)
        self.properties = {"wsidicom.vendor": "dicom", "wsidicom.level-count": str(len(levels))}
        mpp = levels[0].mpp
        if mpp is not None and mpp.width and mpp.height:
            self.properties["wsidicom.mpp-x"] = repr(float(mpp.width))
            self.properties["wsidicom.mpp-y"] = repr(float(mpp.height))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    as_array: bool = True) -> np.ndarray:
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x, y = math.floor(location[0] / ds), math.floor(location[1] / ds)  # level pixels
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 > x0 and y1 > y0:
            part = self._wsi.read_region((x0, y0), self._level_ids[level], (x1 - x0, y1 - y0), as_array=True)
            out[y0 - y:y1 - y, x0 - x:x1 - x] = _to_rgb(np.asarray(part))
        return out

    def get_thumbnail(self, size: tuple[int, int]) -> Image.Image:
        """The image fitted into ``size``, from the coarsest level still at least that large."""
        tw, th = size
        level = 0
        for i, (lw, lh) in enumerate(self.level_dimensions):
            if lw >= tw and lh >= th:
                level = i
        lw, lh = self.level_dimensions[level]
        img = Image.fromarray(self.read_region((0, 0), level, (lw, lh)))
        img.thumbnail((tw, th), Image.Resampling.LANCZOS)
        return img

    @property
    def associated_images(self) -> dict[str, Image.Image]:
        from wsidicom.errors import WsiDicomNotFoundError

        out = {}
        for name, read in (("label", self._wsi.read_label), ("macro", self._wsi.read_overview)):
            try:
                out[name] = read()
            except WsiDicomNotFoundError:
                continue
        return out

    def close(self) -> None:
        self._wsi.close()


def _open_wsidicom(path: Path) -> _WsiDicomSlide:
    from wsidicom import WsiDicom

    return _WsiDicomSlide(WsiDicom.open(list(_series_of(path).files)))


def _open_handle(path: Path) -> tuple[object, str]:
    import openslide

    errors = []
    try:
        return openslide.OpenSlide(str(path)), "openslide"
    except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError) as e:
        errors.append(f"OpenSlide: {e}")
    if path.suffix.lower() in (".tif", ".tiff", ".svs"):
        try:
            import tiffslide

            return tiffslide.TiffSlide(str(path)), "tiffslide"
        except Exception as e:  # tiffslide raises many types for foreign files
            errors.append(f"tiffslide: {type(e).__name__}: {e}")
    if path.suffix.lower() == ".dcm":
        try:
            return _open_wsidicom(path), "wsidicom"
        except ImportError:
            errors.append("wsidicom: not installed (pip install wsidicom reads DICOM WSIs that OpenSlide refuses)")
        except Exception as e:  # wsidicom raises many types for files it cannot use
            errors.append(f"wsidicom: {type(e).__name__}: {e}")
    raise SlideError(
        f"{path}: not a readable whole-slide image ({'; '.join(errors)}); supported: "
        f"{', '.join(SLIDE_EXTENSIONS)} through OpenSlide, other TIFFs through tiffslide, other DICOM WSIs "
        "through wsidicom"
    )


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    Args:
        path: A slide file (for DICOM: any file of the series, or a folder holding one series).
        mpp: Level-0 microns per pixel overriding the metadata (``--mpp``).

    Returns:
        The open :class:`Slide`; ``mpp`` is ``None`` when neither the metadata, the objective power nor
        the override gives it (callers that need it use :meth:`Slide.require_mpp`).

    Raises:
        SlideError: Missing, unreadable or unsupported file, with the file named.
    """
    p = Path(path)
    if p.is_dir():
        p = _only_series(p).main
    if not p.exists():
        raise SlideError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise SlideError(f"{p}: empty file")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise SlideError(f"{p}: --mpp must be a positive number of microns per pixel, got {mpp}")
    sid = slide_id_for(p)  # before opening: a DICOM id reads the folder's headers and may refuse
    handle, backend = _open_handle(p)
    props = handle.properties
    prefix = backend  # property prefix: openslide., tiffslide. or wsidicom.
    meta_mpp = _float_prop(props, f"{prefix}.mpp-x", f"{prefix}.mpp-y")
    power = _float_prop(props, f"{prefix}.objective-power")
    if mpp is not None:
        resolved, source = float(mpp), "user"
    elif meta_mpp is not None:
        resolved, source = meta_mpp, "metadata"
    elif power is not None:
        resolved, source = 10.0 / power, "objective-power"
    else:
        resolved, source = None, "unknown"
    try:
        dims = tuple(int(v) for v in handle.dimensions)
        level_dims = tuple(tuple(int(v) for v in d) for d in handle.level_dimensions)
        downs = tuple(float(d) for d in handle.level_downsamples)
    except Exception as e:
        handle.close()
        raise SlideError(f"{p}: could not read the pyramid ({type(e).__name__}: {e})") from e
    return Slide(
        path=p, slide_id=sid, backend=backend, dimensions=dims, level_dimensions=level_dims,
        level_downsamples=downs, mpp=resolved, mpp_source=source, objective_power=power,
        vendor=props.get(f"{prefix}.vendor"), _handle=handle,
    )


def find_slides(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of slide paths.

    A folder contributes every file with a slide extension (recursively); the ``.dcm`` files of a folder
    contribute one slide per DICOM WSI series (its main file, see :class:`DicomSeries`; DICOM objects that
    are not slides are left out). A ``.dcm`` file given directly stands for its series.

    Raises:
        SlideError: An input that does not exist.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise SlideError(f"{p}: no such file or folder")
        if p.is_file():
            found.append(_series_of(p).main if p.suffix.lower() == ".dcm" else p)
            continue
        dicom_dirs = set()
        for f in sorted(p.rglob("*")):
            if not f.is_file() or f.suffix.lower() not in SLIDE_EXTENSIONS:
                continue
            if f.name.endswith((".tmp", ".part")):
                continue
            if f.suffix.lower() == ".dcm":
                if f.parent not in dicom_dirs:
                    dicom_dirs.add(f.parent)
                    found.extend(s.main for s in dicom_series(f.parent) if s.is_wsi)
                continue
            found.append(f)
    seen, out = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return sorted(out)
