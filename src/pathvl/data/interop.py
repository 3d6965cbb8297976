"""TRIDENT and CLAM files in and out of a pathvl dataset (``pathvl export`` / ``pathvl import``).

Both peers store one HDF5 file per slide (and per magnification) with a top-level ``coords`` (N, 2) of
level-0 top-left corners and, for feature files, a top-level ``features`` (N, D) float32. What the
coordinates mean is carried by attributes of ``coords`` (keys in :mod:`pathvl._const`, ``PEER_*``):

- TRIDENT (``trident/IO.py`` ``read_coords``): ``patch_size`` in pixels *at the target magnification*,
  ``level0_magnification``, ``target_magnification``, ``patch_size_level0`` (the level-0 footprint);
  its legacy reader (``read_coords_legacy``) takes ``patch_size``, ``patch_level`` and
  ``custom_downsample`` so that level-0 pixels per output pixel are ``downsample[patch_level] *
  custom_downsample``.
- CLAM (``dataset_modules/dataset_h5.py`` ``Whole_Slide_Bag_FP``): ``patch_level`` and ``patch_size`` *in
  pixels of that level* (it reads ``patch_size x patch_size`` at ``patch_level``); the older
  ``custom_downsample`` divides that to the final size.

The two ``patch_size`` frames agree when the slide has a level at exactly the patch's scale; otherwise
exported TRIDENT files write ``patch_size`` in TRIDENT's frame and CLAM files in CLAM's, with the other
attributes chosen so that every reader that may open the file reads the same level-0 squares (see
:func:`_coords_attrs`). Exported files also carry ``pathvl_patch_px`` / ``pathvl_magnification`` so that an
import gets the grid back exactly. Layouts written::

    TRIDENT  OUT/<mag>x_<px>px_0px_overlap/patches/<slide>_patches.h5          coords only
             OUT/<mag>x_<px>px_0px_overlap/features_<encoder>/<slide>.h5       features + coords
    CLAM     OUT[/<mag>x_<px>px]/patches/<slide>.h5                            coords only
             OUT[/<mag>x_<px>px]/h5_files/<slide>.h5                           features + coords
             OUT[/<mag>x_<px>px]/pt_files/<slide>.pt                           torch.save(features tensor)

(the CLAM magnification folder only when the export holds several magnifications).

Import turns such files back into a single-magnification pathvl dataset: each file is checked against its
slide (opened with :func:`pathvl.slide.reader.open_slide`) and refused with one line naming the file when
it contradicts it; the other slides go on. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathvl import __version__
from pathvl import _const as K
from pathvl.data.dataset import (
    Dataset,
    DatasetError,
    SlideWriter,
    init_manifest,
    read_manifest,
    slide_file,
    update_manifest,
)
from pathvl.errors import UserError
from pathvl.progress import tqdm
from pathvl.slide.geometry import footprint_px, mag_to_mpp
from pathvl.slide.reader import Slide, SlideError, find_slides, open_slide, slide_id_for
from pathvl.slide.tiling import IntegralMask, SpecError, TileSpec

__all__ = [
    "FOOTPRINT_TOLERANCE", "FORMATS", "ExportSummary", "ImportSummary", "InteropError", "export_coords",
    "export_dataset", "import_features",
]

FORMATS = ("trident", "clam")

#: A peer file's level-0 footprint may differ this much (relative) from ``patch_px * target_mpp / slide_mpp``.
#: TRIDENT rounds the scan to 40x/20x/... from the mpp (a 0.2265 um/px NDPI scan is "40x", 10% off), so
#: the tolerance is wide; what it refuses is the factor of 1.5-2 of a file cut at another magnification or
#: on another scan.
FOOTPRINT_TOLERANCE = 0.25

#: ``patch_size_level0`` may differ this much from the footprint the other attributes give (rounding).
_ATTR_AGREEMENT = 0.01

#: Magnifications a computed one snaps to when within 5% (CLAM files name none).
_NOMINAL_MAGS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)

_TRIDENT_DIR = re.compile(r"^(\d+(?:\.\d+)?)x_(\d+)px_(\d+)px_overlap$")
_CLAM_DIR = re.compile(r"^(\d+(?:\.\d+)?)x_(\d+)px$")


class InteropError(UserError, ValueError):
    """A TRIDENT/CLAM file or folder that cannot be exported or imported; the message names it and why."""


# ----------------------------------------------------------------------------------------------- helpers
def _fmt_mag(m: float) -> str:
    """``20`` for 20.0, ``2.5`` for 2.5 (TRIDENT's folder names)."""
    return str(round(m)) if abs(m - round(m)) < 1e-9 else f"{m:g}"


def _num(v: float) -> int | float:
    """An int when integral (the peers write integer magnifications), else the float."""
    return round(v) if abs(v - round(v)) < 1e-9 else float(v)


def _scalar(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return v.tolist() if v.ndim else v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: _scalar(v) for k, v in obj.attrs.items()}


def _finite_number(attrs: dict[str, Any], key: str) -> float | None:
    v = attrs.get(key)
    if v is None or (isinstance(v, str) and v in ("", "None")):
        return None
    try:
        f = float(v[0] if isinstance(v, list) else v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + K.TMP_SUFFIX)


@contextlib.contextmanager
def _atomic_h5(path: Path):
    """An HDF5 file written as ``<name>.tmp`` and renamed over ``path`` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.unlink(missing_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _clean(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------- export
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
        ds.require(K.FEATURES, name, f"pathvl embed {ds.root} --encoder {features}")
        return name
    if len(names) > 1:
        raise InteropError(f"{ds.root}: holds several feature sets ({', '.join(sorted(names))}); "
                           "choose one with --features NAME")
    if names:
        name = names.pop()
        ds.require(K.FEATURES, name, f"pathvl embed {ds.root} --encoder {name}")
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
        raise DatasetError(f"{root}: no tiled slides to export; run `pathvl tile SLIDES --out {root}` first")
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


# ----------------------------------------------------------------------------------------------- import
@dataclass
class ImportSummary:
    """What :func:`import_features` did.

    Attributes:
        out: The dataset folder.
        done: Slides written (or given new features).
        skipped: Slides that already held everything the files bring.
        failed: ``{file: error}``, one :class:`InteropError` per refused file.
        encoders: Feature sets imported.
        seconds: Wall time.
    """

    out: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, InteropError] = field(default_factory=dict)
    encoders: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        feats = f" with features/{', features/'.join(self.encoders)}" if self.encoders else " (coordinates only)"
        lines = [f"imported {len(self.done)} slide(s){feats}, skipped {len(self.skipped)} already imported, "
                 f"{len(self.failed)} file(s) refused in {self.seconds:.1f} s"]
        lines += [f"  refused {e}" for e in self.failed.values()]
        lines.append(f"dataset: {self.out}  (inspect with `pathvl info {self.out}`)")
        return "\n".join(lines)


@dataclass
class _Source:
    """One slide's peer files: the one whose coords are read and the feature file of each encoder."""

    slide: str
    coords_file: Path
    features: dict[str, Path] = field(default_factory=dict)  # encoder -> .h5 (or CLAM .pt)
    attrs_file: Path | None = None  # where the coords attributes are when coords_file has none (CLAM)


def _h5_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.h5") if p.is_file()) if folder.is_dir() else []


def _one_mag_folder(src: Path, pattern: re.Pattern, marks: tuple[str, ...], fmt: str) -> Path:
    """``src`` itself when it holds the peer's sub-folders, else its only ``<mag>x_...`` folder."""
    if any((src / m).is_dir() for m in marks):
        return src
    if fmt == "trident" and any(d.is_dir() for d in src.glob(f"{K.TRIDENT_FEATURES_PREFIX}*")):
        return src
    subs = sorted(d for d in src.iterdir() if d.is_dir() and pattern.match(d.name))
    if len(subs) == 1:
        return subs[0]
    if len(subs) > 1:
        raise InteropError(f"{src}: holds {len(subs)} magnification folders ({', '.join(d.name for d in subs)}); "
                           f"a pathvl import takes one: pass e.g. {subs[0]}")
    want = ("patches/<slide>_patches.h5 or features_<encoder>/<slide>.h5 (possibly under "
            "<mag>x_<px>px_<overlap>px_overlap/)") if fmt == "trident" else "h5_files/<slide>.h5 or patches/<slide>.h5"
    raise InteropError(f"{src}: no {fmt.upper()} layout found; expected {want}")


def _trident_sources(src: Path, encoder: str | None) -> list[_Source]:
    from pathvl.data.embed import feature_name

    if src.name.startswith(K.TRIDENT_FEATURES_PREFIX) and _h5_in(src):
        folder, feature_dirs = src.parent, [src]
    else:
        folder = _one_mag_folder(src, _TRIDENT_DIR, (K.TRIDENT_PATCHES_DIR,), "trident")
        feature_dirs = sorted(d for d in folder.glob(f"{K.TRIDENT_FEATURES_PREFIX}*") if d.is_dir() and _h5_in(d))
    if encoder is not None and len(feature_dirs) > 1:
        raise InteropError(f"{folder}: --encoder names one feature set but the folder holds "
                           f"{', '.join(d.name for d in feature_dirs)}; pass one features_<encoder> folder as DIR")
    names = {}
    for d in feature_dirs:
        names[d] = encoder or feature_name(d.name[len(K.TRIDENT_FEATURES_PREFIX):])
        if not names[d]:
            raise InteropError(f"{d}: the folder names no encoder (features_<encoder>); pass --encoder NAME")
    by_slide: dict[str, _Source] = {}
    for d in feature_dirs:
        for p in _h5_in(d):
            by_slide.setdefault(p.stem, _Source(slide=p.stem, coords_file=p))
    # coords without features: imported as coordinates only when there are no features at all, else
    # refused as lacking them (so that a slide TRIDENT could not embed is named, not dropped)
    if src not in feature_dirs:
        for p in _h5_in(folder / K.TRIDENT_PATCHES_DIR):
            if p.name.endswith(K.TRIDENT_PATCHES_SUFFIX):
                sid = p.name[: -len(K.TRIDENT_PATCHES_SUFFIX)]
                by_slide.setdefault(sid, _Source(slide=sid, coords_file=p))
    for s in by_slide.values():  # every feature set of the folder, for every slide (a missing one is refused)
        s.features = {names[d]: d / f"{s.slide}.h5" for d in feature_dirs}
    if not by_slide:
        raise InteropError(f"{folder}: no TRIDENT coords or feature files (patches/<slide>_patches.h5, "
                           "features_<encoder>/<slide>.h5)")
    return [by_slide[k] for k in sorted(by_slide)]


def _clam_sources(src: Path, encoder: str | None, patches: Path | None) -> list[_Source]:
    """CLAM's slides: features and coords from ``h5_files`` (or ``pt_files``), the coords attributes from
    ``patches/`` when ``h5_files`` lack them (CLAM's extract_features writes none)."""
    from pathvl.data.embed import feature_name

    folder = src.parent if src.name == K.CLAM_H5_DIR else _one_mag_folder(
        src, _CLAM_DIR, (K.CLAM_H5_DIR, K.CLAM_PATCHES_DIR, K.CLAM_PT_DIR), "clam")
    attr_dirs = [d for d in (patches / K.CLAM_PATCHES_DIR if patches else None, patches, folder / K.CLAM_PATCHES_DIR)
                 if d is not None and d.is_dir()]
    by_slide: dict[str, _Source] = {}
    unnamed: list[Path] = []
    h5s = _h5_in(folder / K.CLAM_H5_DIR)
    for p in h5s:
        s = by_slide[p.stem] = _Source(slide=p.stem, coords_file=p)
        s.attrs_file = next((d / p.name for d in attr_dirs if (d / p.name).is_file()), None)
        try:
            with h5py.File(p, "r") as f:
                has = K.PEER_FEATURES in f
                named = str(_scalar(f[K.PEER_FEATURES].attrs.get(K.PEER_ENCODER, ""))) if has else ""
        except OSError:  # not HDF5: _read_coords refuses it with the reason
            has, named = True, "unknown"
        pt = folder / K.CLAM_PT_DIR / f"{p.stem}{K.PT_SUFFIX}"
        feat_file = p if has else (pt if pt.is_file() else None)
        if feat_file is None:
            continue
        name = encoder or (feature_name(named) if named not in ("", "None") else "")
        if not name:
            unnamed.append(p)
        s.features[name] = feat_file
    if unnamed:
        more = f" (and {len(unnamed) - 1} other file(s))" if len(unnamed) > 1 else ""
        raise InteropError(f"{unnamed[0]}{more}: the features name no encoder (CLAM writes none); pass --encoder NAME")
    names = sorted({k for s in by_slide.values() for k in s.features})
    for d in attr_dirs if not h5s else [folder / K.CLAM_PATCHES_DIR]:  # coords without features: as for TRIDENT
        for p in _h5_in(d):
            if p.stem not in by_slide:
                by_slide[p.stem] = _Source(slide=p.stem, coords_file=p,
                                           features={n: folder / K.CLAM_H5_DIR / p.name for n in names})
    if not by_slide:
        raise InteropError(f"{folder}: no CLAM files (h5_files/<slide>.h5 with features and coords, or "
                           "patches/<slide>.h5 with coords)")
    return [by_slide[k] for k in sorted(by_slide)]


@dataclass
class _Grid:
    """A peer file's patches in pathvl terms."""

    coords: np.ndarray
    patch_px: int
    mag: float
    footprint: int
    mpp: float
    mpp_source: str
    attrs: dict[str, Any]


def _read_coords(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with h5py.File(path, "r") as f:
        if K.PEER_COORDS not in f or not isinstance(f[K.PEER_COORDS], h5py.Dataset):
            raise InteropError(f"{path}: no '{K.PEER_COORDS}' dataset (it holds {sorted(f.keys()) or 'nothing'}); "
                               "TRIDENT and CLAM files carry level-0 coords at the top level")
        d = f[K.PEER_COORDS]
        coords, attrs = d[:], _attrs(d)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InteropError(f"{path}: '{K.PEER_COORDS}' has shape {coords.shape}, expected (N, 2) level-0 (x, y)")
    if len(coords) == 0:
        raise InteropError(f"{path}: '{K.PEER_COORDS}' is empty (no patches)")
    integral = np.issubdtype(coords.dtype, np.integer) or (
        np.issubdtype(coords.dtype, np.floating) and np.all(np.isfinite(coords))
        and np.array_equal(coords, np.round(coords)))
    if not integral:
        raise InteropError(f"{path}: '{K.PEER_COORDS}' holds non-integer values ({coords.dtype}); "
                           "expected level-0 pixel corners")
    return coords.astype(np.int64), attrs


def _nominal_mag(m: float) -> float:
    for n in _NOMINAL_MAGS:
        if abs(m - n) <= 0.05 * n:
            return n
    return float(f"{m:.3g}")


def _geometry(fmt: str, path: Path, coords: np.ndarray, attrs: dict[str, Any], slide: Slide) -> _Grid:
    """Patch size, magnification and footprint of a peer file, checked against its slide."""
    ps = _finite_number(attrs, K.PEER_PATCH_SIZE)
    fp0 = _finite_number(attrs, K.PEER_PATCH_SIZE_LEVEL0)
    l0 = _finite_number(attrs, K.PEER_LEVEL0_MAG)
    tm = _finite_number(attrs, K.PEER_TARGET_MAG)
    level = _finite_number(attrs, K.PEER_PATCH_LEVEL)
    custom = _finite_number(attrs, K.PEER_CUSTOM_DOWNSAMPLE) or 1.0
    trident_frame = ps is not None and l0 is not None and tm is not None
    use_trident = trident_frame and (fmt == "trident" or level is None)
    if ps is None or ps <= 0 or (not use_trident and level is None):
        need = ("patch_size, level0_magnification, target_magnification (or patch_level)" if fmt == "trident"
                else "patch_size, patch_level")
        hint = ("; CLAM's h5_files carry none: pass --patches DATA_H5_DIR holding patches/<slide>.h5"
                if fmt == "clam" else "")
        raise InteropError(f"{path}: '{K.PEER_COORDS}' lacks the attributes {need} (it has "
                           f"{sorted(attrs) or 'none'}){hint}")
    if use_trident:
        if l0 <= 0 or tm <= 0:
            raise InteropError(f"{path}: level0_magnification {l0:g} / target_magnification {tm:g} must be positive")
        patch_px, mag = round(ps), float(tm)
        implied = ps * l0 / tm
        if fp0 is not None and abs(fp0 - implied) > max(1.0, _ATTR_AGREEMENT * implied):
            raise InteropError(f"{path}: patch_size_level0 {fp0:g} disagrees with patch_size {ps:g} x "
                               f"level0_magnification {l0:g} / target_magnification {tm:g} = {implied:g}")
        footprint = round(fp0) if fp0 is not None else round(implied)
    else:
        lv = round(level)
        if not 0 <= lv < slide.level_count:
            raise InteropError(f"{path}: patch_level {lv} but the slide {slide.path} has {slide.level_count} "
                               f"level(s)")
        implied = ps * slide.level_downsamples[lv]
        if fp0 is not None and abs(fp0 - implied) > max(1.0, _ATTR_AGREEMENT * implied):
            raise InteropError(f"{path}: patch_size_level0 {fp0:g} disagrees with patch_size {ps:g} at patch_level "
                               f"{lv} (downsample {slide.level_downsamples[lv]:g} on {slide.path}) = {implied:g}")
        footprint = round(fp0) if fp0 is not None else round(implied)
        patch_px = round(ps / custom)
        mag = float(tm) if tm is not None else None
    if footprint < 1:
        raise InteropError(f"{path}: level-0 patch footprint {footprint} px; expected a positive size")
    own_px, own_mag = _finite_number(attrs, K.PATHVL_PATCH_PX), _finite_number(attrs, K.PATHVL_MAGNIFICATION)
    if own_px is not None and own_mag is not None and own_px > 0 and own_mag > 0:  # written by pathvl export
        patch_px, mag = round(own_px), float(own_mag)
    slide_mpp = slide.mpp
    if slide_mpp is None and l0 is not None and l0 > 0:
        slide_mpp, source = 10.0 / l0, K.MPP_SOURCE_IMPORT
    if slide_mpp is None:
        raise InteropError(f"{path}: the slide {slide.path} has no microns per pixel and the file no "
                           "level0_magnification; pass --mpp (level-0 microns per pixel of the slides)")
    if mag is None:
        mag = _nominal_mag(10.0 / (slide_mpp * footprint / patch_px))
    if slide.mpp is not None:
        expected = patch_px * mag_to_mpp(mag) / slide.mpp
        if abs(footprint - expected) > FOOTPRINT_TOLERANCE * expected:
            raise InteropError(
                f"{path}: patches of {footprint} level-0 px contradict the slide {slide.path}: {patch_px} px at "
                f"{mag:g}x on a {slide.mpp:.4g} um/px scan cover {expected:.0f} px (more than "
                f"{FOOTPRINT_TOLERANCE:.0%} off); the file was cut from another scan or magnification")
        if footprint_px(patch_px, mag_to_mpp(mag), slide.mpp) == footprint:
            mpp, source = slide.mpp, slide.mpp_source
        else:  # keep the file's footprint exact: the mpp that gives it (the slide's own is kept beside)
            mpp, source = patch_px * mag_to_mpp(mag) / footprint, K.MPP_SOURCE_IMPORT
    else:
        mpp = patch_px * mag_to_mpp(mag) / footprint
    W, H = slide.dimensions
    bad = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= W) | (coords[:, 1] >= H)
    if bad.any():
        x, y = coords[np.flatnonzero(bad)[0]]
        raise InteropError(f"{path}: {int(bad.sum())} of {len(coords)} coords lie outside the slide {slide.path} "
                           f"({W}x{H} level-0 px), e.g. ({x}, {y}); the file belongs to another slide or frame")
    return _Grid(coords=coords, patch_px=int(patch_px), mag=float(mag), footprint=int(footprint), mpp=float(mpp),
                 mpp_source=source, attrs=attrs)


def _read_features(path: Path, n: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``features`` of a peer file as float16 with its attributes; refused when the count is not ``n``."""
    if path.suffix == K.PT_SUFFIX:
        import torch

        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for foreign or truncated files
            raise InteropError(f"{path}: not a readable torch tensor file ({type(e).__name__}: {_clean(e)})") from e
        if not isinstance(t, torch.Tensor):
            raise InteropError(f"{path}: holds a {type(t).__name__}, expected a (N, D) features tensor")
        feats, attrs = t.float().numpy(), {}
    else:
        with h5py.File(path, "r") as f:
            if K.PEER_FEATURES not in f or not isinstance(f[K.PEER_FEATURES], h5py.Dataset):
                raise InteropError(f"{path}: no '{K.PEER_FEATURES}' dataset (it holds {sorted(f.keys())})")
            d = f[K.PEER_FEATURES]
            feats, attrs = d[:], _attrs(d)
    if feats.ndim != 2:
        raise InteropError(f"{path}: '{K.PEER_FEATURES}' has shape {feats.shape}, expected (N, D) patch features")
    if len(feats) != n:
        raise InteropError(f"{path}: {len(feats)} feature rows for {n} coords; each patch needs one row")
    if not np.issubdtype(feats.dtype, np.number):
        raise InteropError(f"{path}: '{K.PEER_FEATURES}' is not numeric ({feats.dtype})")
    f16 = feats.astype(np.float16)
    if not np.all(np.isfinite(f16)):
        raise InteropError(f"{path}: features hold NaN or values beyond float16's range (pathvl stores float16)")
    return f16, attrs


def _tissue(slide: Slide, mpp: float, coords: np.ndarray, footprint: int) -> tuple[np.ndarray, float]:
    """Tissue fraction of each patch with pathvl's detector (what ``pathvl tile`` would have written)."""
    from pathvl.data.tiler import thumbnail_px
    from pathvl.slide.tissue import detect_tissue

    thumb, ds = slide.thumbnail(thumbnail_px(slide.dimensions, mpp))
    mask = detect_tissue(thumb, mpp=mpp * ds)
    frac = IntegralMask(mask, ds).fraction(coords[:, 0], coords[:, 1], footprint)
    return frac.astype(np.float32), float(ds)


def _feature_attrs(name: str, src_attrs: dict[str, Any], fmt: str, path: Path) -> dict[str, Any]:
    a = {
        K.FEAT_ENCODER: str(src_attrs.get(K.FEAT_ENCODER) or name),
        K.FEAT_WEIGHTS_SHA256: str(src_attrs.get(K.FEAT_WEIGHTS_SHA256) or "none"),
        K.FEAT_WEIGHTS_PATH: str(src_attrs.get(K.FEAT_WEIGHTS_PATH) or "none"),
        K.FEAT_TRANSFORM: str(src_attrs.get(K.FEAT_TRANSFORM) or "unknown"),
        K.FEAT_DESCRIPTION: str(src_attrs.get(K.FEAT_DESCRIPTION) or f"features imported from {fmt.upper()}"),
        K.FEAT_SOURCE: f"import:{fmt}",
        K.ATTR_IMPORTED_FROM: str(path.resolve()),
    }
    if a[K.FEAT_ENCODER] in ("None", ""):
        a[K.FEAT_ENCODER] = name
    return a


def _write_features(h5: h5py.File, name: str, feats: np.ndarray, attrs: dict[str, Any]) -> None:
    d = h5.create_dataset(f"{K.FEATURES}/{name}", data=feats, chunks=(min(len(feats), 1024), feats.shape[1]))
    for k, v in attrs.items():
        d.attrs[k] = v
    d.attrs[K.FEAT_COMPLETE] = True


def _add_to_existing(path: Path, coords: np.ndarray, feats: dict[str, tuple[np.ndarray, dict]],
                     src: Path) -> list[str]:
    """Add feature sets to a slide file already in the dataset (a copy is written and swapped in).

    Returns:
        The feature sets added (those already present are left as they are).

    Raises:
        InteropError: The file's coords are not the dataset's.
    """
    with h5py.File(path, "r") as f:
        same = np.array_equal(f[K.COORDS][:], coords)
        have = set(f[K.FEATURES].keys()) if K.FEATURES in f else set()
    if not same:
        raise InteropError(f"{src}: its coords differ from those of {path} already in the dataset; import it into "
                           "another --out folder")
    new = {k: v for k, v in feats.items() if k not in have}
    if not new:
        return []
    tmp = _tmp(path)
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            for name, (arr, attrs) in new.items():
                _write_features(f, name, arr, attrs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sorted(new)


def _slide_index(slides: str | Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for p in find_slides([slides]):
        for key in (p.stem, slide_id_for(p)):
            index.setdefault(key, p)
    return index


def import_features(src: str | Path, out: str | Path, fmt: str, slides: str | Path, *, encoder: str | None = None,
                    patches: str | Path | None = None, mpp: float | None = None,
                    progress: bool = True) -> ImportSummary:
    """Turn TRIDENT or CLAM coords/feature files into a single-magnification pathvl dataset.

    Each slide's coords become the patch table (every patch a root, ``parent`` -1), its features
    ``features/<encoder>`` float16 with the encoder name and where they came from in the attributes, and
    the manifest and slide file are written by :mod:`pathvl.data.dataset`'s writers. The footprint and
    magnification come from the file's attributes, checked against the slide: a file whose coords fall
    outside it, whose footprint is more than :data:`FOOTPRINT_TOLERANCE` off ``patch_px * target_mpp /
    slide_mpp``, whose slide is missing, that has no coords, or whose feature count differs from its
    coords count is refused (one line in :attr:`ImportSummary.failed`) and the other slides go on. A slide
    already in ``out`` with the same coords only gets the feature sets it lacks.

    Args:
        src: The peer's output folder (TRIDENT: the job folder, a ``<mag>x_<px>px_<overlap>px_overlap``
            folder or one ``features_<encoder>`` folder; CLAM: the folder holding ``h5_files``/``pt_files``
            or ``patches``).
        out: The dataset folder to write (created, or extended when it holds the same tiling spec).
        fmt: ``trident`` or ``clam``.
        slides: The slides (a folder searched recursively, or one file); matched by file stem / slide id.
        encoder: Feature set name (default: TRIDENT's folder name, the ``encoder`` attribute for CLAM).
        patches: CLAM's ``--data_h5_dir`` (holding ``patches/<slide>.h5``) when the coords attributes are not
            in ``src``.
        mpp: Level-0 microns per pixel of every slide, overriding their metadata.
        progress: Show a progress bar.

    Raises:
        InteropError: Unknown format, or no peer layout in ``src``.
        SlideError: ``slides`` does not exist.
    """
    from pathvl.data.embed import feature_name

    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise InteropError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InteropError(f"{src}: no such folder (the {fmt.upper()} output to import)")
    if encoder is not None:
        encoder = feature_name(encoder)
        if not encoder:
            raise InteropError("--encoder: give a non-empty name")
    sources = (_trident_sources(src, encoder) if fmt == "trident"
               else _clam_sources(src, encoder, Path(patches) if patches else None))
    index = _slide_index(slides)
    summary = ImportSummary(out=out)
    encoders: set[str] = set()
    for s in tqdm(sources, desc=f"import {fmt}", unit="slide", disable=not progress):
        try:
            added = _import_one(s, fmt, out, index, slides, mpp)
        except (InteropError, SlideError, SpecError, DatasetError, OSError) as e:
            err = e if isinstance(e, InteropError) else InteropError(f"{s.coords_file}: {_clean(e)}")
            summary.failed[str(s.coords_file)] = err
            _record_failure(out, s, err)
            continue
        if added is None:
            summary.skipped.append(s.slide)
        else:
            summary.done.append(s.slide)
            encoders.update(added)
    summary.encoders = sorted(encoders)
    summary.seconds = time.perf_counter() - t0
    return summary


def _record_failure(out: Path, s: _Source, err: InteropError) -> None:
    """Note a refused slide in the manifest (when there is one), unless it is already done there."""
    if not (out / K.MANIFEST).exists():
        return
    rec = read_manifest(out)["slides"].get(s.slide, {})
    if rec.get("status") != K.STATUS_DONE:
        update_manifest(out, s.slide, {"path": str(s.coords_file), "status": K.STATUS_FAILED, "reason": str(err)})


def _import_one(s: _Source, fmt: str, out: Path, index: dict[str, Path], slides: str | Path,
                mpp: float | None) -> list[str] | None:
    """Import one slide; returns the feature sets written, or None when nothing was new."""
    coords, attrs = _read_coords(s.coords_file)
    if s.attrs_file is not None and not (K.PEER_PATCH_SIZE in attrs and K.PEER_PATCH_LEVEL in attrs):
        _, attrs = _read_coords(s.attrs_file)
    slide_path = index.get(s.slide)
    if slide_path is None:
        raise InteropError(f"{s.coords_file}: its slide {s.slide!r} is not under {slides} (looked for a slide file "
                           f"with that name); pass the slides folder with --slides")
    feats: dict[str, tuple[np.ndarray, dict]] = {}
    for name, p in s.features.items():
        if not p.exists():
            raise InteropError(f"{s.coords_file}: no {name} features for this slide ({p} is missing)")
        if p != s.coords_file:  # another encoder's file (or CLAM .pt): same patches, same order
            other = _read_coords(p)[0] if p.suffix != K.PT_SUFFIX else coords
            if not np.array_equal(other, coords):
                raise InteropError(f"{p}: its coords differ from {s.coords_file} for the same slide")
        arr, fa = _read_features(p, len(coords))
        feats[name] = (arr, _feature_attrs(name, fa, fmt, p))
    with open_slide(slide_path, mpp=mpp) as slide:
        g = _geometry(fmt, s.coords_file, coords, attrs, slide)
        spec = TileSpec(mags=(g.mag,), patch_px=g.patch_px, parents=None, min_tissue=0.0)
        sid = s.slide
        path = slide_file(out, sid)
        manifest_rec = read_manifest(out)["slides"].get(sid, {}) if (out / K.MANIFEST).exists() else {}
        if path.exists() and manifest_rec.get("status") == K.STATUS_DONE:
            init_manifest(out, spec.to_json())
            added = _add_to_existing(path, coords, feats, s.coords_file)
            return added or None
        try:
            init_manifest(out, spec.to_json())
        except DatasetError:
            have = read_manifest(out)["spec"]
            raise InteropError(f"{s.coords_file}: {g.patch_px} px patches at {g.mag:g}x, but {out} holds another "
                               f"tiling ({have}); import this file into another --out folder") from None
        tissue, thumb_ds = _tissue(slide, g.mpp, coords, g.footprint)
        n = len(coords)
        table = {"coords": coords, "magnification": np.full(n, g.mag, np.float32),
                 "parent": np.full(n, -1, np.int64), "tissue": tissue, "bag": np.arange(n, dtype=np.int64)}
        root_attrs = {
            K.ATTR_SLIDE_PATH: str(Path(slide_path).resolve()),
            K.ATTR_SLIDE_ID: sid,
            K.ATTR_SLIDE_SIZE: np.asarray(slide.dimensions, dtype=np.int64),
            K.ATTR_MPP: g.mpp,
            K.ATTR_MPP_SOURCE: g.mpp_source,
            K.ATTR_SPEC: spec.to_json(),
            K.ATTR_FOOTPRINTS: json.dumps({f"{g.mag:g}": g.footprint}, sort_keys=True),
            K.ATTR_MAGS_DONE: np.asarray([g.mag], dtype=np.float32),
            K.ATTR_MAGS_SKIPPED: np.asarray([], dtype=np.float32),
            K.ATTR_UPSAMPLED: np.asarray([], dtype=np.float32),
            K.ATTR_PATCH_PX: g.patch_px,
            K.ATTR_VERSION: __version__,
            K.ATTR_BACKEND: slide.backend,
            K.ATTR_THUMBNAIL_DOWNSAMPLE: thumb_ds,
            K.ATTR_IMPORTED_FROM: str(s.coords_file.resolve()),
            K.ATTR_IMPORTED_FORMAT: fmt,
            K.ATTR_IMPORTED_ATTRS: json.dumps(g.attrs, sort_keys=True, default=str),
        }
        if g.mpp_source == K.MPP_SOURCE_IMPORT and slide.mpp is not None:
            root_attrs[K.ATTR_SLIDE_MPP_METADATA] = float(slide.mpp)
        with SlideWriter(path, root_attrs, n, store_pixels=False) as w:
            w.write_patches(table)
            for name, (arr, fa) in feats.items():
                _write_features(w.h5, name, arr, fa)
            w.commit()
        update_manifest(out, sid, {
            "path": str(Path(slide_path).resolve()), "status": K.STATUS_DONE, "bags": n, "patches": n,
            "mpp": g.mpp, "mpp_source": g.mpp_source, "magnifications": [g.mag], "skipped": [], "upsampled": [],
            "imported_from": str(s.coords_file.resolve()), "format": fmt, "features": sorted(feats),
        })
    return sorted(feats)
