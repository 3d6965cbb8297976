"""Generated reports: for a batch of slides, for one slide of a dataset (written to files), and scored
against the dataset's reports over a whole set (BLEU, ROUGE-L, METEOR where it runs offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pathvl.data.slidedata import pad_slides
from pathvl.models.pathalign import PathAlign, build_prompt


@torch.no_grad()
def generate_reports(model: PathAlign, features: Tensor, mask: Tensor | None = None,
                     prompt: str | Sequence[str] | None = None, max_new_tokens: int = 64, num_beams: int = 1, *,
                     context: str | Sequence[str | None] | None = None, pos: Tensor | None = None,
                     length_penalty: float = 1.0) -> list[str]:
    """Generated reports for a batch of slides.

    A stage-2 model writes through its LM after the prompt (``prompt`` or ``cfg.prompt``, with the
    clinical ``context`` put first through ``cfg.context_template``); a stage-1 model writes with its
    Q-Former ITG decoder and ignores prompt and context.

    Args:
        model: A PathAlign model.
        features: ``(B, N, D)`` patch features.
        mask: ``(B, N)`` True for real patches.
        prompt: One prompt, or one per slide.
        max_new_tokens: Longest report in tokens.
        num_beams: 1 = greedy, more = beam search.
        context: Clinical context, one string or one per slide.
        pos: ``(B, N, 2)`` patch centres in [0, 1] (models with position features).
        length_penalty: Beam-search length normalisation exponent.

    Returns:
        One report per slide.
    """
    was = model.training
    model.eval()
    try:
        return model.generate(features, mask, pos, prompt, context, max_new_tokens, num_beams, length_penalty)
    finally:
        model.train(was)


def write_slide_report(model: PathAlign, dataset: Any, slide: int | str, out_dir: str | Path, *,
                       prompt: str | None = None, context: str | None = None, max_new_tokens: int = 64,
                       num_beams: int = 1) -> Path:
    """Writes the generated report of one slide of a dataset to ``out_dir/<slide_id>.report.json``
    (and the text alone to ``<slide_id>.report.txt``).

    Args:
        model: A PathAlign model.
        dataset: A :class:`ReportDataset` or :class:`~pathvl.data.slidedata.SlideDataset`.
        slide: Index or slide id.
        out_dir: Output folder (created).
        prompt: Stage 2: the instruction (default ``cfg.prompt``).
        context: Stage 2: clinical context (default: the dataset's, if any).
        max_new_tokens: Longest report.
        num_beams: Beam width.

    Returns:
        The JSON path. It holds ``slide_id``, ``report``, ``reference`` (the dataset's report), ``prompt``
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
    report = generate_reports(model, b["features"], b["patch_mask"], prompt, max_new_tokens, num_beams,
                              context=None if model.cfg.stage == 1 else ctx, pos=b["pos"])[0]
    sid = str(item.get("slide_id", ids[index]))
    rec = {
        "slide_id": sid, "report": report, "reference": item.get("caption"),
        "prompt": build_prompt(model.cfg, ctx, prompt) if model.cfg.stage == 2 else None,
        "stage": model.cfg.stage, "decoding": {"num_beams": num_beams, "max_new_tokens": max_new_tokens},
    }
    out = Path(out_dir)
    path = write_json(out / f"{sid}.report.json", rec)
    with atomic_path(out / f"{sid}.report.txt") as tmp:
        tmp.write_text(report + "\n", encoding="utf-8")
    return path


def evaluate_reports(model: PathAlign, dataset: Any, batch_size: int = 8, max_new_tokens: int = 64,
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
        ctx = [it.get("context") or None for it in items] if model.cfg.stage == 2 else None
        texts = generate_reports(model, b["features"], b["patch_mask"], None, max_new_tokens, num_beams,
                                 context=ctx, pos=b["pos"])
        rows += [{"slide_id": it["slide_id"], "report": t, "reference": it["caption"]} for it, t in zip(items, texts)]
    metrics = caption_metrics([r["report"] for r in rows], [r["reference"] for r in rows], meteor=meteor)
    return {"metrics": metrics, "reports": rows}
