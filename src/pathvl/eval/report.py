"""Evaluation reports: JSON for machines, Markdown for people, PNG pictures.

A report is the dictionary :func:`pathvl.eval.metrics.classification_report` returns, optionally
with more keys (``baselines``: {name: {metric: value}}, ``config``, results per top-j, ...). Per-item
predictions (``predictions``, from :func:`prediction_records`: every tile or slide with its true and
predicted class and its class scores) are written to ``<name>_predictions.csv`` beside the JSON, so a
user can audit and re-score them; the JSON names that file instead of holding the rows.
Every file is written atomically: to ``<name>.tmp`` first, then renamed, so a reader never sees
half a report. matplotlib is imported inside the plotting functions and draws on an Agg canvas without
pyplot (no global backend switch), so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "plot_confusion_matrix",
    "plot_per_class_f1",
    "prediction_records",
    "render_markdown",
    "to_jsonable",
    "write_json",
    "write_markdown",
    "write_predictions_csv",
    "write_report",
]

# Headline metrics first, in this order; other metrics follow in the report's order.
_METRIC_ORDER = (
    "f1_weighted",
    "balanced_accuracy",
    "accuracy",
    "f1_macro",
    "auroc",
    "auroc_ovr_macro",
    "auroc_ovo_macro",
    "kappa",
    "kappa_linear",
    "kappa_quadratic",
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The parent folder is created. On an exception the temporary file is removed and ``path`` is
    left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: str | os.PathLike[str], write: Any) -> Path:
    """``write(tmp_path)`` then rename onto ``path`` (:func:`atomic_path` for a callable); returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """A CSV of ``rows`` (columns in order of first appearance, floats to 6 significant digits), atomically."""
    import csv
    import io

    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return write_atomic(path, lambda p: p.write_text(buf.getvalue(), encoding="utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars and arrays, tuples, paths and NaN/inf (to None) for strict JSON.

    Raises:
        TypeError: for an object with no JSON form, naming its type.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch tensors and the like
        return to_jsonable(obj.tolist())
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (NaN becomes null), atomically; returns the path."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def _escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_escape(_fmt(v)) for v in row) + " |" for row in rows]
    return lines


def _metric_rows(metrics: Mapping[str, Any], ci: Mapping[str, Any] | None) -> list[list[Any]]:
    names = [k for k in _METRIC_ORDER if k in metrics] + [k for k in metrics if k not in _METRIC_ORDER]
    rows = []
    for k in names:
        row: list[Any] = [k, metrics[k]]
        if ci is not None:
            interval = ci.get(k)
            row.append("n/a" if not interval else f"{_fmt(interval[0])} - {_fmt(interval[1])}")
        rows.append(row)
    return rows


_KNOWN = {"metrics", "ci", "per_class", "confusion_matrix", "class_names", "baselines", "num_classes", "n",
          "predictions"}


def _render_generic(obj: Mapping[str, Any], level: int) -> list[str]:
    lines: list[str] = []
    scalars = [(k, v) for k, v in obj.items() if not isinstance(v, (Mapping, list, tuple, np.ndarray))]
    if scalars:
        lines += [*_table(["key", "value"], scalars), ""]
    for k, v in obj.items():
        if isinstance(v, Mapping):
            lines += ["#" * min(level, 6) + f" {k}", ""]
            lines += _render_body(v, level + 1)
        elif isinstance(v, (list, tuple, np.ndarray)) and len(v) <= 20:
            lines += [f"- {k}: {', '.join(_fmt(x) for x in v) or 'none'}", ""]
    return lines


def _render_body(report: Mapping[str, Any], level: int) -> list[str]:
    lines: list[str] = []
    if "n" in report:
        lines += [f"{report['n']} samples, {report.get('num_classes', '?')} classes.", ""]
    if "metrics" in report:
        ci = report.get("ci")
        header = ["metric", "value"]
        if ci is not None:
            conf = 100 * (1 - float(ci.get("alpha", 0.05)))
            header.append(f"{conf:g}% CI ({ci.get('n_bootstrap', '?')} bootstrap resamples)")
        lines += [*_table(header, _metric_rows(report["metrics"], ci)), ""]
    if "baselines" in report:
        lines += ["#" * min(level, 6) + " Baselines", ""]
        base = report["baselines"]
        keys = sorted({m for v in base.values() for m in v})
        lines += [*_table(["baseline", *keys], [[n, *(v.get(k) for k in keys)] for n, v in base.items()]), ""]
    if "per_class" in report:
        lines += ["#" * min(level, 6) + " Per class", ""]
        cols = ["precision", "recall", "f1", "support", "auroc"]
        rows = [[c["name"], *(c.get(k) for k in cols)] for c in report["per_class"]]
        lines += [*_table(["class", *cols], rows), ""]
    if "confusion_matrix" in report:
        names = report.get("class_names") or [str(i) for i in range(len(report["confusion_matrix"]))]
        lines += ["#" * min(level, 6) + " Confusion matrix (rows: true, columns: predicted)", ""]
        rows = [[n, *r] for n, r in zip(names, report["confusion_matrix"])]
        lines += [*_table(["", *names], rows), ""]
    h = "#" * min(level, 6)
    handled = set(_KNOWN)
    if isinstance(report.get("ks"), Mapping) and "method" in report:  # few-shot (pathvl.eval.probe)
        ks = report["ks"]
        names = sorted({m for v in ks.values() for m in v})
        rows = [[k, *(f"{_fmt(v[m]['mean'])} ± {_fmt(v[m]['std'])}" if m in v else "n/a" for m in names)]
                for k, v in ks.items()]
        lines += [f"{h} Few-shot ({report['method']}, {report.get('n_seeds', '?')} draws per k; mean ± sd)", ""]
        lines += [*_table(["k per class", *names], rows), ""]
        handled.add("ks")
    directions = [d for d in ("image_to_text", "text_to_image") if isinstance(report.get(d), Mapping)]
    if directions:  # retrieval (pathvl.eval.retrieval)
        cols = list(report[directions[0]])
        ci = report.get("ci") if isinstance(report.get("ci"), Mapping) else {}

        def cell(d: str, c: str) -> Any:
            v, iv = report[d].get(c), (ci.get(d) or {}).get(c)
            return v if not iv else f"{_fmt(v)} ({_fmt(iv[0])} - {_fmt(iv[1])})"

        title = f"{h} Retrieval"
        if ci:
            title += f" (95% CI over {ci.get('n_bootstrap', '?')} bootstrap resamples of the queries)"
        lines += [title, ""]
        lines += [*_table(["direction", *cols], [[d, *(cell(d, c) for c in cols)] for d in directions]), ""]
        handled.update(directions)
    if isinstance(report.get("predictions"), Mapping) and "csv" in report["predictions"]:
        pr = report["predictions"]
        lines += [f"Per-item predictions and class scores ({pr.get('score_kind', 'scores')}): {pr['csv']}", ""]
    if isinstance(report.get("topj"), Mapping):  # slide zero-shot (pathvl.eval.zeroshot)
        topj = report["topj"]
        names = [k for k in _METRIC_ORDER if any(k in r.get("metrics", {}) for r in topj.values())]
        rows = [[j, *(r.get("metrics", {}).get(k) for k in names)] for j, r in topj.items()]
        lines += [f"{h} Slide zero-shot, top-j pooling", "", *_table(["j", *names], rows), ""]
        for j, r in topj.items():
            lines += [f"{h}# j = {j}", "", *_render_body(r, level + 2)]
        handled.add("topj")
    rest = {k: v for k, v in report.items() if k not in handled}
    if rest:
        lines += _render_generic(rest, level)
    return lines


def render_markdown(report: Mapping[str, Any], title: str | None = None) -> str:
    """Markdown for people: headline metrics (with CIs), baselines, per-class table, confusion matrix.

    Keys it does not know are rendered generically (scalars in a table, nested dicts as sections),
    so reports of few-shot runs, retrieval or slide top-j pooling render too.
    """
    lines = [f"# {title or 'Evaluation report'}", ""]
    lines += _render_body(report, level=2)
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(path: str | os.PathLike[str], report: Mapping[str, Any], title: str | None = None) -> Path:
    """Write :func:`render_markdown` of ``report`` to ``path`` atomically; returns the path."""
    text = render_markdown(report, title)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def _figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas, without pyplot's global state (no backend switching)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_confusion_matrix(
    cm: Any,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Heatmap of a confusion matrix (rows true, columns predicted) as PNG.

    Args:
        cm: Counts (C, C).
        class_names: Name of each class.
        path: Output PNG path.
        normalize: Colour by row fraction (recall) and print fraction and count in each cell.
        title: Figure title.
    """
    counts = np.asarray(cm, dtype=np.float64)
    c = counts.shape[0]
    if counts.shape != (c, c) or len(class_names) != c:
        raise ValueError(f"confusion matrix {counts.shape} does not match {len(class_names)} class names")
    rows = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    size = max(4.0, 0.6 * c + 2)
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 20:
        high = shown.max() if shown.size else 0
        for i in range(c):
            for j in range(c):
                text = f"{shown[i, j]:.2f}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
                colour = "white" if high and shown[i, j] > 0.6 * high else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    ax.set_title(title or "Confusion matrix")
    return _save_figure(fig, path)


def plot_per_class_f1(
    per_class: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Horizontal bars of per-class F1 (the ``per_class`` list of a report) as PNG."""
    names = [str(c["name"]) for c in per_class]
    f1 = [c.get("f1") for c in per_class]
    values = [0.0 if v is None else float(v) for v in f1]
    fig = _figure(6, max(2.5, 0.4 * len(names) + 1))
    ax = fig.subplots()
    ax.barh(range(len(names)), values, color="#3b75af")
    ax.set_yticks(range(len(names)), labels=names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    for i, (v, raw) in enumerate(zip(values, f1)):
        ax.text(min(v + 0.01, 0.9), i, "n/a" if raw is None else f"{v:.2f}", va="center", fontsize=8)
    ax.set_title(title or "Per-class F1")
    return _save_figure(fig, path)


def prediction_records(ids: Sequence[Any] | None, y_true: Any, y_pred: Any, scores: Any,
                       class_names: Sequence[str], score_kind: str) -> dict[str, Any]:
    """Per-item predictions for a report's ``predictions`` entry.

    Args:
        ids: A name per item (tile file, slide id); None: the row numbers.
        y_true: True class indices (N,).
        y_pred: Predicted class indices (N,).
        scores: Class scores (N, C) (probabilities for zero-shot and probes).
        class_names: The C class names.
        score_kind: What the scores are (e.g. ``softmax(logit_scale * cosine)``).
    """
    y, p = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    s = np.asarray(scores, dtype=np.float64)
    names = [str(i) for i in range(len(y))] if ids is None else [str(i) for i in ids]
    if not (len(names) == len(y) == len(p) == len(s)):
        raise ValueError(f"predictions: {len(names)} ids, {len(y)} labels, {len(p)} predictions, {len(s)} score rows")
    return {"ids": names, "y_true": y.tolist(), "y_pred": p.tolist(), "scores": s.tolist(),
            "class_names": [str(c) for c in class_names], "score_kind": score_kind}


def write_predictions_csv(path: str | os.PathLike[str], predictions: Sequence[tuple[str | None, Mapping[str, Any]]]
                          ) -> Path:
    """One CSV of per-item predictions: ``id``, (``j``,) ``true``, ``predicted``, ``correct`` and a score
    column per class (``score_<class>``); ``predictions`` is ``[(j or None, prediction_records(...)), ...]``."""
    import csv

    first = predictions[0][1]
    classes = list(first["class_names"])
    with_j = any(j is not None for j, _ in predictions)
    header = ["id", *(["j"] if with_j else []), "true", "predicted", "correct", *(f"score_{c}" for c in classes)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for j, pr in predictions:
            for i, t, q, row in zip(pr["ids"], pr["y_true"], pr["y_pred"], pr["scores"]):
                w.writerow([i, *([j] if with_j else []), classes[int(t)], classes[int(q)], int(t == q),
                            *(repr(float(v)) for v in row)])
    return Path(path)


def _split_predictions(report: Mapping[str, Any], csv_name: str) -> tuple[dict[str, Any], list]:
    """The report with each ``predictions`` entry replaced by a pointer to the CSV, and the entries."""
    found: list[tuple[str | None, Mapping[str, Any]]] = []

    def summary(pr: Mapping[str, Any]) -> dict[str, Any]:
        return {"csv": csv_name, "n": len(pr["ids"]), "score_kind": pr.get("score_kind")}

    out = dict(report)
    if isinstance(out.get("predictions"), Mapping) and "ids" in out["predictions"]:
        found.append((None, out["predictions"]))
        out["predictions"] = summary(out["predictions"])
    if isinstance(out.get("topj"), Mapping):
        topj = {}
        for j, r in out["topj"].items():
            if isinstance(r, Mapping) and isinstance(r.get("predictions"), Mapping) and "ids" in r["predictions"]:
                found.append((str(j), r["predictions"]))
                r = {**r, "predictions": summary(r["predictions"])}
            topj[j] = r
        out["topj"] = topj
    return out, found


def write_report(
    out_dir: str | os.PathLike[str],
    report: Mapping[str, Any],
    name: str = "report",
    title: str | None = None,
    pictures: bool = True,
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and, for classification reports, two PNGs.

    Args:
        out_dir: Output folder (created).
        report: A report dictionary (see module docstring).
        name: Stem of the files.
        title: Markdown heading and figure titles; defaults to ``name``.
        pictures: Also write ``<name>_confusion.png`` and ``<name>_f1.png`` when the report holds
            a confusion matrix and per-class results.

    Returns:
        {"json": path, "markdown": path, "confusion_matrix": path, "per_class_f1": path, "predictions": path},
        the pictures only when written, ``predictions`` (``<name>_predictions.csv``) when the report holds
        per-item predictions.
    """
    out = Path(out_dir)
    report, preds = _split_predictions(report, f"{name}_predictions.csv")
    paths = {
        "json": write_json(out / f"{name}.json", report),
        "markdown": write_markdown(out / f"{name}.md", report, title or name),
    }
    if pictures and "confusion_matrix" in report:
        names = report.get("class_names") or [str(i) for i in range(len(report["confusion_matrix"]))]
        paths["confusion_matrix"] = plot_confusion_matrix(
            report["confusion_matrix"], names, out / f"{name}_confusion.png", title=title
        )
    if pictures and "per_class" in report:
        paths["per_class_f1"] = plot_per_class_f1(report["per_class"], out / f"{name}_f1.png", title=title)
    if preds:
        paths["predictions"] = write_predictions_csv(out / f"{name}_predictions.csv", preds)
    return paths
