"""A bounded, least-recently-used set of open HDF5 slide files, one per process.

At MR-PLIP's scale (20,000 slides) a dataset that keeps every slide file it has read open holds 20,000
handles per DataLoader worker, past the usual limit of 1,024 open files (``ulimit -n``). :class:`HandleCache`
keeps at most ``max_open`` files open and closes the least recently used one when a new one is needed.
Random bags over thousands of slides then reopen files now and then (an HDF5 open costs about 0.2-1 ms
here); ``pathvl pack`` (:mod:`pathvl.data.pack`) avoids that cost entirely.

Handles never cross a process boundary: pickling a cache (a DataLoader worker started by ``spawn``) gives
an empty one with the same bound, and a cache used in a process other than the one that filled it (a
worker started by ``fork``) forgets the inherited handles before opening its own.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import h5py

__all__ = ["DEFAULT_MAX_OPEN_FILES", "HandleCache"]

#: Default bound of open slide files per dataset and process: well below the usual ``ulimit -n`` of 1,024,
#: so eight workers with a train and an eval dataset each stay under it.
DEFAULT_MAX_OPEN_FILES = 64


def _open_read(path: Path) -> h5py.File:
    from pathvl.data.slidefile import open_slide_h5

    return open_slide_h5(path)


class HandleCache:
    """At most ``max_open`` open slide files, least recently used closed first.

    Args:
        max_open: The bound (>= 1).
        opener: ``path -> open h5py.File`` (default: read-only, a damaged file raising
            :class:`~pathvl.data.files.SlideFileError` naming it).

    Raises:
        ValueError: ``max_open < 1``.
    """

    def __init__(self, max_open: int = DEFAULT_MAX_OPEN_FILES,
                 opener: Callable[[Path], h5py.File] | None = None) -> None:
        if int(max_open) < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open}")
        self.max_open = int(max_open)
        self._opener = opener
        self._open: OrderedDict[str, h5py.File] = OrderedDict()
        self._pid = os.getpid()
        self.opened = 0  # files opened by this process (misses), for tests and benchmarks

    def __len__(self) -> int:
        return len(self._open)

    def get(self, path: str | Path) -> h5py.File:
        """The open file at ``path``, opening it (and closing the least recently used) when needed."""
        if self._pid != os.getpid():  # a forked worker: the parent's handles are not ours to use
            self._open = OrderedDict()
            self._pid = os.getpid()
        key = str(path)
        f = self._open.get(key)
        if f is not None and f.id.valid:
            self._open.move_to_end(key)
            return f
        self._open.pop(key, None)
        while len(self._open) >= self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        f = (self._opener or _open_read)(Path(path))
        self.opened += 1
        self._open[key] = f
        return f

    def close(self) -> None:
        """Close every file this process opened."""
        if self._pid == os.getpid():
            for f in self._open.values():
                f.close()
        self._open = OrderedDict()

    def __getstate__(self) -> dict:  # open HDF5 handles do not cross process boundaries
        return {"max_open": self.max_open, "_opener": self._opener, "opened": 0}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"], state["_opener"])
