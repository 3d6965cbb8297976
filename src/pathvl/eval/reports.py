"""Generated reports: for a batch of slides, for one slide of a dataset (written to files), for every slide
of a dataset scored against reference reports (BLEU-1..4, ROUGE-L, METEOR, CIDEr from pycocoevalcap, per
slide and overall: :func:`dataset_reports`, :func:`write_report_table`).

Any generative slide model writes: PathAlign (stage 1 with its Q-Former decoder, stage 2 through its LM)
and PathFLIP-instruct (its default instruction, "Describe this slide.", unless a prompt is given).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pathvl.data.slidedata import pad_slides
from pathvl.models.pathalign import PathAlign, build_prompt

__all__ = ["dataset_reports", "evaluate_reports", "generate_reports", "write_report_table", "write_slide_report"]


def _is_stage1_pathalign(model: Any) -> bool:
    return isinstance(model, PathAlign) and model.bridge is None


def _prompt_record(model: Any, context: str | None, prompt: str | None) -> str | None:
    """The prompt the model's LM saw (None for a stage-1 PathAlign, which has no LM)."""
    if _is_stage1_pathalign(model):
        return None
    if isinstance(model, PathAlign):
        return build_prompt(model.cfg, context, prompt)
    text = getattr(model, "prompt_text", None)
    return text(prompt, context) if callable(text) else prompt


def _stage(model: Any) -> int | None:
    return getattr(getattr(model, "cfg", None), "stage", None)


@torch.no_grad()
def generate_reports(model: Any, features: Tensor, mask: Tensor | None = None,
                     prompt: str | Sequence[str] | None = None, max_new_tokens: int = 64, num_beams: int = 1, *,
                     context: str | Sequence[str | None] | None = None, pos: Tensor | None = None,
                     length_penalty: float = 1.0, decoding: Any = None) -> list[str]:
    """Generated reports for a batch of slides.

    A stage-2 model writes through its LM after the prompt (``prompt`` or ``cfg.prompt``, with the
    clinical ``context`` put first through ``cfg.context_template``); a stage-1 model writes with its
    Q-Former ITG decoder and ignores prompt and context. A PathFLIP-instruct model answers ``prompt`` (its
    default instruction when None).

    Args:
        model: A PathAlign or PathFLIP-instruct model.
        features: ``(B, N, D)`` patch features.
        mask: ``(B, N)`` True for real patches.
        prompt: One prompt, or one per slide.
        max_new_tokens: Longest report in tokens.
        num_beams: 1 = greedy, more = beam search.
        context: Clinical context, one string or one per slide.
        pos: ``(B, N, 2)`` patch centres in [0, 1] (models with position features).
        length_penalty: Beam-search length normalisation exponent.
        decoding: A :class:`pathvl.models.lm_bridge.Decoding` (greedy, sampling or beam search) in place of
            ``max_new_tokens``/``num_beams``/``length_penalty``.

    Returns:
        One report per slide.
    """
    was = model.training
    model.eval()
    try:
        if decoding is not None and not _is_stage1_pathalign(model):
            from pathvl.eval.vqa import generate_answers

            B = features.shape[0]
            prompts = [prompt] * B if prompt is None or isinstance(prompt, str) else list(prompt)
            ctx = [context] * B if context is None or isinstance(context, str) else list(context)
            return generate_answers(model, features, mask, pos, prompts, decoding, ctx)
        if decoding is not None:
            if decoding.do_sample:
                from pathvl.eval.loading import EvalError

                raise EvalError("a stage-1 PathAlign model writes with its Q-Former decoder, greedy or beam search; "
                                "sampling needs the LM of stage 2")
            d = decoding
            max_new_tokens, num_beams, length_penalty = d.max_new_tokens, d.num_beams, d.length_penalty
        return model.generate(features, mask, pos, prompt, context, max_new_tokens, num_beams, length_penalty)
    finally:
        model.train(was)


def write_slide_report(model: Any, dataset: Any, slide: int | str, out_dir: str | Path, *,
                       prompt: str | None = None, context: str | None = None, max_new_tokens: int = 64,
                       num_beams: int = 1, decoding: Any = None) -> Path:
    """Writes the generated report of one slide of a dataset to ``out_dir/<slide_id>.report.json``
    (and the text alone to ``<slide_id>.report.txt``).

    Args:
        model: A PathAlign or PathFLIP-instruct model.
        dataset: A :class:`ReportDataset` or :class:`~pathvl.data.slidedata.SlideDataset`.
        slide: Index or slide id.
        out_dir: Output folder (created).
        prompt: Stage 2: the instruction (default ``cfg.prompt``).
        context: Stage 2: clinical context (default: the dataset's, if any).
        max_new_tokens: Longest report.
        num_beams: Beam width.
        decoding: Full decoding options (:class:`pathvl.models.lm_bridge.Decoding`), overriding the two above.

    Returns:
        The JSON path (the text is beside it, ``<slide_id>.report.txt``). It holds ``slide_id``, ``report``,
        ``reference`` (the dataset's report), ``prompt``
        (stage 2), the decoding settings and the model stage.

    Raises:
        KeyError: No such slide.
    """
    from pathvl.eval.report import atomic_path, write_json

    ids = list(dataset.slide_ids)
    if isinstance(slide, str):
        if slide not in ids:
            raise KeyError(f"slide {slide!r} is not in the dataset ({len(ids)} slides)")
        index = ids.index(slide)
    else:
        index = int(slide)
        if not 0 <= index < len(ids):
            raise KeyError(f"slide index {index} out of range (0..{len(ids) - 1})")
    item = dataset[index]
    b = pad_slides([item])
    ctx = context if context is not None else (item.get("context") or None)
    if _is_stage1_pathalign(model):
        ctx = None
    report = generate_reports(model, b["features"], b["patch_mask"], prompt, max_new_tokens, num_beams,
                              context=ctx, pos=b["pos"], decoding=decoding)[0]
    sid = str(item.get("slide_id", ids[index]))
    dec = ({k: getattr(decoding, k) for k in ("num_beams", "max_new_tokens", "do_sample", "temperature", "top_k",
                                              "top_p", "seed")}
           if decoding is not None else {"num_beams": num_beams, "max_new_tokens": max_new_tokens})
    rec = {
        "slide_id": sid, "report": report, "reference": item.get("caption") or None,
        "prompt": _prompt_record(model, ctx, prompt), "stage": _stage(model), "decoding": dec,
    }
    out = Path(out_dir)
    path = write_json(out / f"{sid}.report.json", rec)
    with atomic_path(out / f"{sid}.report.txt") as tmp:
        tmp.write_text(report + "\n", encoding="utf-8")
    return path


def evaluate_reports(model: Any, dataset: Any, batch_size: int = 8, max_new_tokens: int = 64,
                     num_beams: int = 1, meteor: bool | None = None) -> dict[str, Any]:
    """Generates a report for every slide and scores it against the dataset's report.

    Returns:
        ``{"metrics": caption_metrics(...), "reports": [{"slide_id", "report", "reference"}, ...]}``.
    """
    from pathvl.eval.captioning import caption_metrics

    rows = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        b = pad_slides(items)
        ctx = None if _is_stage1_pathalign(model) else [it.get("context") or None for it in items]
        texts = generate_reports(model, b["features"], b["patch_mask"], None, max_new_tokens, num_beams,
                                 context=ctx, pos=b["pos"])
        rows += [{"slide_id": it["slide_id"], "report": t, "reference": it["caption"]} for it, t in zip(items, texts)]
    metrics = caption_metrics([r["report"] for r in rows], [r["reference"] for r in rows], meteor=meteor)
    return {"metrics": metrics, "reports": rows}


def dataset_reports(ev: Any, dataset: str | Path, references: str | Path | dict[str, str] | None = None, *,
                    slide_ids: Sequence[str] | None = None, prompt: str | None = None,
                    contexts: str | Path | dict[str, str] | None = None, decoding: Any = None, batch_size: int = 8,
                    meteor: bool | None = None) -> dict[str, Any]:
    """``pathvl report --all``: a report for every slide of a dataset, scored against reference reports.

    Slides are read as the model was trained (its features and magnifications, at most its
    ``data.max_patches`` patches evenly spaced). Scores are :func:`pathvl.eval.captioning.report_scores`:
    BLEU-1..4, ROUGE-L, CIDEr-D and METEOR (where Java runs) from pycocoevalcap, per slide and over the slides
    that have a reference.

    Args:
        ev: A loaded model (:func:`pathvl.eval.loading.load_for_eval`) that writes (``generate``).
        dataset: Embedded dataset folder.
        references: CSV/JSONL of slide id and report (or ``{slide_id: report}``); slides without one are
            written but not scored. A reference naming a slide the dataset lacks is an error.
        slide_ids: Restrict to these slides (default: every slide of the dataset).
        prompt: The instruction (stage-2 PathAlign, PathFLIP-instruct); default the model's own.
        contexts: Clinical context per slide (CSV/JSONL with a ``context`` column, or a dict).
        decoding: A :class:`pathvl.models.lm_bridge.Decoding` (default greedy, 64 tokens).
        batch_size: Slides per generation batch.
        meteor: Compute METEOR (None: where it runs).

    Returns:
        ``{"rows": [{"slide_id", "report", "reference", <metric>: value, ...}], "overall": {...} or None,
        "metrics": [...], "implementation": ..., "n_slides", "n_scored"}``.

    Raises:
        EvalError: The model does not write, or references name unknown slides.
    """
    from pathvl.data.dataset import Dataset
    from pathvl.data.reports import read_reports
    from pathvl.data.slidedata import SlideDataset, read_slide_texts
    from pathvl.eval.captioning import report_scores
    from pathvl.eval.loading import EvalError
    from pathvl.models.lm_bridge import Decoding

    model = ev.model
    if not callable(getattr(model, "generate", None)):
        raise EvalError(f"{ev.source}: a {ev.family} model does not write reports (train PathAlign or "
                        "pathflip-instruct)")
    known = Dataset(dataset).slide_ids()
    ids = list(slide_ids) if slide_ids is not None else list(known)
    refs: dict[str, str] = {}
    if references is not None:
        refs = ({str(k): str(v) for k, v in references.items()} if isinstance(references, dict)
                else {k: t.caption for k, t in read_reports(references).items()})
        unknown = sorted(set(refs) - set(known))
        if unknown:
            raise EvalError(f"{references}: {len(unknown)} reference(s) name slides that are not in {dataset} "
                            f"(e.g. {unknown[:3]})")
    ctx: dict[str, str] = {}
    if contexts is not None:
        ctx = (dict(contexts) if isinstance(contexts, dict)
               else {k: t.caption for k, t in read_slide_texts(contexts, text_column="context").items()})
    slides = SlideDataset(dataset, None, ev.features, slide_ids=ids, max_patches=ev.max_patches, n_subcaptions=1,
                          decomposer=lambda c: [c], mags=ev.mags, train=False)
    d = decoding or Decoding()
    rows: list[dict[str, Any]] = []
    for start in range(0, len(slides), batch_size):
        items = [slides[i] for i in range(start, min(len(slides), start + batch_size))]
        b = pad_slides(items)
        c = None if _is_stage1_pathalign(model) else [ctx.get(it["slide_id"]) for it in items]
        texts = generate_reports(model, b["features"], b["patch_mask"], prompt, context=c, pos=b["pos"], decoding=d)
        rows += [{"slide_id": it["slide_id"], "report": t, "reference": refs.get(it["slide_id"], "")}
                 for it, t in zip(items, texts)]
    scored = [r for r in rows if r["reference"].strip()]
    out: dict[str, Any] = {"rows": rows, "overall": None, "metrics": [], "n_slides": len(rows),
                           "n_scored": len(scored), "implementation": None,
                           "decoding": {k: getattr(d, k) for k in ("max_new_tokens", "num_beams", "do_sample",
                                                                   "temperature", "top_k", "top_p", "seed")}}
    if scored:
        sc = report_scores([r["report"] for r in scored], [r["reference"] for r in scored], meteor=meteor)
        for r, m in zip(scored, sc["per_report"]):
            r.update(m)
        out.update(overall=sc["overall"], metrics=sc["metrics"], implementation=sc["implementation"])
    return out


def write_report_table(out_dir: str | Path, result: dict[str, Any], name: str = "reports") -> dict[str, Path]:
    """Writes :func:`dataset_reports` as ``<name>.csv`` (one row per slide: report, reference, every metric;
    a last row ``overall``), ``<name>.json`` and ``<name>.md`` (the metric table, per slide and overall).

    Returns:
        ``{"csv": path, "json": path, "markdown": path}``.
    """
    import csv

    from pathvl.eval.report import atomic_path, write_json

    out = Path(out_dir)
    metrics = list(result["metrics"])
    cols = ["slide_id", *metrics, "report", "reference"]
    with atomic_path(out / f"{name}.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: r.get(k, "") for k in cols})
        if result["overall"]:
            w.writerow({"slide_id": "overall", **{k: result["overall"][k] for k in metrics}})
    paths = {"csv": out / f"{name}.csv", "json": write_json(out / f"{name}.json", result)}
    lines = [f"# Generated reports: {result['n_slides']} slides, {result['n_scored']} with a reference", ""]
    if metrics:
        lines += [f"Scores by {result['implementation']} (texts lower-cased, punctuation removed); BLEU overall "
                  "pools the n-gram counts of the set, CIDEr-D uses the document frequencies of the set.", ""]
        lines += ["| slide | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
        for r in result["rows"]:
            if r["reference"].strip():
                lines.append(f"| {r['slide_id']} | " + " | ".join(f"{r[k]:.4f}" for k in metrics) + " |")
        lines.append("| **overall** | " + " | ".join(f"**{result['overall'][k]:.4f}**" for k in metrics) + " |")
    else:
        lines.append("No reference reports were given: nothing is scored.")
    with atomic_path(out / f"{name}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["markdown"] = out / f"{name}.md"
    return paths
