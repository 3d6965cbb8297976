"""``pathvl mil eval``: reading a run folder back, its fold models, and predicting (and scoring) slides."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl.eval.mil.bags import _embedding_bags, load_bags, read_slide_embeddings
from pathvl.eval.mil.common import (
    CONFIG_FILE,
    HEATMAP_DIR,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RUN_FORMAT,
    SPLITS_FILE,
    MILError,
    _write_csv,
    _write_json,
)
from pathvl.eval.mil.drawing import _pick_heatmap_slides, write_heatmaps
from pathvl.eval.mil.labels import SlideLabels, _as_labels, match_labels
from pathvl.eval.mil.scoring import _fmt, _prediction_rows, slide_metrics
from pathvl.eval.mil.training import MILResult, _device, _load_state, _predict, _scores
from pathvl.progress import tqdm

if TYPE_CHECKING:
    import torch


def read_run(run: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a MIL run folder.

    Raises:
        MILError: Not a complete run folder.
    """
    p = Path(run) / CONFIG_FILE
    if not p.is_file():
        raise MILError(f"{run}: not a MIL run folder (no {CONFIG_FILE}); train one with `pathvl mil train`")
    cfg = json.loads(p.read_text())
    if cfg.get("format") != RUN_FORMAT:
        raise MILError(f"{p}: not a pathvl MIL run (format {cfg.get('format')!r})")
    return cfg


def load_fold_models(run: str | Path, device: torch.device | str = "cpu") -> list[torch.nn.Module]:
    """The best network of each fold of a run, in eval mode."""
    from safetensors.torch import load_file

    from pathvl.models.mil import build_mil_model

    cfg = read_run(run)
    models = []
    for f in cfg["folds"]:
        path = Path(run) / f["checkpoint"]
        if not path.is_file():
            raise MILError(f"{run}: fold {f['fold']} checkpoint {path} is missing; retrain the run")
        m = build_mil_model(cfg["model"], cfg["in_dim"], cfg["n_outputs"], **cfg["model_args"])
        models.append(_load_state(m, load_file(str(path))).to(device).eval())
    return models


def evaluate_mil(run: str | Path, dataset: str | Path | None = None,
                 labels: SlideLabels | str | os.PathLike[str] | Mapping | None = None, out: str | Path | None = None,
                 *, slide_embeddings: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
                 slide_ids: Sequence[str] | None = None, heatmaps: int = 4, top_k: int = 16,
                 n_bootstrap: int = 1000, progress: bool = True) -> MILResult:
    """``pathvl mil eval``: predict slides with a trained run, and score them when labels are given.

    On the run's own dataset (same folder; for slide embeddings, the same slide ids), a slide of a test
    fold is predicted by that fold's model only, so scores stay out-of-fold; any other slide by the mean
    of every fold's prediction (probabilities, or values), with the mean of their attention.

    Args:
        run: Run folder of ``pathvl mil train``.
        dataset: Dataset folder with the run's features (unless ``slide_embeddings``).
        labels: Optional labels (file, :class:`SlideLabels` or mapping) for metrics; the training labels
            are not needed.
        out: Output folder (default: ``RUN/eval-<dataset folder name>``).
        slide_embeddings: For a run trained on slide embeddings.
        slide_ids: Slides to predict (default: all the dataset's, or the labelled ones when labels are given).
        heatmaps: Slides to draw heatmaps for.
        top_k: Patches per contact sheet.
        n_bootstrap: Bootstrap resamples of the CIs.
        progress: Progress bars on a terminal.
    """
    cfg = read_run(run)
    device = _device()
    models = load_fold_models(run, device)
    task, names = cfg["task"], cfg["class_names"]
    emb_input = cfg["input"] == "slide-embeddings"
    if emb_input:
        if slide_embeddings is None:
            raise MILError(f"{run}: trained on slide embeddings; pass --slide-embeddings")
        emb = read_slide_embeddings(slide_embeddings) if isinstance(slide_embeddings, (str, os.PathLike)) \
            else slide_embeddings
        bags = _embedding_bags(emb)
        avail, where = list(bags), "the slide embeddings"
    else:
        if dataset is None:
            raise MILError("give the --dataset to evaluate on")
        from pathvl.data.dataset import Dataset

        avail, where = Dataset(dataset).slide_ids(), f"dataset {dataset}"
    lab = None
    if labels is not None:
        lab = match_labels(_as_labels(labels, "regression" if task == "regression" else "classification")
                           if not isinstance(labels, SlideLabels) else labels, avail, where)
        if task == "classification":
            lab = _relabel(lab, names)
        ids = lab.slide_ids
    else:
        ids = list(slide_ids) if slide_ids is not None else list(avail)
    if not emb_input:
        bags = load_bags(dataset, cfg["features"], ids, mag=cfg.get("mag"), progress=progress)
    dims = {bags[s].dim for s in ids}
    if dims != {cfg["in_dim"]}:
        raise MILError(f"{run}: the model takes {cfg['in_dim']}-wide features, {where} has {sorted(dims)}")
    test_fold = {}
    sp = Path(run) / SPLITS_FILE
    same_data = emb_input or (dataset is not None and str(Path(dataset).resolve()) == cfg.get("dataset"))
    if same_data and sp.is_file():
        for s in json.loads(sp.read_text()).get("splits", []):
            for sid in s["test"]:
                test_fold[sid] = int(s["fold"])
    norms = [(f.get("target_mean", 0.0), f.get("target_std", 1.0)) for f in cfg["folds"]]
    fold_index = {f["fold"]: i for i, f in enumerate(cfg["folds"])}
    rows, scores, attention = [], [], {}
    base = lab if lab is not None else SlideLabels(ids, np.zeros(len(ids)), task, names)
    for sid in tqdm(ids, desc="predict", unit="slide", disable=None if progress else True):
        use = [fold_index[test_fold[sid]]] if test_fold.get(sid) in fold_index else list(range(len(models)))
        sc, at = [], []
        for i in use:
            raw, attn = _predict(models[i], bags, [sid], device, emb_input)
            sc.append(_scores(raw, task, norms[i]))
            if sid in attn:
                at.append(attn[sid])
        s_mean = np.mean(sc, axis=0)
        scores.append(s_mean[0] if task == "classification" else float(s_mean[0]))
        if at and cfg["model"] != "mean":
            attention[sid] = np.mean(at, axis=0)
        oof = len(use) == 1 and len(models) > 1
        how = f"fold {test_fold[sid]} (out-of-fold)" if oof else f"mean of {len(use)} folds"
        rows += _prediction_rows(base, [sid], np.asarray([scores[-1]]), {"model": how}, with_truth=lab is not None)
    s_arr = np.asarray(scores)
    metrics: dict[str, Any] = {"run": str(run), "n": len(ids)}
    if lab is not None:
        metrics["pooled"] = slide_metrics(task, lab.y, s_arr, names, n_bootstrap=n_bootstrap)
    out_dir = Path(out) if out is not None else Path(run) / f"eval-{Path(dataset).name if dataset else 'embeddings'}"
    _write_csv(out_dir / PREDICTIONS_FILE, rows)
    if lab is not None:
        _write_json(out_dir / METRICS_FILE, metrics)
    chosen = _pick_heatmap_slides(rows, attention, heatmaps, task, names)
    caps = {r["slide_id"]: f"{r['slide_id']}: predicted {_fmt(r['prediction'])}"
            + (f", label {r['label']}" if "label" in r else "") for r in rows}
    hms = write_heatmaps(bags, attention, chosen, out_dir / HEATMAP_DIR, caps, top_k) if not emb_input else []
    res_cfg = {**cfg, "evaluated_on": str(dataset) if dataset else "slide embeddings"}
    return MILResult(res_cfg, {"k": len(models)}, metrics, rows, out_dir, hms, attention, [])


def _relabel(lab: SlideLabels, names: Sequence[str]) -> SlideLabels:
    """Express classification labels in a run's class order (labels it does not know are an error)."""
    if lab.task != "classification":
        raise MILError(f"{lab.source}: the run classifies into {list(names)}, but these labels look continuous")
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({lab.class_names[c] for c in set(lab.y.tolist())} - set(index))
    if unknown:
        raise MILError(f"{lab.source}: labels {unknown} are not classes of the run ({list(names)})")
    y = np.array([index[lab.class_names[c]] for c in lab.y], dtype=np.int64)
    return replace(lab, y=y, class_names=list(names))
