"""Writing and reading one slide file copy-on-write: the guarded HDF5 file, the new-file writer
(:class:`SlideWriter`), the add-to-a-copy updater (:class:`SlideUpdate`), verification and reading."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathvl import _const as K
from pathvl.data.files import (
    SlideFileError,
    _fsync_dir,
    _swap_lock,
    _temp_for,
    clean_stale_temps,
    describe_error,
    disk_full_error,
    first_line,
    is_disk_full,
)
from pathvl.errors import UserError

#: Rows read at once when a file is verified in full (``pathvl check``).
_READ_CHUNK_ROWS = 4096


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
