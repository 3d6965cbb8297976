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
