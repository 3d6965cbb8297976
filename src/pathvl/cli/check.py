"""``pathvl check DATASET``: verify every file of a dataset folder."""

from __future__ import annotations

import argparse

CHECK_EXAMPLE = """example:
  pathvl check data/mrplip             # read every dataset of every slide file through to its last byte
  pathvl check data/mrplip --quick     # open each file and check its structure only

  Reports, one line each: slide files listed in the manifest that are missing, cannot be opened or read
  (truncated, damaged), are not marked complete, have captions, keywords, features or pixels whose row
  count differs from the patch table, or non-finite features; invalid slide ids in the manifest; .h5 files
  the manifest does not list; temporary files left by an interrupted run. Exits 1 when there is any.
  A damaged file is re-created by rerunning `pathvl tile` with its slide on the folder.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def register(sub) -> None:
    p = sub.add_parser("check", help="verify every file of a dataset",
                       description="Verify every slide file of a dataset folder and list the problems.",
                       epilog=CHECK_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("dataset", help="dataset folder written by `pathvl tile`")
    p.add_argument("--quick", action="store_true", help="check structure only, without reading every byte")
    p.set_defaults(func=_run_check)


def _run_check(a: argparse.Namespace) -> int:
    from pathvl.data.dataset import Dataset

    ds = Dataset(a.dataset)
    problems = ds.check(deep=not a.quick)
    for line in problems:
        print(line)
    n = len(ds.slide_ids())
    verdict = "all sound" if not problems else f"{len(problems)} problem(s)"
    print(f"checked {n} slide file(s) in {ds.root}{' (structure only)' if a.quick else ''}: {verdict}")
    return 1 if problems else 0
