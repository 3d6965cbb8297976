"""Evaluation slides that the model was trained on: found, warned about, and recorded in the report.

Pretraining reads every slide of ``data.dataset`` (there is no held-out split inside a dataset), so an
evaluation slide is a training slide when it comes from the same slide file: the same resolved source path
in both manifests, or the same slide id when the evaluation dataset is the training dataset itself. The
checkpoint records the training slides when it is saved (``training_data`` in ``trainer.json``), so the answer
does not change when the training data is moved or deleted after training. Scores
on such slides are not held-out results; the report says so and a warning goes to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["note_training_overlap", "training_overlap"]


def _trained_on(model: Any) -> dict[str, Any] | None:
    """``{"dataset", "slide_ids", "sources"}`` of the slides ``model`` was trained on, or ``None``.

    ``model`` is an :class:`~pathvl.eval.loading.EvalModel` (its checkpoint records the training slides at save
    time, so the answer survives the training data being moved or deleted; older checkpoints fall back to
    reading the training dataset named in their config) or a resolved training config.
    """
    from pathvl.data.manifest import slides_record

    if model is None:
        return None
    recorded = getattr(model, "meta", None)
    if isinstance(recorded, Mapping) and isinstance(recorded.get("training_data"), Mapping):
        rec = recorded["training_data"]
        return {"dataset": str(rec.get("dataset", "")), "slide_ids": set(rec.get("slide_ids", ())),
                "sources": set(dict(rec.get("sources", {})).values())}
    config = getattr(model, "config", model)
    rec = slides_record(getattr(getattr(config, "data", None), "dataset", "") if config is not None else "")
    if rec is None:
        return None
    return {"dataset": rec["dataset"], "slide_ids": set(rec["slide_ids"]), "sources": set(rec["sources"].values())}


def training_overlap(model: Any, dataset: str | Path, slide_ids: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Evaluation slides of ``dataset`` that ``model`` was trained on.

    Args:
        model: An :class:`~pathvl.eval.loading.EvalModel` or its resolved training config; ``None`` (a published
            VLM) or an in-process model without a config gives ``None``.
        dataset: The evaluation dataset folder.
        slide_ids: The slides evaluated (default: every tiled slide of ``dataset``).

    Returns:
        ``None`` when nothing overlaps, or when the training slides are unknown (an older checkpoint whose
        training dataset has moved away); else ``{"training_dataset", "slides": [ids], "n_overlap",
        "n_evaluated"}``.
    """
    from pathvl.data.files import DatasetError
    from pathvl.data.manifest import read_manifest, slide_sources

    trained = _trained_on(model)
    if trained is None:
        return None
    try:
        evald = read_manifest(Path(dataset))
    except (DatasetError, OSError):
        return None
    ids = list(slide_ids) if slide_ids is not None else sorted(evald.get("slides", {}))
    if trained["dataset"] and Path(trained["dataset"]).resolve() == Path(dataset).resolve():
        both = [s for s in ids if s in trained["slide_ids"]]
    else:
        eval_src = slide_sources(evald)
        both = [s for s in ids if eval_src.get(s) in trained["sources"]]
    if not both:
        return None
    return {"training_dataset": trained["dataset"], "slides": both, "n_overlap": len(both), "n_evaluated": len(ids)}


def note_training_overlap(report: dict[str, Any], model: Any, dataset: str | Path,
                          slide_ids: Sequence[str] | None = None, *, warn: bool = True) -> dict[str, Any]:
    """Add ``training_overlap`` and a line in ``warnings`` to ``report`` when evaluation slides were trained on.

    Prints the same line to stderr (``warn``). Returns ``report``.
    """
    ov = training_overlap(model, dataset, slide_ids)
    if ov is None:
        return report
    shown = ", ".join(ov["slides"][:5]) + (f" and {ov['n_overlap'] - 5} more" if ov["n_overlap"] > 5 else "")
    line = (f"{ov['n_overlap']} of the {ov['n_evaluated']} evaluation slide(s) of {dataset} were in the training "
            f"set ({ov['training_dataset']}): {shown}; these scores are not held-out results")
    report["training_overlap"] = ov
    report.setdefault("warnings", []).append(line)
    if warn:
        print(f"pathvl: warning: {line}", file=sys.stderr)
    return report
