"""Slide-level metrics with bootstrap CIs, their summary over folds, and the rows of ``predictions.csv``.

Metrics come from :mod:`pathvl.eval.metrics`: balanced accuracy, weighted F1 and AUROC, or MSE, Pearson r
and R^2 for a continuous target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pathvl.eval import metrics as M
from pathvl.eval.mil.labels import SlideLabels


def _mse(t: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(t, float) - np.asarray(p, float)) ** 2))


def _pearson(t: np.ndarray, p: np.ndarray) -> float:
    t, p = np.asarray(t, float), np.asarray(p, float)
    if t.std() == 0 or p.std() == 0:
        return math.nan
    return float(np.corrcoef(t, p)[0, 1])


def _r2(t: np.ndarray, p: np.ndarray) -> float:
    t, p = np.asarray(t, float), np.asarray(p, float)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return math.nan if ss_tot == 0 else 1.0 - float(((t - p) ** 2).sum()) / ss_tot


def _nan_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def slide_metrics(task: str, y_true: np.ndarray, scores: np.ndarray, class_names: Sequence[str] = (),
                  n_bootstrap: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Slide-level metrics with percentile bootstrap CIs (:func:`pathvl.eval.metrics.bootstrap_ci`).

    Args:
        task: ``classification`` or ``regression``.
        y_true: Class indices (N,) or targets (N,).
        scores: Class probabilities (N, C) or predicted values (N,).
        class_names: Names of the classes (classification).
        n_bootstrap: Resamples for the CIs (0: none); stratified by class for classification.
        seed: Bootstrap seed.
        alpha: 1 - confidence level.

    Returns:
        ``{"n", "task", "metrics": {name: value}, "ci": {name: [low, high]}, ...}``: balanced_accuracy,
        f1_weighted and auroc (the positive class ``class_names[1]`` for two classes, one-vs-rest macro
        for more) plus the full :func:`~pathvl.eval.metrics.classification_report` under ``report``; or
        mse, pearson_r and r2. A metric undefined on these slides (one class only) is None.
    """
    t = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    out: dict[str, Any] = {"n": len(t), "task": task}
    if task == "classification":
        pred = s.argmax(axis=1)
        fns: dict[str, tuple[Callable, np.ndarray]] = {
            "balanced_accuracy": (M.balanced_accuracy, pred), "f1_weighted": (M.weighted_f1, pred)}
        if len(np.unique(t)) >= 2:
            if s.shape[1] == 2:
                fns["auroc"] = (lambda a, b: M.roc_auc_binary(a, b[:, 1], pos_label=1), s)
            else:
                fns["auroc"] = (lambda a, b: M.roc_auc_ovr(a, b), s)
        out["class_names"] = list(class_names)
        if s.shape[1] == 2:
            out["positive_class"] = class_names[1] if len(class_names) > 1 else 1
        out["metrics"] = {k: _nan_none(fn(t, y)) for k, (fn, y) in fns.items()}
        if "auroc" not in fns:
            out["metrics"]["auroc"] = None
        out["report"] = M.classification_report(t.astype(np.int64), pred.astype(np.int64), s,
                                                class_names=list(class_names) or None)
        stratified = True
    else:
        p = s.reshape(-1)
        fns = {"mse": (_mse, p), "pearson_r": (_pearson, p), "r2": (_r2, p)}
        out["metrics"] = {k: _nan_none(fn(t, y)) for k, (fn, y) in fns.items()}
        stratified = False
    if n_bootstrap > 0 and len(t) > 1:
        ci: dict[str, Any] = {"alpha": alpha, "n_bootstrap": n_bootstrap, "stratified": stratified}
        for k, (fn, y) in fns.items():
            try:
                with np.errstate(all="ignore"):
                    _, lo, hi = M.bootstrap_ci(fn, t, y, n=n_bootstrap, alpha=alpha, seed=seed, stratified=stratified,
                                               skip_missing_classes=task == "classification")
                ci[k] = [_nan_none(lo), _nan_none(hi)]
            except ValueError:
                ci[k] = [None, None]
        out["ci"] = ci
    return out


def _fold_summary(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    names = sorted({k for f in per_fold for k in f["metrics"]})
    out = {}
    for k in names:
        v = [f["metrics"][k] for f in per_fold if f["metrics"].get(k) is not None]
        out[k] = {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v)) if v else None, "n_folds": len(v)}
    return out


def _prediction_rows(labels: SlideLabels, ids: Sequence[str], scores: np.ndarray, extra: Mapping[str, Any],
                     with_truth: bool = True) -> list[dict[str, Any]]:
    pats = dict(zip(labels.slide_ids, labels.patients)) if labels.patients is not None else {}
    pos = {s: i for i, s in enumerate(labels.slide_ids)}
    rows = []
    for j, sid in enumerate(ids):
        r: dict[str, Any] = {"slide_id": sid}
        if pats:
            r["patient"] = pats.get(sid, "")
        r.update(extra)
        if with_truth and sid in pos:
            r["label"] = labels.value(pos[sid])
        if labels.task == "classification":
            r["prediction"] = labels.class_names[int(np.argmax(scores[j]))]
            for c, name in enumerate(labels.class_names):
                r[f"prob_{name}"] = float(scores[j, c])
        else:
            r["prediction"] = float(scores[j])
        rows.append(r)
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
