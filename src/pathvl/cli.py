"""The ``pathvl`` command: thin argument parsing over library functions.

Every subcommand accepts an argv list (``main(["tile", ...])``) so tests call it in-process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pathvl import __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed as one line, no traceback."""
    from pathvl.data.dataset import DatasetError
    from pathvl.slide.reader import SlideError
    from pathvl.slide.tiling import SpecError

    errs: list[type[BaseException]] = [DatasetError, SlideError, SpecError, FileNotFoundError]
    try:
        from pathvl.train.config import ConfigError

        errs.append(ConfigError)
    except ImportError:
        pass
    return tuple(errs)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


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
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


# ----------------------------------------------------------------------------------------------- tile
TILE_EXAMPLE = """example:
  pathvl tile slides/ --out data/mrplip                      # 5/10/20/40x bags of 85, 20 per slide
  pathvl tile a.svs b.svs --out data/grid --mags 20 --patch-px 256 --parents all   # full 20x grid
  pathvl tile slides/ --out data/mrplip --shard 0/4          # one of four machines
"""


def _add_tile(sub) -> None:
    p = sub.add_parser("tile", help="cut slides into a multi-resolution patch dataset",
                       description="Cut whole-slide images into the multi-resolution patch dataset.",
                       epilog=TILE_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("slides", nargs="+", help="slide files or folders of slides")
    p.add_argument("--out", required=True, help="dataset folder (created; reruns skip finished slides)")
    p.add_argument("--mags", nargs="+", type=_positive_float, default=[5.0, 10.0, 20.0, 40.0],
                   help="physical magnifications, ascending, each a power-of-two multiple of the first")
    p.add_argument("--patch-px", type=int, default=512, help="patch side in pixels at its own magnification")
    p.add_argument("--parents", type=_parents, default=20,
                   help="root patches per slide sampled from tissue, or 'all'")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a root patch")
    p.add_argument("--above-scan", choices=["skip", "upsample"], default="skip",
                   help="what to do with magnifications finer than the scan")
    p.add_argument("--seed", type=int, default=0, help="seed of the root sampling")
    p.add_argument("--mpp", type=_positive_float, default=None,
                   help="level-0 microns per pixel, overriding the slide metadata (e.g. 0.25 for 40x)")
    p.add_argument("--store-pixels", action="store_true", help="store every patch as JPEG in the dataset")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored pixels")
    p.add_argument("--workers", type=int, default=1, help="slides tiled in parallel")
    p.add_argument("--shard", type=_shard, default=None,
                   help="I/N: tile only every N-th slide starting at I (default: RANK/WORLD_SIZE or 0/1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_tile)


def _run_tile(a: argparse.Namespace) -> int:
    from pathvl.data.tiler import TileOptions, shard_from_env, tile_slides
    from pathvl.slide.tiling import TileSpec

    if not (1 <= a.jpeg_quality <= 100):
        raise argparse.ArgumentTypeError(f"--jpeg-quality must be within 1..100, got {a.jpeg_quality}")
    spec = TileSpec(mags=tuple(a.mags), patch_px=a.patch_px, parents=a.parents, min_tissue=a.min_tissue,
                    above_scan=a.above_scan, seed=a.seed)
    opts = TileOptions(mpp=a.mpp, store_pixels=a.store_pixels, jpeg_quality=a.jpeg_quality,
                       workers=max(1, a.workers), shard=a.shard or shard_from_env(), progress=not a.no_progress)
    summary = tile_slides(a.slides, a.out, spec, opts)
    print(summary.text())
    if not summary.done and not summary.skipped:
        print("pathvl tile: nothing could be tiled", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------- embed
EMBED_EXAMPLE = """example:
  pathvl embed data/mrplip --encoder uni --weights ~/models/uni/pytorch_model.bin
  pathvl embed data/mrplip --encoder colour-texture            # no weights needed (demo encoder)
  torchrun --nproc_per_node 8 -m pathvl.cli embed data/mrplip --encoder uni --weights uni.bin
"""


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="cache frozen patch features of a dataset",
                       description="Run a frozen patch encoder over every patch and cache features/<encoder>.",
                       epilog=EMBED_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("dataset", nargs="?", help="dataset folder written by `pathvl tile`")
    p.add_argument("--encoder", help="encoder name (see `pathvl embed --list`)")
    p.add_argument("--list", action="store_true", help="list the registered encoders and exit")
    p.add_argument("--weights", default=None, help="local weights file for encoders that need one (uni, timm:*)")
    p.add_argument("--batch-size", type=int, default=256, help="patches per forward pass")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="precision (auto: the encoder's preference on a GPU, fp32 on CPU)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding and reading pixels")
    p.add_argument("--shard", type=_shard, default=None, help="I/N (default: RANK/WORLD_SIZE or 0/1)")
    p.add_argument("--overwrite", action="store_true", help="recompute slides whose features exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_embed)


def _run_embed(a: argparse.Namespace) -> int:
    from pathvl.data.embed import embed_dataset
    from pathvl.data.tiler import shard_from_env

    if a.list:
        from pathvl.encoders import describe_encoders

        print(describe_encoders())
        return 0
    if not a.dataset or not a.encoder:
        raise argparse.ArgumentTypeError("give a DATASET and --encoder NAME (or --list)")
    s = embed_dataset(a.dataset, a.encoder, a.weights, batch_size=a.batch_size, dtype=a.dtype,
                      workers=max(0, a.workers), shard=a.shard or shard_from_env(), overwrite=a.overwrite,
                      progress=not a.no_progress)
    print(s.text())
    return 0


# ----------------------------------------------------------------------------------------------- info
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a slide or a dataset",
                       description="Describe a slide (levels, mpp and its source) or a dataset folder.",
                       epilog="example:\n  pathvl info slide.svs\n  pathvl info data/mrplip\n",
                       formatter_class=_Formatter)
    p.add_argument("path", help="a slide file or a dataset folder")
    p.add_argument("--mpp", type=_positive_float, default=None, help="override the slide's mpp")
    p.set_defaults(func=_run_info)


def _run_info(a: argparse.Namespace) -> int:
    from pathvl import _const as K

    path = Path(a.path)
    if path.is_dir() and (path / K.MANIFEST).exists():
        from pathvl.data.dataset import Dataset

        print(Dataset(path).summary())
        return 0
    from pathvl.slide.reader import open_slide

    with open_slide(path, mpp=a.mpp) as s:
        print(s.describe())
    return 0


# ----------------------------------------------------------------------------------------------- main
_COMMANDS: list[Callable] = [_add_tile, _add_embed, _add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathvl", description="Pathology vision-language models on whole-slide images.",
        epilog="Run `pathvl demo` for the whole chain on built-in data; `pathvl COMMAND --help` for examples.",
    )
    parser.add_argument("--version", action="version", version=f"pathvl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pathvl`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (argparse.ArgumentTypeError, *_user_errors()) as e:
        print(f"pathvl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pathvl {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
