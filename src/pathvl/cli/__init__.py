"""The ``pathvl`` command: thin argument parsing over library functions.

Every subcommand accepts an argv list (``main(["tile", ...])``) so tests call it in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pathvl import __version__
from pathvl.cli._shape import _int_ge0, _int_ge1, _positive_float  # noqa: F401 (re-exported)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's (or the machine's) to fix: printed as one line, no traceback.

    :class:`~pathvl.errors.UserError`; every ``OSError`` (a missing or unreadable file, a full disk,
    HDF5's errors, which h5py raises as ``OSError``); a refused pickle (``UnpicklingError``); a truncated
    or corrupt safetensors file; bad arguments. Anything else is a bug and shows its traceback.
    """
    from pickle import UnpicklingError

    from pathvl.errors import UserError

    errors: list[type[BaseException]] = [UserError, OSError, UnpicklingError, argparse.ArgumentTypeError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(errors)


def _one_line(e: BaseException) -> str:
    """The message of a user error, made one line: the file named where the error carries it."""
    import errno
    from pickle import UnpicklingError

    from pathvl.errors import UserError

    if isinstance(e, UnpicklingError) and not isinstance(e, UserError):
        from pathvl.encoders.weights import CONVERT_HINT, refusal_detail

        return (f"refused to unpickle a file that is not plain tensors ({refusal_detail(e)}); the safe loader never "
                f"runs code from a file. To use it, {CONVERT_HINT}")
    if isinstance(e, OSError) and not isinstance(e, UserError):
        if e.strerror and e.filename is not None:
            msg = f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else "")
        else:
            msg = " ".join(str(e).split()) or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            msg += "; the disk is full or over the file-size limit: free some space and rerun"
        return msg
    if type(e).__name__ == "SafetensorError":
        return f"not a readable safetensors file (truncated or corrupt?): {' '.join(str(e).split())}"
    return " ".join(str(e).split()) or type(e).__name__


def _stage_exit(failed: dict) -> int:
    """Exit code of a stage command: 1 when some slides failed (each listed with its reason), else 0."""
    return 1 if failed else 0


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


# ----------------------------------------------------------------------------------------------- evaluation
ZEROSHOT_EXAMPLE = """example:
  pathvl zeroshot --checkpoint runs/mrplip --data ~/data/CRC-VAL-HE-7K --benchmark crc_val_he_7k
  pathvl zeroshot --checkpoint runs/mrplip --data tiles/ --prompts my_prompts.json --out reports/zs
  pathvl zeroshot --checkpoint runs/mrplip --dataset data/grid --slide-labels labels.csv --prompts crc
  pathvl zeroshot --list                                   # benchmarks and built-in prompt sets
  pathvl zeroshot --checkpoint ~/models/QuiltNet-B-32 --data tiles/ --prompts crc    # a published VLM baseline
  pathvl zeroshot --checkpoint runs/mrplip --dataset data/grid --slide-labels labels.csv --prompts brca.json \\
                  --prompt-set all     # MI-Zero's 50 prompt sets: each set, and the mean +- sd over sets
slide level (--dataset + --slide-labels): MR-PLIP uses MI-Zero top-j pooling of patch scores (every j is
reported); PathFLIP and PathAlign score their slide embeddings.
--checkpoint also takes a published VLM: an OpenCLIP folder (open_clip_config.json + open_clip_pytorch_model.bin,
e.g. QuiltNet), openclip:<model>:<weights file>, or a Hugging Face CLIP folder (PLIP); local files only.
"""


def _add_eval_common(p) -> None:
    p.add_argument("--checkpoint", help="run folder (or checkpoint folder) from `pathvl pretrain`, or a published VLM: "
                                        "an OpenCLIP folder, openclip:<model>:<weights>, a Hugging Face CLIP folder")
    p.add_argument("--encoder-weights", default=None, help="weights of the frozen vision encoder, if it needs any")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per batch")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for confidence intervals")
    p.add_argument("--out", default=None, help="report folder (JSON, Markdown, PNG)")


def _add_zeroshot(sub) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot tile classification with prompt ensembles",
                       description="Zero-shot classification of labelled tiles; weighted F1 and every metric.",
                       epilog=ZEROSHOT_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("--data", help="tiles: a benchmark's local copy, a folder with labels.csv, or class folders")
    p.add_argument("--benchmark", default=None, help="benchmark registry name (sets layout and prompts)")
    p.add_argument("--split", default=None, help="benchmark split")
    p.add_argument("--prompts", default=None,
                   help="built-in prompt set or JSON file (ours, CONCH's, MI-Zero's or quilt1m's class names)")
    p.add_argument("--prompt-set", default=None, metavar="I|all",
                   help="a file of numbered prompt sets (MI-Zero's 50, CONCH's): use set I, or every set and report "
                        "each with the mean +- sd over sets (without it: set 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--allow-extra-classes", action="store_true",
                   help="drop prompt classes the labels lack (the model then chooses among the labels present) "
                        "instead of refusing the prompt file")
    p.add_argument("--dataset", default=None, help="slide level: an embedded dataset folder")
    p.add_argument("--slide-labels", default=None, help="slide level: CSV of slide_id,label")
    p.add_argument("--list", action="store_true", help="list benchmarks and prompt sets and exit")
    _add_eval_common(p)
    p.set_defaults(func=_run_zeroshot)


def _write(report: dict, out: str | None, name: str, title: str) -> None:
    from pathvl.eval.report import render_markdown, write_report

    if out:
        write_report(out, report, name=name, title=title)
        print(f"report: {Path(out) / (name + '.md')}")
    else:
        print(render_markdown(report, title=title))


def _run_zeroshot(a: argparse.Namespace) -> int:
    if a.list:
        from pathvl.eval.benchmarks import describe_all
        from pathvl.eval.zeroshot import builtin_prompt_sets

        print(describe_all())
        print("\nbuilt-in prompt sets: " + ", ".join(builtin_prompt_sets()))
        return 0
    if a.checkpoint and a.dataset and a.slide_labels:
        from pathvl.eval.apply import zeroshot_slides

        if not a.prompts:
            raise argparse.ArgumentTypeError("slide-level zero-shot needs --prompts")
        if a.prompt_set is not None:
            from pathvl.eval.apply import zeroshot_slides_prompt_sets

            rep = zeroshot_slides_prompt_sets(a.checkpoint, a.dataset, a.slide_labels, a.prompts,
                                              prompt_set=a.prompt_set, n_bootstrap=a.bootstrap,
                                              allow_extra=a.allow_extra_classes)
        else:
            rep = zeroshot_slides(a.checkpoint, a.dataset, a.slide_labels, a.prompts, n_bootstrap=a.bootstrap,
                                  allow_extra=a.allow_extra_classes)
        _write(rep, a.out, "zeroshot_slides", f"Slide zero-shot: {a.dataset}")
        return 0
    if not a.checkpoint or not a.data:
        raise argparse.ArgumentTypeError("give --checkpoint RUN and --data TILES, or --dataset DATA --slide-labels "
                                         "CSV (or --list)")
    from pathvl.eval.apply import zeroshot_tiles, zeroshot_tiles_prompt_sets

    common = {"prompts": a.prompts, "benchmark": a.benchmark, "split": a.split, "encoder_weights": a.encoder_weights,
              "batch_size": a.batch_size, "workers": a.workers, "n_bootstrap": a.bootstrap, "skip_bad": a.skip_bad,
              "allow_extra": a.allow_extra_classes}
    if a.prompt_set is not None:
        rep = zeroshot_tiles_prompt_sets(a.checkpoint, a.data, prompt_set=a.prompt_set, **common)
    else:
        rep = zeroshot_tiles(a.checkpoint, a.data, **common)
    _write(rep, a.out, "zeroshot", f"Zero-shot: {a.benchmark or a.data}")
    return 0


PROBE_EXAMPLE = """example:
  pathvl probe --checkpoint runs/mrplip --train tiles/tr --test tiles/te
  pathvl probe --features uni --weights ~/models/uni/pytorch_model.bin --train tiles/tr --test tiles/te  # UNI baseline
  pathvl probe --features uni --weights uni.bin --train tiles/tr --test tiles/te --shots 1 2 4 8 16 --seeds 5
  pathvl probe --checkpoint ~/models/QuiltNet-B-32 --train tiles/tr --test tiles/te --simpleshot --shots 1 4 16
--features: a plain frozen encoder (`pathvl embed --list`), no checkpoint; its raw features are probed.
--shots: k tiles per class drawn --seeds times from the training set, each draw scored on the test set (mean +- sd).
--simpleshot: nearest class centroid after centring on the training mean and L2 normalisation (Wang et al. 2019).
"""


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="linear probe, k-shot or SimpleShot on frozen embeddings or plain features",
                       description="Logistic regression on frozen embeddings (a checkpoint's, a published VLM's or a "
                                   "plain encoder's features), C chosen on a validation split; k-shot, SimpleShot.",
                       epilog=PROBE_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("--train", required=True, help="training tiles (labels.csv folder or class folders)")
    p.add_argument("--test", required=True, help="test tiles")
    p.add_argument("--benchmark", default=None, help="benchmark registry name")
    p.add_argument("--features", default=None, metavar="ENCODER",
                   help="probe a plain frozen encoder instead of a checkpoint (uni, timm:<arch>, openclip:<dir>, ...)")
    p.add_argument("--weights", default=None, help="local weights file of the --features encoder")
    p.add_argument("--shots", type=_int_ge1, nargs="+", default=None, metavar="K",
                   help="few-shot: K training tiles per class, e.g. --shots 1 2 4 8 16")
    p.add_argument("--seeds", type=_int_ge1, default=5, help="draws per K (seeds SEED .. SEED+N-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (draws, validation split)")
    p.add_argument("--simpleshot", action="store_true",
                   help="SimpleShot nearest centroid instead of logistic regression")
    p.add_argument("--C", dest="C", type=_positive_float, default=1.0,
                   help="inverse regularisation of the few-shot logistic regression (the full probe sweeps C)")
    _add_eval_common(p)
    p.set_defaults(func=_run_probe)


def _run_probe(a: argparse.Namespace) -> int:
    few = {"shots": a.shots, "simpleshot": a.simpleshot, "n_seeds": a.seeds, "seed": a.seed, "C": a.C,
           "batch_size": a.batch_size, "workers": a.workers, "n_bootstrap": a.bootstrap, "benchmark": a.benchmark}
    title = ("SimpleShot" if a.simpleshot else "Linear probe") + (" k-shot" if a.shots else "")
    if a.features:
        from pathvl.eval.baselines import probe_features

        if a.checkpoint:
            raise argparse.ArgumentTypeError("give --checkpoint RUN or --features ENCODER, not both")
        rep = probe_features(a.features, a.train, a.test, weights=a.weights or a.encoder_weights, **few)
        _write(rep, a.out, "probe", f"{title}: {a.features}")
        return 0
    if not a.checkpoint:
        raise argparse.ArgumentTypeError("give --checkpoint RUN (or a published VLM) or --features ENCODER")
    if a.weights:
        raise argparse.ArgumentTypeError("--weights goes with --features; a checkpoint's encoder takes "
                                         "--encoder-weights")
    if a.shots or a.simpleshot:
        from pathvl.eval.baselines import probe_tiles

        rep = probe_tiles(a.checkpoint, a.train, a.test, encoder_weights=a.encoder_weights, **few)
    else:
        from pathvl.eval.apply import linear_probe_tiles

        rep = linear_probe_tiles(a.checkpoint, a.train, a.test, benchmark=a.benchmark,
                                 encoder_weights=a.encoder_weights, batch_size=a.batch_size, workers=a.workers,
                                 n_bootstrap=a.bootstrap)
    _write(rep, a.out, "probe", title)
    return 0


def _add_retrieve(sub) -> None:
    p = sub.add_parser("retrieve", help="image-text retrieval Recall@1/5/10",
                       description="Retrieval between a dataset's patches and their captions (MR-PLIP), or "
                                   "between slides and their captions or reports (PathFLIP, PathAlign: --texts).",
                       epilog="example:\n  pathvl retrieve --checkpoint runs/mrplip --dataset data/heldout\n"
                              "  pathvl retrieve --checkpoint runs/pathflip --dataset data/grid --texts captions.csv\n"
                              "  pathvl embed --dataset data/heldout --encoder openclip:~/models/QuiltNet-B-32\n"
                              "  pathvl retrieve --checkpoint ~/models/QuiltNet-B-32 --dataset data/heldout\n",
                       formatter_class=_Formatter)
    p.add_argument("--dataset", required=True, help="dataset folder with features and captions")
    p.add_argument("--captions", default=None, help="captions name (default: the one the model trained on)")
    p.add_argument("--max-items", type=int, default=None, help="patch level: at most this many caption/patch pairs "
                                                                 "(default 5000)")
    p.add_argument("--texts", default=None, help="slide level: CSV/JSONL of slide_id and caption or report")
    p.add_argument("--checkpoint", help="run folder from `pathvl pretrain`, or a published VLM (as for zeroshot)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="patches (default 256) or slides (default 8) per forward pass")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples of the queries for 95%% CIs of R@K")
    p.add_argument("--seed", type=int, default=0, help="seed of the patch choice and of the bootstrap")
    p.add_argument("--out", default=None, help="report folder (JSON, Markdown)")
    p.set_defaults(func=_run_retrieve)


def _run_retrieve(a: argparse.Namespace) -> int:
    from pathvl.eval.apply import retrieve_patches, retrieve_slides

    if not a.checkpoint:
        raise argparse.ArgumentTypeError("give --checkpoint RUN")
    if a.batch_size is not None and a.batch_size < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.bootstrap < 0:
        raise argparse.ArgumentTypeError(f"--bootstrap must be 0 or more, got {a.bootstrap}")
    if a.texts:
        if a.captions or a.max_items is not None:
            raise argparse.ArgumentTypeError("--captions and --max-items are for patch retrieval; slide retrieval "
                                             "scores every slide of --texts")
        rep = retrieve_slides(a.checkpoint, a.dataset, a.texts, batch_size=a.batch_size or 8,
                              n_bootstrap=a.bootstrap, seed=a.seed)
    else:
        rep = retrieve_patches(a.checkpoint, a.dataset, captions=a.captions, max_patches=a.max_items or 5000,
                               batch_size=a.batch_size or 256, n_bootstrap=a.bootstrap, seed=a.seed)
    _write(rep, a.out, "retrieval", "Retrieval")
    return 0


# ----------------------------------------------------------------------------------------------- slide-level uses
def _add_heatmap(sub) -> None:
    p = sub.add_parser("heatmap", help="where a text matches on a slide, as a PNG over the thumbnail",
                       description="Score every patch of an embedded slide against a text query and draw it.",
                       epilog='example:\n  pathvl heatmap slide-01 --dataset data/grid --checkpoint runs/pathflip '
                              '--text "tumor" --out heat/\n', formatter_class=_Formatter)
    p.add_argument("slide", help="slide id in the dataset")
    p.add_argument("--dataset", required=True, help="dataset folder (full grid, embedded)")
    p.add_argument("--checkpoint", required=True, help="run folder of any family (PathFLIP, PathAlign, MR-PLIP)")
    p.add_argument("--text", action="append", required=True, help="query text (repeat for several)")
    p.add_argument("--mode", choices=["similarity", "attention"], default="similarity",
                   help="PathFLIP's score type (other families have one)")
    p.add_argument("--vmin", type=float, default=None, help="score at the colour bar bottom (default: slide min)")
    p.add_argument("--vmax", type=float, default=None, help="score at the top of the colour bar (default: slide max)")
    p.add_argument("--label", default=None, help="ground-truth class for a localisation AUROC (synthetic slides)")
    p.add_argument("--out", default="heatmaps", help="output folder")
    p.set_defaults(func=_run_heatmap)


def _run_heatmap(a: argparse.Namespace) -> int:
    from pathvl.eval.heatmap import heatmap_filename, slide_heatmaps
    from pathvl.eval.loading import load_for_eval

    ev = load_for_eval(a.checkpoint)
    out = Path(a.out)
    mode = None if a.mode == "similarity" else a.mode
    for hm in slide_heatmaps(ev, a.dataset, a.slide, a.text, mode=mode):
        png = hm.save_png(out / heatmap_filename(a.slide, hm.text, a.checkpoint, mode), vmin=a.vmin, vmax=a.vmax)
        line = f"{hm.text!r}: {png}"
        if a.label:
            from pathvl.synthetic import load_ground_truth

            line += f"  localisation AUROC {hm.auroc(load_ground_truth(hm.slide_path), a.label):.3f}"
        print(line)
    return 0


# ----------------------------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole chain on built-in data (CPU, no network)",
                       description="Generate slides, tile, caption, embed, pretrain MR-PLIP briefly, evaluate, "
                                   "and write a report with pictures.",
                       epilog="example:\n  pathvl demo\n  pathvl demo --out /tmp/demo --quick\n",
                       formatter_class=_Formatter)
    p.add_argument("--out", default="pathvl-demo", help="work folder (reruns reuse finished stages)")
    p.add_argument("--quick", action="store_true", help="a smaller setting (what the test suite runs)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: 150, quick: 80)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(a: argparse.Namespace) -> int:
    from pathvl.demo import run_demo

    report = run_demo(a.out, quick=a.quick, steps=a.steps, progress=not a.no_progress)
    print(f"demo report: {report}")
    return 0


# ----------------------------------------------------------------------------------------------- info
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a slide or a dataset",
                       description="Describe a slide (levels, mpp and its source) or a dataset folder.",
                       epilog="example:\n  pathvl info slide.svs\n  pathvl info --dataset data/mrplip\n",
                       formatter_class=_Formatter)
    p.add_argument("path", nargs="?", default=None, help="a slide file (or, deprecated, a dataset folder)")
    p.add_argument("--dataset", default=None, help="a dataset folder written by `pathvl tile`")
    p.add_argument("--mpp", type=_positive_float, default=None, help="override the slide's mpp")
    p.set_defaults(func=_run_info)


def _run_info(a: argparse.Namespace) -> int:
    from pathvl import _const as K

    if (a.path is None) == (a.dataset is None):
        raise argparse.ArgumentTypeError("give a slide file (pathvl info SLIDE) or --dataset DATASET")
    if a.dataset is not None:
        from pathvl.data.dataset import Dataset

        print(Dataset(a.dataset).summary())
        return 0
    path = Path(a.path)
    if path.is_dir() and (path / K.MANIFEST).exists():
        from pathvl.data.dataset import Dataset

        print(f"pathvl info: deprecated: a dataset as PATH; write --dataset {a.path}", file=sys.stderr)
        print(Dataset(path).summary())
        return 0
    from pathvl.slide.reader import open_slide

    with open_slide(path, mpp=a.mpp) as s:
        print(s.describe())
    return 0


# ----------------------------------------------------------------------------------------------- main
_COMMANDS: list[Callable] = [
    _add_zeroshot, _add_probe, _add_retrieve, _add_heatmap,
    _add_demo, _add_info,
]


# Commands that live in their own module of this package: each has ``register(sub)`` adding its parser(s).
_COMMAND_MODULES: tuple[str, ...] = (
    "pathvl.cli.stages", "pathvl.cli.interop", "pathvl.cli.mil", "pathvl.cli.learn", "pathvl.cli.ask",
    "pathvl.cli.check", "pathvl.cli.view", "pathvl.cli.configs", "pathvl.cli.synth", "pathvl.cli.pack",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathvl", description="Pathology vision-language models on whole-slide images.",
        epilog="Run `pathvl demo` for the whole chain on built-in data; `pathvl COMMAND --help` for examples.",
    )
    parser.add_argument("--version", action="version", version=f"pathvl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    importlib.import_module(_COMMAND_MODULES[0]).register(sub)  # the stages first, in the order they run
    for add in _COMMANDS:
        add(sub)
    for name in _COMMAND_MODULES[1:]:
        importlib.import_module(name).register(sub)
    _no_abbreviations(parser)
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """A prefix of a flag is an error, not silently that flag (``--out`` must not mean ``--output``)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _no_abbreviations(child)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pathvl`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return rc
    except BrokenPipeError:
        # `pathvl caption ... | head -1`: the reader left; point stdout at /dev/null so that the
        # interpreter's own flush at exit does not fail again
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        print(f"pathvl {args.command}: output closed early (broken pipe, e.g. `| head`); the rest of the "
              "report was not printed", file=sys.stderr)
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except _user_errors() as e:
        if os.environ.get("PATHVL_DEBUG"):
            raise
        print(f"pathvl {args.command}: error: {_one_line(e)}  (PATHVL_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pathvl {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
