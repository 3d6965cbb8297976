"""Commands that make a slide model write: ``pathvl report`` (one slide or a whole dataset, scored),
``pathvl ask`` (a question about a slide) and ``pathvl vqa`` (a question file, multiple-choice accuracy)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pathvl.cli import _Formatter


def _add_decoding(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("decoding (greedy by default)")
    g.add_argument("--beams", type=int, default=1, help="beam width (1 = greedy; >1 = beam search)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this probability")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length ** this")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="longest answer in tokens")


def _decoding(a: argparse.Namespace):
    from pathvl.eval.vqa import decoding_from

    try:
        return decoding_from(a.max_new_tokens, a.beams, a.sample, a.temperature, a.top_k, a.top_p, a.seed,
                             a.length_penalty)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _load_writer(checkpoint: str):
    from pathvl.eval.loading import EvalError, load_for_eval

    ev = load_for_eval(checkpoint, kind="slide")
    if not callable(getattr(ev.model, "generate", None)):
        raise EvalError(f"{checkpoint}: a {ev.family} model does not write text (train PathAlign or "
                        "pathflip-instruct)")
    return ev


# ----------------------------------------------------------------------------------------------- report
REPORT_EXAMPLE = """example:
  pathvl report slide-01 --dataset data/grid --checkpoint runs/pathalign --reports reports.csv
  pathvl report --all --dataset data/grid --checkpoint runs/pathalign --references reports.csv --out eval/
  pathvl report --all --dataset data/grid --checkpoint runs/pathflip-instruct --beams 3
--all writes reports.csv (per slide: BLEU-1..4, ROUGE-L, METEOR, CIDEr and the texts; last row overall),
reports.json and reports.md; scores are pycocoevalcap's.
"""


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write generated pathology reports (PathAlign, pathflip-instruct)",
                       description="Generate the report of one embedded slide, or of every slide of a dataset "
                                   "scored against reference reports.",
                       epilog=REPORT_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("slide", nargs="?", help="slide id in the dataset (or --all)")
    p.add_argument("--all", action="store_true", help="every slide of the dataset, scored against --references")
    p.add_argument("--dataset", required=True, help="dataset folder (embedded)")
    p.add_argument("--checkpoint", required=True, help="PathAlign (stage 1 or 2) or pathflip-instruct run folder")
    p.add_argument("--reports", "--references", dest="references", default=None,
                   help="CSV/JSONL of slide_id,report (reference reports), optional")
    p.add_argument("--context", default=None, help="clinical context for the prompt (stage 2)")
    p.add_argument("--contexts", default=None, help="--all: CSV/JSONL of slide_id,context")
    p.add_argument("--prompt", default=None, help="instruction given to the LM (default: the model's own)")
    p.add_argument("--batch-size", type=int, default=8, help="--all: slides per generation batch")
    p.add_argument("--no-meteor", action="store_true", help="--all: skip METEOR (it starts a Java process)")
    _add_decoding(p, 64)
    p.add_argument("--out", default="reports", help="output folder")
    p.set_defaults(func=_run_report)


def _run_report(a: argparse.Namespace) -> int:
    from pathvl.data.reports import build_report_dataset

    if a.all == bool(a.slide):
        raise argparse.ArgumentTypeError("give one SLIDE id or --all")
    ev = _load_writer(a.checkpoint)
    dec = _decoding(a)
    if a.all:
        from pathvl.eval.reports import dataset_reports, write_report_table

        res = dataset_reports(ev, a.dataset, a.references, prompt=a.prompt, contexts=a.contexts, decoding=dec,
                              batch_size=max(1, a.batch_size), meteor=False if a.no_meteor else None)
        paths = write_report_table(a.out, res)
        if res["overall"]:
            print("overall (" + f"{res['n_scored']} of {res['n_slides']} slides scored): "
                  + ", ".join(f"{k} {res['overall'][k]:.4f}" for k in res["metrics"]))
        else:
            print(f"{res['n_slides']} reports written; no references given, nothing scored")
        print(f"reports: {paths['csv']}  (table {paths['markdown']}, all values {paths['json']})")
        return 0
    from pathvl.eval.reports import write_slide_report

    reports = a.references if a.references else {a.slide: "(no reference report given)"}
    ds = build_report_dataset(a.dataset, reports, ev.features, slide_ids=[a.slide], mags=ev.mags, train=False,
                              max_patches=ev.max_patches)
    path = write_slide_report(ev.model, ds, a.slide, a.out, prompt=a.prompt, context=a.context, decoding=dec)
    print(f"report: {path.with_name(f'{a.slide}.report.txt')}  ({path})")
    return 0


# ----------------------------------------------------------------------------------------------- ask
ASK_EXAMPLE = """example:
  pathvl ask slide-01 --dataset data/grid --checkpoint runs/pathflip-instruct "Which tissue dominates?"
  pathvl ask slide-01 --dataset data/grid --checkpoint runs/pathalign-s2 "Describe the tumour." --beams 3
  pathvl ask slide-01 --dataset data/grid --checkpoint RUN "What is shown?" --sample --top-p 0.9 --seed 1
"""


def _add_ask(sub) -> None:
    p = sub.add_parser("ask", help="ask an instruction-following slide model a question about a slide",
                       description="Answer a free-text question about one embedded slide (pathflip-instruct, "
                                   "PathAlign stage 2); the answer is printed.",
                       epilog=ASK_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("slide", help="slide id in the dataset")
    p.add_argument("question", help="the question or instruction")
    p.add_argument("--dataset", required=True, help="dataset folder (embedded)")
    p.add_argument("--checkpoint", required=True, help="pathflip-instruct or PathAlign stage-2 run folder")
    p.add_argument("--context", default=None, help="clinical context put before the question")
    _add_decoding(p, 64)
    p.set_defaults(func=_run_ask)


def _run_ask(a: argparse.Namespace) -> int:
    from pathvl.data.dataset import Dataset
    from pathvl.data.instructions import resolve_slide_ids
    from pathvl.data.slidedata import SlideDataset, pad_slides
    from pathvl.eval.vqa import generate_answers

    ev = _load_writer(a.checkpoint)
    dec = _decoding(a)
    sid = resolve_slide_ids([{"slide": a.slide}], Dataset(a.dataset).slide_ids())[0]
    ds = SlideDataset(a.dataset, None, ev.features, slide_ids=[sid], max_patches=ev.max_patches, n_subcaptions=1,
                      decomposer=lambda c: [c], mags=ev.mags, train=False)
    b = pad_slides([ds[0]])
    answer = generate_answers(ev.model, b["features"], b["patch_mask"], b["pos"], [a.question], dec,
                              [a.context])[0]
    print(answer)
    return 0


# ----------------------------------------------------------------------------------------------- vqa
VQA_EXAMPLE = """example:
  pathvl vqa --checkpoint runs/pathflip-instruct --dataset data/tcga --questions "SlideBench-VQA (TCGA).csv"
  pathvl vqa --checkpoint runs/pathflip-instruct --dataset data/bcnb --questions bcnb.csv --out eval/bcnb
  pathvl vqa --checkpoint runs/pathalign-s2 --dataset data/grid --questions questions.jsonl
questions: SlideBench-style tables (ID, Slide, Question, A-D, Answer) or JSON/JSONL instructions; accuracy is
the exact match of the option letter; every answer is written to <questions>.answers.csv (or --out).
"""


def _add_vqa(sub) -> None:
    p = sub.add_parser("vqa", help="answer a question file; multiple-choice accuracy (SlideBench, BCNB)",
                       description="Answer every question of a file about the slides of a dataset; score the "
                                   "multiple-choice ones by exact match of the option letter.",
                       epilog=VQA_EXAMPLE, formatter_class=_Formatter)
    p.add_argument("--checkpoint", required=True, help="pathflip-instruct or PathAlign stage-2 run folder")
    p.add_argument("--dataset", required=True, help="dataset folder (embedded)")
    p.add_argument("--questions", required=True, help="SlideBench-style CSV/TSV/XLSX or JSON/JSONL questions")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generation batch")
    p.add_argument("--out", default=None, help="folder for answers.csv and vqa.json (default: beside the questions)")
    _add_decoding(p, 16)
    p.set_defaults(func=_run_vqa)


def _run_vqa(a: argparse.Namespace) -> int:
    from pathvl.eval.report import write_json
    from pathvl.eval.vqa import run_vqa

    ev = _load_writer(a.checkpoint)
    q = Path(a.questions)
    out_csv = Path(a.out) / f"{q.stem}.answers.csv" if a.out else None
    res = run_vqa(ev, a.dataset, q, _decoding(a), batch_size=max(1, a.batch_size), out_csv=out_csv)
    res["model"] = ev.describe()
    summary = Path(res["answers"]).with_name(f"{q.stem}.vqa.json")
    write_json(summary, res)
    if res["accuracy"] is not None:
        print(f"multiple-choice accuracy {res['accuracy']:.4f} ({res['n_mcq']} questions, "
              f"{res['parsed']:.0%} of replies name an option)")
        for cat, v in res["per_category"].items():
            print(f"  {cat}: {v['accuracy']:.4f} ({v['n']})")
    if res["n_open"]:
        print(f"{res['n_open']} open-ended answers written")
    print(f"answers: {res['answers']}  (summary {summary})", file=sys.stdout)
    return 0


def register(sub) -> None:
    _add_report(sub)
    _add_ask(sub)
    _add_vqa(sub)
