"""Reading whole-slide images.

OpenSlide first (the PyPI packages ``openslide-python`` and ``openslide-bin``: Aperio SVS, generic tiled
TIFF, DICOM WSI, NDPI, MRXS, ...), tiffslide as the fallback for TIFFs OpenSlide refuses. Every coordinate
in this module is a level-0 pixel ``(x, y)`` of the top-left corner, as in OpenSlide's ``read_region``.

The slide's microns per pixel come from, in order: a user override (``mpp=``), the scanner metadata
(``openslide.mpp-x``/``tiffslide.mpp-x``), the objective power (``mpp = 10 / power``). Where it came
from is kept in :attr:`Slide.mpp_source` and written into every dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

#: File extensions a folder scan picks up as slides.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm",
)


class SlideError(Exception):
    """A slide could not be used; the message names the file and what to do."""


@dataclass
class Slide:
    """An open whole-slide image with its physical scale resolved.

    Attributes:
        path: The file opened.
        slide_id: Stable identifier (the file stem, or the folder name for DICOM series).
        backend: ``"openslide"`` or ``"tiffslide"``.
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

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """A thumbnail no larger than ``max_size`` on its long side.

        Returns:
            ``(rgb, downsample)``: the uint8 image and level-0 pixels per thumbnail pixel.
        """
        w, h = self.dimensions
        scale = max(w, h) / max_size if max(w, h) > max_size else 1.0
        tw, th = max(1, round(w / scale)), max(1, round(h / scale))
        img = self._handle.get_thumbnail((tw, th))
        rgb = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else _to_rgb(np.asarray(img))
        return rgb, w / rgb.shape[1]

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


def slide_id_for(path: str | Path) -> str:
    """Identifier of a slide: the file stem, or the folder name for a DICOM file inside a series folder."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return p.parent.name
    return p.stem


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
    raise SlideError(
        f"{path}: not a readable whole-slide image ({'; '.join(errors)}); supported: "
        f"{', '.join(SLIDE_EXTENSIONS)} through OpenSlide, other TIFFs through tiffslide"
    )


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    Args:
        path: A slide file (or a folder holding one DICOM WSI series).
        mpp: Level-0 microns per pixel overriding the metadata (``--mpp``).

    Returns:
        The open :class:`Slide`; ``mpp`` is ``None`` when neither the metadata, the objective power nor
        the override gives it (callers that need it use :meth:`Slide.require_mpp`).

    Raises:
        SlideError: Missing, unreadable or unsupported file, with the file named.
    """
    p = Path(path)
    if p.is_dir():
        dcm = sorted(p.glob("*.dcm"))
        if not dcm:
            raise SlideError(f"{p}: a folder but not a DICOM WSI series (no .dcm files)")
        p = dcm[0]
    if not p.exists():
        raise SlideError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise SlideError(f"{p}: empty file")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise SlideError(f"{p}: --mpp must be a positive number of microns per pixel, got {mpp}")
    handle, backend = _open_handle(p)
    props = handle.properties
    prefix = "openslide" if backend == "openslide" else "tiffslide"
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
        path=p, slide_id=slide_id_for(p), backend=backend, dimensions=dims, level_dimensions=level_dims,
        level_downsamples=downs, mpp=resolved, mpp_source=source, objective_power=power,
        vendor=props.get(f"{prefix}.vendor"), _handle=handle,
    )


def find_slides(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of slide paths.

    A folder contributes every file with a slide extension (recursively); a folder of ``.dcm`` files
    counts as one DICOM slide.

    Raises:
        SlideError: An input that does not exist.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise SlideError(f"{p}: no such file or folder")
        if p.is_file():
            found.append(p)
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
                    found.append(f.parent)
                continue
            found.append(f)
    seen, out = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return sorted(out)
