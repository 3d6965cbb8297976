"""The one CLI shape (issue 15): the dataset is always ``--dataset DATASET``.

Old spellings (a positional dataset) stay accepted as aliases that print one deprecation line to stderr.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable


class _DeprecatedPositional(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values is None:
            return
        if getattr(namespace, "dataset", None) is None:
            namespace.dataset = values
        print(f"{parser.prog}: deprecated: the positional DATASET; write --dataset {values}", file=sys.stderr)


def add_dataset(p: argparse.ArgumentParser, help: str, *, required: bool = True) -> None:
    """``--dataset DATASET`` on ``p``, plus the deprecated positional spelling; call before set_defaults."""
    p.add_argument("--dataset", default=None, metavar="DATASET", help=help + (" (required)" if required else ""))
    p.add_argument("dataset_positional", nargs="?", default=None, action=_DeprecatedPositional,
                   help=argparse.SUPPRESS)
    p.set_defaults(_dataset_required=required)


def require_dataset(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so that a missing ``--dataset`` is a one-line user error (exit 2)."""

    @functools.wraps(func)
    def run(a: argparse.Namespace) -> int:
        if getattr(a, "_dataset_required", False) and not a.dataset:
            raise argparse.ArgumentTypeError("give --dataset DATASET (a folder written by `pathvl tile`)")
        return func(a)

    return run


class _DeprecatedOption(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, "dataset", None) is None:
            namespace.dataset = values
        print(f"{parser.prog}: deprecated: {option_string} {values}; write --dataset {values}", file=sys.stderr)


def add_dataset_option_alias(p: argparse.ArgumentParser, flag: str) -> None:
    """Keep an old ``flag DATASET`` spelling (e.g. ``import --out``) as a deprecated alias of ``--dataset``."""
    p.add_argument(flag, dest="_alias_" + flag.lstrip("-"), metavar="DATASET", action=_DeprecatedOption,
                   help=argparse.SUPPRESS)


# ------------------------------------------------------------------ argument types shared by commands
def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return i, n


def _parents(text: str) -> int | None:
    if text == "all":
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--parents wants a positive integer or 'all', got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"--parents wants a positive integer or 'all', got {text!r}")
    return v


def _positive_float(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return v

    parse.__name__ = f"integer >= {low}"
    return parse


_int_ge1 = _int_at_least(1)
_int_ge0 = _int_at_least(0)


def _jpeg_quality(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer within 1..100, got {text!r}") from None
    if not 1 <= v <= 100:
        raise argparse.ArgumentTypeError(f"--jpeg-quality must be within 1..100, got {text}")
    return v
