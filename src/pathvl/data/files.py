"""Safe file handling for the dataset: slide ids that are safe as paths, one-line errors, free-space
checks, locks and claims, temporary names, and workers that die with their parent."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import resource
import secrets
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from pathvl import _const as K
from pathvl.errors import UserError

#: Free space asked for beyond an estimate: a factor and a fixed amount (HDF5 object headers, B-trees).
SPACE_MARGIN = 1.10
SPACE_SLACK = 1 << 20

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_DISK_FULL_TEXT = re.compile(r"No space left on device|File too large|Disk quota exceeded|"
                             r"os error (?:28|27|122)\b|errno = (?:28|27|122)\b")


class DatasetError(UserError, ValueError):
    """A dataset folder that is missing, incomplete or inconsistent; the message says what to run."""


class SlideFileError(DatasetError):
    """One slide's file cannot be opened or read (damaged, truncated, missing, not HDF5), or a slide id
    cannot name a file. Stages report it for that slide, record it in the manifest and go on."""


class DiskFullError(DatasetError):
    """Not enough space for what a stage is about to write (refused before writing), or a write that
    failed for lack of it (ENOSPC, EFBIG, EDQUOT). Nothing was changed; the stage stops."""


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
