"""Cross-validation splits: stratified, patient-grouped k folds, and reading a splits file back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pathvl.eval.mil.common import SPLITS_FORMAT, MILError, _some, _warn
from pathvl.eval.mil.labels import SlideLabels


def _strata(labels: SlideLabels, k: int) -> tuple[np.ndarray, list[str]]:
    if labels.task == "classification":
        return labels.y.astype(np.int64), list(labels.class_names)
    n_bins = max(1, min(5, len(labels) // max(k, 1)))
    ranks = np.argsort(np.argsort(labels.y, kind="stable"), kind="stable")
    s = (ranks * n_bins // len(labels)).astype(np.int64)
    return s, [f"target quantile {i + 1}/{n_bins}" for i in range(n_bins)]


def _assign(groups: list[str], strata: np.ndarray, n_parts: int, rng: np.random.Generator) -> dict[str, int]:
    """Put whole groups into ``n_parts`` parts so that each stratum spreads evenly.

    Groups go biggest first (random order among equal sizes); each goes where its strata are least
    represented so far, relative to their totals (then to the smallest part, then the lowest index). With
    one slide per group this deals every stratum round the parts, so a stratum's count per part differs by
    at most one.
    """
    names = sorted(set(groups))
    col = {g: i for i, g in enumerate(names)}
    n_s = int(strata.max()) + 1 if len(strata) else 1
    counts = np.zeros((len(names), n_s))
    for g, s in zip(groups, strata):
        counts[col[g], s] += 1
    totals = counts.sum(axis=0).clip(min=1)
    order = rng.permutation(len(names))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    have = np.zeros((n_parts, n_s))
    out = {}
    for gi in order:
        c = counts[gi]
        cost = (have / totals) @ c
        part = int(np.lexsort((np.arange(n_parts), have.sum(axis=1), np.round(cost, 9)))[0])
        have[part] += c
        out[names[gi]] = part
    return out


def make_splits(labels: SlideLabels, folds: int = 5, seed: int = 0, val_fraction: float = 0.2) -> dict[str, Any]:
    """Stratified (and, with patients, patient-grouped) k-fold cross-validation splits.

    Fold ``k``'s test set is the ``k``-th of ``folds`` parts; its validation set is a stratified share of
    about ``val_fraction`` of the remaining patients, the rest is its training set. Classes are the strata
    of a classification task, quantiles of the target those of a regression.

    Returns:
        The JSON-ready splits: ``{"format", "version", "k", "seed", "val_fraction", "grouped_by",
        "splits": [{"fold", "train", "val", "test"}]}`` with slide ids.

    Raises:
        MILError: Fewer than two folds, or a class with fewer slides (or patients) than folds, named.
    """
    if folds < 2:
        raise MILError(f"--folds must be at least 2, got {folds}")
    if not 0 <= val_fraction < 1:
        raise MILError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = labels.groups()
    strata, names = _strata(labels, folds)
    if labels.task == "classification":
        for c, name in enumerate(names):
            n = int((strata == c).sum())
            n_pat = len({g for g, s in zip(groups, strata) if s == c})
            if n < folds:
                raise MILError(f"class {name!r} has {n} slide(s) in {labels.source}, fewer than --folds {folds}; "
                               "lower --folds or leave the class out")
            if n_pat < folds:
                raise MILError(f"class {name!r} has {n_pat} patient(s) in {labels.source}, fewer than --folds "
                               f"{folds}; lower --folds or leave the class out")
    elif len(set(groups)) < folds:
        raise MILError(f"{labels.source}: {len(set(groups))} patients for --folds {folds}; lower --folds")
    rng = np.random.default_rng(seed)
    part = _assign(groups, strata, folds, rng)
    fold_of = np.array([part[g] for g in groups])
    splits = []
    for k in range(folds):
        test = [i for i in range(len(groups)) if fold_of[i] == k]
        rest = [i for i in range(len(groups)) if fold_of[i] != k]
        val: list[int] = []
        if val_fraction > 0:
            n_val = max(2, round(1 / val_fraction))
            vpart = _assign([groups[i] for i in rest], strata[rest], n_val, np.random.default_rng([seed, k]))
            val = [i for i in rest if vpart[groups[i]] == 0]
        vset = set(val)
        train = [i for i in rest if i not in vset]
        splits.append({"fold": k, "train": [labels.slide_ids[i] for i in train],
                       "val": [labels.slide_ids[i] for i in val], "test": [labels.slide_ids[i] for i in test]})
    return {"format": SPLITS_FORMAT, "version": 1, "k": folds, "seed": seed, "val_fraction": val_fraction,
            "grouped_by": labels.patient_column, "n_slides": len(labels), "splits": splits}


def load_splits(path: str | os.PathLike[str], labels: SlideLabels) -> dict[str, Any]:
    """Read a splits file (as :func:`make_splits` writes) and fit it to ``labels``.

    Slides of the file without a label here are dropped with a warning, and so are labelled slides that no
    test fold holds.

    Raises:
        MILError: Unreadable file, a slide in two test folds or in two parts of one fold (named), or a fold
            left without training slides.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"splits: no such file {p}")
    try:
        data = json.loads(p.read_text())
        raw = data["splits"]
        folds = [{"fold": int(s.get("fold", i)), "train": list(s["train"]), "val": list(s.get("val", [])),
                  "test": list(s["test"])} for i, s in enumerate(raw)]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise MILError(f"{p}: not a splits file ({type(e).__name__}: {e}); write one with `pathvl mil train`") from None
    if len(folds) < 2:
        raise MILError(f"{p}: holds {len(folds)} fold(s); need at least 2")
    seen: dict[str, int] = {}
    for f in folds:
        for s in f["test"]:
            if s in seen:
                raise MILError(f"{p}: slide {s!r} is in the test sets of folds {seen[s]} and {f['fold']}")
            seen[s] = f["fold"]
        a, b, c = set(f["train"]), set(f["val"]), set(f["test"])
        both = (a & b) | (a & c) | (b & c)
        if both:
            raise MILError(f"{p}: fold {f['fold']} has slide(s) {_some(sorted(both))} in two of train/val/test")
    have = set(labels.slide_ids)
    unknown = sorted({s for f in folds for part in ("train", "val", "test") for s in f[part]} - have)
    if unknown:
        _warn(f"{p}: {len(unknown)} slide(s) of the splits have no label or features here and are left out: "
              f"{_some(unknown)}")
    outside = sorted(have - set(seen))
    if outside:
        _warn(f"{p}: {len(outside)} labelled slide(s) are in no test fold of the splits and are left out: "
              f"{_some(outside)}")
    for f in folds:
        for part in ("train", "val", "test"):
            f[part] = [s for s in f[part] if s in have]
        if not f["train"]:
            raise MILError(f"{p}: fold {f['fold']} has no training slide with a label here")
    return {"format": SPLITS_FORMAT, "version": 1, "k": len(folds), "seed": data.get("seed"),
            "val_fraction": data.get("val_fraction"), "grouped_by": data.get("grouped_by"),
            "source": str(p), "splits": folds}
