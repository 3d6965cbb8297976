"""What export and import share: the formats, the tolerances of the attribute contract, the peers' folder
names, the error type, and small readers and writers of HDF5 attributes and files."""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathvl import _const as K
from pathvl.errors import UserError

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
