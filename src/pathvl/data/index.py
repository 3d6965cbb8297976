"""The slide index: what the datasets need to know of every slide file, cached in the dataset folder.

Building a training dataset used to open every slide file (the patch count, the bags, which features and
captions exist, the slide size): 20,000 opens and reads before the first batch, on every rank, every run.
:func:`load_index` reads that once per file and keeps it in ``DATASET/.slide_index.npz``; a later build
opens no slide file at all while the cache is fresh.

Per slide the index holds: the number of patches, every dataset's path and shape (which features,
captions, keywords and pixels the file has), the slide's level-0 size, the first row of each bag (the
roots, ``patches/parent == -1``) and the magnification of each row run-length encoded (a bag is laid out
magnification by magnification, so four runs per 5x-40x bag).

Freshness: an entry is valid while its file's size and modification time (``st_size``, ``st_mtime_ns``)
are those it was read at (the manifest keeps no per-file digest). Every writer of a slide file
(``tile``, ``caption``, ``embed``) swaps a new file in, which changes its modification time, so an entry
is read again after any stage. A copy that keeps times (``cp -p``, ``rsync -a``) keeps the cache valid;
one that does not merely rebuilds it. Entries of slides that changed are re-read alone and the cache is
rewritten through a temporary name and an atomic rename, under a lock (``.locks/slide_index.lock``) so
that ranks starting together read each file once between them. A folder that cannot be written (a
read-only share) gets an in-memory index and a warning.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathvl import _const as K
from pathvl.data.files import DatasetError, DiskFullError, _flock, _lock_file, _temp_for

__all__ = ["INDEX_FILE", "SlideEntry", "SlideIndex", "file_stat", "load_index"]

#: The cache, in the dataset folder.
INDEX_FILE = ".slide_index.npz"
INDEX_LOCK = "slide_index.lock"
INDEX_VERSION = 1


def file_stat(path: Path) -> tuple[int, int] | None:
    """``(st_size, st_mtime_ns)`` of a file, None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


@dataclass(frozen=True)
class SlideEntry:
    """What the index knows of one slide file.

    Attributes:
        stat: ``(size, mtime_ns)`` of the file when it was read.
        n: Number of patches (rows of ``patches/``).
        datasets: Every dataset's path and shape (``features/<name>``: ``(n, D)``).
        slide_size: Level-0 ``(width, height)`` (None when the file has no such attribute).
        roots: ``(bags,)`` first row of each bag.
        mag_values: Magnification of each run of rows.
        mag_lengths: Length of each run (they add up to ``n``).
    """

    stat: tuple[int, int]
    n: int
    datasets: dict[str, tuple[int, ...]]
    slide_size: tuple[float, float] | None
    roots: np.ndarray
    mag_values: np.ndarray
    mag_lengths: np.ndarray

    def bags(self) -> tuple[np.ndarray, np.ndarray]:
        """``(first row, size)`` of each bag: from one root to the next."""
        ends = np.append(self.roots[1:], self.n)
        return self.roots.astype(np.int64), (ends - self.roots).astype(np.int64)

    def magnification(self) -> np.ndarray:
        """``(n,)`` float32 magnification of each row."""
        return np.repeat(self.mag_values.astype(np.float32), self.mag_lengths)

    def rows_at(self, mags: Sequence[float]) -> np.ndarray:
        """Rows whose magnification is one of ``mags`` (all rows when ``mags`` is empty)."""
        if not mags:
            return np.arange(self.n)
        m = self.magnification()
        return np.flatnonzero(np.isin(m, np.asarray(mags, dtype=m.dtype)))


def _read_entry(path: Path, stat: tuple[int, int]) -> SlideEntry:
    from pathvl.data.slidefile import listing, open_slide_h5, reading

    f = open_slide_h5(path)
    with f, reading(path):
        datasets = listing(f)
        parent = f[K.PARENT][:]
        mags = f[K.MAGNIFICATION][:].astype(np.float32)
        size = f.attrs.get(K.ATTR_SLIDE_SIZE)
    n = len(parent)
    starts = np.flatnonzero(np.r_[True, mags[1:] != mags[:-1]]) if n else np.zeros(0, np.int64)
    return SlideEntry(
        stat=stat, n=n, datasets=datasets,
        slide_size=None if size is None else (float(size[0]), float(size[1])),
        roots=np.flatnonzero(parent < 0).astype(np.int64), mag_values=mags[starts],
        mag_lengths=np.diff(np.r_[starts, n]).astype(np.int64),
    )


def _decode(path: Path) -> dict[str, SlideEntry]:
    """The cached entries (empty when the cache is missing, unreadable or of another version)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            if meta.get("version") != INDEX_VERSION:
                return {}
            roots, values, lengths = z["roots"], z["mag_values"], z["mag_lengths"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a damaged cache is rebuilt
        return {}
    out = {}
    for sid, e in meta["slides"].items():
        r0, r1, m0, m1 = e["at"]
        out[sid] = SlideEntry(
            stat=(int(e["stat"][0]), int(e["stat"][1])), n=int(e["n"]),
            datasets={k: tuple(v) for k, v in e["datasets"].items()},
            slide_size=None if e["size"] is None else (float(e["size"][0]), float(e["size"][1])),
            roots=roots[r0:r1], mag_values=values[m0:m1], mag_lengths=lengths[m0:m1],
        )
    return out


def _encode(entries: dict[str, SlideEntry]) -> bytes:
    slides, roots, values, lengths = {}, [], [], []
    r = m = 0
    for sid, e in sorted(entries.items()):
        slides[sid] = {"stat": list(e.stat), "n": e.n, "datasets": {k: list(v) for k, v in e.datasets.items()},
                       "size": None if e.slide_size is None else list(e.slide_size),
                       "at": [r, r + len(e.roots), m, m + len(e.mag_values)]}
        roots.append(e.roots)
        values.append(e.mag_values)
        lengths.append(e.mag_lengths)
        r, m = r + len(e.roots), m + len(e.mag_values)
    meta = json.dumps({"version": INDEX_VERSION, "slides": slides}, separators=(",", ":")).encode("utf-8")
    buf = io.BytesIO()

    def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
        return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

    np.savez(buf, meta=np.frombuffer(meta, dtype=np.uint8), roots=cat(roots, np.int64),
             mag_values=cat(values, np.float32), mag_lengths=cat(lengths, np.int64))
    return buf.getvalue()


def _write(path: Path, entries: dict[str, SlideEntry]) -> None:
    for stale in path.parent.glob(f"{path.name}.*{K.TMP_SUFFIX}"):  # every writer holds the lock: a crash's
        with contextlib.suppress(OSError):
            stale.unlink()
    tmp = _temp_for(path)
    try:
        with open(tmp, "xb") as fh:
            fh.write(_encode(entries))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _index_lock(root: Path) -> Iterator[bool]:
    """The index lock; yields False (no lock, no cache written) when the folder cannot be written."""
    try:
        lock = _lock_file(root, INDEX_LOCK)
        cm = _flock(lock, blocking=True)
        cm.__enter__()
    except (OSError, DiskFullError):
        yield False
        return
    try:
        yield True
    finally:
        cm.__exit__(None, None, None)


class SlideIndex:
    """The entries of some slides of a dataset (from :func:`load_index`).

    Attributes:
        root: The dataset folder.
        slide_ids: The slides, in the order asked for.
        opened: Slide files read to build it (0 when the cache was fresh).
    """

    def __init__(self, root: Path, entries: dict[str, SlideEntry], slide_ids: Sequence[str], opened: int) -> None:
        self.root = root
        self.slide_ids = list(slide_ids)
        self._entries = entries
        self.opened = opened

    def __getitem__(self, slide_id: str) -> SlideEntry:
        return self._entries[slide_id]

    def require(self, key: str, command: str) -> None:
        """Every slide has dataset ``key``; else a DatasetError naming ``command``."""
        missing = [s for s in self.slide_ids if key not in self._entries[s].datasets]
        if missing:
            raise DatasetError(f"{self.root}: {len(missing)} slide(s) lack {key} (e.g. {missing[0]}); run "
                               f"`{command}` first")


_warned: set[str] = set()


def load_index(ds, slide_ids: Sequence[str], *, cache: bool = True) -> SlideIndex:
    """The index entries of ``slide_ids``: from the cache where fresh, read from the files otherwise.

    Args:
        ds: A :class:`~pathvl.data.dataset.Dataset`.
        slide_ids: Slides of the dataset.
        cache: Use and update ``DATASET/.slide_index.npz`` (False: read every file, write nothing).

    Raises:
        SlideFileError: A slide file is missing or damaged (named).
    """
    root = Path(ds.root)
    path = root / INDEX_FILE
    stats = {sid: file_stat(ds.path(sid)) for sid in slide_ids}

    def stale(entries: dict[str, SlideEntry]) -> list[str]:
        return [s for s in slide_ids if s not in entries or entries[s].stat != stats[s] or stats[s] is None]

    entries = _decode(path) if cache else {}
    todo = stale(entries)
    if not todo:
        return SlideIndex(root, entries, slide_ids, 0)
    if not cache:
        return SlideIndex(root, {s: _read_entry(ds.path(s), stats[s]) for s in todo}, slide_ids, len(todo))
    with _index_lock(root) as locked:
        if locked:  # another process may have refreshed it while we waited
            entries = _decode(path)
            todo = stale(entries)
        for s in todo:
            stat = stats[s] if stats[s] is not None else (0, 0)
            entries[s] = _read_entry(ds.path(s), stat)  # a missing file raises here, naming it
        written, why = locked, "the folder cannot be written"
        if locked and todo:
            known = set(ds.manifest["slides"])
            try:
                _write(path, {s: e for s, e in entries.items() if s in known})
            except (OSError, DiskFullError) as e:
                written, why = False, str(e)
        if not written and str(root) not in _warned:
            _warned.add(str(root))
            warnings.warn(f"{path}: cannot write the slide index cache ({why}); every dataset build reads all "
                          "slide files", stacklevel=2)
    return SlideIndex(root, entries, slide_ids, len(todo))
