"""Reading a peer file for ``pathvl import``: its coords, its features, and its patch geometry (size,
magnification, level-0 footprint) from the attributes, checked against the slide.

Coordinates are level-0 pixels (x, y) of each patch's top-left corner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathvl import _const as K
from pathvl.data.interop.common import (
    _ATTR_AGREEMENT,
    _NOMINAL_MAGS,
    FOOTPRINT_TOLERANCE,
    InteropError,
    _attrs,
    _clean,
    _finite_number,
)
from pathvl.slide.geometry import footprint_px, mag_to_mpp
from pathvl.slide.reader import Slide


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
