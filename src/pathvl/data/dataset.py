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
import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathvl import __version__
from pathvl import _const as K
from pathvl.errors import UserError

#: Free space asked for beyond an estimate: a factor and a fixed amount (HDF5 object headers, B-trees).
SPACE_MARGIN = 1.10
SPACE_SLACK = 1 << 20
#: Rows read at once when a file is verified in full (``pathvl check``).
_READ_CHUNK_ROWS = 4096


class DatasetError(UserError, ValueError):
    """A dataset folder that is missing, incomplete or inconsistent; the message says what to run."""


class SlideFileError(DatasetError):
    """One slide's file cannot be opened or read (damaged, truncated, missing, not HDF5), or a slide id
    cannot name a file. Stages report it for that slide, record it in the manifest and go on."""


class DiskFullError(DatasetError):
    """Not enough space for what a stage is about to write (refused before writing), or a write that
    failed for lack of it (ENOSPC, EFBIG, EDQUOT). Nothing was changed; the stage stops."""


# ------------------------------------------------------------------------------------------ slide ids
def check_slide_id(slide_id: object) -> str:
    """``slide_id`` if it can safely name a file inside a dataset folder.

    A slide id becomes ``<dataset>/<slide_id>.h5`` (and lock and overlay names): it may not be empty,
    contain a path separator, NUL or other control character, or ``..``, nor be absolute.

    Raises:
        SlideFileError: An id that could escape the folder or name nothing.
    """
    why = None
    if not isinstance(slide_id, str) or not slide_id.strip():
        why = "empty"
    elif any(sep and sep in slide_id for sep in ("/", "\\", os.sep, os.altsep)):
        why = "contains a path separator"
    elif ".." in slide_id:
        why = "contains '..'"
    elif any(ord(c) < 32 for c in slide_id):
        why = "contains a control character"
    elif os.path.isabs(slide_id):
        why = "is an absolute path"
    if why:
        raise SlideFileError(f"invalid slide id {slide_id!r}: it {why}; a slide id names a file in the dataset "
                             "folder (rename the slide, or fix the manifest entry)")
    return slide_id


def slide_file(root: str | Path, slide_id: str) -> Path:
    """``<root>/<slide_id>.h5``, the id checked by :func:`check_slide_id` first."""
    return Path(root) / f"{check_slide_id(slide_id)}{K.SLIDE_SUFFIX}"


# ------------------------------------------------------------------------------------------ errors
def first_line(exc: BaseException) -> str:
    """One line saying what an exception was (a DataLoader worker's re-raise: its original last line)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Original Traceback" in text and lines:
        return lines[-1]
    return lines[0]


def describe_error(exc: BaseException) -> str:
    """One line for a per-slide failure: the message of a user error, else its type and first line."""
    if isinstance(exc, UserError):
        return first_line(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_DISK_FULL_TEXT = re.compile(r"No space left on device|File too large|Disk quota exceeded|"
                             r"os error (?:28|27|122)\b|errno = (?:28|27|122)\b")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) says the disk or the file-size limit is full."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def disk_full_error(path: str | Path, exc: BaseException) -> DiskFullError:
    """The one-line error for a write to ``path`` that failed for lack of space."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
    return DiskFullError(f"{path}: {why} while writing it (disk full or over the file-size limit); nothing was "
                         "changed (the previous file is intact); free some space and rerun the same command")


def free_bytes(path: str | Path) -> int:
    """Bytes available to this user on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def file_size_limit() -> int | None:
    """This process's largest writable file (``ulimit -f``, RLIMIT_FSIZE), None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def check_space(folder: str | Path, need: int, what: str, *, largest: int | None = None) -> None:
    """Refuse, before writing anything, when ``need`` bytes (plus margin) do not fit.

    Args:
        folder: Where the bytes go.
        need: Estimated bytes.
        what: What is about to be written (named in the message).
        largest: Estimated size of the largest single file, compared with ``ulimit -f``.

    Raises:
        DiskFullError: One line with both numbers.
    """
    need = int(need * SPACE_MARGIN + SPACE_SLACK)
    free = free_bytes(folder)
    if need > free:
        raise DiskFullError(f"{what}: needs about {_mb(need)}, {_mb(free)} free in {folder}; nothing was written: "
                            "free some space (or write elsewhere) and rerun")
    limit = file_size_limit()
    big = int((largest if largest is not None else need) * SPACE_MARGIN + SPACE_SLACK)
    if limit is not None and big > limit:
        raise DiskFullError(f"{what}: needs a file of about {_mb(big)}, over this process's file-size limit "
                            f"(ulimit -f) of {_mb(limit)}; nothing was written: raise the limit and rerun")


# ------------------------------------------------------------------------------------------ processes
def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel kill this process when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``).

    Call it first thing in a worker process (a pool initializer, a DataLoader ``worker_init_fn``). When
    ``parent_pid`` is given and the parent is already gone, the worker exits at once. Elsewhere than Linux
    only that check is made.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


# ------------------------------------------------------------------------------------------ locks
def _lock_file(folder: Path, name: str) -> Path:
    d = folder / K.LOCKS_DIR
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(d, e) from e
        raise
    return d / name


@contextlib.contextmanager
def _flock(path: Path, blocking: bool) -> Iterator[bool]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            got = True
        except BlockingIOError:
            got = False
        yield got
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def claim_slide(root: str | Path, slide_id: str, stage: str) -> Iterator[bool]:
    """Claim ``stage`` work on one slide for this process; yields False when another process holds it.

    The claim is a non-blocking ``flock`` on ``.locks/<slide_id>.<stage>.claim``, released when the block
    ends or the process dies (the kernel drops it), so a killed run never leaves a stale claim.
    """
    check_slide_id(slide_id)
    with _flock(_lock_file(Path(root), f"{slide_id}.{stage}.claim"), blocking=False) as got:
        yield got


def _swap_lock(final: Path) -> contextlib.AbstractContextManager[bool]:
    """Blocking lock held while a file's temporary copy is created, and while it is swapped in."""
    return _flock(_lock_file(final.parent, final.name + ".lock"), blocking=True)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """The manifest lock of a dataset folder (creates the folder)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(root, e) from e
        raise
    with _flock(_lock_file(root, K.MANIFEST_LOCK), blocking=True):
        yield


# ------------------------------------------------------------------------------------------ temp files
def _temp_for(final: Path) -> Path:
    return final.with_name(f"{final.name}.{os.getpid()}-{secrets.token_hex(4)}{K.TMP_SUFFIX}")


def _is_temp_of(final: Path, p: Path) -> bool:
    rest = p.name[len(final.name):]
    return p.name.startswith(final.name) and rest.endswith(K.TMP_SUFFIX) and (rest == K.TMP_SUFFIX or
                                                                               rest.startswith("."))


def clean_stale_temps(final: Path) -> list[Path]:
    """Delete temporary files of ``final`` that no writer holds (left by a crash); call under its swap lock.

    Writers create their temporary file under the swap lock and hold an ``flock`` on it until it is
    renamed, so a temporary file whose lock can be taken is stale.
    """
    removed = []
    for p in final.parent.glob(f"{glob_escape(final.name)}*{K.TMP_SUFFIX}"):
        if not _is_temp_of(final, p):
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
        finally:
            os.close(fd)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    import glob

    return glob.escape(name)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _GuardedFile:
    """A new file for h5py's ``fileobj`` driver that never lets a failed write reach HDF5.

    The first ``OSError`` of a write, truncate or sync is kept in :attr:`error` and every later write is
    discarded (reads of discarded bytes return zeros), so HDF5 finishes and closes without ever seeing an
    I/O failure; the owner checks :attr:`error` after closing and raises it in Python. The file is created
    exclusively and holds an ``flock`` until :meth:`close`, which marks it as live for
    :func:`clean_stale_temps`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(path, e) from e
            raise
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.pos = 0
        self.size = 0
        self.error: OSError | None = None

    # the io-like surface h5py's fileobj driver uses
    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = os.preadv(self.fd, [mv], self.pos) if len(mv) else 0
        if n < len(mv):
            mv[n:] = bytes(len(mv) - n)
        self.pos += len(mv)
        return len(mv)

    def read(self, size: int = -1) -> bytes:
        buf = bytearray(size if size >= 0 else max(0, self.size - self.pos))
        self.readinto(buf)
        return bytes(buf)

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if self.error is None:
            try:
                done = 0
                while done < n:
                    k = os.pwrite(self.fd, mv[done:], self.pos + done)
                    if k <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += k
            except OSError as e:
                self.error = e
        self.pos += n
        self.size = max(self.size, self.pos)
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                self.error = e
        self.size = size
        return size

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        if self.error is None:
            try:
                os.fsync(self.fd)
            except OSError as e:
                self.error = e

    def raise_error(self, final: Path) -> None:
        """Raise what went wrong writing the copy of ``final`` (DiskFullError or OSError naming it)."""
        e = self.error
        if e is None:
            return
        if is_disk_full(e):
            raise disk_full_error(final, e) from e
        raise OSError(e.errno, f"{e.strerror} while writing {final}", str(self.path)) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close and delete the file (after a failure)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.close()


# ------------------------------------------------------------------------------------------ verifying
def listing(f: h5py.Group) -> dict[str, tuple[int, ...]]:
    """Every dataset under ``f`` by path, with its shape."""
    out: dict[str, tuple[int, ...]] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = tuple(obj.shape)

    f.visititems(visit)
    return out


def verify_copy(path: Path, expected: Mapping[str, tuple[int, ...]], *, complete: bool) -> None:
    """Check a freshly written file before it replaces anything: it opens, holds exactly ``expected``
    (names and shapes), the last row of every dataset reads back, and (``complete``) it is marked complete.

    Raises:
        SlideFileError: What differs.
    """
    try:
        with h5py.File(path, "r", locking=False) as f:  # the writer still holds its flock on the file
            have = listing(f)
            if have != dict(expected):
                missing = sorted(set(expected) - set(have))
                extra = sorted(set(have) - set(expected))
                wrong = sorted(k for k in set(have) & set(expected) if have[k] != expected[k])
                raise SlideFileError(f"{path}: the new file does not hold what was written (missing {missing}, "
                                     f"unexpected {extra}, other shape {wrong}); nothing was replaced")
            for name, shape in have.items():
                if shape and shape[0] > 0:
                    f[name][shape[0] - 1]
            if complete and not bool(f.attrs.get(K.ATTR_COMPLETE, False)):
                raise SlideFileError(f"{path}: the new file is not marked complete; nothing was replaced")
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise SlideFileError(f"{path}: the new file does not read back ({first_line(e)}); nothing was replaced") from e


def _swap_in(guard: _GuardedFile, final: Path, expected: Mapping[str, tuple[int, ...]], complete: bool,
             check=None) -> None:
    """Sync, verify and rename ``guard``'s file over ``final`` (under the swap lock, taken here or held)."""
    guard.sync()
    guard.raise_error(final)
    verify_copy(guard.path, expected, complete=complete)
    if check is not None:
        check()
    os.replace(guard.path, final)
    _fsync_dir(final.parent)


def _close_h5(h5: h5py.File | None, exc: BaseException | None) -> None:
    """Close an HDF5 file; a failure is raised, or attached as a note to the error already propagating."""
    if h5 is None or not h5.id.valid:
        return
    try:
        h5.close()
    except Exception as e:
        if exc is None:
            raise
        exc.add_note(f"closing the temporary HDF5 file also failed: {describe_error(e)}")


# ------------------------------------------------------------------------------------------ writers
class SlideWriter:
    """Writes one new slide file under a temporary name; :meth:`commit` verifies it and renames it in.

    Use as a context manager: leaving the block without :meth:`commit` (an exception) deletes the
    temporary file; an error closing it is raised, never swallowed. A write that fails for lack of space
    raises :class:`DiskFullError` naming the file, and the previous file (if any) is untouched.
    """

    def __init__(self, path: Path, attrs: dict, n_patches: int, store_pixels: bool) -> None:
        self.path = Path(path)
        with _swap_lock(self.path):
            clean_stale_temps(self.path)
            self._file = _GuardedFile(_temp_for(self.path))
        self.tmp = self._file.path
        self.h5: h5py.File | None = None
        self._committed = False
        try:
            self.h5 = h5py.File(self._file, "w")
            for k, v in attrs.items():
                self.h5.attrs[k] = v
            self._pix = None
            if store_pixels:
                self._pix = self.h5.create_dataset(
                    K.PIXELS_JPEG, shape=(n_patches,), dtype=h5py.vlen_dtype(np.uint8),
                    chunks=(max(1, min(n_patches, 256)),),
                )
        except BaseException as e:
            self._abort(e)
            raise

    def check_write(self) -> None:
        """Raise now if a write has failed (a full disk), rather than at :meth:`commit`."""
        if self._file.error is not None:
            self._file.raise_error(self.path)

    def write_patches(self, table: dict[str, np.ndarray]) -> None:
        """Write the patch table (``coords``, ``magnification``, ``parent``, ``tissue``, ``bag``)."""
        self.h5.create_dataset(K.COORDS, data=table["coords"].astype(np.int64))
        self.h5.create_dataset(K.MAGNIFICATION, data=table["magnification"].astype(np.float32))
        self.h5.create_dataset(K.PARENT, data=table["parent"].astype(np.int64))
        self.h5.create_dataset(K.TISSUE, data=table["tissue"].astype(np.float32))
        self.h5.create_dataset(K.BAG, data=table["bag"].astype(np.int64))
        self.check_write()

    def write_jpegs(self, start: int, jpegs: list[bytes]) -> None:
        for i, b in enumerate(jpegs):
            self._pix[start + i] = np.frombuffer(b, dtype=np.uint8)
        self.check_write()

    def commit(self) -> None:
        self.h5.attrs[K.ATTR_COMPLETE] = True
        expected = listing(self.h5)
        self.h5.close()
        with _swap_lock(self.path):
            _swap_in(self._file, self.path, expected, complete=True)
        self._file.close()
        self._committed = True

    def _abort(self, exc: BaseException | None) -> None:
        try:
            _close_h5(self.h5, exc)
        finally:
            self._file.discard()

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self._abort(exc)


def table_digest(f: h5py.File) -> str:
    """A digest of a slide file's patch table (coordinates and magnifications): what other stages key on."""
    h = hashlib.sha1()
    for key in (K.COORDS, K.MAGNIFICATION):
        h.update(np.ascontiguousarray(f[key][:]).tobytes())
    return h.hexdigest()


class SlideUpdate:
    """Copy-on-write change of one slide file: a new copy with datasets dropped and added, swapped in.

    On entering, under the file's swap lock (held until the block ends), the current file is opened, its
    patch table checked against ``digest`` (the table the caller computed from), and everything except
    ``drop`` copied into a new temporary file, which :attr:`h5` exposes for the caller to add to.
    :meth:`commit` closes, syncs and verifies the new file (everything copied and added is there and reads
    back) and renames it over the old one. Leaving without committing deletes the copy; the old file is
    never modified.

    Args:
        path: The slide file.
        drop: Dataset or group paths not to copy (what the caller replaces, stale leftovers).
        digest: :func:`table_digest` of the table the caller's data belongs to; a file re-tiled since is
            refused.

    Raises:
        SlideFileError: The file cannot be read, or its table changed.
        DiskFullError: The copy does not fit (raised on commit; nothing changed).
    """

    def __init__(self, path: Path, drop: Iterable[str] = (), digest: str | None = None) -> None:
        self.path = Path(path)
        self.drop = {d.strip("/") for d in drop}
        self.digest = digest
        self.h5: h5py.File | None = None
        self._file: _GuardedFile | None = None
        self._lock = None
        self._committed = False
        self._complete = True
        self._kept: dict[str, tuple[int, ...]] = {}

    def __enter__(self) -> SlideUpdate:
        self._lock = _swap_lock(self.path)
        self._lock.__enter__()
        try:
            clean_stale_temps(self.path)
            src = open_slide_h5(self.path)
            with src, reading(self.path):
                if self.digest is not None and table_digest(src) != self.digest:
                    raise SlideFileError(f"{self.path}: its patch table changed while this stage was working "
                                         "(re-tiled by another process?); rerun the stage")
                self._complete = bool(src.attrs.get(K.ATTR_COMPLETE, False))
                self._kept = {k: v for k, v in listing(src).items() if not self._dropped(k)}
                self._file = _GuardedFile(_temp_for(self.path))
                self.h5 = h5py.File(self._file, "w")
                _copy_group(src, self.h5, self.drop, "")
            if self._file.error is not None:
                self._file.raise_error(self.path)
        except BaseException as e:
            self._release(e)
            raise
        return self

    def check_write(self) -> None:
        """Raise now if a write has failed (a full disk), rather than at :meth:`commit`."""
        if self._file is not None and self._file.error is not None:
            self._file.raise_error(self.path)

    def _dropped(self, key: str) -> bool:
        return any(key == d or key.startswith(d + "/") for d in self.drop)

    def commit(self) -> None:
        expected = listing(self.h5)
        lost = sorted(k for k, shape in self._kept.items() if expected.get(k) != shape)
        if lost:
            raise SlideFileError(f"{self.path}: the new copy lacks {lost[:5]} of the old file; nothing was replaced")
        self.h5.close()
        _swap_in(self._file, self.path, expected, complete=self._complete)
        self._file.close()
        self._committed = True

    def _release(self, exc: BaseException | None) -> None:
        try:
            try:
                _close_h5(self.h5, exc)
            finally:
                if self._file is not None:
                    self._file.discard()
        finally:
            if self._lock is not None:
                self._lock.__exit__(None, None, None)
                self._lock = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._committed:
            self._lock.__exit__(None, None, None)
            self._lock = None
        else:
            self._release(exc)


def _copy_attrs(src: h5py.AttributeManager, dst: h5py.AttributeManager) -> None:
    for k in src:
        dst.create(k, data=src[k], dtype=src.get_id(k).dtype)


def _copy_group(src: h5py.Group, dst: h5py.Group, drop: set[str], prefix: str) -> None:
    _copy_attrs(src.attrs, dst.attrs)
    for name in src:
        full = prefix + name
        if full in drop:
            continue
        obj = src[name]
        if isinstance(obj, h5py.Group) and any(d.startswith(full + "/") for d in drop):
            _copy_group(obj, dst.create_group(name), drop, full + "/")
        else:
            src.copy(obj, dst, name)


# ------------------------------------------------------------------------------------------ reading
def open_slide_h5(path: Path) -> h5py.File:
    """Open a slide file read-only.

    Raises:
        SlideFileError: Missing, or not readable as HDF5 (truncated, damaged); the message names it.
    """
    if not path.exists():
        raise SlideFileError(f"{path}: listed in the manifest but missing; rerun `pathvl tile` with its slide "
                             "on this folder to re-create it")
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as e:
        raise SlideFileError(f"{path}: damaged, cannot be opened ({first_line(e)}); rerun `pathvl tile` with its "
                             "slide on this folder to re-create it") from e


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a failure reading an open slide file into a :class:`SlideFileError` naming it."""
    try:
        yield
    except UserError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        raise SlideFileError(f"{path}: damaged, cannot be read ({type(e).__name__}: {first_line(e)}); rerun "
                             "`pathvl tile` with its slide on this folder to re-create it") from e


# ------------------------------------------------------------------------------------------ manifest
def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary name (unique to the process), fsync and an atomic rename.

    Raises:
        DiskFullError: The disk is full; ``path`` is untouched and no temporary file is left.
    """
    tmp = _temp_for(path)
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise
    _fsync_dir(path.parent)


def _parse_manifest(p: Path, text: str) -> dict:
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: unreadable manifest ({e}); restore it, or move it away and rerun `pathvl tile` "
                           "into a new folder") from e
    why = None
    if not isinstance(m, dict):
        why = f"a {type(m).__name__}, not an object"
    elif not isinstance(m.get("spec"), str):
        why = "no tiling spec"
    elif not isinstance(m.get("slides"), dict):
        why = "no slides table"
    else:
        bad = [s for s, r in m["slides"].items() if not isinstance(r, dict) or not isinstance(r.get("status"), str)]
        if bad:
            why = f"slide record(s) without a status: {bad[:3]}"
        else:
            try:
                json.loads(m["spec"])
            except json.JSONDecodeError:
                why = "a tiling spec that is not JSON"
    if why:
        raise DatasetError(f"{p}: not a valid pathvl manifest ({why}); restore it, or move it away and rerun "
                           "`pathvl tile` into a new folder")
    return m


def _load_manifest(p: Path) -> dict:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p}: unreadable manifest (not UTF-8 text)") from e
    return _parse_manifest(p, text)


def read_manifest(root: str | Path) -> dict:
    """The manifest of a dataset folder.

    Raises:
        DatasetError: No manifest (the folder was not written by ``pathvl tile``), unreadable JSON, or a
            structure that is not a manifest's (the message names the file).
    """
    p = Path(root) / K.MANIFEST
    if not p.exists():
        raise DatasetError(f"{root}: not a pathvl dataset (no {K.MANIFEST}); create it with `pathvl tile`")
    return _load_manifest(p)


def init_manifest(root: Path, spec_json: str) -> dict:
    """Create the manifest, or check that an existing one was written with the same spec.

    Raises:
        DatasetError: The folder holds a dataset tiled with another spec, or a damaged manifest.
    """
    with _locked(root):
        p = root / K.MANIFEST
        if p.exists():
            m = _load_manifest(p)
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


def _modify_manifest(root: Path, change) -> None:
    with _locked(root):
        p = root / K.MANIFEST
        for stale in root.glob(f"{glob_escape(K.MANIFEST)}*{K.TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                stale.unlink()  # every writer holds the lock: any temporary copy is a crash's
        m = _load_manifest(p)
        if change(m) is False:
            return
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(p, json.dumps(m, indent=1))


def update_manifest(root: Path, slide_id: str, record: dict) -> None:
    """Set one slide's record in the manifest (read-modify-write under the folder lock)."""
    check_slide_id(slide_id)

    def change(m: dict) -> None:
        m["slides"][slide_id] = record

    _modify_manifest(Path(root), change)


def record_stage(root: str | Path, slide_id: str, stage: str, error: str | None) -> None:
    """Record (or, with ``error=None``, clear) a stage's failure on one slide: ``errors[stage]`` of its
    manifest record. Writes the manifest only when something changes."""

    def change(m: dict) -> bool:
        rec = m["slides"].get(slide_id)
        if rec is None:
            return False
        errs = rec.get("errors") if isinstance(rec.get("errors"), dict) else {}
        if error is None:
            if stage not in errs:
                return False
            errs.pop(stage)
        else:
            if errs.get(stage) == error:
                return False
            errs[stage] = error
        if errs:
            rec["errors"] = errs
        else:
            rec.pop("errors", None)
        return True

    _modify_manifest(Path(root), change)


# ------------------------------------------------------------------------------------------ reading API
def verify_slide_file(path: Path, *, deep: bool = True) -> list[str]:
    """Problems of one slide file (empty when it is sound): opens, is complete, the patch table is
    consistent, captions, keywords, features and pixels have one row per patch, features are finite;
    ``deep`` also reads every dataset through to its last byte."""
    try:
        f = open_slide_h5(path)
    except SlideFileError as e:
        return [str(e)]
    problems: list[str] = []
    try:
        with f:
            if not bool(f.attrs.get(K.ATTR_COMPLETE, False)):
                problems.append(f"{path}: not marked complete (an unfinished write?)")
            missing = [k for k in (K.COORDS, K.MAGNIFICATION, K.PARENT, K.TISSUE, K.BAG) if k not in f]
            if missing:
                return [*problems, f"{path}: no {', '.join(missing)}; re-tile its slide"]
            n = f[K.COORDS].shape[0]
            if f[K.COORDS].shape != (n, 2):
                problems.append(f"{path}: {K.COORDS} has shape {f[K.COORDS].shape}, expected ({n}, 2)")
            for k in (K.MAGNIFICATION, K.PARENT, K.TISSUE, K.BAG):
                if f[k].shape != (n,):
                    problems.append(f"{path}: {k} has {f[k].shape[0] if f[k].shape else 0} rows, {K.COORDS} {n}")
            for g in (K.CAPTIONS, K.KEYWORDS, K.FEATURES, K.PIXELS):
                if g not in f:
                    continue
                for name, d in f[g].items():
                    key = f"{g}/{name}"
                    if not isinstance(d, h5py.Dataset):
                        continue
                    if not d.shape or d.shape[0] != n:
                        problems.append(f"{path}: {key} has {d.shape[0] if d.shape else 0} rows, the table {n}")
                    if g in (K.CAPTIONS, K.FEATURES) and not bool(d.attrs.get(K.ATTR_COMPLETE, False)):
                        problems.append(f"{path}: {key} is not marked complete (an unfinished write?)")
            if deep:
                for key, shape in listing(f).items():
                    d = f[key]
                    rows = shape[0] if shape else 1
                    for s in range(0, max(rows, 1), _READ_CHUNK_ROWS):
                        block = d[s:s + _READ_CHUNK_ROWS] if shape else d[()]
                        if key.startswith(K.FEATURES + "/") and np.issubdtype(block.dtype, np.floating):
                            bad = int((~np.isfinite(block)).sum())
                            if bad:
                                problems.append(f"{path}: {key} holds {bad} non-finite value(s) (rows from {s})")
                                break
                        if not shape:
                            break
            if K.PARENT in f and n:
                parent = f[K.PARENT][:]
                if parent.min() < -1 or parent.max() >= n:
                    problems.append(f"{path}: {K.PARENT} points outside the table")
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        problems.append(f"{path}: damaged, cannot be read ({type(e).__name__}: {first_line(e)}); rerun `pathvl tile` "
                        "with its slide on this folder to re-create it")
    return problems


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
        """Human-readable summary (``pathvl info DATASET``); damaged files are listed, not fatal."""
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
