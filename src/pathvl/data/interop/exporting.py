"""``pathvl export``: a dataset's coordinates (and one feature set) in TRIDENT's or CLAM's layout, and the
coordinates table of every patch.

Coordinates are level-0 pixels (x, y) of each patch's top-left corner; the attributes written with them
(:func:`_coords_attrs`) say what they cover in the frame of every reader that may open the file.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathvl import _const as K
from pathvl.data.dataset import Dataset, DatasetError
from pathvl.data.interop.common import (
    _ATTR_AGREEMENT,
    FORMATS,
    InteropError,
    _atomic_h5,
    _attrs,
    _fmt_mag,
    _num,
    _tmp,
)
from pathvl.progress import tqdm
from pathvl.slide.reader import SlideError, open_slide
from pathvl.slide.tiling import TileSpec


@dataclass
class ExportSummary:
    """What :func:`export_dataset` wrote.

    Attributes:
        out: The output folder.
        fmt: ``trident`` or ``clam``.
        folders: The folder of each magnification exported.
        features: The feature set exported (None: coordinates only).
        files: Files written.
        slides: Slides exported (at least one magnification).
        skipped: ``{"<slide_id> <mag>x": why}`` for slide/magnification pairs left out (not tiled).
    """

    out: Path
    fmt: str
    folders: dict[float, Path] = field(default_factory=dict)
    features: str | None = None
    files: int = 0
    slides: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        what = f"features/{self.features}" if self.features else "coordinates only"
        lines = [f"exported {len(self.slides)} slide(s) as {self.fmt.upper()} ({what}), {self.files} file(s)"]
        lines += [f"  {m:g}x: {p}" for m, p in sorted(self.folders.items())]
        lines += [f"  skipped {k}: {v}" for k, v in sorted(self.skipped.items())]
        return "\n".join(lines)


def _dataset_mags(ds: Dataset, ids: list[str]) -> list[float]:
    mags: set[float] = set()
    for sid in ids:
        with ds.open(sid) as f:
            mags.update(float(m) for m in np.unique(f[K.MAGNIFICATION][:]))
    return sorted(mags)


def _pick_features(ds: Dataset, ids: list[str], features: str | None) -> str | None:
    names: set[str] = set()
    for sid in ids:
        with ds.open(sid) as f:
            if K.FEATURES in f:
                names.update(k for k in f[K.FEATURES] if not k.startswith("."))
    if features is not None:
        from pathvl.data.embed import feature_name

        name = feature_name(features)
        ds.require(K.FEATURES, name, f"pathvl embed --dataset {ds.root} --encoder {features}")
        return name
    if len(names) > 1:
        raise InteropError(f"{ds.root}: holds several feature sets ({', '.join(sorted(names))}); "
                           "choose one with --features NAME")
    if names:
        name = names.pop()
        ds.require(K.FEATURES, name, f"pathvl embed --dataset {ds.root} --encoder {name}")
        return name
    return None


def _read_geometry(slide_path: str) -> tuple[tuple[float, ...], tuple[tuple[int, int], ...]] | None:
    """Level downsamples and level sizes of the slide, or None when it cannot be opened now (then the
    exported files name level 0, which every slide has)."""
    try:
        with open_slide(slide_path) as s:
            return s.level_downsamples, s.level_dimensions
    except SlideError:
        return None


def _patch_level(downsamples: tuple[float, ...], footprint: int, patch_px: int) -> tuple[int, int]:
    """``(level, size at that level)``: the coarsest level at most the patch's scale on which the footprint
    is a whole number of pixels (within 1%), so that CLAM's ``read_region(coord, level, (size, size))``
    covers the footprint; level 0 always qualifies."""
    scale = footprint / patch_px
    best, size = 0, footprint
    for i, d in enumerate(downsamples):
        if d > scale * (1 + 1e-3) or d <= downsamples[best]:
            continue
        n = round(footprint / d)
        if n >= 1 and abs(n * d - footprint) <= _ATTR_AGREEMENT * footprint:
            best, size = i, n
    return best, size


def _coords_attrs(fmt: str, *, sid: str, folder: Path, patch_px: int, footprint: int, slide_mpp: float,
                  mag: float, size: tuple[int, int], geometry: tuple | None) -> dict[str, Any]:
    """The attributes of an exported ``coords``, right for every reader that may open the file.

    TRIDENT files: ``patch_size`` at the target magnification with the magnifications (``read_coords``),
    and ``patch_level`` / ``custom_downsample`` with ``downsample[patch_level] * custom_downsample`` = level-0
    px per output px (``read_coords_legacy``). CLAM files: ``patch_size`` in ``patch_level`` pixels
    (``Whole_Slide_Bag_FP`` reads that square) with ``custom_downsample`` 1, which TRIDENT's legacy reader
    also reads right; the two magnifications only when the level is at the patch's own scale (else
    TRIDENT's ``read_coords`` would take the level's ``patch_size`` for the target's).
    """
    downsamples = geometry[0] if geometry else (1.0,)
    level, level_size = _patch_level(downsamples, footprint, patch_px)
    ds = downsamples[level]
    W, H = int(size[0]), int(size[1])
    a: dict[str, Any] = {
        K.PEER_PATCH_SIZE_LEVEL0: int(footprint),
        K.PEER_PATCH_LEVEL: int(level),
        K.PEER_OVERLAP: 0,
        K.PEER_NAME: sid,
        K.PEER_LEVEL0_WIDTH: W,
        K.PEER_LEVEL0_HEIGHT: H,
        K.PATHVL_PATCH_PX: int(patch_px),
        K.PATHVL_MAGNIFICATION: float(mag),
    }
    mags = {K.PEER_LEVEL0_MAG: _num(10.0 / slide_mpp), K.PEER_TARGET_MAG: _num(mag)}
    if fmt == "trident":
        a.update(mags)
        a[K.PEER_PATCH_SIZE] = int(patch_px)
        a[K.PEER_CUSTOM_DOWNSAMPLE] = _num(footprint / patch_px / ds)
        a[K.PEER_SAVETODIR] = str(folder)
    else:
        if level_size == patch_px:
            a.update(mags)
        a[K.PEER_PATCH_SIZE] = int(level_size)
        a[K.PEER_CUSTOM_DOWNSAMPLE] = 1
        a[K.CLAM_DOWNSAMPLE] = np.asarray([ds, ds], dtype=np.float64)
        level_dim = geometry[1][level] if geometry else (W, H)
        a[K.CLAM_LEVEL_DIM] = np.asarray(level_dim, dtype=np.int64)
        a[K.CLAM_DOWNSAMPLED_LEVEL_DIM] = a[K.CLAM_LEVEL_DIM]
        a[K.CLAM_SAVE_PATH] = str(folder / K.CLAM_PATCHES_DIR)
    return a


def _write_peer_h5(path: Path, coords: np.ndarray, coords_attrs: dict, features: np.ndarray | None = None,
                   features_attrs: dict | None = None) -> None:
    with _atomic_h5(path) as f:
        d = f.create_dataset(K.PEER_COORDS, data=coords.astype(np.int64))
        for k, v in coords_attrs.items():
            d.attrs[k] = v
        if features is not None:
            d = f.create_dataset(K.PEER_FEATURES, data=features.astype(np.float32))
            for k, v in (features_attrs or {}).items():
                d.attrs[k] = v


def _write_pt(path: Path, features: np.ndarray) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        torch.save(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_dataset(root: str | Path, out: str | Path, fmt: str, *, mag: float | None = None,
                   features: str | None = None, progress: bool = True) -> ExportSummary:
    """Write a dataset's coordinates (and one feature set) in TRIDENT's or CLAM's layout.

    Args:
        root: A pathvl dataset folder.
        out: Output folder (created; existing files of the same names are replaced).
        fmt: ``trident`` or ``clam``.
        mag: Export only this magnification; default every magnification of the dataset, each in its own
            folder (TRIDENT always names its folder ``<mag>x_<px>px_0px_overlap``; CLAM gets
            ``<mag>x_<px>px/`` only when there are several).
        features: Feature set (``features/<name>``) to export; default the only one present, none when
            the dataset has none (coordinates only).
        progress: Show a progress bar.

    Raises:
        InteropError: Unknown format, magnification not in the dataset, several feature sets and none chosen.
        DatasetError: Not a dataset, or a slide lacks the chosen features.
    """
    if fmt not in FORMATS:
        raise InteropError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    ds = Dataset(root)
    ids = ds.slide_ids()
    if not ids:
        raise DatasetError(f"{root}: no tiled slides to export; run `pathvl tile SLIDES --dataset {root}` first")
    present = _dataset_mags(ds, ids)
    if mag is not None and not any(math.isclose(mag, m, rel_tol=1e-6) for m in present):
        raise InteropError(f"{root}: no {mag:g}x patches; the dataset has {', '.join(f'{m:g}x' for m in present)}")
    mags = [m for m in present if mag is None or math.isclose(mag, m, rel_tol=1e-6)]
    name = _pick_features(ds, ids, features)
    out = Path(out)
    patch_px = TileSpec.from_json(ds.spec_json).patch_px
    summary = ExportSummary(out=out, fmt=fmt, features=name)
    for m in mags:
        if fmt == "trident":
            summary.folders[m] = out / f"{_fmt_mag(m)}x_{patch_px}px_0px_overlap"
        else:
            summary.folders[m] = out / f"{_fmt_mag(m)}x_{patch_px}px" if len(mags) > 1 else out
    done: set[str] = set()
    for sid in tqdm(ids, desc=f"export {fmt}", unit="slide", disable=not progress):
        attrs = ds.attrs(sid)
        fps = {float(k): int(v) for k, v in json.loads(attrs[K.ATTR_FOOTPRINTS]).items()}
        geometry = _read_geometry(attrs[K.ATTR_SLIDE_PATH])
        with ds.open(sid) as f:
            coords, mag_col = f[K.COORDS][:], f[K.MAGNIFICATION][:]
            feats = f[f"{K.FEATURES}/{name}"][:] if name else None
            feat_attrs = {k: v for k, v in _attrs(f[f"{K.FEATURES}/{name}"]).items()
                          if k != K.FEAT_COMPLETE} if name else {}
        for m in mags:
            rows = np.flatnonzero(np.isclose(mag_col, m, rtol=1e-6))
            if len(rows) == 0:
                summary.skipped[f"{sid} {m:g}x"] = "magnification not tiled for this slide (above its scan)"
                continue
            fp = next(v for k, v in fps.items() if math.isclose(k, m, rel_tol=1e-6))
            folder = summary.folders[m]
            ca = _coords_attrs(fmt, sid=sid, folder=folder, patch_px=patch_px, footprint=fp,
                               slide_mpp=float(attrs[K.ATTR_MPP]), mag=m, size=tuple(attrs[K.ATTR_SLIDE_SIZE]),
                               geometry=geometry)
            c = coords[rows]
            if fmt == "trident":
                _write_peer_h5(folder / K.TRIDENT_PATCHES_DIR / f"{sid}{K.TRIDENT_PATCHES_SUFFIX}", c, ca)
                summary.files += 1
                if feats is not None:
                    feat_dir = folder / f"{K.TRIDENT_FEATURES_PREFIX}{name}"
                    fa = {**feat_attrs, K.PEER_NAME: sid, K.PEER_SAVETODIR: str(feat_dir),
                          K.PEER_ENCODER: str(feat_attrs.get(K.FEAT_ENCODER, name))}
                    _write_peer_h5(feat_dir / f"{sid}.h5", c, ca, feats[rows], fa)
                    summary.files += 1
            else:
                _write_peer_h5(folder / K.CLAM_PATCHES_DIR / f"{sid}.h5", c, ca)
                summary.files += 1
                if feats is not None:
                    fa = {**feat_attrs, K.PEER_ENCODER: str(feat_attrs.get(K.FEAT_ENCODER, name))}
                    _write_peer_h5(folder / K.CLAM_H5_DIR / f"{sid}.h5", c, ca, feats[rows], fa)
                    _write_pt(folder / K.CLAM_PT_DIR / f"{sid}{K.PT_SUFFIX}", feats[rows])
                    summary.files += 2
            done.add(sid)
    summary.slides = sorted(done)
    return summary


def export_coords(root: str | Path, path: str | Path, *, mag: float | None = None) -> int:
    """Write every patch as a ``slide_id,index,x,y,magnification,parent`` CSV row.

    ``index`` is the patch's row in its slide's table and ``parent`` the row of its parent (-1 for a
    root); ``x, y`` are level-0 pixels. This is the table ``pathvl caption --captioner import`` matches
    captions against (by index, or by x, y and magnification).

    Args:
        root: A pathvl dataset folder.
        path: The CSV file to write (through a temporary name).
        mag: Only patches at this magnification.

    Returns:
        The number of rows written.
    """
    ds = Dataset(root)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    n = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_id", "index", "x", "y", "magnification", "parent"])
            for sid in ds.slide_ids():
                t = ds.patches(sid)
                keep = np.ones(len(t["coords"]), bool) if mag is None else np.isclose(t["magnification"], mag)
                for i in np.flatnonzero(keep):
                    x, y = t["coords"][i]
                    w.writerow([sid, int(i), int(x), int(y), f"{float(t['magnification'][i]):g}", int(t["parent"][i])])
                    n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
