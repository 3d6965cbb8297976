"""Bags: the cached patch features of a dataset's slides, or precomputed slide embeddings, checked.

Coordinates are level-0 pixels (x, y) of each patch's top-left corner, as stored in the dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pathvl import _const as K
from pathvl.eval.mil.common import MILError, _some
from pathvl.progress import tqdm

#: Feature bytes kept in memory across epochs; beyond this, bags are re-read from the slide files.
CACHE_BYTES = 8 << 30


@dataclass
class Bag:
    """The patches of one slide that MIL sees.

    Attributes:
        slide_id: The slide.
        features: ``(N, D)`` patch features (as stored, usually float16), or None to read them from
            ``h5_path`` on demand.
        coords: ``(N, 2)`` int64 level-0 top-left corners.
        footprint: ``(N,)`` level-0 side of each patch in pixels.
        rows: ``(N,)`` rows of these patches in the slide file.
        slide_size: Level-0 ``(width, height)``.
        slide_path: The slide file (for thumbnails and pixels).
        h5_path: The dataset's slide file.
        key: HDF5 key of the features.
        dim: Feature width ``D``.
    """

    slide_id: str
    features: np.ndarray | None
    coords: np.ndarray | None = None
    footprint: np.ndarray | None = None
    rows: np.ndarray | None = None
    slide_size: tuple[int, int] | None = None
    slide_path: str | None = None
    h5_path: Path | None = None
    key: str | None = None
    dim: int = 0

    def __post_init__(self) -> None:
        if self.features is not None and not self.dim:
            self.dim = int(self.features.shape[1])

    def __len__(self) -> int:
        if self.features is not None:
            return len(self.features)
        return len(self.rows) if self.rows is not None else 0

    def load(self) -> np.ndarray:
        """The ``(N, D)`` features (read from the slide file when not kept in memory)."""
        if self.features is not None:
            return self.features
        with h5py.File(self.h5_path, "r") as f:
            data = f[self.key][:]
        return data if self.rows is None or len(self.rows) == len(data) else data[self.rows]


def _feature_names(f: h5py.File) -> list[str]:
    return sorted(f[K.FEATURES].keys()) if K.FEATURES in f else []


def load_bags(root: str | Path, features: str, slide_ids: Sequence[str] | None = None,
              mag: float | None = None, progress: bool = False, cache_bytes: int = CACHE_BYTES) -> dict[str, Bag]:
    """Read and check the patch features of slides of a dataset.

    Args:
        root: Dataset folder (``pathvl tile``, then ``pathvl embed``).
        features: Encoder name the dataset was embedded with (``features/<name>``).
        slide_ids: Slides to read (default: every tiled slide).
        mag: Keep only patches at this magnification (``patches/magnification``).
        progress: Show a progress bar.
        cache_bytes: Keep features in memory up to this many bytes in all; later bags are re-read on
            demand.

    Raises:
        MILError: A slide lacks ``features/<name>`` (says to run ``pathvl embed``), has no patch at ``mag``,
            holds NaN or infinite features, or its features and coordinates differ in length; each names
            the slide.
    """
    from pathvl.data.dataset import Dataset
    from pathvl.data.embed import feature_name

    ds = Dataset(root)
    ids = list(slide_ids) if slide_ids is not None else ds.slide_ids()
    name = feature_name(features)
    key = f"{K.FEATURES}/{name}"
    known = set(ds.slide_ids())
    absent = [s for s in ids if s not in known]
    if absent:
        raise MILError(f"{root}: slide(s) {_some(absent)} are not tiled in this dataset")
    lacking, have = [], set()
    for sid in ids:
        with ds.open(sid) as f:
            if key not in f:
                lacking.append(sid)
                have.update(_feature_names(f))
    if lacking:
        other = f" (it has features of: {', '.join(sorted(have))})" if have else " (it has no features yet)"
        raise MILError(f"{root}: slide {lacking[0]!r} has no {key}" + (f", nor do {len(lacking) - 1} more slide(s)"
                       if len(lacking) > 1 else "") + f"{other}; run `pathvl embed --dataset {root} "
                       f"--encoder {features}` first")
    bags: dict[str, Bag] = {}
    used = 0
    for sid in tqdm(ids, desc="read bags", unit="slide", disable=None if progress else True):
        with ds.open(sid) as f:
            feats = f[key][:]
            coords = f[K.COORDS][:]
            mags = f[K.MAGNIFICATION][:]
            size = tuple(int(v) for v in f.attrs[K.ATTR_SLIDE_SIZE]) if K.ATTR_SLIDE_SIZE in f.attrs else None
            fps = json.loads(f.attrs[K.ATTR_FOOTPRINTS]) if K.ATTR_FOOTPRINTS in f.attrs else {}
            spath = f.attrs.get(K.ATTR_SLIDE_PATH)
        if len(feats) != len(coords):
            raise MILError(f"slide {sid!r}: {key} has {len(feats)} rows but patches/coords {len(coords)}; "
                           f"re-run `pathvl embed --dataset {root} --encoder {features} --overwrite`")
        rows = np.arange(len(coords))
        if mag is not None:
            rows = np.flatnonzero(np.isclose(mags, float(mag)))
            if not len(rows):
                raise MILError(f"slide {sid!r}: no patches at {mag:g}x (it has "
                               f"{', '.join(f'{m:g}x' for m in np.unique(mags))}); pass another --mag")
            feats = feats[rows]
        if not len(rows):
            raise MILError(f"slide {sid!r}: no patches; re-tile it")
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise MILError(f"slide {sid!r}: {key} holds NaN or infinite values in {len(bad)} of {len(feats)} "
                           f"patches (rows {_some(rows[bad].tolist(), 4)}); re-run "
                           f"`pathvl embed --dataset {root} --encoder {features} --overwrite`")
        fpx = np.array([float(fps.get(f"{m:g}", fps.get(str(m), 0))) for m in mags[rows]])
        keep = used + feats.nbytes <= cache_bytes
        used += feats.nbytes if keep else 0
        bags[sid] = Bag(sid, feats if keep else None, coords[rows].astype(np.int64), fpx, rows,
                        size, str(spath) if spath is not None else None, ds.path(sid), key, int(feats.shape[1]))
    dims = {b.dim for b in bags.values()}
    if len(dims) > 1:
        raise MILError(f"{root}: {key} has different widths across slides ({sorted(dims)}); re-embed the dataset")
    return bags


def read_slide_embeddings(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Slide embeddings from an ``.npz`` (one array per slide id) or ``.h5`` file (one dataset per slide id,
    at the root or under ``slide_embeddings/``); each is ``(D,)`` or ``(M, D)``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"slide embeddings: no such file {p}")
    if p.suffix == ".npz":
        with np.load(p) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    if p.suffix in (".h5", ".hdf5"):
        with h5py.File(p, "r") as f:
            g = f.get("slide_embeddings", f)
            return {k: np.asarray(g[k][()]) for k in g if isinstance(g[k], h5py.Dataset)}
    raise MILError(f"{p}: slide embeddings must be an .npz or .h5 file (one array per slide id)")


def _embedding_bags(emb: Mapping[str, np.ndarray]) -> dict[str, Bag]:
    bags = {}
    dims = set()
    for sid, v in emb.items():
        a = np.asarray(v, dtype=np.float32)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or not len(a):
            raise MILError(f"slide {sid!r}: a slide embedding must be (D,) or (M, D), got shape {np.shape(v)}")
        if not np.isfinite(a).all():
            raise MILError(f"slide {sid!r}: its slide embedding holds NaN or infinite values")
        dims.add(a.shape[1])
        bags[str(sid)] = Bag(str(sid), a.mean(axis=0, keepdims=True))
    if len(dims) > 1:
        raise MILError(f"slide embeddings have different widths ({sorted(dims)})")
    if not bags:
        raise MILError("no slide embeddings given")
    return bags
