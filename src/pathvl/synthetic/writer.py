"""Streaming writer of synthetic pyramidal TIFFs (Aperio-style SVS or generic tiled TIFF)."""


from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pathvl.synthetic.constants import (
    _APERIO_HEADER,
    _GLASS_RGB,
    _PEN_RGB,
    DEFAULT_CLASSES,
    GENERATOR_VERSION,
    LABEL_DOWNSAMPLE,
    MIN_LEVEL_PX,
    TEXTURE_PX,
    THUMBNAIL_PX,
)
from pathvl.synthetic.layout import _blob_layout, _cells_near_path, _grid_layout, _path_coverage, _pen_path
from pathvl.synthetic.textures import _TEXTURES, AVAILABLE_CLASSES, _level_texture
from pathvl.synthetic.truth import GroundTruth, SyntheticSlide, _is_pow2, ground_truth_paths


@dataclass
class _Renderer:
    labels: np.ndarray
    label_ds: int
    names: tuple[str, ...]  # index 0 is "background"
    mpp: float
    seed: int
    pen_path: np.ndarray | None = None
    pen_halfwidth: float = 0.0
    pen_od: np.ndarray | None = None
    _pen_box: tuple[float, float, float, float] = field(default=(0, 0, 0, 0))

    def __post_init__(self) -> None:
        if self.pen_path is not None:
            r = self.pen_halfwidth + 2
            x0, y0 = self.pen_path.min(0) - r
            x1, y1 = self.pen_path.max(0) + r
            self._pen_box = (x0, y0, x1, y1)

    def _tex(self, k: int, ds: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        t = _level_texture(self.names[k], self.mpp, self.seed, ds)
        Q = t.shape[0]
        ox, oy = x0 % Q, y0 % Q
        if ox + w <= Q and oy + h <= Q:
            return t[oy:oy + h, ox:ox + w]
        rows = (oy + np.arange(h)) % Q
        cols = (ox + np.arange(w)) % Q
        return t[rows[:, None], cols[None, :]]

    def _label_block(self, r0: int, c0: int, nr: int, nc: int) -> np.ndarray:
        """Labels ``[r0, r0 + nr) x [c0, c0 + nc)``, background outside the map."""
        hl, wl = self.labels.shape
        if r0 >= 0 and c0 >= 0 and r0 + nr <= hl and c0 + nc <= wl:
            return self.labels[r0:r0 + nr, c0:c0 + nc]
        out = np.zeros((nr, nc), np.uint8)
        ra, rb = max(r0, 0), min(r0 + nr, hl)
        ca, cb = max(c0, 0), min(c0 + nc, wl)
        if rb > ra and cb > ca:
            out[ra - r0:rb - r0, ca - c0:cb - c0] = self.labels[ra:rb, ca:cb]
        return out

    def render(self, ds: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of level ``ds`` pixels ``[x0, x0 + w) x [y0, y0 + h)``."""
        L = self.label_ds
        if ds <= L:
            r = L // ds
            c0, r0 = x0 // r, y0 // r
            block = self._label_block(r0, c0, (y0 + h - 1) // r - r0 + 1, (x0 + w - 1) // r - c0 + 1)
            lo, hi = int(block.min()), int(block.max())
            if lo == hi:
                out = self._tex(lo, ds, x0, y0, w, h)
            else:
                lab = np.repeat(np.repeat(block, r, 0), r, 1)
                lab = lab[y0 - r0 * r:y0 - r0 * r + h, x0 - c0 * r:x0 - c0 * r + w]
                out = np.array(self._tex(lo, ds, x0, y0, w, h))
                for k in np.unique(block)[1:]:
                    np.copyto(out, self._tex(int(k), ds, x0, y0, w, h), where=(lab == k)[..., None])
        else:
            f = ds // L
            block = self._label_block(y0 * f, x0 * f, h * f, w * f)
            lo, hi = int(block.min()), int(block.max())
            if lo == hi:
                out = self._tex(lo, ds, x0, y0, w, h)
            else:
                acc = np.zeros((h, w, 3), np.float32)
                for k in np.unique(block):
                    wk = (block == k).reshape(h, f, w, f).mean((1, 3), dtype=np.float32)
                    acc += wk[..., None] * self._tex(int(k), ds, x0, y0, w, h)
                out = np.round(acc).astype(np.uint8)
        if self.pen_path is not None:
            out = self._draw_pen(out, ds, x0, y0, w, h)
        return out

    def _draw_pen(self, out: np.ndarray, ds: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        bx0, by0, bx1, by1 = self._pen_box
        if (x0 + w) * ds < bx0 or x0 * ds > bx1 or (y0 + h) * ds < by0 or y0 * ds > by1:
            return out
        alpha = _path_coverage(x0, y0, w, h, ds, self.pen_path, self.pen_halfwidth)
        if not alpha.any():
            return out
        trans = np.power(10.0, -alpha[..., None] * self.pen_od)
        return np.clip(np.round(out * trans), 0, 255).astype(np.uint8)

    def tiles(self, ds: int, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
        """Tiles of a level in row-major order, each ``(tile, tile, 3)`` (edge tiles drawn in full)."""
        for ty in range(0, height, tile):
            for tx in range(0, width, tile):
                t = self.render(ds, tx, ty, tile, tile)
                yield t if t.flags.c_contiguous else np.ascontiguousarray(t)


# --------------------------------------------------------------------------------------------------
# Writing


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp")


def _level_plan(W: int, H: int, downsamples: Sequence[int]) -> list[tuple[int, int, int]]:
    levels = [(1, W, H)]
    for ds in sorted({int(d) for d in downsamples}):
        if ds <= 1:
            continue
        if not _is_pow2(ds):
            raise ValueError(f"downsamples must be powers of two, got {ds}")
        if min(W, H) // ds >= MIN_LEVEL_PX:
            levels.append((ds, W // ds, H // ds))
    return levels


def write_synthetic_slide(
    path: str | Path,
    size: tuple[int, int] = (4096, 3072),
    *,
    mpp: float | None = 0.25,
    classes: Sequence[str] = DEFAULT_CLASSES,
    seed: int = 0,
    flavour: Literal["aperio", "generic"] = "aperio",
    tile_px: int = 256,
    jpeg_quality: int = 80,
    downsamples: Sequence[int] = (4, 16, 64),
    background_frac: float = 0.5,
    pen_mark: bool | Literal["green", "blue", "black"] = False,
    objective_power: float | None = None,
    layout: Literal["blobs", "grid"] = "blobs",
    label_downsample: int = LABEL_DOWNSAMPLE,
    workers: int | None = None,
) -> SyntheticSlide:
    """Write a synthetic pyramidal whole-slide image and its ground truth.

    The slide streams to disk tile by tile (memory stays at tens of MB for any size); the TIFF, the
    label map and the metadata are each written under a temporary name in the same folder and renamed
    when complete, the slide last.

    Args:
        path: Slide file to write (e.g. ``slide.svs`` or ``slide.tiff``); ``<stem>.labels.png`` and
            ``<stem>.json`` go beside it.
        size: Level-0 ``(width, height)`` in pixels.
        mpp: Level-0 microns per pixel written into the file; textures are drawn at this scale.
            ``None`` writes no mpp (``"generic"``: no resolution tags; ``"aperio"``: no ``MPP`` field,
            then ``objective_power`` is required) and draws textures at ``10 / objective_power`` or
            0.25.
        classes: Tissue class names, each in :data:`AVAILABLE_CLASSES`; label ``k`` is
            ``classes[k - 1]``.
        seed: Everything (layout, textures, stain jitter, pen) follows it; the same arguments give the
            same bytes.
        flavour: ``"aperio"``: Aperio SVS-like (ImageDescription with ``AppMag`` and ``MPP``, a
            thumbnail page, reduced levels with subfiletype 0). ``"generic"``: generic tiled TIFF, mpp
            only in the resolution tags, reduced levels with subfiletype 1, no objective power.
        tile_px: TIFF tile side (a multiple of 16).
        jpeg_quality: JPEG quality of the tiles.
        downsamples: Reduced levels (powers of two); one is written only when its shorter side keeps at
            least :data:`MIN_LEVEL_PX` pixels.
        background_frac: Target fraction of the slide that is bare glass, in ``[0.05, 0.95]``.
        pen_mark: Draw a pen stroke on the glass (``True``: green or blue by seed, or a colour name).
            The ground truth labels it background.
        objective_power: ``AppMag`` of an Aperio slide; default ``round(10 / mpp)``.
        layout: ``"blobs"``: irregular tissue pieces split into class regions; ``"grid"``: one
            rectangle per class in order.
        label_downsample: Level-0 pixels per label-map pixel (a power of two).
        workers: Threads tifffile compresses tiles with (``None``: tifffile's default).

    Returns:
        The paths and geometry of what was written.

    Raises:
        ValueError: An argument is out of range (the message says which).
    """
    path = Path(path)
    W, H = int(size[0]), int(size[1])
    classes = tuple(classes)
    if W < 64 or H < 64:
        raise ValueError(f"size must be at least 64x64 pixels, got {W}x{H}")
    if not classes or len(classes) > 255:
        raise ValueError(f"classes: give 1 to 255 names, got {len(classes)}")
    unknown = [c for c in classes if c not in _TEXTURES]
    if unknown:
        raise ValueError(f"classes: no texture for {unknown}; available: {', '.join(AVAILABLE_CLASSES)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes: names must be unique, got {classes}")
    if flavour not in ("aperio", "generic"):
        raise ValueError(f"flavour must be 'aperio' or 'generic', got {flavour!r}")
    if mpp is not None and not (mpp > 0):
        raise ValueError(f"mpp must be positive or None, got {mpp}")
    if flavour == "aperio" and mpp is None and objective_power is None:
        raise ValueError("an aperio slide without mpp needs objective_power (AppMag)")
    if not (0.05 <= background_frac <= 0.95):
        raise ValueError(f"background_frac must be within [0.05, 0.95], got {background_frac}")
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if not _is_pow2(label_downsample):
        raise ValueError(f"label_downsample must be a power of two, got {label_downsample}")
    if layout not in ("blobs", "grid"):
        raise ValueError(f"layout must be 'blobs' or 'grid', got {layout!r}")
    if pen_mark not in (False, True, "green", "blue", "black"):
        raise ValueError(f"pen_mark must be a bool or one of green, blue, black; got {pen_mark!r}")

    render_mpp = float(mpp) if mpp is not None else (10.0 / objective_power if objective_power else 0.25)
    levels = _level_plan(W, H, downsamples)
    rng = np.random.default_rng([seed, 1])

    hl, wl = math.ceil(H / label_downsample), math.ceil(W / label_downsample)
    if layout == "grid":
        labels = _grid_layout(hl, wl, len(classes), background_frac)
    else:
        labels = _blob_layout(rng, hl, wl, len(classes), background_frac)

    pen_info = None
    pen_path = pen_od = None
    pen_hw = 0.0
    if pen_mark:
        prng = np.random.default_rng([seed, 2])
        colour = pen_mark if isinstance(pen_mark, str) else ("green", "blue")[int(prng.integers(0, 2))]
        pen_path, pen_hw = _pen_path(prng, W, H)
        near = _cells_near_path((hl, wl), label_downsample, pen_path, pen_hw + label_downsample)
        labels[near] = 0  # no tissue under or beside the pen: the ground truth stays exact
        pen_od = -np.log10(np.asarray(_PEN_RGB[colour], float) / _GLASS_RGB) * prng.uniform(0.9, 1.1)
        pen_info = {"colour": colour, "halfwidth_px": pen_hw, "path": np.round(pen_path, 2).tolist()}

    names = ("background", *classes)
    renderer = _Renderer(labels, label_downsample, names, render_mpp, seed, pen_path, pen_hw, pen_od)

    labels_path, meta_path = ground_truth_paths(path)
    gt = GroundTruth(labels, label_downsample, classes, (W, H))
    label_fracs = gt.fractions(0, 0, W, H)
    stats = {}
    for k, name in enumerate(names):
        t = _level_texture(name, render_mpp, seed, 1).reshape(-1, 3).astype(np.float64)
        stats[name] = {"rgb_mean": np.round(t.mean(0), 2).tolist(), "rgb_std": np.round(t.std(0), 2).tolist()}
        stats[name]["area_fraction"] = round(float(label_fracs[k]), 6)
    mag = objective_power if objective_power is not None else (round(10.0 / mpp) if mpp else None)
    meta = {
        "generator": "pathvl.synthetic",
        "generator_version": GENERATOR_VERSION,
        "slide": path.name,
        "flavour": flavour,
        "size": [W, H],
        "mpp": mpp,
        "render_mpp": render_mpp,
        "objective_power": mag if flavour == "aperio" else None,
        "seed": seed,
        "classes": list(classes),
        "labels": labels_path.name,
        "label_downsample": label_downsample,
        "levels": [{"downsample": ds, "size": [w, h]} for ds, w, h in levels],
        "tile_px": tile_px,
        "jpeg_quality": jpeg_quality,
        "layout": layout,
        "background_frac_requested": background_frac,
        "texture_px": TEXTURE_PX,
        "class_stats": stats,
        "pen": pen_info,
    }

    # Everything is written under temporary names first and renamed when all three are complete, the
    # slide last: an interrupted run leaves no file under a final name (and never a slide without truth).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmps = [_tmp_path(p) for p in (labels_path, meta_path, path)]
    try:
        Image.fromarray(labels).save(tmps[0], format="PNG")
        tmps[1].write_text(json.dumps(meta, indent=2) + "\n")
        _write_tiff(tmps[2], renderer, levels, flavour=flavour, mpp=mpp, mag=mag, tile_px=tile_px,
                    quality=jpeg_quality, workers=workers)
        for tmp, final in zip(tmps, (labels_path, meta_path, path)):
            os.replace(tmp, final)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return SyntheticSlide(
        path=path,
        labels_path=labels_path,
        meta_path=meta_path,
        classes=classes,
        mpp=mpp,
        size=(W, H),
        downsamples=tuple(ds for ds, _, _ in levels),
        flavour=flavour,
    )


def _write_tiff(
    tmp: Path,
    renderer: _Renderer,
    levels: list[tuple[int, int, int]],
    *,
    flavour: str,
    mpp: float | None,
    mag: float | None,
    tile_px: int,
    quality: int,
    workers: int | None,
) -> None:
    import tifffile

    W, H = levels[0][1], levels[0][2]
    bigtiff = W * H * 3 > 2**31
    common = {
        "dtype": np.uint8,
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": int(quality)},
        "metadata": None,
        "maxworkers": workers,
        "buffersize": 16 * 2**20,
    }
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for i, (ds, w, h) in enumerate(levels):
            kw = dict(common, shape=(h, w, 3), tile=(tile_px, tile_px))
            if flavour == "aperio":
                if i == 0:
                    desc = f"{_APERIO_HEADER} \r\n{W}x{H} [0,0 {W}x{H}] ({tile_px}x{tile_px}) JPEG/RGB Q={quality}"
                    if mag is not None:
                        desc += f"|AppMag = {mag:g}"
                    if mpp is not None:
                        desc += f"|MPP = {mpp:.10g}"
                    kw["description"] = desc
                kw["subfiletype"] = 0
            else:
                kw["subfiletype"] = 0 if i == 0 else 1
                if mpp is not None:
                    res = 1e4 / (mpp * ds)
                    kw["resolution"] = (res, res)
                    kw["resolutionunit"] = "CENTIMETER"
            tif.write(renderer.tiles(ds, w, h, tile_px), **kw)
            if flavour == "aperio" and i == 0:
                tds = 1
                while max(W, H) / tds > THUMBNAIL_PX:
                    tds *= 2
                tw, th = max(W // tds, 1), max(H // tds, 1)
                thumb = renderer.render(tds, 0, 0, tw, th)
                tif.write(
                    np.ascontiguousarray(thumb),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": 90},
                    metadata=None,
                    description=f"{_APERIO_HEADER} \r\n{W}x{H} -> {tw}x{th} - ",
                    subfiletype=0,
                )

