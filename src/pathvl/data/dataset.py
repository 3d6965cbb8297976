"""The on-disk dataset: a folder with ``manifest.json`` and one HDF5 file per slide.

Layout (DESIGN.md, "Dataset on disk"; every key lives in :mod:`pathvl._const`)::

    DATASET/
      manifest.json          slides, their status (done / failed + reason), the tiling spec, pathvl version
      <slide_id>.h5          patches/coords (N,2) int64 level-0, patches/magnification (N,) float32,
                             patches/parent (N,) int64, patches/tissue (N,) float32, patches/bag (N,) int64,
                             [pixels/jpeg (N,) vlen uint8], captions/<name>, keywords/<name>, features/<encoder>
      <slide_id>.tissue.png  tissue overlay of the thumbnail, to check the mask

Files are written as ``<name>.tmp`` and renamed when complete, so a crash never leaves a half file under
a final name. The manifest is updated under a lock, so shards of one job may share a folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from pathvl import __version__
from pathvl import _const as K
from pathvl.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset folder that is missing, incomplete or inconsistent; the message says what to run."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary name and an atomic rename."""
    tmp = path.with_name(path.name + K.TMP_SUFFIX)
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(root: str | Path) -> dict:
    """The manifest of a dataset folder.

    Raises:
        DatasetError: No manifest (the folder was not written by ``pathvl tile``) or unreadable JSON.
    """
    p = Path(root) / K.MANIFEST
    if not p.exists():
        raise DatasetError(f"{root}: not a pathvl dataset (no {K.MANIFEST}); create it with `pathvl tile`")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: unreadable manifest ({e})") from e


def init_manifest(root: Path, spec_json: str) -> dict:
    """Create the manifest, or check that an existing one was written with the same spec.

    Raises:
        DatasetError: The folder holds a dataset tiled with another spec.
    """
    with _locked(root):
        p = root / K.MANIFEST
        if p.exists():
            m = json.loads(p.read_text())
            if json.loads(m["spec"]) != json.loads(spec_json):
                raise DatasetError(
                    f"{root}: already holds a dataset tiled with another spec ({m['spec']}); this run asks for "
                    f"{spec_json}. Use another --out folder."
                )
            return m
        m = {"pathvl_version": __version__, "spec": spec_json, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "slides": {}}
        atomic_write_text(p, json.dumps(m, indent=1))
        return m


def update_manifest(root: Path, slide_id: str, record: dict) -> None:
    """Set one slide's record in the manifest (read-modify-write under the folder lock)."""
    with _locked(root):
        p = root / K.MANIFEST
        m = json.loads(p.read_text())
        m["slides"][slide_id] = record
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(p, json.dumps(m, indent=1))


def slide_file(root: str | Path, slide_id: str) -> Path:
    return Path(root) / f"{slide_id}{K.SLIDE_SUFFIX}"


class SlideWriter:
    """Writes one slide's HDF5 file under a temporary name; :meth:`commit` renames it into place.

    Use as a context manager: leaving the block with an exception deletes the temporary file.
    """

    def __init__(self, path: Path, attrs: dict, n_patches: int, store_pixels: bool) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + K.TMP_SUFFIX)
        self.tmp.unlink(missing_ok=True)
        self.h5 = h5py.File(self.tmp, "w")
        for k, v in attrs.items():
            self.h5.attrs[k] = v
        self._pix = None
        if store_pixels:
            self._pix = self.h5.create_dataset(
                K.PIXELS_JPEG, shape=(n_patches,), dtype=h5py.vlen_dtype(np.uint8), chunks=(min(n_patches, 256),)
            )
        self._committed = False

    def write_patches(self, table: dict[str, np.ndarray]) -> None:
        """Write the patch table (``coords``, ``magnification``, ``parent``, ``tissue``, ``bag``)."""
        self.h5.create_dataset(K.COORDS, data=table["coords"].astype(np.int64))
        self.h5.create_dataset(K.MAGNIFICATION, data=table["magnification"].astype(np.float32))
        self.h5.create_dataset(K.PARENT, data=table["parent"].astype(np.int64))
        self.h5.create_dataset(K.TISSUE, data=table["tissue"].astype(np.float32))
        self.h5.create_dataset(K.BAG, data=table["bag"].astype(np.int64))

    def write_jpegs(self, start: int, jpegs: list[bytes]) -> None:
        for i, b in enumerate(jpegs):
            self._pix[start + i] = np.frombuffer(b, dtype=np.uint8)

    def commit(self) -> None:
        self.h5.attrs["complete"] = True
        self.h5.close()
        os.replace(self.tmp, self.path)
        self._committed = True

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if not self._committed:
            with contextlib.suppress(Exception):
                self.h5.close()
            self.tmp.unlink(missing_ok=True)


class Dataset:
    """Read access to a dataset folder written by ``pathvl tile``.

    Args:
        root: The dataset folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)

    @property
    def spec_json(self) -> str:
        return self.manifest["spec"]

    def slide_ids(self, status: str = K.STATUS_DONE) -> list[str]:
        return sorted(s for s, r in self.manifest["slides"].items() if r.get("status") == status)

    def failures(self) -> dict[str, str]:
        return {s: r.get("reason", "") for s, r in self.manifest["slides"].items()
                if r.get("status") == K.STATUS_FAILED}

    def path(self, slide_id: str) -> Path:
        return slide_file(self.root, slide_id)

    def open(self, slide_id: str, mode: str = "r") -> h5py.File:
        p = self.path(slide_id)
        if not p.exists():
            raise DatasetError(f"{p}: listed in the manifest but missing; rerun `pathvl tile` on this folder")
        return h5py.File(p, mode)

    def patches(self, slide_id: str) -> dict[str, np.ndarray]:
        """The patch table of one slide as numpy arrays."""
        with self.open(slide_id) as f:
            return {
                "coords": f[K.COORDS][:], "magnification": f[K.MAGNIFICATION][:], "parent": f[K.PARENT][:],
                "tissue": f[K.TISSUE][:], "bag": f[K.BAG][:],
            }

    def attrs(self, slide_id: str) -> dict:
        with self.open(slide_id) as f:
            return {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in f.attrs.items()}

    def has_pixels(self, slide_id: str) -> bool:
        with self.open(slide_id) as f:
            return K.PIXELS_JPEG in f

    def require(self, group: str, name: str, command: str) -> None:
        """Check every done slide has ``group/name``; else a DatasetError naming the command to run."""
        missing = []
        for sid in self.slide_ids():
            with self.open(sid) as f:
                if f"{group}/{name}" not in f:
                    missing.append(sid)
        if missing:
            raise DatasetError(
                f"{self.root}: {len(missing)} slide(s) lack {group}/{name} (e.g. {missing[0]}); run `{command}` first"
            )

    def summary(self) -> str:
        """Human-readable summary (``pathvl info DATASET``)."""
        done, failed = self.slide_ids(), self.failures()
        lines = [f"dataset    {self.root}", f"pathvl     {self.manifest.get('pathvl_version')}",
                 f"spec       {self.spec_json}", f"slides     {len(done)} done, {len(failed)} failed"]
        per_mag: dict[float, int] = {}
        n_bags = n = 0
        groups: dict[str, set] = {}
        for sid in done:
            with self.open(sid) as f:
                mags = f[K.MAGNIFICATION][:]
                n += len(mags)
                n_bags += int((f[K.PARENT][:] < 0).sum())
                for m, c in zip(*np.unique(mags, return_counts=True)):
                    per_mag[float(m)] = per_mag.get(float(m), 0) + int(c)
                for g in (K.CAPTIONS, K.KEYWORDS, K.FEATURES, K.PIXELS):
                    if g in f:
                        groups.setdefault(g, set()).update(f[g].keys())
        lines.append(f"bags       {n_bags}")
        lines.append(f"patches    {n}" + "".join(f"\n  {m:g}x: {c}" for m, c in sorted(per_mag.items())))
        for g, names in sorted(groups.items()):
            lines.append(f"{g:<10} {', '.join(sorted(names))}")
        for sid, why in sorted(failed.items()):
            lines.append(f"failed     {sid}: {why}")
        return "\n".join(lines)
