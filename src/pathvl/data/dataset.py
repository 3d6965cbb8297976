"""The on-disk dataset: a folder with ``manifest.json`` and one HDF5 file per slide.

Layout (DESIGN.md, "Dataset on disk"; every key lives in :mod:`pathvl._const`)::

    DATASET/
      manifest.json          slides, their status (done / failed + reason, stage errors), the tiling spec,
                             the pathvl version
      <slide_id>.h5          patches/coords (N,2) int64 level-0, patches/magnification (N,) float32,
                             patches/parent (N,) int64, patches/tissue (N,) float32, patches/bag (N,) int64,
                             [pixels/jpeg (N,) vlen uint8], captions/<name>, keywords/<name>, features/<encoder>
      <slide_id>.tissue.png  tissue overlay of the thumbnail, to check the mask
      .locks/                empty lock files (one per slide and stage, one for the manifest)

Writing is copy-on-write. A new slide file is written under a temporary name unique to the process
(``<slide_id>.h5.<pid>-<token>.tmp``, :class:`SlideWriter`); a stage that adds to an existing file
(captions, features, stored pixels) writes a complete new copy beside it (:class:`SlideUpdate`). Either
way the new file is closed, synced, reopened and checked against what it must hold, and only then renamed
over the old one, so the old file stays readable until the new one is complete and verified, and a crash
or a full disk never leaves a half file under a final name.

Why a whole new file per stage rather than a sidecar per stage (``<slide>.<stage>.h5``): every reader,
and the peers' layouts we export to, open one file per slide; the copy costs one sequential pass over the
file (measured 0.13 s for 100 MB, H5Ocopy) next to minutes of encoder or captioner time, and it drops
replaced and stale datasets, so files stay compact across ``--overwrite`` runs (HDF5 never returns the
space of a deleted dataset).

HDF5 never sees a failed write: files are written through :class:`_GuardedFile` (h5py's ``fileobj``
driver), which records the first ``OSError`` (ENOSPC, EFBIG under ``ulimit -f``, EIO) and discards later
writes. HDF5 left holding a failed write corrupts its own state (a segmentation fault when the objects are
released); this way the library closes cleanly and the error is raised afterwards, in Python, naming the
file: :class:`DiskFullError`, one line, the dataset unchanged.

Concurrency: a stage claims a slide with a non-blocking lock (``.locks/<slide_id>.<stage>.claim``), so a
second process on the same output skips the slides the first is working on; swapping a file in happens
under a per-file lock (``.locks/<slide_id>.h5.lock``), so two stages adding to one slide both keep their
additions; the manifest is read-modified-written under its own lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import h5py
import numpy as np

from pathvl import _const as K
from pathvl.data.files import (  # noqa: F401  (re-exported: the dataset API)
    SPACE_MARGIN,
    SPACE_SLACK,
    DatasetError,
    DiskFullError,
    SlideFileError,
    _locked,
    check_slide_id,
    check_space,
    claim_slide,
    clean_stale_temps,
    describe_error,
    die_with_parent,
    disk_full_error,
    file_size_limit,
    first_line,
    free_bytes,
    glob_escape,
    is_disk_full,
    slide_file,
)
from pathvl.data.manifest import (  # noqa: F401
    atomic_write_text,
    init_manifest,
    read_manifest,
    record_stage,
    update_manifest,
)
from pathvl.data.slidefile import (  # noqa: F401
    SlideUpdate,
    SlideWriter,
    _GuardedFile,
    listing,
    open_slide_h5,
    reading,
    table_digest,
    verify_copy,
    verify_slide_file,
)


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

    def stage_errors(self) -> dict[str, dict[str, str]]:
        """Slide id -> {stage: reason} recorded by the stages after tiling (``errors`` of a record)."""
        return {s: dict(r["errors"]) for s, r in self.manifest["slides"].items() if isinstance(r.get("errors"), dict)}

    def path(self, slide_id: str) -> Path:
        """The slide's file (the id checked: it cannot name a file outside the folder)."""
        return slide_file(self.root, slide_id)

    def open(self, slide_id: str, mode: str = "r") -> h5py.File:
        """Open a slide's file read-only (writers use :class:`SlideUpdate`, never an in-place mode).

        Raises:
            SlideFileError: Missing or damaged; the message names the file.
        """
        if mode != "r":
            raise ValueError(f"slide files are never modified in place (mode {mode!r}); use SlideUpdate")
        return open_slide_h5(self.path(slide_id))

    def patches(self, slide_id: str) -> dict[str, np.ndarray]:
        """The patch table of one slide as numpy arrays."""
        p = self.path(slide_id)
        with self.open(slide_id) as f, reading(p):
            return {
                "coords": f[K.COORDS][:], "magnification": f[K.MAGNIFICATION][:], "parent": f[K.PARENT][:],
                "tissue": f[K.TISSUE][:], "bag": f[K.BAG][:],
            }

    def attrs(self, slide_id: str) -> dict:
        with self.open(slide_id) as f, reading(self.path(slide_id)):
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

    def check(self, *, deep: bool = True) -> list[str]:
        """Every problem of the folder (``pathvl check``): manifest entries without a sound file, invalid
        ids, files the manifest does not list, temporary files left by a crash; empty when all is sound."""
        problems: list[str] = []
        listed = set()
        for sid in self.slide_ids():
            try:
                p = self.path(sid)
            except SlideFileError as e:
                problems.append(str(e))
                continue
            listed.add(p.name)
            problems += verify_slide_file(p, deep=deep)
        for p in sorted(self.root.glob(f"*{K.SLIDE_SUFFIX}")):
            if p.name not in listed:
                sid = p.name[: -len(K.SLIDE_SUFFIX)]
                status = self.manifest["slides"].get(sid, {}).get("status")
                if status is None:
                    problems.append(f"{p}: not listed in the manifest (left from another run? delete it or tile its "
                                    "slide again)")
        for p in sorted(self.root.glob(f"*{K.TMP_SUFFIX}")):
            busy = False
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    busy = True
                finally:
                    os.close(fd)
            if not busy:
                problems.append(f"{p}: temporary file left by an interrupted run (safe to delete; the next run "
                                "on that slide deletes it)")
        return problems

    def summary(self) -> str:
        """Human-readable summary (``pathvl info --dataset DATASET``); damaged files are listed, not fatal."""
        done, failed = self.slide_ids(), self.failures()
        lines = [f"dataset    {self.root}", f"pathvl     {self.manifest.get('pathvl_version')}",
                 f"spec       {self.spec_json}"]
        per_mag: dict[float, int] = {}
        n_bags = n = 0
        groups: dict[str, set] = {}
        damaged: list[str] = []
        for sid in done:
            try:
                p = self.path(sid)
                with self.open(sid) as f, reading(p):
                    mags = f[K.MAGNIFICATION][:]
                    bags = int((f[K.PARENT][:] < 0).sum())
                    found = {g: set(f[g].keys()) for g in (K.CAPTIONS, K.KEYWORDS, K.FEATURES, K.PIXELS) if g in f}
            except SlideFileError as e:
                damaged.append(str(e))
                continue
            n += len(mags)
            n_bags += bags
            for m, c in zip(*np.unique(mags, return_counts=True)):
                per_mag[float(m)] = per_mag.get(float(m), 0) + int(c)
            for g, names in found.items():
                groups.setdefault(g, set()).update(names)
        lines.append(f"slides     {len(done)} done, {len(failed)} failed"
                     + (f", {len(damaged)} damaged" if damaged else ""))
        lines.append(f"bags       {n_bags}")
        lines.append(f"patches    {n}" + "".join(f"\n  {m:g}x: {c}" for m, c in sorted(per_mag.items())))
        for g, names in sorted(groups.items()):
            lines.append(f"{g:<10} {', '.join(sorted(names))}")
        for why in damaged:
            lines.append(f"damaged    {why}")
        for sid, why in sorted(failed.items()):
            lines.append(f"failed     {sid}: {why}")
        for sid, errs in sorted(self.stage_errors().items()):
            for stage, why in sorted(errs.items()):
                lines.append(f"error      {sid} ({stage}): {why}")
        if damaged:
            lines.append(f"(`pathvl check {self.root}` verifies every file in full)")
        return "\n".join(lines)
