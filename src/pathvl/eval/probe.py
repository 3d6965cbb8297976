"""Linear probes and few-shot classification on frozen embeddings.

Linear probe: L2-regularised logistic regression (scikit-learn, lbfgs) on frozen image
embeddings, its inverse regularisation strength C chosen on a validation split from a log grid
(CLIP's protocol, Radford et al., ICML 2021, appendix A.3, which sweeps 1e-6..1e6; the grid here is
coarser to stay fast), then optionally refitted on train + validation.

Few-shot: k labelled examples per class drawn from the training set, repeated over seeds, each
run scored on the full test set; the mean and standard deviation of each metric are reported
(the few-shot protocol of CONCH, Lu et al., Nature Medicine 2024, and UNI, Chen et al., Nature
Medicine 2024). The classifier is the same logistic regression with a fixed C, or SimpleShot's
nearest centroid (Wang et al., arXiv:1911.04623, 2019).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathvl.eval import metrics as M

__all__ = [
    "DEFAULT_C_GRID",
    "DEFAULT_KS",
    "LinearProbe",
    "few_shot",
    "fit_linear_probe",
    "linear_probe",
    "nearest_centroid",
    "sample_k_shot",
    "stratified_split",
]

DEFAULT_C_GRID: tuple[float, ...] = tuple(float(10.0**e) for e in range(-6, 6))
"""Inverse regularisation strengths swept by default: 1e-6, 1e-5, ..., 1e5."""
DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)

Metric = Callable[[np.ndarray, np.ndarray], float]
_METRICS: dict[str, Metric] = {
    "accuracy": M.accuracy,
    "balanced_accuracy": M.balanced_accuracy,
    "f1_weighted": M.weighted_f1,
    "f1_macro": M.macro_f1,
}


def _metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    try:
        return _METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(_METRICS)}") from None


def _xy(x: Any, y: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y)
    if xa.ndim != 2:
        raise ValueError(f"{name} embeddings must have shape (N, D), got {xa.shape}")
    if ya.ndim != 1 or len(ya) != len(xa):
        raise ValueError(f"{name} labels must have shape ({len(xa)},), got {ya.shape}")
    if not np.issubdtype(ya.dtype, np.integer):
        raise ValueError(f"{name} labels must be integer class indices, got dtype {ya.dtype}")
    if not np.all(np.isfinite(xa)):
        raise ValueError(f"{name} embeddings hold NaN or infinite values")
    return xa, ya.astype(np.int64)


def _logreg(C: float, max_iter: int, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs", random_state=seed)


def _fit(model: Any, x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # expected at the ends of the C grid (nearly separable data, tiny C); the sweep judges them
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def stratified_split(y: Any, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) holding ``val_fraction`` of each class in val (at least one per class
    with two or more members).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ya = np.asarray(y)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(ya):
        members = rng.permutation(np.flatnonzero(ya == c))
        n_val = round(len(members) * val_fraction)
        n_val = min(max(n_val, 1 if len(members) >= 2 else 0), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass
class LinearProbe:
    """A fitted probe.

    Attributes:
        model: The fitted scikit-learn LogisticRegression.
        C: The chosen inverse regularisation strength.
        num_classes: Number of classes (columns of :meth:`predict_proba`).
        val_scores: Validation metric for each C tried ({} when C was given).
        metric: Name of the selection metric.
        refit: Whether the final model was refitted on train + validation.
    """

    model: Any
    C: float
    num_classes: int
    val_scores: dict[float, float] = field(default_factory=dict)
    metric: str = "balanced_accuracy"
    refit: bool = False

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities (N, num_classes); 0 for classes absent from the training data."""
        xa = np.asarray(x, dtype=np.float64)
        out = np.zeros((len(xa), self.num_classes))
        out[:, self.model.classes_] = self.model.predict_proba(xa)
        return out

    def predict(self, x: Any) -> np.ndarray:
        """Predicted class indices (N,)."""
        return np.asarray(self.model.predict(np.asarray(x, dtype=np.float64)), dtype=np.int64)

    def evaluate(
        self, x: Any, y: Any, class_names: Sequence[str] | None = None, n_bootstrap: int = 0, seed: int = 0,
        ids: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """:func:`pathvl.eval.metrics.classification_report` on (x, y), plus the probe's settings and the
        per-item ``predictions`` (true, predicted, class probabilities; ``ids`` name the items, default the
        row numbers), which :func:`pathvl.eval.report.write_report` writes to a CSV."""
        from pathvl.eval.report import prediction_records

        xa, ya = _xy(x, y, "test")
        names = class_names if class_names is not None else [str(i) for i in range(self.num_classes)]
        pred, proba = self.predict(xa), self.predict_proba(xa)
        report = M.classification_report(ya, pred, proba, class_names=names, n_bootstrap=n_bootstrap, seed=seed)
        report["predictions"] = prediction_records(ids, ya, pred, proba, names, "logistic-regression probability")
        report["probe"] = {
            "C": self.C, "metric": self.metric, "refit_on_train_and_val": self.refit,
            "val_scores": {f"{c:g}": s for c, s in self.val_scores.items()},
        }
        return report


def fit_linear_probe(
    x_train: Any,
    y_train: Any,
    x_val: Any = None,
    y_val: Any = None,
    C: float | None = None,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    metric: str | Metric = "balanced_accuracy",
    val_fraction: float = 0.2,
    refit: bool = True,
    max_iter: int = 1000,
    seed: int = 0,
    num_classes: int | None = None,
) -> LinearProbe:
    """Fit a logistic-regression probe, choosing C on validation data (CLIP, Radford et al. 2021).

    Args:
        x_train: Training embeddings (N, D).
        y_train: Training class indices (N,).
        x_val: Validation embeddings; when absent and ``C`` is None, a stratified ``val_fraction``
            of the training data is held out.
        y_val: Validation class indices.
        C: Use this C and skip the sweep.
        C_grid: Values of C to try; the best validation score wins, ties going to the smaller C
            (stronger regularisation).
        metric: Selection metric: a name (accuracy, balanced_accuracy, f1_weighted, f1_macro) or a
            function ``(y_true, y_pred) -> float``.
        val_fraction: Fraction held out when no validation data is given.
        refit: Refit with the chosen C on train + validation.
        max_iter: lbfgs iterations.
        seed: Seed of the held-out split and the solver.
        num_classes: Number of classes; default: largest label + 1.

    Returns:
        The fitted :class:`LinearProbe`.
    """
    xt, yt = _xy(x_train, y_train, "train")
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    score = _metric(metric)
    n_cls = int(num_classes if num_classes is not None else yt.max() + 1)
    if len(np.unique(yt)) < 2:
        raise ValueError(f"a probe needs at least two classes in the training labels, got {np.unique(yt).tolist()}")
    if C is not None:
        if x_val is not None and refit:
            xv, yv = _xy(x_val, y_val, "val")
            xt, yt = np.concatenate([xt, xv]), np.concatenate([yt, yv])
        model = _fit(_logreg(C, max_iter, seed), xt, yt)
        return LinearProbe(model, float(C), n_cls, {}, metric_name, refit=x_val is not None and refit)
    if x_val is None:
        if y_val is not None:
            raise ValueError("y_val given without x_val")
        tr, va = stratified_split(yt, val_fraction, seed)
        xt, yt, xv, yv = xt[tr], yt[tr], xt[va], yt[va]
    else:
        xv, yv = _xy(x_val, y_val, "val")
    if len(C_grid) == 0:
        raise ValueError("C_grid is empty")
    val_scores: dict[float, float] = {}
    best: tuple[float, float, Any] | None = None
    for c in sorted(float(v) for v in C_grid):
        model = _fit(_logreg(c, max_iter, seed), xt, yt)
        s = float(score(yv, model.predict(xv)))
        val_scores[c] = s
        if best is None or s > best[0]:
            best = (s, c, model)
    assert best is not None
    _, best_c, model = best
    if refit:
        model = _fit(_logreg(best_c, max_iter, seed), np.concatenate([xt, xv]), np.concatenate([yt, yv]))
    return LinearProbe(model, best_c, n_cls, val_scores, metric_name, refit=refit)


def linear_probe(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    x_val: Any = None,
    y_val: Any = None,
    class_names: Sequence[str] | None = None,
    n_bootstrap: int = 0,
    ids: Sequence[str] | None = None,
    **fit_kwargs: Any,
) -> dict[str, Any]:
    """Fit a probe (:func:`fit_linear_probe`) and report it on the test set.

    Returns:
        The classification report of the test set with a ``probe`` entry (C, validation scores) and the
        per-test-item ``predictions`` (named by ``ids``).
    """
    n_cls = len(class_names) if class_names is not None else None
    probe = fit_linear_probe(x_train, y_train, x_val, y_val, num_classes=n_cls, **fit_kwargs)
    return probe.evaluate(x_test, y_test, class_names=class_names, n_bootstrap=n_bootstrap, ids=ids)


def sample_k_shot(y: Any, k: int, seed: int = 0, classes: Sequence[int] | None = None) -> np.ndarray:
    """Indices of exactly ``k`` examples of each class, drawn without replacement.

    With one seed, the k-shot set is contained in the 2k-shot set (each class's members are
    permuted once and the first k taken).

    Args:
        y: Class index of each example (N,).
        k: Examples per class.
        seed: Seed of the draw.
        classes: Classes to draw from; default: every class in ``y``.

    Raises:
        ValueError: naming the class, when a class has fewer than ``k`` examples.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ya = np.asarray(y)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in (np.unique(ya) if classes is None else classes):
        members = np.flatnonzero(ya == c)
        if len(members) < k:
            raise ValueError(f"class {c} has {len(members)} examples, fewer than k={k}")
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen))


def nearest_centroid(x_train: Any, y_train: Any, x_test: Any) -> tuple[np.ndarray, np.ndarray]:
    """SimpleShot (Wang et al. 2019): centre on the training mean, L2-normalise, nearest class mean.

    Returns:
        (pred (N,), scores (N, C)) where scores are negative Euclidean distances to the class
        centroids (C = largest training label + 1; absent classes score -inf).
    """
    xt, yt = _xy(x_train, y_train, "train")
    xq = np.asarray(x_test, dtype=np.float64)
    mean = xt.mean(axis=0)

    def prep(a: np.ndarray) -> np.ndarray:
        a = a - mean
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    xt, xq = prep(xt), prep(xq)
    n_cls = int(yt.max()) + 1
    scores = np.full((len(xq), n_cls), -np.inf)
    for c in np.unique(yt):
        centroid = xt[yt == c].mean(axis=0)
        scores[:, c] = -np.linalg.norm(xq - centroid, axis=1)
    return scores.argmax(axis=1), scores


def few_shot(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    ks: Sequence[int] = DEFAULT_KS,
    n_seeds: int = 5,
    method: str = "logreg",
    C: float = 1.0,
    metrics: Sequence[str] = ("accuracy", "balanced_accuracy", "f1_weighted", "f1_macro"),
    seed: int = 0,
    max_iter: int = 1000,
) -> dict[str, Any]:
    """k-shot classification over repeated draws (CONCH/UNI few-shot protocol).

    For each k and each of ``n_seeds`` draws (seed ``seed + i``), :func:`sample_k_shot` picks k
    training examples per class, the classifier is fitted on them and scored on the whole test set.

    Args:
        x_train: Training embeddings (N, D), the pool to draw from.
        y_train: Training class indices (N,).
        x_test: Test embeddings (M, D).
        y_test: Test class indices (M,).
        ks: Shots per class; values larger than the smallest class are skipped (recorded under
            ``skipped_ks``).
        n_seeds: Draws per k.
        method: ``"logreg"`` (logistic regression with fixed ``C``) or ``"centroid"`` (SimpleShot).
        C: Inverse regularisation strength for ``"logreg"``.
        metrics: Metric names (accuracy, balanced_accuracy, f1_weighted, f1_macro).
        seed: First seed.
        max_iter: lbfgs iterations.

    Returns:
        ``{"method", "C", "n_seeds", "skipped_ks", "ks": {k: {metric: {"mean", "std", "values"}}}}``;
        ``std`` is the population standard deviation over draws.
    """
    xt, yt = _xy(x_train, y_train, "train")
    xq, yq = _xy(x_test, y_test, "test")
    if method not in ("logreg", "centroid"):
        raise ValueError(f"method must be 'logreg' or 'centroid', got {method!r}")
    fns = {m: _metric(m) for m in metrics}
    smallest = int(np.bincount(yt)[np.unique(yt)].min())
    results: dict[int, dict[str, dict[str, Any]]] = {}
    skipped = []
    for k in ks:
        if k > smallest:
            skipped.append(int(k))
            continue
        values: dict[str, list[float]] = {m: [] for m in fns}
        for i in range(n_seeds):
            idx = sample_k_shot(yt, k, seed=seed + i)
            if method == "centroid":
                pred, _ = nearest_centroid(xt[idx], yt[idx], xq)
            else:
                pred = _fit(_logreg(C, max_iter, seed + i), xt[idx], yt[idx]).predict(xq)
            for m, fn in fns.items():
                values[m].append(float(fn(yq, pred)))
        results[int(k)] = {
            m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for m, v in values.items()
        }
    if not results:
        raise ValueError(f"every k in {list(ks)} exceeds the smallest training class ({smallest} examples)")
    return {"method": method, "C": C if method == "logreg" else None, "n_seeds": n_seeds,
            "skipped_ks": skipped, "ks": results}
