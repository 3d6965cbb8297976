"""Cross-validation of a MIL network or a linear head, and the ``pathvl mil train`` entry points."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from pathvl import __version__
from pathvl.eval.mil.bags import Bag, _embedding_bags, load_bags, read_slide_embeddings
from pathvl.eval.mil.common import (
    CONFIG_FILE,
    HEATMAP_DIR,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    RUN_FORMAT,
    SPLITS_FILE,
    MILError,
    _save_state,
    _some,
    _write_csv,
    _write_json,
)
from pathvl.eval.mil.drawing import _pick_heatmap_slides, write_heatmaps
from pathvl.eval.mil.labels import SlideLabels, _as_labels, match_labels
from pathvl.eval.mil.scoring import _fmt, _fold_summary, _prediction_rows, slide_metrics
from pathvl.eval.mil.splits import load_splits, make_splits
from pathvl.eval.mil.training import MILConfig, MILResult, _device, _load_state, _predict, _scores, _train_fold


def cross_validate(bags: Mapping[str, Bag], labels: SlideLabels, cfg: MILConfig | None = None,
                   splits: dict[str, Any] | str | os.PathLike[str] | None = None, out: str | Path | None = None,
                   embeddings: bool = False, heatmaps: int = 4, top_k: int = 16, progress: bool = False,
                   extra_config: Mapping[str, Any] | None = None) -> MILResult:
    """Cross-validate a MIL network (or the linear head) on bags whose slides all have labels.

    Args:
        bags: ``{slide_id: Bag}`` (:func:`load_bags`, or arrays in memory).
        labels: One label per slide of ``bags`` (:func:`match_labels` first).
        cfg: Training settings.
        splits: A splits dict or file (default: :func:`make_splits` with ``cfg.folds`` and ``cfg.seed``).
        out: Run folder to write (None: nothing written).
        embeddings: The bags are slide embeddings (one row each), batched for the linear head.
        heatmaps: Slides to draw attention heatmaps for (needs coordinates; 0: none).
        top_k: Patches on each contact sheet.
        progress: Progress bars (shown on a terminal only).
        extra_config: More entries for ``config.json`` (dataset, features, magnification...).
    """
    from pathvl.models.mil import build_mil_model

    cfg = cfg or MILConfig()
    if cfg.model == "clam-sb" and labels.task != "classification":
        raise MILError("CLAM-SB classifies slides; use --model abmil or mean for a continuous target")
    missing = [s for s in labels.slide_ids if s not in bags]
    if missing:
        raise MILError(f"labelled slide(s) {_some(missing)} have no bag")
    if isinstance(splits, (str, os.PathLike)):
        splits = load_splits(splits, labels)
    elif splits is None:
        splits = make_splits(labels, cfg.folds, cfg.seed, cfg.val_fraction)
    in_dim = next(iter(bags[s] for s in labels.slide_ids)).dim
    device = _device()
    run = Path(out) if out is not None else None
    config = {"format": RUN_FORMAT, "version": 1, "pathvl_version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "input": "slide-embeddings" if embeddings else "patch-features",
              "model": cfg.model, "model_args": cfg.model_args(), "in_dim": in_dim, "n_outputs": labels.n_outputs,
              "task": labels.task, "class_names": labels.class_names,
              "positive_class": labels.class_names[1] if labels.n_outputs == 2 else None,
              "labels": labels.source, "grouped_by": labels.patient_column,
              "train": asdict(cfg), **(extra_config or {}), "folds": []}
    preds: list[dict[str, Any]] = []
    per_fold, states = [], []
    oof_ids: list[str] = []
    oof_scores: list[np.ndarray] = []
    attention: dict[str, np.ndarray] = {}
    for split in splits["splits"]:
        k = split["fold"]
        train_ids, val_ids, test_ids = split["train"], split["val"], split["test"]
        res = _train_fold(bags, labels, train_ids, val_ids, cfg, k, in_dim, device, embeddings, progress)
        model = _load_state(build_mil_model(cfg.model, in_dim, labels.n_outputs, **cfg.model_args()),
                            res["state"]).to(device)
        states.append(res["state"])
        raw, attn = _predict(model, bags, test_ids, device, embeddings)
        sc = _scores(raw, labels.task, res["norm"])
        if cfg.model != "mean":
            attention.update(attn)
        preds += _prediction_rows(labels, test_ids, sc, {"fold": k})
        oof_ids += test_ids
        oof_scores.append(sc)
        fold_y = labels.subset(test_ids).y
        fm = slide_metrics(labels.task, fold_y, sc, labels.class_names, n_bootstrap=0)
        fm.pop("report", None)
        per_fold.append({"fold": k, "n_test": len(test_ids), "best_epoch": res["best_epoch"], **fm})
        entry = {"fold": k, "checkpoint": f"fold_{k}/{MODEL_FILE}", "best_epoch": res["best_epoch"],
                 "val_loss": res["val_loss"], "n_train": len(train_ids), "n_val": len(val_ids),
                 "n_test": len(test_ids)}
        if labels.task == "regression":
            entry.update(target_mean=res["norm"][0], target_std=res["norm"][1])
        config["folds"].append(entry)
        if run is not None:
            _save_state(run / f"fold_{k}" / MODEL_FILE, res["state"], {"format": RUN_FORMAT, "model": cfg.model,
                                                                       "fold": str(k)})
            _write_json(run / f"fold_{k}" / HISTORY_FILE, res["history"])
    scores = np.concatenate(oof_scores)
    pooled = slide_metrics(labels.task, labels.subset(oof_ids).y, scores, labels.class_names,
                           n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    metrics = {"pooled": pooled, "folds": per_fold, "fold_summary": _fold_summary(per_fold)}
    result = MILResult(config, splits, metrics, preds, run, [], attention, states)
    if run is not None:
        _write_json(run / SPLITS_FILE, splits)
        _write_csv(run / PREDICTIONS_FILE, preds)
        _write_json(run / METRICS_FILE, metrics)
        chosen = _pick_heatmap_slides(preds, attention, heatmaps, labels.task, labels.class_names)
        caps = {r["slide_id"]: f"{r['slide_id']}: label {r['label']}, predicted {_fmt(r['prediction'])}"
                for r in preds}
        result.heatmaps = write_heatmaps(bags, attention, chosen, run / HEATMAP_DIR, caps, top_k)
        config["heatmaps"] = [str(p.relative_to(run)) for p in result.heatmaps]
        _write_json(run / CONFIG_FILE, config)  # last: a run folder with a config is complete
    return result


def train_mil(dataset: str | Path | None, features: str | None, labels: SlideLabels | str | os.PathLike[str] | Mapping,
              out: str | Path | None, *, cfg: MILConfig | None = None, mag: float | None = None,
              splits: str | os.PathLike[str] | dict | None = None, task: str = "auto",
              slide_embeddings: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None, heatmaps: int = 4,
              top_k: int = 16, progress: bool = True, benchmark: str | None = None) -> MILResult:
    """``pathvl mil train``: cross-validated slide-level MIL on a dataset's patch features.

    Args:
        dataset: Dataset folder (tiled and embedded); unused with ``slide_embeddings``.
        features: Encoder name of ``features/<name>``.
        labels: A label file (:func:`read_labels`), :class:`SlideLabels`, or ``{slide_id: label}``.
        out: Run folder.
        cfg: Training settings (model, epochs, lr, folds, seed...).
        mag: Use only patches at this magnification.
        splits: A splits file to reuse (default: new stratified, patient-grouped folds).
        task: ``auto``, ``classification`` or ``regression`` (when ``labels`` is a file).
        slide_embeddings: Precomputed slide embeddings instead of patch features (a linear head).
        heatmaps: Slides to draw attention heatmaps and top-patch contact sheets for.
        top_k: Patches per contact sheet.
        progress: Progress bars on a terminal.
        benchmark: Name of the slide benchmark the labels follow (recorded in the config).

    Raises:
        MILError: Bad labels, splits, features (see :func:`match_labels`, :func:`make_splits`,
            :func:`load_bags`).
    """
    cfg = cfg or MILConfig()
    lab = _as_labels(labels, task)
    if slide_embeddings is not None:
        emb = read_slide_embeddings(slide_embeddings) if isinstance(slide_embeddings, (str, os.PathLike)) \
            else slide_embeddings
        return fit_slide_embeddings(emb, lab, cfg=cfg, splits=splits, out=out, progress=progress,
                                    source=str(slide_embeddings) if isinstance(slide_embeddings, (str, os.PathLike))
                                    else None)
    if dataset is None or features is None:
        raise MILError("give a dataset and its --features (or --slide-embeddings)")
    from pathvl.data.dataset import Dataset

    ds = Dataset(dataset)
    lab = match_labels(lab, ds.slide_ids(), f"dataset {dataset}")
    bags = load_bags(dataset, features, lab.slide_ids, mag=mag, progress=progress)
    extra = {"dataset": str(Path(dataset).resolve()), "features": features,
             "feature_key": next(iter(bags.values())).key, "mag": mag, "benchmark": benchmark}
    return cross_validate(bags, lab, cfg, splits, out, embeddings=False, heatmaps=heatmaps, top_k=top_k,
                          progress=progress, extra_config=extra)


def fit_slide_embeddings(emb: Mapping[str, np.ndarray], labels: SlideLabels | str | os.PathLike[str] | Mapping,
                         *, cfg: MILConfig | None = None, folds: int | None = None, epochs: int | None = None,
                         lr: float | None = None, seed: int | None = None,
                         splits: str | os.PathLike[str] | dict | None = None, out: str | Path | None = None,
                         progress: bool = False, source: str | None = None) -> MILResult:
    """Cross-validate a linear head on precomputed slide embeddings (PathFLIP, PathAlign, TITAN...).

    The same protocol and outputs as :func:`train_mil` (splits, per-fold best checkpoint, predictions,
    metrics with bootstrap CIs), with :class:`pathvl.models.mil.LinearHead` on inputs standardised with
    the training fold's statistics, trained in batches of ``cfg.batch_size`` slides.

    Args:
        emb: ``{slide_id: (D,) or (M, D)}``; ``M`` rows (several embeddings of one slide) are averaged.
        labels: A label file, :class:`SlideLabels` or ``{slide_id: label}``; matched to ``emb`` by slide id
            (as :func:`match_labels`: exact, without a file suffix, or a TCGA barcode without its UUID).
        cfg: Settings (default: :meth:`MILConfig.linear_head`); ``model`` is always ``linear``.
        folds: Overrides ``cfg.folds``.
        epochs: Overrides ``cfg.epochs``.
        lr: Overrides ``cfg.lr``.
        seed: Overrides ``cfg.seed``.
        splits: A splits file or dict to reuse.
        out: Run folder (None: nothing written).
        progress: Progress bars on a terminal.
        source: Where the embeddings came from (recorded in the config).

    Raises:
        MILError: A slide embedding with NaN (slide named), labels matching no embedding, a class with
            fewer slides than folds.
    """
    over = {k: v for k, v in {"folds": folds, "epochs": epochs, "lr": lr, "seed": seed}.items() if v is not None}
    cfg = replace(cfg, model="linear", **over) if cfg is not None else MILConfig.linear_head(**over)
    bags = _embedding_bags(emb)
    lab = match_labels(_as_labels(labels), list(bags), "the slide embeddings")
    return cross_validate(bags, lab, cfg, splits, out, embeddings=True, heatmaps=0, progress=progress,
                          extra_config={"slide_embeddings": source})
