"""``pathvl mil``: slide-level multiple-instance learning with cross-validation.

Thin parsing over :mod:`pathvl.eval.mil` (training, evaluation) and :mod:`pathvl.eval.slide_benchmarks`
(label layouts of public benchmarks); defaults come from :class:`pathvl.eval.mil.MILConfig`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import fields
from pathlib import Path

MIL_EXAMPLE = """examples:
  pathvl mil --list                                           # the slide-level benchmarks and their label files
  pathvl mil train --dataset data/grid --features uni --labels labels.csv --folds 5 --out runs/mil
  pathvl mil train --dataset data/grid --features uni --labels labels.csv --out runs/clam --model clam-sb --mag 20
  pathvl mil eval --run runs/mil --dataset data/external --labels external.csv
"""

TRAIN_EXAMPLE = """examples:
  pathvl mil train --dataset data/grid --features uni --labels labels.csv --folds 5 --out runs/mil
  pathvl mil train --dataset data/grid --features uni --labels tmb.xlsx --label-column TMB --out runs/tmb
  pathvl mil train --dataset data/rcc --features uni --benchmark tcga-rcc --root ~/CLAM/dataset_csv --out runs/rcc
  pathvl mil train --dataset data/grid --features uni --labels labels.csv --splits runs/mil/splits.json \\
      --model mean --out runs/mean                                 # same folds, mean-pooling baseline
  pathvl mil train --slide-embeddings slides.npz --labels labels.csv --out runs/linear   # linear head

labels: CSV/TSV/XLSX/JSONL with slide_id,label (and optionally patient or case_id, which keeps a patient's
slides in one fold); a numeric label with many values is a regression target, 0/1 a binary status.
"""

EVAL_EXAMPLE = """examples:
  pathvl mil eval --run runs/mil --dataset data/external                        # predictions only
  pathvl mil eval --run runs/mil --dataset data/external --labels external.csv  # and metrics
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:  # no "(default: None)" after every optional
            return action.help
        return super()._get_help_string(action)


def _defaults() -> tuple[dict, dict]:
    """Defaults of MIL training and of the linear head on slide embeddings (:class:`MILConfig`)."""
    from dataclasses import asdict

    from pathvl.eval.mil import MILConfig

    return {f.name: f.default for f in fields(MILConfig)}, asdict(MILConfig.linear_head())


def register(sub) -> None:
    """Add ``pathvl mil`` with its ``train`` and ``eval`` sub-commands."""
    d, e = _defaults()
    p = sub.add_parser("mil", help="slide-level MIL (ABMIL, CLAM-SB, mean pooling) with cross-validation",
                       description="Train and evaluate slide-level classifiers or regressors on patch features "
                                   "(multiple-instance learning) or on slide embeddings.",
                       epilog=MIL_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("--list", action="store_true", help="describe the slide-level benchmarks and exit")
    p.set_defaults(func=_run_root, mil_parser=p)
    msub = p.add_subparsers(dest="mil_command", metavar="SUBCOMMAND")

    t = msub.add_parser("train", help="cross-validated training; writes a run folder",
                        description="Stratified (patient-grouped) k-fold cross-validation of a MIL network on a "
                                    "dataset's patch features, with per-fold checkpoints, out-of-fold predictions, "
                                    "metrics with bootstrap CIs and attention heatmaps.",
                        epilog=TRAIN_EXAMPLE, formatter_class=_Formatter)
    src = t.add_argument_group("input")
    src.add_argument("--dataset", default=None, help="dataset folder (tiled with `pathvl tile`, embedded with "
                                                     "`pathvl embed`)")
    src.add_argument("--features", default=None, help="encoder name of features/<encoder> (`pathvl embed --encoder`)")
    src.add_argument("--mag", type=float, default=None, help="use only patches at this magnification (default: all)")
    src.add_argument("--slide-embeddings", default=None,
                     help="precomputed slide embeddings (.npz or .h5, one array per slide id): a linear head "
                          "instead of MIL")
    lab = t.add_argument_group("labels")
    lab.add_argument("--labels", default=None, help="label file: CSV, TSV, XLSX or JSONL with slide ids and labels")
    lab.add_argument("--benchmark", default=None,
                     help="read the labels in a benchmark's layout (`pathvl mil --list`)")
    lab.add_argument("--root", default=None, help="folder holding the benchmark's label file")
    lab.add_argument("--target", default=None, help="label column of a benchmark with several (a gene)")
    lab.add_argument("--slide-column", default=None, help="column of slide ids (default: slide_id, slide, ...)")
    lab.add_argument("--label-column", default=None, help="column of labels (default: label, target, ...)")
    lab.add_argument("--patient-column", default=None, help="column of patients (default: patient, case_id, ... "
                                                            "when present)")
    lab.add_argument("--task", choices=["auto", "classification", "regression"], default="auto",
                     help="what the labels are (auto: numbers with many values are a regression target)")
    tr = t.add_argument_group("training")
    tr.add_argument("--out", required=True, help="run folder (config, splits, checkpoints, predictions, heatmaps)")
    tr.add_argument("--model", choices=["abmil", "mean", "clam-sb"], default=d["model"],
                    help="ABMIL (gated attention, Ilse et al. 2018), mean pooling, or CLAM-SB (Lu et al. 2021)")
    tr.add_argument("--folds", type=int, default=d["folds"], help="cross-validation folds")
    tr.add_argument("--splits", default=None, help="reuse the folds of a splits.json (from an earlier run)")
    tr.add_argument("--epochs", type=int, default=None,
                    help=f"epochs per fold (default: {d['epochs']}; {e['epochs']} for slide embeddings)")
    tr.add_argument("--lr", type=float, default=None,
                    help=f"Adam learning rate (default: {d['lr']:g}; {e['lr']:g} for slide embeddings)")
    tr.add_argument("--weight-decay", type=float, default=None,
                    help=f"Adam weight decay (default: {d['weight_decay']:g}; {e['weight_decay']:g} for slide "
                         "embeddings)")
    tr.add_argument("--seed", type=int, default=d["seed"], help="seed of the folds, initialisation and order")
    tr.add_argument("--hidden", type=int, default=None, help="width of the patch embedding (default: the model's)")
    tr.add_argument("--dropout", type=float, default=None, help="dropout (default: the model's)")
    tr.add_argument("--val-fraction", type=float, default=None,
                    help=f"share of each fold's training patients that picks the best epoch (0: last epoch; "
                         f"default: {d['val_fraction']:g}, {e['val_fraction']:g} for slide embeddings)")
    tr.add_argument("--max-patches", type=int, default=None, help="random patches per bag per step (default: all)")
    tr.add_argument("--bootstrap", type=int, default=d["n_bootstrap"], help="bootstrap resamples of the CIs")
    tr.add_argument("--heatmaps", type=int, default=4, help="slides to draw attention heatmaps for (0: none)")
    tr.add_argument("--top-patches", type=int, default=16, help="patches on each contact sheet")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_run_train)

    e = msub.add_parser("eval", help="predict (and score) slides with a trained run",
                        description="Predict slides with the fold models of a `pathvl mil train` run; with labels, "
                                    "also metrics with bootstrap CIs. Slides of the run's own test folds are "
                                    "predicted by their fold's model, others by the mean of all folds.",
                        epilog=EVAL_EXAMPLE, formatter_class=_Formatter)
    e.add_argument("--run", required=True, help="run folder of `pathvl mil train`")
    e.add_argument("--dataset", default=None, help="dataset folder embedded with the run's features")
    e.add_argument("--slide-embeddings", default=None, help="slide embeddings (for a run trained on them)")
    e.add_argument("--labels", default=None, help="optional label file, for metrics")
    e.add_argument("--slide-column", default=None, help="column of slide ids of --labels")
    e.add_argument("--label-column", default=None, help="column of labels of --labels")
    e.add_argument("--out", default=None, help="output folder (default: RUN/eval-<dataset name>)")
    e.add_argument("--heatmaps", type=int, default=4, help="slides to draw attention heatmaps for (0: none)")
    e.add_argument("--top-patches", type=int, default=16, help="patches on each contact sheet")
    e.add_argument("--bootstrap", type=int, default=d["n_bootstrap"], help="bootstrap resamples of the CIs")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=_run_eval)

    m = msub.add_parser("embed", help="slide embeddings of a PathFLIP/PathAlign run, for a linear head",
                        description="Embed every slide of a dataset with a trained slide model (PathFLIP, PathAlign) "
                                    "and write one array per slide id to an .npz, the input of "
                                    "`pathvl mil train --slide-embeddings`.",
                        epilog="example:\n  pathvl mil embed --checkpoint runs/pathflip-cpu --dataset data/grid "
                               "--out slides.npz\n  pathvl mil train --slide-embeddings slides.npz --labels labels.csv "
                               "--out runs/linear\n", formatter_class=_Formatter)
    m.add_argument("--checkpoint", required=True, help="run folder of a slide model")
    m.add_argument("--dataset", required=True, help="dataset folder embedded with the run's features")
    m.add_argument("--out", required=True, help="the .npz to write")
    m.set_defaults(func=_run_embed)


def _run_embed(a: argparse.Namespace) -> int:
    from pathvl.eval.loading import load_for_eval
    from pathvl.eval.slides import save_slide_embeddings

    ev = load_for_eval(a.checkpoint, kind="slide")
    path = save_slide_embeddings(ev, a.dataset, a.out)
    print(f"slide embeddings of {ev.family} ({ev.source}): {path}")
    return 0


def _run_root(a: argparse.Namespace) -> int:
    if a.list:
        from pathvl.eval.slide_benchmarks import describe_benchmarks

        print(describe_benchmarks())
        return 0
    a.mil_parser.print_help()
    return 2


class _PrintWarnings(warnings.catch_warnings):
    """Show pathvl's MIL warnings as one line each on stderr (``pathvl mil: warning: ...``)."""

    def __enter__(self):
        out = super().__enter__()
        from pathvl.eval.mil import MILWarning

        warnings.simplefilter("always", MILWarning)

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, MILWarning):
                print(f"pathvl mil: warning: {message}", file=sys.stderr)
            else:
                print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)

        warnings.showwarning = show
        return out


def _labels(a: argparse.Namespace, task: str):
    from pathvl.eval.mil import MILError, read_labels

    if a.benchmark:
        from pathvl.eval.slide_benchmarks import benchmark_labels

        return benchmark_labels(a.benchmark, root=a.root, labels=a.labels, target=a.target)
    if not a.labels:
        raise MILError("give --labels FILE (or --benchmark NAME --root DIR)")
    return read_labels(a.labels, slide_column=a.slide_column, label_column=a.label_column,
                       patient_column=getattr(a, "patient_column", None), task=task)


def _run_train(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from pathvl.eval.mil import MILConfig, MILError, train_mil

    if a.slide_embeddings is None and (a.dataset is None or a.features is None):
        raise MILError("give --dataset and --features (patch features), or --slide-embeddings FILE")
    emb = a.slide_embeddings is not None
    base = MILConfig.linear_head() if emb else MILConfig(model=a.model)
    over = {"epochs": a.epochs, "lr": a.lr, "weight_decay": a.weight_decay, "val_fraction": a.val_fraction}
    cfg = replace(base, folds=a.folds, seed=a.seed, hidden=a.hidden, dropout=a.dropout, max_patches=a.max_patches,
                  n_bootstrap=a.bootstrap, **{k: v for k, v in over.items() if v is not None})
    with _PrintWarnings():
        labels = _labels(a, a.task)
        res = train_mil(a.dataset, a.features, labels, a.out, cfg=cfg, mag=a.mag, splits=a.splits,
                        slide_embeddings=a.slide_embeddings, heatmaps=a.heatmaps, top_k=a.top_patches,
                        progress=not a.no_progress, benchmark=a.benchmark)
    print(res.summary())
    print(f"splits: {Path(a.out) / 'splits.json'}  (reuse with --splits)")
    return 0


def _run_eval(a: argparse.Namespace) -> int:
    from pathvl.eval.mil import evaluate_mil, read_labels, read_run

    cfg = read_run(a.run)
    with _PrintWarnings():
        labels = None
        if a.labels:
            task = "regression" if cfg["task"] == "regression" else "classification"
            labels = read_labels(a.labels, slide_column=a.slide_column, label_column=a.label_column, task=task)
        res = evaluate_mil(a.run, a.dataset, labels, a.out, slide_embeddings=a.slide_embeddings,
                           heatmaps=a.heatmaps, top_k=a.top_patches, n_bootstrap=a.bootstrap,
                           progress=not a.no_progress)
    pooled = res.metrics.get("pooled")
    line = f"predicted {len(res.predictions)} slide(s) with {res.splits['k']} fold model(s)"
    if pooled:
        ci = pooled.get("ci", {})
        parts = []
        for k, v in pooled["metrics"].items():
            if v is None:
                continue
            lo, hi = ci.get(k, [None, None])
            parts.append(f"{k} {v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""))
        line += ": " + ", ".join(parts)
    print(line)
    print(f"predictions: {res.run_dir / 'predictions.csv'}" + (f"  metrics: {res.run_dir / 'metrics.json'}"
                                                              if pooled else ""))
    if res.heatmaps:
        print(f"heatmaps: {len(res.heatmaps)} PNG(s) in {res.heatmaps[0].parent}")
    return 0
