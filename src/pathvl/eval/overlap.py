"""Evaluation slides that the model was trained on: found, warned about, and recorded in the report.

Pretraining reads every slide of ``data.dataset`` (there is no held-out split inside a dataset), so an
evaluation slide is a training slide when it comes from the same slide file: the same resolved source path
in both manifests, or the same slide id when the evaluation dataset is the training dataset itself. Scores
on such slides are not held-out results; the report says so and a warning goes to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["note_training_overlap", "training_overlap"]


def _sources(manifest: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for sid, rec in manifest.get("slides", {}).items():
        if isinstance(rec, Mapping) and rec.get("path"):
            out[sid] = str(Path(rec["path"]).resolve())
    return out


def training_overlap(config: Any, dataset: str | Path, slide_ids: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Evaluation slides of ``dataset`` that the run of ``config`` trained on.

    Args:
        config: The run's resolved training config (``EvalModel.config``); ``None`` (an in-process model or a
            published VLM) gives ``None``.
        dataset: The evaluation dataset folder.
        slide_ids: The slides evaluated (default: every tiled slide of ``dataset``).

    Returns:
        ``None`` when nothing overlaps or the training dataset cannot be read (moved away); else
        ``{"training_dataset", "slides": [ids], "n_overlap", "n_evaluated"}``.
    """
    from pathvl.data.files import DatasetError
    from pathvl.data.manifest import read_manifest

    train_root = getattr(getattr(config, "data", None), "dataset", "") if config is not None else ""
    if not train_root:
        return None
    try:
        train = read_manifest(Path(train_root))
        evald = read_manifest(Path(dataset))
    except (DatasetError, OSError):
        return None
    ids = list(slide_ids) if slide_ids is not None else sorted(evald.get("slides", {}))
    if Path(train_root).resolve() == Path(dataset).resolve():
        trained = set(train.get("slides", {}))
        both = [s for s in ids if s in trained]
    else:
        train_src = set(_sources(train).values())
        eval_src = _sources(evald)
        both = [s for s in ids if eval_src.get(s) in train_src]
    if not both:
        return None
    return {"training_dataset": str(train_root), "slides": both, "n_overlap": len(both), "n_evaluated": len(ids)}


def note_training_overlap(report: dict[str, Any], config: Any, dataset: str | Path,
                          slide_ids: Sequence[str] | None = None, *, warn: bool = True) -> dict[str, Any]:
    """Add ``training_overlap`` and a line in ``warnings`` to ``report`` when evaluation slides were trained on.

    Prints the same line to stderr (``warn``). Returns ``report``.
    """
    ov = training_overlap(config, dataset, slide_ids)
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
