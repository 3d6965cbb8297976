"""Classification metrics written in numpy, with bootstrap confidence intervals.

Every metric here is checked against scikit-learn in ``tests/test_metrics.py``; they are written
out so that their conventions are visible and fixed, not inherited from a library version:

- Labels are any sortable values. Unless ``labels`` is given, the label set is the sorted union of
  the values in ``y_true`` and ``y_pred`` (scikit-learn's convention).
- A class with neither true nor predicted samples gets precision, recall and F1 of 0 when it is
  named in ``labels`` (scikit-learn's ``zero_division=0``).
- Balanced accuracy is the mean recall over the classes present in ``y_true``.
- AUROC uses the Mann-Whitney form with average ranks, which equals the trapezoidal area under
  the ROC curve, ties included. Multi-class AUROC is the macro average of one-vs-rest AUROCs
  or the Hand and Till (2001) one-vs-one average, over the classes present in ``y_true``.

The headline metric for zero-shot tile classification in this field is weighted F1, with balanced
accuracy beside it (CONCH, Lu et al., Nature Medicine 2024); :func:`classification_report` gives
both and everything else in one dictionary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "bootstrap_ci",
    "classification_report",
    "cohen_kappa",
    "confusion_matrix",
    "f1_score",
    "macro_f1",
    "precision_recall_f1",
    "roc_auc",
    "roc_auc_binary",
    "roc_auc_ovo",
    "roc_auc_ovr",
    "roc_auc_per_class",
    "weighted_f1",
]


def _as_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _as_1d(y_true, "y_true")
    p = _as_1d(y_pred, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length: {len(t)} != {len(p)}")
    if len(t) == 0:
        raise ValueError("y_true is empty")
    return t, p


def _encode(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[Any] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map labels to 0..C-1; returns (true codes, pred codes, label values)."""
    if labels is None:
        values = np.union1d(y_true, y_pred)
    else:
        values = np.asarray(labels)
        if values.ndim != 1 or len(values) == 0:
            raise ValueError("labels must be a non-empty one-dimensional sequence")
        if len(np.unique(values)) != len(values):
            raise ValueError(f"labels must be unique, got {values.tolist()}")
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    codes = []
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        pos = np.searchsorted(sorted_values, y)
        pos = np.clip(pos, 0, len(sorted_values) - 1)
        bad = sorted_values[pos] != y
        if bad.any():
            extra = sorted(set(np.asarray(y)[bad].tolist()))
            raise ValueError(f"{name} holds values not in labels: {extra} (labels: {values.tolist()})")
        codes.append(order[pos])
    return codes[0], codes[1], values


def confusion_matrix(
    y_true: Any, y_pred: Any, labels: Sequence[Any] | np.ndarray | None = None
) -> np.ndarray:
    """Counts of (true, predicted) label pairs.

    Args:
        y_true: True labels, shape (N,).
        y_pred: Predicted labels, shape (N,).
        labels: Label values in the order of the rows and columns; by default the sorted union of
            the labels seen. A value outside ``labels`` raises ValueError.

    Returns:
        int64 array (C, C): rows are true classes, columns predicted classes.
    """
    t, p = _check_pair(y_true, y_pred)
    ti, pi, values = _encode(t, p, labels)
    c = len(values)
    return np.bincount(ti * c + pi, minlength=c * c).reshape(c, c).astype(np.int64)


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of samples whose prediction equals the true label."""
    t, p = _check_pair(y_true, y_pred)
    return float(np.mean(t == p))


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean recall over the classes present in ``y_true`` (Brodersen et al., ICPR 2010)."""
    cm = confusion_matrix(y_true, y_pred)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def precision_recall_f1(
    y_true: Any, y_pred: Any, labels: Sequence[Any] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support (true count), 0 where undefined.

    Args:
        y_true: True labels, shape (N,).
        y_pred: Predicted labels, shape (N,).
        labels: Classes to report, in order; by default the sorted union of the labels seen.

    Returns:
        Four float arrays (C,), the last one holding integer supports.
    """
    cm = confusion_matrix(y_true, y_pred, labels)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def f1_score(
    y_true: Any,
    y_pred: Any,
    average: str | None = "weighted",
    labels: Sequence[Any] | np.ndarray | None = None,
) -> float | np.ndarray:
    """F1 score, per class or averaged.

    Args:
        y_true: True labels, shape (N,).
        y_pred: Predicted labels, shape (N,).
        average: ``"weighted"`` (mean weighted by support, the field's headline zero-shot metric),
            ``"macro"`` (plain mean over ``labels``) or None (per-class array).
        labels: Classes to include; by default the sorted union of the labels seen.

    Returns:
        A float, or an array (C,) when ``average`` is None.
    """
    _, _, f1, support = precision_recall_f1(y_true, y_pred, labels)
    if average is None:
        return f1
    if average == "macro":
        return float(f1.mean())
    if average == "weighted":
        total = support.sum()
        return float((f1 * support).sum() / total) if total > 0 else 0.0
    raise ValueError(f"average must be 'weighted', 'macro' or None, got {average!r}")


def weighted_f1(y_true: Any, y_pred: Any) -> float:
    """F1 averaged over classes weighted by their support."""
    return float(f1_score(y_true, y_pred, average="weighted"))


def macro_f1(y_true: Any, y_pred: Any) -> float:
    """Unweighted mean F1 over the labels seen in ``y_true`` or ``y_pred``."""
    return float(f1_score(y_true, y_pred, average="macro"))


def cohen_kappa(
    y_true: Any,
    y_pred: Any,
    weights: str | None = None,
    labels: Sequence[Any] | np.ndarray | None = None,
) -> float:
    """Cohen's kappa, optionally weighted for ordinal classes (Cohen 1960; Cohen 1968).

    Args:
        y_true: True labels, shape (N,).
        y_pred: Predicted labels, shape (N,).
        weights: None (unweighted), ``"linear"`` (|i - j|) or ``"quadratic"`` ((i - j) ** 2), where
            i and j are positions in ``labels``. Pass ``labels`` explicitly for ordinal grades so a
            grade missing from the data still counts in the distances.
        labels: Label values in order; by default the sorted union of the labels seen.

    Returns:
        Kappa in [-1, 1]; NaN when chance agreement is total (one class everywhere).
    """
    cm = confusion_matrix(y_true, y_pred, labels).astype(np.float64)
    c = cm.shape[0]
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / cm.sum()
    i, j = np.indices((c, c))
    if weights is None:
        w = (i != j).astype(np.float64)
    elif weights == "linear":
        w = np.abs(i - j).astype(np.float64)
    elif weights == "quadratic":
        w = ((i - j) ** 2).astype(np.float64)
    else:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
    den = (w * expected).sum()
    if den == 0:
        return math.nan
    return float(1.0 - (w * cm).sum() / den)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC is undefined when y_true holds only one class")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _check_scores(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape[0] != n:
        raise ValueError(f"scores have {s.shape[0]} rows but y_true has {n} samples")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores hold NaN or infinite values")
    return s


def roc_auc_binary(y_true: Any, scores: Any, pos_label: Any = 1) -> float:
    """Area under the ROC curve for a binary task.

    Args:
        y_true: True labels, shape (N,); ``pos_label`` marks the positive class, every other
            value is negative.
        scores: Scores for the positive class, shape (N,); higher means more positive.
        pos_label: The positive label.

    Returns:
        AUROC in [0, 1]. Raises ValueError when only one class is present.
    """
    t = _as_1d(y_true, "y_true")
    s = _check_scores(scores, len(t))
    if s.ndim != 1:
        raise ValueError(f"binary scores must be one-dimensional, got shape {s.shape}")
    return _binary_auc(t == pos_label, s)


def _multiclass_inputs(
    y_true: Any, scores: Any, labels: Sequence[Any] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    t = _as_1d(y_true, "y_true")
    s = _check_scores(scores, len(t))
    if s.ndim != 2:
        raise ValueError(f"multi-class scores must have shape (N, C), got {s.shape}")
    values = np.arange(s.shape[1]) if labels is None else np.asarray(labels)
    if len(values) != s.shape[1]:
        raise ValueError(f"{len(values)} labels for {s.shape[1]} score columns")
    codes, _, _ = _encode(t, t, values)
    return codes, s


def roc_auc_per_class(
    y_true: Any, scores: Any, labels: Sequence[Any] | np.ndarray | None = None
) -> np.ndarray:
    """One-vs-rest AUROC of each column of a score matrix.

    Args:
        y_true: True labels, shape (N,).
        scores: Score matrix (N, C); column k scores class ``labels[k]``.
        labels: Label of each column; by default 0..C-1.

    Returns:
        float array (C,), NaN for a class absent from ``y_true`` (or the only one present).
    """
    codes, s = _multiclass_inputs(y_true, scores, labels)
    out = np.full(s.shape[1], np.nan)
    for k in range(s.shape[1]):
        positive = codes == k
        if 0 < positive.sum() < len(positive):
            out[k] = _binary_auc(positive, s[:, k])
    return out


def roc_auc_ovr(y_true: Any, scores: Any, labels: Sequence[Any] | np.ndarray | None = None) -> float:
    """Macro one-vs-rest AUROC over the classes present in ``y_true``.

    Args:
        y_true: True labels, shape (N,).
        scores: Score matrix (N, C) (probabilities or logits; each column is ranked on its own).
        labels: Label of each column; by default 0..C-1.
    """
    per_class = roc_auc_per_class(y_true, scores, labels)
    defined = per_class[~np.isnan(per_class)]
    if len(defined) == 0:
        raise ValueError("AUROC is undefined when y_true holds only one class")
    return float(defined.mean())


def roc_auc_ovo(y_true: Any, scores: Any, labels: Sequence[Any] | np.ndarray | None = None) -> float:
    """Macro one-vs-one AUROC (Hand and Till, Machine Learning 2001).

    For each pair of classes (a, b) present in ``y_true``, the samples of a and b are kept and the
    AUROC of column a separating a from b is averaged with that of column b separating b from a;
    the result is the mean over pairs.

    Args:
        y_true: True labels, shape (N,).
        scores: Score matrix (N, C).
        labels: Label of each column; by default 0..C-1.
    """
    codes, s = _multiclass_inputs(y_true, scores, labels)
    present = np.unique(codes)
    if len(present) < 2:
        raise ValueError("AUROC is undefined when y_true holds only one class")
    pair_scores = []
    for ai, a in enumerate(present):
        for b in present[ai + 1 :]:
            mask = (codes == a) | (codes == b)
            sub = codes[mask]
            auc_ab = _binary_auc(sub == a, s[mask, a])
            auc_ba = _binary_auc(sub == b, s[mask, b])
            pair_scores.append((auc_ab + auc_ba) / 2.0)
    return float(np.mean(pair_scores))


def roc_auc(
    y_true: Any,
    scores: Any,
    multi_class: str = "ovr",
    labels: Sequence[Any] | np.ndarray | None = None,
) -> float:
    """AUROC for binary or multi-class scores.

    Args:
        y_true: True labels, shape (N,).
        scores: (N,) positive-class scores for a binary task (positive label 1, or ``labels[1]``);
            (N, 2) scores whose second column is the positive class; or (N, C) scores.
        multi_class: ``"ovr"`` or ``"ovo"`` for C > 2.
        labels: Label of each score column; by default 0..C-1.

    Returns:
        AUROC. For one or two score columns this is the binary AUROC of the positive column.
    """
    s = np.asarray(scores)
    if s.ndim == 1 or (s.ndim == 2 and s.shape[1] == 2):
        pos_label = 1 if labels is None else np.asarray(labels)[1]
        col = s if s.ndim == 1 else s[:, 1]
        return roc_auc_binary(y_true, col, pos_label=pos_label)
    if multi_class == "ovr":
        return roc_auc_ovr(y_true, s, labels)
    if multi_class == "ovo":
        return roc_auc_ovo(y_true, s, labels)
    raise ValueError(f"multi_class must be 'ovr' or 'ovo', got {multi_class!r}")


def _bootstrap_indices(
    rng: np.random.Generator, y_true: np.ndarray, stratified: bool
) -> np.ndarray:
    n = len(y_true)
    if not stratified:
        return rng.integers(0, n, size=n)
    parts = []
    for value in np.unique(y_true):
        members = np.flatnonzero(y_true == value)
        parts.append(members[rng.integers(0, len(members), size=len(members))])
    return np.concatenate(parts)


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    y_pred_or_scores: Any,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = False,
    skip_missing_classes: bool = True,
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of any metric (Efron and Tibshirani 1993).

    Each resample draws N samples with replacement (``stratified=True``: the same number per true
    class as in the data, drawn within each class). Resamples lacking a class present in
    ``y_true`` are skipped when ``skip_missing_classes`` is set, since AUROC (and balanced accuracy
    and macro averages) change meaning or become undefined then. Resampling is reproducible:
    ``numpy.random.default_rng(seed)`` draws the indices of resample 1, then 2, and so on.

    Args:
        metric_fn: ``metric_fn(y_true, y_pred_or_scores) -> float``.
        y_true: True labels, shape (N,).
        y_pred_or_scores: Predictions (N,) or scores (N, ...), indexed along the first axis.
        n: Number of resamples.
        alpha: 1 - confidence level (0.05 gives a 95% interval).
        seed: Seed of the resampling.
        stratified: Resample within each true class.
        skip_missing_classes: Skip resamples where a class of ``y_true`` is absent.

    Returns:
        (point, low, high): the metric on all data and the alpha/2 and 1 - alpha/2 percentiles.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    t = _as_1d(y_true, "y_true")
    y = np.asarray(y_pred_or_scores)
    if len(y) != len(t):
        raise ValueError(f"y_true and y_pred_or_scores differ in length: {len(t)} != {len(y)}")
    point = float(metric_fn(t, y))
    n_classes = len(np.unique(t))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        idx = _bootstrap_indices(rng, t, stratified)
        if skip_missing_classes and len(np.unique(t[idx])) < n_classes:
            continue
        stats.append(float(metric_fn(t[idx], y[idx])))
    if not stats:
        raise ValueError(
            f"every one of the {n} bootstrap resamples lacked a class of y_true; "
            "use stratified=True or skip_missing_classes=False"
        )
    low, high = np.quantile(np.asarray(stats), [alpha / 2.0, 1.0 - alpha / 2.0])
    return point, float(low), float(high)


def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def classification_report(
    y_true: Any,
    y_pred: Any,
    scores: Any = None,
    class_names: Sequence[str] | None = None,
    n_bootstrap: int = 0,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
    ordinal: bool = False,
) -> dict[str, Any]:
    """Every metric of this module for integer labels 0..C-1, as a JSON-ready dictionary.

    Args:
        y_true: True class indices, shape (N,).
        y_pred: Predicted class indices, shape (N,).
        scores: Optional scores (N, C) (or (N,) positive-class scores for two classes) for AUROC.
        class_names: Name of each class index; sets C. By default C comes from ``scores`` or the
            largest label and names are the indices.
        n_bootstrap: Number of bootstrap resamples for confidence intervals (0: none).
        alpha: 1 - confidence level of the intervals.
        seed: Bootstrap seed; every metric uses the same resamples.
        stratified: Stratify the bootstrap by true class.
        ordinal: The classes are ordered grades (Gleason, ...): add the linearly and quadratically
            weighted kappas, which mean nothing for nominal classes.

    Returns:
        A dict with ``n``, ``class_names``, ``metrics`` (accuracy, balanced_accuracy, f1_weighted,
        f1_macro, kappa (unweighted), kappa_linear and kappa_quadratic when ``ordinal``, and auroc for two classes or
        auroc_ovr_macro and auroc_ovo_macro for more), ``per_class`` (precision, recall, f1,
        support, auroc per class), ``confusion_matrix`` (rows true, columns predicted), and ``ci``
        ({metric: [low, high]} plus ``alpha``, ``n_bootstrap``, ``stratified``) when
        ``n_bootstrap`` > 0, and ``notes``: plain sentences where a figure needs a caveat (a zero-width
        interval, a class absent from the data). Undefined values are None.
    """
    t, p = _check_pair(y_true, y_pred)
    for name, arr in (("y_true", t), ("y_pred", p)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    s = None if scores is None else np.asarray(scores, dtype=np.float64)
    if class_names is not None:
        c = len(class_names)
    elif s is not None and s.ndim == 2:
        c = s.shape[1]
    else:
        c = int(max(t.max(), p.max())) + 1
    names = [str(x) for x in class_names] if class_names is not None else [str(i) for i in range(c)]
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.min() < 0 or arr.max() >= c:
            raise ValueError(f"{name} holds class indices outside 0..{c - 1} ({c} classes)")
    if s is not None and s.ndim == 2 and s.shape[1] != c:
        raise ValueError(f"scores have {s.shape[1]} columns for {c} classes")
    labels = np.arange(c)

    metric_fns: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], np.ndarray]] = {
        "accuracy": (accuracy, p),
        "balanced_accuracy": (balanced_accuracy, p),
        "f1_weighted": (weighted_f1, p),
        "f1_macro": (macro_f1, p),
        "kappa": (lambda a, b: cohen_kappa(a, b, None, labels), p),
    }
    if ordinal:
        metric_fns["kappa_linear"] = (lambda a, b: cohen_kappa(a, b, "linear", labels), p)
        metric_fns["kappa_quadratic"] = (lambda a, b: cohen_kappa(a, b, "quadratic", labels), p)
    n_present = len(np.unique(t))
    if s is not None and n_present >= 2:
        if c <= 2:
            metric_fns["auroc"] = (lambda a, b: roc_auc(a, b), s)
        else:
            metric_fns["auroc_ovr_macro"] = (lambda a, b: roc_auc_ovr(a, b), s)
            metric_fns["auroc_ovo_macro"] = (lambda a, b: roc_auc_ovo(a, b), s)

    metrics = {k: _none_if_nan(fn(t, y)) for k, (fn, y) in metric_fns.items()}
    precision, recall, f1, support = precision_recall_f1(t, p, labels)
    if s is not None and s.ndim == 2 and c > 2:
        auc_per_class = roc_auc_per_class(t, s)
    else:
        auc_per_class = np.full(c, np.nan)
    seen = np.isin(labels, np.union1d(t, p))
    per_class = [
        {
            "name": names[k],
            "precision": float(precision[k]) if seen[k] else None,
            "recall": float(recall[k]) if support[k] > 0 else None,
            "f1": float(f1[k]) if seen[k] else None,
            "support": int(support[k]),
            "auroc": _none_if_nan(float(auc_per_class[k])),
        }
        for k in range(c)
    ]
    report: dict[str, Any] = {
        "n": len(t),
        "num_classes": c,
        "class_names": names,
        "metrics": metrics,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(t, p, labels).tolist(),
    }
    notes: list[str] = []
    absent = [names[k] for k in range(c) if support[k] == 0]
    if absent:
        notes.append(f"classes without samples in the data: {absent} (their recall and AUROC are undefined)")
    if n_bootstrap > 0:
        ci: dict[str, Any] = {"alpha": alpha, "n_bootstrap": n_bootstrap, "stratified": stratified}
        flat = []
        for k, (fn, y) in metric_fns.items():
            _, low, high = bootstrap_ci(fn, t, y, n=n_bootstrap, alpha=alpha, seed=seed, stratified=stratified)
            ci[k] = [_none_if_nan(low), _none_if_nan(high)]
            if ci[k][0] is not None and ci[k][0] == ci[k][1]:
                flat.append(k)
        report["ci"] = ci
        if flat:
            why = (" (a stratified bootstrap keeps every class's count, so a predictor that is right or wrong on "
                   "whole classes gives every resample the same value)" if stratified else "")
            notes.append(f"zero-width {int(100 * (1 - alpha))}% intervals for {flat}: every resample of the "
                         f"{len(t)} samples gave the same value{why}; the interval says nothing about their "
                         "uncertainty: report more samples")
    report["notes"] = notes
    return report
