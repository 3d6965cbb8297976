"""``pathvl pack --dataset DATASET``: one contiguous, memory-mapped training store of a dataset's bags."""

from __future__ import annotations

import argparse

from pathvl.cli import _Formatter
from pathvl.cli._shape import add_dataset, require_dataset

EXAMPLE = """example:
  pathvl tile slides/ --dataset data/mrplip
  pathvl caption --dataset data/mrplip --captioner template
  pathvl embed --dataset data/mrplip --encoder colour-texture
  pathvl pack --dataset data/mrplip                       # the only features and captions present
  pathvl pack --dataset data/mrplip --features uni --captions llava

  Writes DATASET/packs/<features>/<captions>/ (features, magnifications, parents and texts of every done
  slide end to end, as .npy memory maps). `pathvl pretrain` (MR-PLIP) then reads bags from it instead of
  thousands of slide files. After any change to a slide file (tile, caption, embed) the pack is stale:
  training refuses it and names this command; rerun it (or delete the folder to read the slide files).
"""


def register(sub) -> None:
    p = sub.add_parser("pack", help="pack a dataset's bags into one memory-mapped training store",
                       description="Pack the features, magnifications, parents, captions and keywords of every "
                                   "done slide into one contiguous, memory-mapped store for training.",
                       epilog=EXAMPLE, formatter_class=_Formatter)
    add_dataset(p, "dataset folder, embedded and captioned")
    p.add_argument("--features", default=None, help="encoder name given to `pathvl embed --encoder` "
                                                    "(default: the only one every slide has)")
    p.add_argument("--captions", default=None, help="captioner name given to `pathvl caption --captioner` "
                                                    "(default: the only one every slide has)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=require_dataset(_run))


def _run(a: argparse.Namespace) -> int:
    from pathvl.data.pack import pack_dataset

    report = pack_dataset(a.dataset, a.features, a.captions, progress=not a.no_progress)
    print(report.text())
    return 0
