"""Segmentation metrics: the pixel confusion matrix, IoU and Dice per class and their means, and the
Markdown table of a report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pathvl.eval.segment.common import IGNORE_INDEX, SegmentError


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """Pixel confusion matrix ``(K, K)`` int64: rows are true classes, columns predicted ones.

    Args:
        pred: Predicted class ids, any shape.
        target: True class ids, the same shape; pixels equal to ``ignore_index`` are left out.
        num_classes: ``K``.
        ignore_index: The unlabelled id (None: every pixel counts).

    Raises:
        SegmentError: Shapes differ, or an id outside ``0..K-1`` (other than ``ignore_index``).
    """
    p = np.asarray(pred).astype(np.int64, copy=False).ravel()
    t = np.asarray(target).astype(np.int64, copy=False).ravel()
    if np.shape(pred) != np.shape(target):
        raise SegmentError(f"prediction shape {np.shape(pred)} differs from target shape {np.shape(target)}")
    keep = np.ones_like(t, dtype=bool) if ignore_index is None else t != ignore_index
    p, t = p[keep], t[keep]
    for name, a in (("target", t), ("prediction", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            bad = int(a[(a < 0) | (a >= num_classes)][0])
            raise SegmentError(f"{name} holds class id {bad}, outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """IoU and Dice per class, their means over the classes that occur, and pixel accuracy.

    Args:
        cm: ``(K, K)`` confusion matrix (rows true, columns predicted), e.g. summed over a data set.
        class_names: Name of each class (default: the ids).

    Returns:
        ``{"miou", "mdice", "pixel_accuracy", "n_pixels", "per_class": [{"name", "iou", "dice", "pixels",
        "predicted"}], "confusion_matrix"}``; a class with no true and no predicted pixel has IoU and Dice
        None and is left out of the means.
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(union > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = cm.sum()

    def mean(v: np.ndarray) -> float | None:
        return float(np.nanmean(v)) if np.isfinite(v).any() else None

    def opt(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    return {
        "miou": mean(iou),
        "mdice": mean(dice),
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "n_pixels": int(total),
        "per_class": [{"name": names[i], "iou": opt(iou[i]), "dice": opt(dice[i]), "pixels": int(cm[i].sum()),
                       "predicted": int(cm[:, i].sum())} for i in range(k)],
        "confusion_matrix": cm.tolist(),
    }


def _markdown(report: Mapping[str, Any], title: str) -> str:
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"# {title}", "", f"{report['n_pixels']} labelled pixels, {len(report['per_class'])} classes.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(report.get(k))} |" for k in ("miou", "mdice", "pixel_accuracy")]
    lines += ["", "## Per class", "", "| class | IoU | Dice | true pixels | predicted pixels |",
              "|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {fmt(c['iou'])} | {fmt(c['dice'])} | {c['pixels']} | {c['predicted']} |"
              for c in report["per_class"]]
    return "\n".join(lines) + "\n"
