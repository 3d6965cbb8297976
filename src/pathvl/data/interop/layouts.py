"""Finding a peer's files for ``pathvl import``: TRIDENT's and CLAM's folder layouts, one source per slide."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from pathvl import _const as K
from pathvl.data.interop.common import _CLAM_DIR, _TRIDENT_DIR, InteropError, _scalar


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
