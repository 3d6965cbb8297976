"""Commands that make a slide model write: ``pathvl report`` (PathAlign)."""

from __future__ import annotations

import argparse

from pathvl.cli import _Formatter


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write a generated pathology report for a slide (PathAlign)",
                       description="Generate the report of one embedded slide with a PathAlign model.",
                       epilog="example:\n  pathvl report slide-01 --dataset data/grid --checkpoint runs/pathalign "
                              "--reports reports.csv\n", formatter_class=_Formatter)
    p.add_argument("slide", help="slide id in the dataset")
    p.add_argument("--dataset", required=True, help="dataset folder (embedded)")
    p.add_argument("--checkpoint", required=True, help="PathAlign run folder (stage 1 or 2)")
    p.add_argument("--reports", default=None, help="CSV/JSONL of slide_id,text (reference reports), optional")
    p.add_argument("--context", default=None, help="clinical context for the prompt (stage 2)")
    p.add_argument("--beams", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest report")
    p.add_argument("--out", default="reports", help="output folder")
    p.set_defaults(func=_run_report)


def _run_report(a: argparse.Namespace) -> int:
    from pathvl.data.reports import build_report_dataset
    from pathvl.eval.loading import EvalError, load_for_eval
    from pathvl.eval.reports import write_slide_report

    ev = load_for_eval(a.checkpoint, kind="slide")
    if not callable(getattr(ev.model, "generate", None)):
        raise EvalError(f"{a.checkpoint}: a {ev.family} model does not write reports (train PathAlign)")
    reports = a.reports if a.reports else {a.slide: "(no reference report given)"}
    ds = build_report_dataset(a.dataset, reports, ev.features, slide_ids=[a.slide], mags=ev.mags, train=False,
                              max_patches=ev.max_patches)
    path = write_slide_report(ev.model, ds, a.slide, a.out, context=a.context, max_new_tokens=a.max_new_tokens,
                              num_beams=a.beams)
    print(f"report: {path.with_suffix('').with_suffix('.txt')}  ({path})")
    return 0


def register(sub) -> None:
    _add_report(sub)
