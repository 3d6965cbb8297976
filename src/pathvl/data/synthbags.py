"""Synthetic embedded and captioned datasets written straight to HDF5, for tests and benchmarks of the
data path at thousands of slides (no slide image is generated, tiled or embedded).

Each slide file has the layout ``pathvl tile`` + ``pathvl caption`` + ``pathvl embed`` write
(:mod:`pathvl._const`): bags of the tree ``mags`` (5x, 10x, 20x by default: 1 + 4 + 16 = 21 patches a
bag) laid out magnification by magnification with their parent rows, level-0 coordinates and
footprints, the slide size, float16 features under ``features/<name>``, and captions and keywords
under ``captions/<name>`` and ``keywords/<name>``. Values are drawn from ``seed`` and the slide's
position, so a dataset is the same on every run. Files are written under a temporary name and renamed;
the manifest is written once at the end (one record per slide).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from pathvl import __version__
from pathvl import _const as K

__all__ = ["write_bag_dataset"]

_CLASSES = ("tumor", "stroma", "lymphocytes", "necrosis", "adipose tissue", "mucosa")


def _bag_tree(mags: tuple[float, ...], root_fp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from pathvl.slide.tiling import bag_layout

    fps = {m: root_fp * int(mags[0]) // int(m) for m in mags}
    rel, bm, parent = bag_layout(mags, fps)
    return rel, bm.astype(np.float32), parent


def write_bag_dataset(root: str | Path, n_slides: int, *, bags: tuple[int, int] = (2, 6), dim: int = 16,
                      mags: tuple[float, ...] = (5.0, 10.0, 20.0), features: str = "synthetic",
                      captions: str = "template", seed: int = 0) -> Path:
    """Write a dataset of ``n_slides`` slides with ``bags[0]..bags[1]`` bags each; returns ``root``.

    Args:
        root: A new (or empty) folder.
        n_slides: Number of slides (ids ``s00000``, ``s00001``, ...).
        bags: Fewest and most bags per slide (drawn per slide).
        dim: Feature width.
        mags: Magnifications of the bag tree (ascending powers of two of the first).
        features: Name under ``features/``.
        captions: Name under ``captions/`` and ``keywords/``.
        seed: Seed of every drawn value.
    """
    from pathvl.data.manifest import atomic_write_text
    from pathvl.slide.tiling import TileSpec

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    mags = tuple(float(m) for m in mags)
    root_fp = 2048
    rel, bm, bparent = _bag_tree(mags, root_fp)
    per = len(bm)
    fps = {f"{m:g}": root_fp * int(mags[0]) // int(m) for m in mags}
    spec = TileSpec(mags=mags, patch_px=256, parents=bags[1], min_tissue=0.5)
    str_dt = h5py.string_dtype("utf-8")
    records = {}
    for i in range(n_slides):
        sid = f"s{i:05d}"
        rng = np.random.default_rng([seed, i])
        nb = int(rng.integers(bags[0], bags[1] + 1))
        cols = 8
        origins = np.stack([np.arange(nb) % cols, np.arange(nb) // cols], axis=1) * root_fp
        coords = (origins[:, None, :] + rel[None]).reshape(-1, 2).astype(np.int64)
        n = nb * per
        parent = (bparent[None] + np.where(bparent >= 0, np.arange(nb)[:, None] * per, 0)).reshape(-1)
        cls = rng.integers(0, len(_CLASSES), size=n)
        caps = [f"{_CLASSES[c]} at {m:g}x" if rng.random() > 0.05 else "" for c, m in zip(cls, np.tile(bm, nb))]
        kws = [_CLASSES[c].replace(" ", "|") if cap else "" for c, cap in zip(cls, caps)]
        final = root / f"{sid}{K.SLIDE_SUFFIX}"
        tmp = final.with_name(final.name + f".{os.getpid()}{K.TMP_SUFFIX}")
        with h5py.File(tmp, "w") as f:
            f.attrs[K.ATTR_SLIDE_ID] = sid
            f.attrs[K.ATTR_SLIDE_PATH] = f"synthetic/{sid}.svs"
            f.attrs[K.ATTR_SLIDE_SIZE] = np.asarray([cols * root_fp, (nb // cols + 1) * root_fp], dtype=np.int64)
            f.attrs[K.ATTR_MPP] = 0.25
            f.attrs[K.ATTR_MPP_SOURCE] = "metadata"
            f.attrs[K.ATTR_SPEC] = spec.to_json()
            f.attrs[K.ATTR_FOOTPRINTS] = json.dumps(fps)
            f.attrs[K.ATTR_MAGS_DONE] = np.asarray(mags, dtype=np.float32)
            f.attrs[K.ATTR_VERSION] = __version__
            f.create_dataset(K.COORDS, data=coords)
            f.create_dataset(K.MAGNIFICATION, data=np.tile(bm, nb))
            f.create_dataset(K.PARENT, data=parent.astype(np.int64))
            f.create_dataset(K.TISSUE, data=rng.uniform(0.5, 1.0, n).astype(np.float32))
            f.create_dataset(K.BAG, data=np.repeat(np.arange(nb) * per, per).astype(np.int64))
            d = f.create_dataset(K.features_key(features), data=rng.normal(size=(n, dim)).astype(np.float16))
            d.attrs[K.FEAT_ENCODER] = features
            d.attrs[K.FEAT_COMPLETE] = True
            f.create_dataset(K.captions_key(captions), data=np.array(caps, dtype=object), dtype=str_dt)
            f.create_dataset(K.keywords_key(captions), data=np.array(kws, dtype=object), dtype=str_dt)
            f.attrs[K.ATTR_COMPLETE] = True
        os.replace(tmp, final)
        records[sid] = {"path": f"synthetic/{sid}.svs", "status": K.STATUS_DONE, "bags": nb, "patches": n,
                        "mpp": 0.25, "mpp_source": "metadata", "magnifications": list(mags)}
    manifest = {"pathvl_version": __version__, "spec": spec.to_json(), "created": "synthetic", "slides": records}
    atomic_write_text(root / K.MANIFEST, json.dumps(manifest, indent=1))
    return root
