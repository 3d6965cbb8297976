"""What the viewer serves, read from one dataset folder: slide metadata, Deep Zoom tiles, thumbnails,
patch crops, captions, cached features and the magnification tree.

Slide ids come from the dataset's manifest only: every lookup goes through :meth:`SlideStore.meta`, which
raises :class:`NotFoundError` for any other string, so nothing a request sends reaches the file system (the
slide file's path is the one the dataset recorded). Coordinates are level-0 pixels ``(x, y)`` of a patch's
top-left corner, as in the dataset; a patch's level-0 side is the footprint of its magnification.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pathvl import _const as K
from pathvl.data.dataset import Dataset
from pathvl.errors import UserError

__all__ = ["LRU", "NotFoundError", "SlideMeta", "SlideStore", "ViewError"]


class ViewError(UserError, ValueError):
    """A request the viewer cannot answer as asked (bad query, missing stage); HTTP 422."""


class NotFoundError(UserError, LookupError):
    """No such slide, patch, tile or captioner in this dataset; HTTP 404."""


class LRU:
    """A thread-safe least-recently-used cache with hit and miss counts.

    Args:
        maxsize: Entries kept; the least recently used one goes first.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(1, int(maxsize))
        self._d: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                self.hits += 1
                return self._d[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> Any:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The cached value, or ``make()`` stored under ``key`` (two racing callers may both make it)."""
        v = self.get(key)
        return v if v is not None else self.put(key, make())

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def info(self) -> dict[str, int]:
        return {"size": len(self._d), "maxsize": self.maxsize, "hits": self.hits, "misses": self.misses}


@dataclass(frozen=True)
class SlideMeta:
    """One slide of the dataset, as its HDF5 file describes it.

    Attributes:
        slide_id: Id in the manifest.
        slide_path: The slide file the dataset was tiled from (``None`` when it is missing now).
        size: Level-0 ``(width, height)``.
        mpp: Level-0 microns per pixel the dataset used.
        footprints: Level-0 patch side per magnification.
        patch_px: Patch side in pixels at its own magnification.
        n_patches: Rows of the patch table.
        magnifications: Magnifications present, ascending.
        has_tree: The patches form a multi-magnification tree (MR-PLIP datasets: parents and >1 mag).
        captioners: Names under ``captions/``.
        features: Names under ``features/``.
    """

    slide_id: str
    slide_path: Path | None
    size: tuple[int, int]
    mpp: float | None
    footprints: dict[float, int]
    patch_px: int
    n_patches: int
    magnifications: tuple[float, ...]
    has_tree: bool
    captioners: tuple[str, ...]
    features: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.slide_id, "width": self.size[0], "height": self.size[1], "mpp": self.mpp,
                "patch_px": self.patch_px, "patches": self.n_patches, "magnifications": list(self.magnifications),
                "footprints": {f"{m:g}": fp for m, fp in sorted(self.footprints.items())},
                "has_tree": self.has_tree, "captioners": list(self.captioners), "features": list(self.features),
                "slide_available": self.slide_path is not None}


def _encode(img: Image.Image | np.ndarray, fmt: str, **kw: Any) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


class SlideStore:
    """Read access for the viewer to one dataset, with bounded caches.

    Args:
        root: Dataset folder written by ``pathvl tile``.
        tile_size: Deep Zoom tile side (OpenSeadragon's default 254 plus ``overlap`` on each side).
        overlap: Deep Zoom tile overlap in pixels.
        limit_bounds: Show only the slide's non-empty bounds (MRXS and others record them).
        jpeg_quality: Quality of tile and patch JPEGs.
        tile_cache: Encoded tiles kept in memory.
        open_slides: Slides kept open (each with its Deep Zoom generator).
        slide_cache_mb: OpenSlide's decoded-tile cache shared by the open slides.
    """

    def __init__(self, root: str | Path, *, tile_size: int = 254, overlap: int = 1, limit_bounds: bool = True,
                 jpeg_quality: int = 75, tile_cache: int = 4096, open_slides: int = 16,
                 slide_cache_mb: int = 256) -> None:
        self.dataset = Dataset(root)
        self.root = self.dataset.root
        self.ids: tuple[str, ...] = tuple(self.dataset.slide_ids())
        self._id_set = frozenset(self.ids)
        self.tile_size, self.overlap, self.limit_bounds = int(tile_size), int(overlap), bool(limit_bounds)
        self.jpeg_quality = int(jpeg_quality)
        self.tiles = LRU(tile_cache)
        self._meta = LRU(max(len(self.ids), 1))
        self._slides = LRU(open_slides)
        self._tables = LRU(32)
        self._captions = LRU(32)
        self._features = LRU(2)
        self._thumbs = LRU(max(2 * len(self.ids), 8))
        self._open_lock = threading.Lock()
        self._slide_cache_mb = int(slide_cache_mb)
        self._shared_cache: Any = None

    # ---------------------------------------------------------------------------------------------- lookup
    def meta(self, slide_id: str) -> SlideMeta:
        """The slide's metadata.

        Raises:
            NotFoundError: ``slide_id`` is not a done slide of this dataset's manifest.
        """
        if slide_id not in self._id_set:
            raise NotFoundError(f"no slide {slide_id!r} in this dataset")
        return self._meta.get_or_make(slide_id, lambda: self._read_meta(slide_id))

    def _read_meta(self, sid: str) -> SlideMeta:
        with self.dataset.open(sid) as f:
            a = f.attrs
            fps = {float(m): int(v) for m, v in json.loads(a[K.ATTR_FOOTPRINTS]).items()}
            mags = np.unique(f[K.MAGNIFICATION][:]) if K.MAGNIFICATION in f else np.array([])
            n = int(f[K.COORDS].shape[0])
            tree = K.PARENT in f and len(mags) > 1 and bool((f[K.PARENT][:] >= 0).any())
            caps = tuple(sorted(f[K.CAPTIONS].keys())) if K.CAPTIONS in f else ()
            feats = tuple(sorted(f[K.FEATURES].keys())) if K.FEATURES in f else ()
            path = Path(str(a[K.ATTR_SLIDE_PATH])) if K.ATTR_SLIDE_PATH in a else None
            mpp = float(a[K.ATTR_MPP]) if K.ATTR_MPP in a else None
            patch_px = int(a[K.ATTR_PATCH_PX]) if K.ATTR_PATCH_PX in a else int(json.loads(a[K.ATTR_SPEC])["patch_px"])
            size = tuple(int(v) for v in a[K.ATTR_SLIDE_SIZE])
        return SlideMeta(slide_id=sid, slide_path=path if path is not None and path.exists() else None,
                         size=(size[0], size[1]), mpp=mpp, footprints=fps, patch_px=patch_px, n_patches=n,
                         magnifications=tuple(float(m) for m in mags), has_tree=tree, captioners=caps,
                         features=feats)

    def table(self, slide_id: str) -> dict[str, np.ndarray]:
        """Patch table: ``coords (N, 2)`` int64 level-0, ``magnification``, ``parent``, ``bag`` and
        ``footprint (N,)`` (level-0 side of each patch)."""
        m = self.meta(slide_id)

        def read() -> dict[str, np.ndarray]:
            with self.dataset.open(slide_id) as f:
                t = {"coords": f[K.COORDS][:].astype(np.int64), "magnification": f[K.MAGNIFICATION][:]}
                n = len(t["coords"])
                t["parent"] = f[K.PARENT][:] if K.PARENT in f else np.full(n, -1, np.int64)
                t["bag"] = f[K.BAG][:] if K.BAG in f else None
            t["footprint"] = np.array([m.footprints[float(v)] for v in t["magnification"]], np.int64)
            if t["bag"] is None:
                t["bag"] = _roots_of(t["parent"])
            return t

        return self._tables.get_or_make(slide_id, read)

    def captions(self, slide_id: str, captioner: str | None = None) -> list[str] | None:
        """Captions of every patch by ``captioner`` (default: the first one), ``None`` if the slide has none.

        Raises:
            NotFoundError: The named captioner has no captions on this slide.
        """
        m = self.meta(slide_id)
        if captioner is None:
            if not m.captioners:
                return None
            captioner = m.captioners[0]
        elif captioner not in m.captioners:
            raise NotFoundError(f"slide {slide_id!r} has no captions by {captioner!r} (it has: "
                           f"{', '.join(m.captioners) or 'none'})")

        def read() -> list[str]:
            with self.dataset.open(slide_id) as f:
                return list(f[f"{K.CAPTIONS}/{captioner}"].asstr()[:])

        return self._captions.get_or_make((slide_id, captioner), read)

    def features(self, slide_id: str, name: str) -> np.ndarray:
        """Cached patch features ``features/<name>`` as float32 ``(N, D)``.

        Raises:
            ViewError: The slide was not embedded with this encoder (the message says what to run).
        """
        m = self.meta(slide_id)
        if name not in m.features:
            raise ViewError(f"slide {slide_id!r} has no features/{name} (it has: {', '.join(m.features) or 'none'}); "
                            f"run `pathvl embed --dataset {self.root} --encoder {name}` first")

        def read() -> np.ndarray:
            with self.dataset.open(slide_id) as f:
                return f[f"{K.FEATURES}/{name}"][:].astype(np.float32)

        return self._features.get_or_make((slide_id, name), read)

    # ---------------------------------------------------------------------------------------------- pixels
    def _slide(self, slide_id: str) -> tuple[Any, Any]:
        """``(Slide, DeepZoomGenerator)`` of an open slide (kept in an LRU; evicted ones close when unused)."""
        m = self.meta(slide_id)
        if m.slide_path is None:
            raise NotFoundError(f"slide {slide_id!r}: its slide file (recorded in the dataset) is missing")
        hit = self._slides.get(slide_id)
        if hit is not None:
            return hit
        with self._open_lock:
            hit = self._slides.get(slide_id)
            if hit is not None:
                return hit
            from openslide.deepzoom import DeepZoomGenerator

            from pathvl.slide.reader import open_slide

            slide = open_slide(m.slide_path, mpp=m.mpp)
            if slide.backend == "openslide":
                source = slide._handle  # the OpenSlide object itself: DeepZoomGenerator's native input
                if hasattr(source, "set_cache"):
                    import openslide

                    if self._shared_cache is None:
                        self._shared_cache = openslide.OpenSlideCache(self._slide_cache_mb << 20)
                    source.set_cache(self._shared_cache)
            else:
                source = _DeepZoomSource(slide)
            dz = DeepZoomGenerator(source, tile_size=self.tile_size, overlap=self.overlap,
                                   limit_bounds=self.limit_bounds)
            return self._slides.put(slide_id, (slide, dz))

    def deepzoom(self, slide_id: str) -> Any:
        """The slide's :class:`openslide.deepzoom.DeepZoomGenerator`."""
        return self._slide(slide_id)[1]

    def dzi(self, slide_id: str) -> str:
        """Deep Zoom descriptor XML (JPEG tiles)."""
        return self.deepzoom(slide_id).get_dzi("jpeg")

    def dzi_geometry(self, slide_id: str) -> dict[str, int]:
        """Where level 0 lies in the Deep Zoom image: its size and the level-0 offset of its corner (non-zero
        when ``limit_bounds`` crops to the slide's recorded bounds)."""
        slide, dz = self._slide(slide_id)
        w, h = dz.level_dimensions[-1]
        ox = oy = 0
        if self.limit_bounds:
            props = slide.properties
            ox = int(props.get("openslide.bounds-x", 0) or 0)
            oy = int(props.get("openslide.bounds-y", 0) or 0)
        return {"width": int(w), "height": int(h), "offset_x": ox, "offset_y": oy,
                "tile_size": self.tile_size, "overlap": self.overlap}

    def tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        """One Deep Zoom tile as JPEG bytes.

        Raises:
            NotFoundError: No such level or tile address.
        """
        key = (slide_id, level, col, row)
        hit = self.tiles.get(key)
        if hit is not None:
            return hit
        dz = self.deepzoom(slide_id)
        if not (0 <= level < dz.level_count):
            raise NotFoundError(f"slide {slide_id!r} has Deep Zoom levels 0..{dz.level_count - 1}, not {level}")
        cols, rows = dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise NotFoundError(f"slide {slide_id!r} level {level} has {cols}x{rows} tiles; no tile {col}_{row}")
        img = dz.get_tile(level, (col, row))
        return self.tiles.put(key, _encode(img.convert("RGB"), "JPEG", quality=self.jpeg_quality))

    def thumbnail(self, slide_id: str, max_px: int = 256) -> bytes:
        """PNG thumbnail at most ``max_px`` on its long side."""
        def make() -> bytes:
            slide, _ = self._slide(slide_id)
            rgb, _ = slide.thumbnail(max_px)
            return _encode(rgb, "PNG")

        return self._thumbs.get_or_make((slide_id, int(max_px)), make)

    def patch_image(self, slide_id: str, index: int, max_px: int = 256) -> bytes:
        """One patch as JPEG at its own magnification (at most ``max_px`` wide).

        Raises:
            NotFoundError: No patch ``index`` on this slide.
        """
        from pathvl.slide.bags import read_patch

        m = self.meta(slide_id)
        if not (0 <= index < m.n_patches):
            raise NotFoundError(f"slide {slide_id!r} has patches 0..{m.n_patches - 1}, not {index}")
        t = self.table(slide_id)
        (x, y), fp = t["coords"][index], int(t["footprint"][index])
        px = min(m.patch_px, max_px)
        slide, _ = self._slide(slide_id)
        rgb = read_patch(slide, int(x), int(y), fp, px, fp / px)
        return _encode(rgb, "JPEG", quality=85)

    # ---------------------------------------------------------------------------------------------- tree
    def tree_roots(self, slide_id: str) -> list[dict[str, Any]]:
        """Root patches (the coarsest magnification) of an MR-PLIP slide.

        Raises:
            NotFoundError: The slide has no magnification tree.
        """
        self._require_tree(slide_id)
        t = self.table(slide_id)
        roots = np.flatnonzero(t["parent"] < 0)
        return [self._patch_json(t, int(i), None) for i in roots]

    def tree(self, slide_id: str, root: int, captioner: str | None = None) -> list[dict[str, Any]]:
        """Every patch under ``root`` (itself included, coarse to fine), with its caption.

        Raises:
            NotFoundError: No tree, or ``root`` is not a root patch of this slide.
        """
        self._require_tree(slide_id)
        t = self.table(slide_id)
        if not (0 <= root < len(t["parent"])) or t["parent"][root] >= 0:
            raise NotFoundError(f"patch {root} is not a root patch of slide {slide_id!r}")
        caps = self.captions(slide_id, captioner)
        rows = np.flatnonzero(t["bag"] == root)
        rows = rows[np.lexsort((rows, t["magnification"][rows]))]
        return [self._patch_json(t, int(i), caps) for i in rows]

    def _require_tree(self, slide_id: str) -> None:
        if not self.meta(slide_id).has_tree:
            raise NotFoundError(f"slide {slide_id!r} has no magnification tree (one magnification or no parents)")

    @staticmethod
    def _patch_json(t: dict[str, np.ndarray], i: int, caps: list[str] | None) -> dict[str, Any]:
        x, y = (int(v) for v in t["coords"][i])
        out = {"index": i, "x": x, "y": y, "size": int(t["footprint"][i]),
               "magnification": float(t["magnification"][i]), "parent": int(t["parent"][i])}
        if caps is not None:
            out["caption"] = caps[i]
        return out


class _DeepZoomSource:
    """The part of OpenSlide's slide interface :class:`~openslide.deepzoom.DeepZoomGenerator` reads, over a
    :class:`pathvl.slide.reader.Slide` of another backend (tiffslide, wsidicom); ``read_region`` takes a
    level-0 location, as OpenSlide's does."""

    def __init__(self, slide: Any) -> None:
        self.slide = slide
        self.dimensions = slide.dimensions
        self.level_dimensions = slide.level_dimensions
        self.level_downsamples = slide.level_downsamples
        self.level_count = len(slide.level_dimensions)
        self.properties = slide.properties

    def get_best_level_for_downsample(self, downsample: float) -> int:
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        return Image.fromarray(self.slide.read_region(location, level, size)).convert("RGBA")


def _roots_of(parent: np.ndarray) -> np.ndarray:
    """Index of each patch's root, following ``parent`` (-1 marks a root)."""
    p = np.asarray(parent, np.int64)
    root = np.arange(len(p))
    while True:
        nxt = p[root]
        step = nxt >= 0
        if not step.any():
            return root
        root[step] = nxt[step]

