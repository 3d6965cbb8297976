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

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pathvl.errors import UserError

#: File extensions a folder scan picks up as slides.
from pathvl.slide.dicom import (  # noqa: F401  (re-exported)
    DICOM_WSI_SOP_CLASS,
    DicomSeries,
    _only_series,
    _series_of,
    dicom_series,
)
from pathvl.slide.tiff import (  # noqa: F401  (re-exported)
    _SMALL_LEVEL_PX,
    TILE_CACHE_BYTES,
    TiffLevels,
    TileCache,
    tiff_damage,
)

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
        try:
            if self.backend == "openslide":
                rgba = np.asarray(self._handle.read_region((x, y), level, (w, h)))
            else:
                rgba = self._handle.read_region((x, y), level, (w, h), as_array=True)
        except Exception as e:  # a damaged tile: one line naming the file and the place, not a library traceback
            raise SlideError(f"{self.path}: could not read {w}x{h} px of level {level} at ({x}, {y}) "
                             f"({type(e).__name__}: {e})") from None
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

    damage = tiff_damage(path)
    if damage:
        raise SlideError(f"{path}: {damage}")
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
