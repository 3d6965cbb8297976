"""Progress that suits where it goes: a live bar on a terminal, a plain line every few seconds in a log.

:func:`tqdm` is a drop-in for ``tqdm.auto.tqdm`` (the subset pathvl uses: iteration, ``update``,
``set_postfix``, ``close``, ``with``). On a terminal it is tqdm; when stderr is not a terminal (a job log, a
pipe, CI) it writes ``desc: 1,200/5,000 patches (24%) 310/s, ETA 12s`` at most every
``PATHVL_PROGRESS_EVERY`` seconds (default 30) and once at the end, instead of carriage-return spam.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["PlainProgress", "tqdm"]


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get("PATHVL_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def _fmt_time(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class PlainProgress:
    """Periodic one-line progress for non-terminals (see the module docstring)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, disable: bool | None = False, every: float | None = None, stream: Any = None,
                 leave: bool = True, **_: Any) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.n, self.start_n = desc, unit, initial, initial
        self.disable = bool(disable)
        self.every = _every() if every is None else every
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.leave = leave  # an inner bar (leave=False) writes no closing line
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def line(self) -> str:
        """The progress line as it would be written now."""
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.n - self.start_n) / dt
        done = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", ETA {_fmt_time((self.total - self.n) / rate)}"
        post = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}{pct} {rate:.3g}/s, {_fmt_time(dt)} elapsed{eta}{post}"

    def _write(self) -> None:
        if not self.disable:
            print(self.line(), file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._write()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self.start_n and self.leave:
                self._write()


def tqdm(iterable: Iterable | None = None, *args: Any, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm`` on a terminal, :class:`PlainProgress` elsewhere (same arguments)."""
    stream = kwargs.get("file", sys.stderr)
    if kwargs.get("disable") is None:  # tqdm's "auto": off without a terminal; here: plain lines instead
        kwargs["disable"] = False
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm as _tqdm

        return _tqdm(iterable, *args, **kwargs)
    if args:
        kwargs.setdefault("desc", args[0])
    for k in ("dynamic_ncols", "smoothing", "position", "file", "mininterval", "ncols"):
        kwargs.pop(k, None)
    return PlainProgress(iterable, stream=stream, **kwargs)
