"""``pathvl import``: TRIDENT or CLAM files into a single-magnification pathvl dataset, one slide at a time
(a refused file is named and the other slides go on)."""

from __future__ import annotations

import json
import os
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
    DatasetError,
    SlideWriter,
    init_manifest,
    read_manifest,
    slide_file,
    update_manifest,
)
from pathvl.data.interop.common import FORMATS, InteropError, _clean, _tmp
from pathvl.data.interop.layouts import _clam_sources, _Source, _trident_sources
from pathvl.data.interop.reading import _geometry, _read_coords, _read_features
from pathvl.progress import tqdm
from pathvl.slide.reader import Slide, SlideError, find_slides, open_slide, slide_id_for
from pathvl.slide.tiling import IntegralMask, SpecError, TileSpec


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
        lines.append(f"dataset: {self.out}  (inspect with `pathvl info --dataset {self.out}`)")
        return "\n".join(lines)


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
