"""Direct tile reads of TIFF pyramids (Aperio SVS, generic tiled TIFF): each stored JPEG tile decoded once,
reduced-DCT decoding where the scale allows, and a bounded cache of partly used tiles."""

from __future__ import annotations

import io
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pathvl.slide.reader import Slide


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


class _Collect:
    """A logging handler that keeps what tifffile says instead of printing it."""

    def __init__(self) -> None:
        import logging

        self.messages: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())  # type: ignore[method-assign]

    def __enter__(self) -> _Collect:
        import logging

        log = logging.getLogger("tifffile")
        self._saved = (log.propagate, log.level)
        log.addHandler(self.handler)
        log.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        import logging

        log = logging.getLogger("tifffile")
        log.removeHandler(self.handler)
        log.propagate, _ = self._saved


def tiff_damage(path: Path) -> str | None:
    """Why a TIFF-family slide is incomplete (truncated, directories out of the file), or ``None``.

    A truncated copy opens (tiffslide reads the first directory) and fails later, pixel by pixel, with
    library tracebacks; this check compares every page's tile data against the file size up front.
    tifffile's own warnings are collected, not printed.
    """
    if path.suffix.lower() not in (".tif", ".tiff", ".svs", ".btf", ".ndpi", ".scn", ".bif", ".qptiff"):
        return None
    import tifffile

    size = path.stat().st_size
    with _Collect() as said:
        try:
            with tifffile.TiffFile(str(path)) as t:
                pages = list(t.pages)
                ends = []  # per page: the end of each written tile (unwritten ones have 0 bytes)
                for page in pages:
                    off = np.asarray(getattr(page, "dataoffsets", ()), dtype=np.int64)
                    cnt = np.asarray(getattr(page, "databytecounts", ()), dtype=np.int64)
                    ends.append((off + cnt)[cnt > 0])
        except Exception as e:
            if "not a TIFF file" in str(e):  # another format under a TIFF name: the backends say what it is
                return None
            return f"not a complete TIFF ({type(e).__name__}: {e}; tifffile: {'; '.join(said.messages) or '-'})"
    n_beyond = sum(int((e > size).sum()) for e in ends)
    if n_beyond:
        k = max(range(len(ends)), key=lambda j: int(ends[j].max()) if len(ends[j]) else -1)
        return (f"truncated: the file has {size:,} bytes but page {k}'s tile data reaches byte {int(ends[k].max()):,} "
                f"({n_beyond} tile(s) beyond the end; an incomplete copy or download?)")
    lost = [m for m in said.messages if "invalid page offset" in m or "invalid offset" in m]
    if lost:
        return f"truncated or damaged: directories point outside the file of {size:,} bytes ({lost[0]})"
    if not pages:
        return "no image directory (truncated or damaged)"
    return None
