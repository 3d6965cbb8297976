"""Slide-level multiple-instance learning: labels, bags, cross-validation, training, metrics, outputs.

``pathvl mil train`` learns a slide label (a subtype, a mutation status, or a continuous target) from the
cached patch features of a dataset (``features/<encoder>`` in each slide file, rows aligned with
``patches/coords``) with one of the networks of :mod:`pathvl.models.mil`, or from precomputed slide
embeddings with a linear head (:func:`fit_slide_embeddings`). The protocol is stratified k-fold
cross-validation: fold ``k`` is the test set, a stratified part of the other folds the validation set that
picks the best epoch (lowest validation loss, as CLAM does), the rest the training set. When the label file
has a patient column (``patient``, ``case_id``...), every patient's slides stay in one fold.

A run folder holds everything ``pathvl mil eval`` needs, without the training labels::

    RUN/config.json                 model, its arguments, task, class names, features, magnification, folds
    RUN/splits.json                 the folds (reusable with --splits)
    RUN/fold_<k>/model.safetensors  the best epoch of fold k
    RUN/fold_<k>/history.json       per epoch: training loss, validation loss and metric
    RUN/predictions.csv             out-of-fold prediction of every slide (class probabilities)
    RUN/metrics.json                pooled out-of-fold metrics with bootstrap CIs, per fold, mean and std
    RUN/heatmaps/<slide>.attention.png     attention over the slide thumbnail, with a colour scale
    RUN/heatmaps/<slide>.top_patches.png   the most attended patches as a contact sheet

Metrics come from :mod:`pathvl.eval.metrics`: balanced accuracy, weighted F1 and AUROC (one-vs-rest macro
for several classes; the positive class, ``class_names[1]``, for two), or MSE, Pearson r and R^2 for a
continuous target, each with a percentile bootstrap CI. Every file is written under a temporary name and
renamed when complete.

Coordinates are level-0 pixels (x, y) of each patch's top-left corner, as stored in the dataset.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from pathvl import __version__
from pathvl import _const as K
from pathvl.errors import UserError
from pathvl.eval import metrics as M
from pathvl.progress import tqdm

if TYPE_CHECKING:  # torch is imported where it runs, so that the CLI parses its arguments without it
    import torch

__all__ = [
    "Bag",
    "MILConfig",
    "MILError",
    "MILResult",
    "MILWarning",
    "SlideLabels",
    "evaluate_mil",
    "fit_slide_embeddings",
    "labels_from_mapping",
    "load_bags",
    "load_splits",
    "make_splits",
    "match_labels",
    "read_labels",
    "read_slide_embeddings",
    "slide_metrics",
    "train_mil",
]

CONFIG_FILE = "config.json"
SPLITS_FILE = "splits.json"
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.safetensors"
HISTORY_FILE = "history.json"
HEATMAP_DIR = "heatmaps"
RUN_FORMAT = "pathvl-mil-run"
SPLITS_FORMAT = "pathvl-mil-splits"

#: Usual column names, tried in order (case-insensitive) when the user names none.
SLIDE_COLUMNS = ("slide_id", "slide", "slide_name", "slide_submitter_id", "filename", "file_name", "image_id",
                 "wsi", "id")
LABEL_COLUMNS = ("label", "target", "y", "class", "status", "mutation", "value")
PATIENT_COLUMNS = ("patient", "patient_id", "case_id", "case", "case_submitter_id", "submitter_id")

#: A numeric label column with more distinct values than this (or any non-integer value) is a
#: continuous target (regression); otherwise each value is a class.
MAX_NUMERIC_CLASSES = 10

#: For a binary task, a class with one of these names (case-insensitive) is the negative class, so
#: that ``class_names[1]`` (the one AUROC scores) is the mutant / positive / metastatic one.
NEGATIVE_NAMES = frozenset({"0", "false", "no", "negative", "neg", "wt", "wildtype", "wild-type", "wild_type",
                            "n0", "absent", "normal", "benign"})

#: Suffixes stripped from a label file's slide ids when they do not match a dataset id as they are.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".dcm", ".jpg", ".jpeg",
                  ".png", ".h5", ".pt", ".isyntax", ".czi")

#: Feature bytes kept in memory across epochs; beyond this, bags are re-read from the slide files.
CACHE_BYTES = 8 << 30


class MILError(UserError, ValueError):
    """Bad input to slide-level MIL (labels, splits, features); the message names the slide or the file."""


class MILWarning(UserWarning):
    """Input that MIL can work around (labelled slides the dataset lacks, unlabelled rows)."""


def _warn(msg: str) -> None:
    warnings.warn(msg, MILWarning, stacklevel=3)


def _some(items: Sequence[Any], n: int = 8) -> str:
    items = list(items)
    head = ", ".join(str(x) for x in items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ============================================================================================== labels
@dataclass
class SlideLabels:
    """One label per slide.

    Attributes:
        slide_ids: The slides.
        y: ``(n,)`` int64 class indices into ``class_names`` (classification) or float64 targets
            (regression).
        task: ``"classification"`` or ``"regression"``.
        class_names: Class of each index (empty for regression); for two classes, ``class_names[1]`` is
            the positive class.
        patients: The patient of each slide, or None when the source has no patient column (then every
            slide is its own group).
        source: Where the labels came from (a file, or a description).
        patient_column: The column patients were read from.
    """

    slide_ids: list[str]
    y: np.ndarray
    task: str
    class_names: list[str] = field(default_factory=list)
    patients: list[str] | None = None
    source: str = ""
    patient_column: str | None = None

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def n_outputs(self) -> int:
        return len(self.class_names) if self.task == "classification" else 1

    def subset(self, ids: Sequence[str]) -> SlideLabels:
        """The labels of ``ids`` (each must be present), in that order."""
        pos = {s: i for i, s in enumerate(self.slide_ids)}
        idx = [pos[s] for s in ids]
        return replace(self, slide_ids=list(ids), y=self.y[idx],
                       patients=None if self.patients is None else [self.patients[i] for i in idx])

    def compact(self) -> tuple[SlideLabels, list[str]]:
        """These labels without the classes no slide has (order kept), and the names of those dropped."""
        if self.task != "classification":
            return self, []
        present = sorted(set(self.y.tolist()))
        dropped = [n for c, n in enumerate(self.class_names) if c not in present]
        if not dropped:
            return self, []
        new = {c: i for i, c in enumerate(present)}
        y = np.array([new[int(v)] for v in self.y], dtype=np.int64)
        return replace(self, y=y, class_names=[self.class_names[c] for c in present]), dropped

    def value(self, i: int) -> str | float:
        """The label of slide ``i`` as a class name or a number."""
        return self.class_names[int(self.y[i])] if self.task == "classification" else float(self.y[i])

    def groups(self) -> list[str]:
        """The grouping unit of each slide: its patient, or the slide itself."""
        return list(self.patients) if self.patients is not None else list(self.slide_ids)


def _as_float(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _class_order(names: Iterable[str]) -> list[str]:
    names = sorted(set(names))
    nums = [_as_float(n) for n in names]
    if all(x is not None for x in nums):
        names = [n for _, n in sorted(zip(nums, names))]
    if len(names) == 2 and names[1].lower() in NEGATIVE_NAMES and names[0].lower() not in NEGATIVE_NAMES:
        names = names[::-1]
    return names


def _infer_task(values: Sequence[str], task: str, where: str) -> str:
    if task not in ("auto", "classification", "regression"):
        raise MILError(f"task must be auto, classification or regression, got {task!r}")
    nums = [_as_float(v) for v in values]
    numeric = all(x is not None for x in nums)
    if task == "regression":
        if not numeric:
            bad = next(v for v, x in zip(values, nums) if x is None)
            raise MILError(f"{where}: a regression target must be numeric, found {bad!r}")
        return task
    if task == "classification":
        return task
    if numeric and (len(set(nums)) > MAX_NUMERIC_CLASSES or any(x != round(x) for x in nums)):
        return "regression"
    return "classification"


def _build_labels(ids: list[str], raw: list[str], patients: list[str] | None, lines: list[Any], *, task: str,
                  classes: Sequence[str] | None, source: str, patient_column: str | None) -> SlideLabels:
    # duplicates: the same slide twice is fine with the same label, an error with two
    first: dict[str, int] = {}
    keep = []
    for i, s in enumerate(ids):
        if s in first:
            j = first[s]
            if raw[j] != raw[i]:
                raise MILError(f"{source}: slide {s!r} has two labels, {raw[j]!r} (line {lines[j]}) and "
                               f"{raw[i]!r} (line {lines[i]}); keep one")
            continue
        first[s] = i
        keep.append(i)
    ids = [ids[i] for i in keep]
    raw = [raw[i] for i in keep]
    patients = None if patients is None else [patients[i] for i in keep]
    if not ids:
        raise MILError(f"{source}: no labelled slides")
    kind = _infer_task(raw, task, source)
    if kind == "regression":
        y = np.array([float(v) for v in raw], dtype=np.float64)
        return SlideLabels(ids, y, kind, [], patients, source, patient_column)
    names = list(classes) if classes is not None else _class_order(raw)
    index = {n: k for k, n in enumerate(names)}
    unknown = sorted({v for v in raw if v not in index})
    if unknown:
        raise MILError(f"{source}: labels {unknown} are not among the classes {names}")
    if len({v for v in raw}) < 2:
        raise MILError(f"{source}: every slide has the label {raw[0]!r}; classification needs two classes")
    y = np.array([index[v] for v in raw], dtype=np.int64)
    return SlideLabels(ids, y, kind, names, patients, source, patient_column)


def read_labels(path: str | os.PathLike[str], *, slide_column: str | None = None, label_column: str | None = None,
                patient_column: str | None = None, task: str = "auto",
                label_map: Mapping[str, str | None] | None = None,
                classes: Sequence[str] | None = None, slide_id_fn: Callable[[str], str] | None = None,
                patient_fn: Callable[[str], str | None] | None = None) -> SlideLabels:
    """Slide labels from a CSV, TSV, XLSX or JSON Lines file (:func:`pathvl.data.tables.read_table`).

    The file holds a slide id column and a label column (``slide_id,label``), and optionally a patient
    column (``patient``, ``case_id``...) that keeps each patient's slides in one fold. Labels are class
    names, a binary status (``0``/``1``, ``WT``/``MUT``: the negative class comes first), or a continuous
    target (numbers with more than :data:`MAX_NUMERIC_CLASSES` distinct values, or any fraction), which
    makes the task a regression. Rows with an empty label are skipped with a warning.

    Args:
        path: The label file.
        slide_column: Column of slide ids (default: the first of :data:`SLIDE_COLUMNS` present).
        label_column: Column of labels (default: the first of :data:`LABEL_COLUMNS` present).
        patient_column: Column of patients (default: the first of :data:`PATIENT_COLUMNS` present, if any).
        task: ``auto``, ``classification`` or ``regression``.
        label_map: Raw label -> class name (None drops the row), e.g. to merge ``N+(1-2)`` and ``N+(>2)``;
            a raw value missing from the map is an error naming the line.
        classes: Class names in index order (default: sorted, negative class first for two).
        slide_id_fn: Maps a raw slide id to the dataset's (e.g. adds a prefix).
        patient_fn: Patient of a slide id when the file has no patient column (e.g. the TCGA case); also
            used when ``patient_column`` is named but absent.

    Raises:
        MILError: Duplicate slides with different labels, unknown classes, a single class, no rows.
        TableError: Unreadable file or missing column (the message names the file and its columns).
    """
    from pathvl.data.tables import TableError, read_table

    t = read_table(path, what="labels")
    sc = t.column(slide_column, SLIDE_COLUMNS, what="slide id")
    lc = t.column(label_column, LABEL_COLUMNS, what="label")
    try:
        pc = t.column(patient_column, PATIENT_COLUMNS, what="patient", required=patient_column is not None)
    except TableError:
        if patient_fn is None:
            raise
        pc = None  # the layout names a patient column this file lacks: derive patients from slide ids
    if pc == sc:
        pc = None
    ids, raw, patients, lines, empty, dropped = [], [], [], [], [], []
    for row, line in zip(t.rows, t.lines):
        sid = str(row.get(sc) if row.get(sc) is not None else "").strip()
        if not sid:
            continue
        v = row.get(lc)
        text = "" if v is None else str(v).strip()
        if not text or text.lower() in ("nan", "na", "n/a", "none", "null"):
            empty.append(sid)
            continue
        if label_map is not None:
            if text not in label_map:
                raise MILError(f"{t.path}:{line}: label {text!r} of slide {sid!r} is none of {sorted(label_map)}")
            mapped = label_map[text]
            if mapped is None:
                dropped.append(sid)
                continue
            text = mapped
        if slide_id_fn is not None:
            sid = slide_id_fn(sid)
        ids.append(sid)
        raw.append(text)
        lines.append(line)
        if pc is not None:
            p = row.get(pc)
            patients.append(str(p).strip() if p is not None and str(p).strip() else sid)
        elif patient_fn is not None:
            patients.append(patient_fn(sid) or sid)
    if empty:
        _warn(f"{t.path}: {len(empty)} slide(s) have no label in column {lc!r} and are left out: {_some(empty)}")
    if dropped:
        _warn(f"{t.path}: {len(dropped)} slide(s) have a label this task leaves out: {_some(dropped)}")
    has_patients = pc is not None or patient_fn is not None
    pcol = pc or ("derived from the slide id" if has_patients else None)
    return _build_labels(ids, raw, patients if has_patients else None, lines, task=task, classes=classes,
                         source=str(t.path), patient_column=pcol)


def labels_from_mapping(labels: Mapping[str, Any], patients: Mapping[str, str] | None = None, task: str = "auto",
                        classes: Sequence[str] | None = None) -> SlideLabels:
    """:class:`SlideLabels` from ``{slide_id: label}`` (and optionally ``{slide_id: patient}``)."""
    ids = [str(s) for s in labels]
    raw = [str(v).strip() for v in labels.values()]
    pats = None if patients is None else [str(patients.get(s, s)) for s in ids]
    return _build_labels(ids, raw, pats, list(range(1, len(ids) + 1)), task=task, classes=classes,
                         source="labels given as a mapping", patient_column="given" if patients else None)


def _as_labels(labels: SlideLabels | str | os.PathLike[str] | Mapping[str, Any], task: str = "auto") -> SlideLabels:
    if isinstance(labels, SlideLabels):
        return labels
    if isinstance(labels, Mapping):
        return labels_from_mapping(labels, task=task)
    return read_labels(labels, task=task)


def _normal_id(s: str) -> str:
    s = s.strip()
    low = s.lower()
    for suf in SLIDE_SUFFIXES:
        if low.endswith(suf):
            return low[: -len(suf)]
    return low


def match_labels(labels: SlideLabels, available: Sequence[str], where: str) -> SlideLabels:
    """Keep the labelled slides found among ``available`` ids, renamed to those ids.

    A label id matches an available id exactly, else after dropping a file suffix and case (``a.svs`` ->
    ``a``), else as the part before the first ``.`` when that is unique (a TCGA barcode without the
    UUID that TCGA file names append).

    Raises:
        MILError: No labelled slide is available (the message shows ids of both sides).

    Warns:
        MILWarning: Listing the labelled slides that are not available.
    """
    avail = list(available)
    exact = set(avail)
    by_norm: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    for a in avail:
        by_norm.setdefault(_normal_id(a), []).append(a)
        by_stem.setdefault(_normal_id(a).split(".")[0], []).append(a)
    mapped, missing, taken = [], [], {}
    for sid in labels.slide_ids:
        hit = sid if sid in exact else None
        if hit is None:
            cands = by_norm.get(_normal_id(sid)) or by_stem.get(_normal_id(sid).split(".")[0]) or []
            hit = cands[0] if len(cands) == 1 else None
        if hit is None or hit in taken:
            missing.append(sid)
            continue
        taken[hit] = sid
        mapped.append((sid, hit))
    if not mapped:
        raise MILError(f"none of the {len(labels)} labelled slides of {labels.source} is in {where} "
                       f"(labels: {_some(labels.slide_ids, 3)}; {where}: {_some(avail, 3) or 'no slides'}); "
                       "check that the slide ids match the dataset's (the slide file names)")
    if missing:
        _warn(f"{len(missing)} labelled slide(s) of {labels.source} are not in {where} and are left out: "
              f"{_some(missing)}")
    out = labels.subset([m[0] for m in mapped])
    out.slide_ids = [m[1] for m in mapped]
    if out.task == "classification":
        present = set(out.y.tolist())
        if len(present) < 2:
            raise MILError(f"the slides of {labels.source} found in {where} are all "
                           f"{out.class_names[out.y[0]]!r}; classification needs two classes")
    return out


# ============================================================================================== bags
@dataclass
class Bag:
    """The patches of one slide that MIL sees.

    Attributes:
        slide_id: The slide.
        features: ``(N, D)`` patch features (as stored, usually float16), or None to read them from
            ``h5_path`` on demand.
        coords: ``(N, 2)`` int64 level-0 top-left corners.
        footprint: ``(N,)`` level-0 side of each patch in pixels.
        rows: ``(N,)`` rows of these patches in the slide file.
        slide_size: Level-0 ``(width, height)``.
        slide_path: The slide file (for thumbnails and pixels).
        h5_path: The dataset's slide file.
        key: HDF5 key of the features.
        dim: Feature width ``D``.
    """

    slide_id: str
    features: np.ndarray | None
    coords: np.ndarray | None = None
    footprint: np.ndarray | None = None
    rows: np.ndarray | None = None
    slide_size: tuple[int, int] | None = None
    slide_path: str | None = None
    h5_path: Path | None = None
    key: str | None = None
    dim: int = 0

    def __post_init__(self) -> None:
        if self.features is not None and not self.dim:
            self.dim = int(self.features.shape[1])

    def __len__(self) -> int:
        if self.features is not None:
            return len(self.features)
        return len(self.rows) if self.rows is not None else 0

    def load(self) -> np.ndarray:
        """The ``(N, D)`` features (read from the slide file when not kept in memory)."""
        if self.features is not None:
            return self.features
        with h5py.File(self.h5_path, "r") as f:
            data = f[self.key][:]
        return data if self.rows is None or len(self.rows) == len(data) else data[self.rows]


def _feature_names(f: h5py.File) -> list[str]:
    return sorted(f[K.FEATURES].keys()) if K.FEATURES in f else []


def load_bags(root: str | Path, features: str, slide_ids: Sequence[str] | None = None,
              mag: float | None = None, progress: bool = False, cache_bytes: int = CACHE_BYTES) -> dict[str, Bag]:
    """Read and check the patch features of slides of a dataset.

    Args:
        root: Dataset folder (``pathvl tile``, then ``pathvl embed``).
        features: Encoder name the dataset was embedded with (``features/<name>``).
        slide_ids: Slides to read (default: every tiled slide).
        mag: Keep only patches at this magnification (``patches/magnification``).
        progress: Show a progress bar.
        cache_bytes: Keep features in memory up to this many bytes in all; later bags are re-read on
            demand.

    Raises:
        MILError: A slide lacks ``features/<name>`` (says to run ``pathvl embed``), has no patch at ``mag``,
            holds NaN or infinite features, or its features and coordinates differ in length; each names
            the slide.
    """
    from pathvl.data.dataset import Dataset
    from pathvl.data.embed import feature_name

    ds = Dataset(root)
    ids = list(slide_ids) if slide_ids is not None else ds.slide_ids()
    name = feature_name(features)
    key = f"{K.FEATURES}/{name}"
    known = set(ds.slide_ids())
    absent = [s for s in ids if s not in known]
    if absent:
        raise MILError(f"{root}: slide(s) {_some(absent)} are not tiled in this dataset")
    lacking, have = [], set()
    for sid in ids:
        with ds.open(sid) as f:
            if key not in f:
                lacking.append(sid)
                have.update(_feature_names(f))
    if lacking:
        other = f" (it has features of: {', '.join(sorted(have))})" if have else " (it has no features yet)"
        raise MILError(f"{root}: slide {lacking[0]!r} has no {key}" + (f", nor do {len(lacking) - 1} more slide(s)"
                       if len(lacking) > 1 else "") + f"{other}; run `pathvl embed {root} --encoder {features}` first")
    bags: dict[str, Bag] = {}
    used = 0
    for sid in tqdm(ids, desc="read bags", unit="slide", disable=None if progress else True):
        with ds.open(sid) as f:
            feats = f[key][:]
            coords = f[K.COORDS][:]
            mags = f[K.MAGNIFICATION][:]
            size = tuple(int(v) for v in f.attrs[K.ATTR_SLIDE_SIZE]) if K.ATTR_SLIDE_SIZE in f.attrs else None
            fps = json.loads(f.attrs[K.ATTR_FOOTPRINTS]) if K.ATTR_FOOTPRINTS in f.attrs else {}
            spath = f.attrs.get(K.ATTR_SLIDE_PATH)
        if len(feats) != len(coords):
            raise MILError(f"slide {sid!r}: {key} has {len(feats)} rows but patches/coords {len(coords)}; "
                           f"re-run `pathvl embed {root} --encoder {features} --overwrite`")
        rows = np.arange(len(coords))
        if mag is not None:
            rows = np.flatnonzero(np.isclose(mags, float(mag)))
            if not len(rows):
                raise MILError(f"slide {sid!r}: no patches at {mag:g}x (it has "
                               f"{', '.join(f'{m:g}x' for m in np.unique(mags))}); pass another --mag")
            feats = feats[rows]
        if not len(rows):
            raise MILError(f"slide {sid!r}: no patches; re-tile it")
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise MILError(f"slide {sid!r}: {key} holds NaN or infinite values in {len(bad)} of {len(feats)} "
                           f"patches (rows {_some(rows[bad].tolist(), 4)}); re-run "
                           f"`pathvl embed {root} --encoder {features} --overwrite`")
        fpx = np.array([float(fps.get(f"{m:g}", fps.get(str(m), 0))) for m in mags[rows]])
        keep = used + feats.nbytes <= cache_bytes
        used += feats.nbytes if keep else 0
        bags[sid] = Bag(sid, feats if keep else None, coords[rows].astype(np.int64), fpx, rows,
                        size, str(spath) if spath is not None else None, ds.path(sid), key, int(feats.shape[1]))
    dims = {b.dim for b in bags.values()}
    if len(dims) > 1:
        raise MILError(f"{root}: {key} has different widths across slides ({sorted(dims)}); re-embed the dataset")
    return bags


def read_slide_embeddings(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Slide embeddings from an ``.npz`` (one array per slide id) or ``.h5`` file (one dataset per slide id,
    at the root or under ``slide_embeddings/``); each is ``(D,)`` or ``(M, D)``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"slide embeddings: no such file {p}")
    if p.suffix == ".npz":
        with np.load(p) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    if p.suffix in (".h5", ".hdf5"):
        with h5py.File(p, "r") as f:
            g = f.get("slide_embeddings", f)
            return {k: np.asarray(g[k][()]) for k in g if isinstance(g[k], h5py.Dataset)}
    raise MILError(f"{p}: slide embeddings must be an .npz or .h5 file (one array per slide id)")


def _embedding_bags(emb: Mapping[str, np.ndarray]) -> dict[str, Bag]:
    bags = {}
    dims = set()
    for sid, v in emb.items():
        a = np.asarray(v, dtype=np.float32)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or not len(a):
            raise MILError(f"slide {sid!r}: a slide embedding must be (D,) or (M, D), got shape {np.shape(v)}")
        if not np.isfinite(a).all():
            raise MILError(f"slide {sid!r}: its slide embedding holds NaN or infinite values")
        dims.add(a.shape[1])
        bags[str(sid)] = Bag(str(sid), a.mean(axis=0, keepdims=True))
    if len(dims) > 1:
        raise MILError(f"slide embeddings have different widths ({sorted(dims)})")
    if not bags:
        raise MILError("no slide embeddings given")
    return bags


# ============================================================================================== splits
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


# ============================================================================================== metrics
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


# ============================================================================================== training
@dataclass
class MILConfig:
    """Training settings of ``pathvl mil train`` (the defaults are written here only).

    Attributes:
        model: Network name in :data:`pathvl.models.mil.MIL_MODELS`.
        epochs: Passes over the training slides per fold.
        lr: Adam learning rate (CLAM's 2e-4).
        weight_decay: Adam weight decay (CLAM's 1e-5).
        hidden: Width of the patch embeddings (None: the network's default).
        attn_dim: Width of the attention layer (None: the network's default).
        dropout: Dropout (None: the network's default).
        folds: Cross-validation folds.
        val_fraction: Share of each fold's non-test patients used to choose the epoch (0: last epoch).
        seed: Seed of the splits, initialisation and slide order.
        max_patches: At most this many random patches of a bag per training step (None: all).
        balance: Weight the classification loss by inverse class frequency of the training slides.
        clam_bag_weight: CLAM-SB's weight of the slide loss against the instance loss.
        n_bootstrap: Bootstrap resamples of the confidence intervals.
        batch_size: Slides per step of the linear head on slide embeddings (bags go one by one).
    """

    model: str = "abmil"
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-5
    hidden: int | None = None
    attn_dim: int | None = None
    dropout: float | None = None
    folds: int = 5
    val_fraction: float = 0.2
    seed: int = 0
    max_patches: int | None = None
    balance: bool = True
    clam_bag_weight: float = 0.7
    n_bootstrap: int = 1000
    batch_size: int = 32

    @classmethod
    def linear_head(cls, **overrides: Any) -> MILConfig:
        """Settings of the linear head on slide embeddings: a fixed schedule of 300 epochs at lr 1e-2 with
        weight decay 1e-4 and no epoch selection (the linear-probe protocol), unless overridden."""
        base = {"model": "linear", "epochs": 300, "lr": 1e-2, "weight_decay": 1e-4, "val_fraction": 0.0}
        return cls(**{**base, **overrides})

    def model_args(self) -> dict[str, Any]:
        from pathvl.models.mil import MIL_DEFAULTS

        wanted = {"hidden": self.hidden, "attn_dim": self.attn_dim, "dropout": self.dropout}
        allowed = MIL_DEFAULTS.get(self.model, {})
        return {**allowed, **{k: v for k, v in wanted.items() if v is not None and k in allowed}}


@dataclass
class MILResult:
    """What a cross-validated run produced.

    Attributes:
        config: The run's ``config.json`` content.
        splits: The folds.
        metrics: The ``metrics.json`` content (pooled out-of-fold, per fold, summary).
        predictions: One dict per slide (the rows of ``predictions.csv``).
        run_dir: Where it was written (None when not written).
        heatmaps: PNG files written.
        attention: Attention per patch of the slides that have it (out-of-fold model).
        states: The best state dict of each fold.
    """

    config: dict[str, Any]
    splits: dict[str, Any]
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    run_dir: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal."""
        pooled = self.metrics.get("pooled", {})
        ci = pooled.get("ci", {})
        parts = []
        for k, v in pooled.get("metrics", {}).items():
            if v is None:
                continue
            lo, hi = ci.get(k, [None, None])
            parts.append(f"{k} {v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""))
        head = f"{self.config.get('model')} on {pooled.get('n', 0)} slides"
        if self.splits.get("k"):
            head += f", {self.splits['k']}-fold"
        lines = [f"{head}: " + ", ".join(parts)]
        if self.run_dir is not None:
            lines.append(f"run: {self.run_dir}  (predictions {PREDICTIONS_FILE}, metrics {METRICS_FILE})")
        if self.heatmaps:
            lines.append(f"heatmaps: {len(self.heatmaps)} PNG(s) in {self.heatmaps[0].parent}")
        return "\n".join(lines)


def _device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _targets(labels: SlideLabels, ids: Sequence[str], norm: tuple[float, float]) -> torch.Tensor:
    import torch

    sub = labels.subset(ids)
    if labels.task == "classification":
        return torch.from_numpy(sub.y.astype(np.int64))
    mean, std = norm
    return torch.from_numpy(((sub.y - mean) / std).astype(np.float32))


def _bag_loss(out: dict[str, torch.Tensor], y: torch.Tensor, task: str, weight: torch.Tensor | None) -> torch.Tensor:
    import torch.nn.functional as F

    if task == "classification":
        return F.cross_entropy(out["logits"], y, weight=weight)
    return F.mse_loss(out["logits"].reshape(-1), y.reshape(-1))


def _bag_tensor(bag: Bag, device: torch.device, max_patches: int | None = None,
                rng: np.random.Generator | None = None) -> torch.Tensor:
    import torch

    x = bag.load()
    if max_patches is not None and len(x) > max_patches and rng is not None:
        x = x[np.sort(rng.choice(len(x), max_patches, replace=False))]
    return torch.from_numpy(np.asarray(x, dtype=np.float32))[None].to(device)  # (1, N, D)


def _predict(model: torch.nn.Module, bags: Mapping[str, Bag], ids: Sequence[str], device: torch.device,
             embeddings: bool = False, batch_size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Raw outputs (logits or standardised values) ``(n, C)`` and the attention of each slide."""
    import torch

    was = model.training
    model.eval()
    outs, attn = [], {}
    with torch.no_grad():
        if embeddings:
            for i in range(0, len(ids), batch_size):
                x = np.concatenate([bags[s].load() for s in ids[i:i + batch_size]])
                outs.append(model(torch.from_numpy(x).float().to(device))["logits"].float().cpu())
        else:
            for s in ids:
                o = model(_bag_tensor(bags[s], device))
                outs.append(o["logits"].float().cpu())
                if "attention" in o:
                    attn[s] = o["attention"][0].float().cpu().numpy()
    model.train(was)
    n_out = outs[0].shape[1] if outs else 1
    return (torch.cat(outs).numpy() if outs else np.zeros((0, n_out))), attn


def _scores(raw: np.ndarray, task: str, norm: tuple[float, float]) -> np.ndarray:
    if task == "classification":
        z = raw - raw.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    return raw.reshape(-1) * norm[1] + norm[0]


def _train_fold(bags: Mapping[str, Bag], labels: SlideLabels, train_ids: list[str], val_ids: list[str],
                cfg: MILConfig, fold: int, in_dim: int, device: torch.device, embeddings: bool,
                progress: bool) -> dict[str, Any]:
    """Train one fold; returns ``{"state", "history", "best_epoch", "val_loss", "norm"}``."""
    import torch

    from pathvl.models.mil import build_mil_model

    task = labels.task
    torch.manual_seed(cfg.seed * 1009 + fold)
    rng = np.random.default_rng([cfg.seed, fold, 7])
    model = build_mil_model(cfg.model, in_dim, labels.n_outputs, **cfg.model_args()).to(device)
    if embeddings:
        x_train = np.concatenate([bags[s].load() for s in train_ids]).astype(np.float64)
        model.mean.copy_(torch.from_numpy(x_train.mean(axis=0)).float())
        model.std.copy_(torch.from_numpy(x_train.std(axis=0)).float().clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr = labels.subset(train_ids)
    norm = (0.0, 1.0)
    if task == "regression":
        norm = (float(tr.y.mean()), float(tr.y.std()) or 1.0)
    y_train = _targets(labels, train_ids, norm).to(device)
    y_val = _targets(labels, val_ids, norm) if val_ids else None
    weight = None
    if task == "classification" and cfg.balance:
        counts = np.bincount(tr.y, minlength=labels.n_outputs).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
        weight = torch.tensor(w, dtype=torch.float32, device=device)
    clam = cfg.model == "clam-sb"
    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size) if embeddings else len(train_ids)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"fold {fold + 1}", unit="step" if embeddings else "slide",
               leave=False, disable=None if progress else True)
    history, best = [], {"loss": math.inf, "epoch": -1, "state": None}
    for epoch in range(cfg.epochs):
        model.train()
        total, n_seen = 0.0, 0
        order = rng.permutation(len(train_ids))
        batches = ([order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)] if embeddings
                   else [[i] for i in order])
        for idx in batches:
            if embeddings:
                x = torch.from_numpy(np.concatenate([bags[train_ids[i]].load() for i in idx])).float().to(device)
            else:
                x = _bag_tensor(bags[train_ids[idx[0]]], device, cfg.max_patches, rng)
            y = y_train[torch.as_tensor(np.asarray(idx), device=device)]
            out = model(x, label=y if clam else None)
            loss = _bag_loss(out, y, task, weight)
            if clam:
                loss = cfg.clam_bag_weight * loss + (1 - cfg.clam_bag_weight) * out["instance_loss"]
            if not torch.isfinite(loss):
                where = "a batch" if embeddings else f"slide {train_ids[idx[0]]!r}"
                raise MILError(f"fold {fold}: the loss became {loss.item()} at epoch {epoch + 1} on {where}; "
                               f"lower --lr (now {cfg.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n_seen += len(idx)
            bar.update(1)
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(n_seen, 1)}
        if val_ids:
            raw, _ = _predict(model, bags, val_ids, device, embeddings)
            logits = torch.from_numpy(raw)
            yv = y_val
            rec["val_loss"] = float(_bag_loss({"logits": logits}, yv, task, None))
            sc = _scores(raw, task, norm)
            if task == "classification":
                rec["val_balanced_accuracy"] = M.balanced_accuracy(yv.numpy(), sc.argmax(axis=1))
            else:
                rec["val_r2"] = _nan_none(_r2(labels.subset(val_ids).y, sc))
            better = rec["val_loss"] < best["loss"] - 1e-9
        else:
            better = True
        if better:
            best = {"loss": rec.get("val_loss", rec["train_loss"]), "epoch": epoch + 1,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        history.append(rec)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{rec.get('val_loss', float('nan')):.3f}")
    bar.close()
    return {"state": best["state"], "history": history, "best_epoch": best["epoch"],
            "val_loss": best["loss"] if val_ids else None, "norm": norm}


def _load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model.load_state_dict(dict(state))
    return model


# ============================================================================================== outputs
def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + K.TMP_SUFFIX)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_json(path: Path, obj: Any) -> Path:
    return _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return _atomic(path, lambda p: p.write_text(buf.getvalue()))


def _save_state(path: Path, state: Mapping[str, torch.Tensor], meta: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return _atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def _save_png(path: Path, img: np.ndarray) -> Path:
    from PIL import Image

    return _atomic(path, lambda p: Image.fromarray(img).save(p, format="PNG"))


def _percentiles(a: np.ndarray) -> np.ndarray:
    """Each value's rank as a fraction in [0, 1] (CLAM draws attention heatmaps as percentiles)."""
    if len(a) < 2:
        return np.ones_like(a, dtype=np.float64)
    r = np.argsort(np.argsort(a, kind="stable"), kind="stable")
    return r / (len(a) - 1)


def _thumbnail(bag: Bag, max_px: int) -> np.ndarray:
    if bag.slide_path and Path(bag.slide_path).exists():
        from pathvl.slide.reader import open_slide

        with open_slide(bag.slide_path) as s:
            return s.thumbnail(max_px)[0]
    W, H = bag.slide_size or (max_px, max_px)
    scale = max(W, H) / max_px if max(W, H) > max_px else 1.0
    return np.full((max(1, round(H / scale)), max(1, round(W / scale)), 3), 255, np.uint8)


def _text(draw: Any, xy: tuple[int, int], text: str, fill: tuple[int, int, int] = (0, 0, 0)) -> None:
    from PIL import ImageFont

    draw.text(xy, text, fill=fill, font=ImageFont.load_default())


def attention_heatmap(bag: Bag, attention: np.ndarray, title: str = "", max_px: int = 1024,
                      alpha: float = 0.5) -> np.ndarray:
    """The attention of each patch over the slide thumbnail, with a colour scale on the right.

    Attention is drawn as its percentile among the slide's patches (0 = least, 1 = most attended), with
    the ramp of :func:`pathvl.eval.heatmap.colorize` through :meth:`pathvl.eval.heatmap.Heatmap.overlay`.

    Returns:
        uint8 RGB image ``(h, w + bar, 3)``.
    """
    from PIL import Image, ImageDraw

    from pathvl.eval.heatmap import Heatmap, colorize

    if bag.coords is None or bag.footprint is None or bag.slide_size is None:
        raise MILError(f"slide {bag.slide_id!r}: no patch coordinates to draw a heatmap with")
    hm = Heatmap(slide_id=bag.slide_id, text=title or "attention", scores=_percentiles(attention).astype(np.float32),
                 coords=bag.coords, footprint=bag.footprint, slide_size=bag.slide_size, mode="attention",
                 slide_path=bag.slide_path)
    over = hm.overlay(_thumbnail(bag, max_px), alpha=alpha, vmin=0.0, vmax=1.0)
    h, w = over.shape[:2]
    bar_w, pad, top = 22, 10, 18
    canvas = Image.new("RGB", (w + bar_w + 4 * pad + 30, max(h, 160) + top), (255, 255, 255))
    canvas.paste(Image.fromarray(over), (0, top))
    bar_h = max(h, 160) - 2 * pad
    ramp = colorize(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    x0 = w + pad
    canvas.paste(Image.fromarray(ramp), (x0, top + pad))
    d = ImageDraw.Draw(canvas)
    d.rectangle([x0 - 1, top + pad - 1, x0 + bar_w, top + pad + bar_h], outline=(0, 0, 0))
    _text(d, (x0 + bar_w + 4, top + pad - 4), "high")
    _text(d, (x0 + bar_w + 4, top + pad + bar_h - 8), "low")
    _text(d, (x0 + bar_w + 4, top + pad + bar_h // 2 - 4), "attn %")
    _text(d, (4, 3), (title or bag.slide_id)[: max(10, w // 6)])
    return np.asarray(canvas)


def _patch_pixels(bag: Bag, rows: Sequence[int], size: int) -> list[np.ndarray] | None:
    """Pixels of patches (by position in the bag) as ``(size, size, 3)``: stored JPEGs, else the slide."""
    from PIL import Image

    idx = [int(i) for i in rows]
    if bag.h5_path is not None and bag.rows is not None:
        with h5py.File(bag.h5_path, "r") as f:
            if K.PIXELS_JPEG in f:
                from pathvl.data.tiler import decode_jpeg

                out = []
                for i in idx:
                    img = decode_jpeg(f[K.PIXELS_JPEG][int(bag.rows[i])])
                    out.append(np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)))
                return out
    if not (bag.slide_path and Path(bag.slide_path).exists()) or bag.coords is None or bag.footprint is None:
        return None
    from pathvl.slide.geometry import best_level
    from pathvl.slide.reader import open_slide

    out = []
    with open_slide(bag.slide_path) as s:
        for i in idx:
            x, y = (int(v) for v in bag.coords[i])
            fp = max(1, round(float(bag.footprint[i])))
            level = best_level(s.level_downsamples, fp / size)  # level-0 px per output px
            ds = s.level_downsamples[level]
            side = max(1, math.ceil(fp / ds))
            region = s.read_region((x, y), level, (side, side))  # location in level-0 pixels
            out.append(np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.BILINEAR)))
    return out


def top_patches_sheet(bag: Bag, attention: np.ndarray, k: int = 16, size: int = 128,
                      title: str = "") -> np.ndarray | None:
    """A contact sheet of the ``k`` most attended patches (rank and attention under each), or None when
    neither stored pixels nor the slide file are at hand."""
    from PIL import Image, ImageDraw

    k = min(k, len(attention))
    order = np.argsort(-attention, kind="stable")[:k]
    pix = _patch_pixels(bag, order, size)
    if pix is None:
        return None
    cols = min(k, 4) or 1
    rows = math.ceil(k / cols)
    lab, top = 14, 18
    sheet = Image.new("RGB", (cols * (size + 4) + 4, rows * (size + lab + 4) + top + 4), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    _text(d, (4, 3), (title or f"{bag.slide_id}: top {k} attended patches")[: cols * 22])
    for j, (i, img) in enumerate(zip(order, pix)):
        x = 4 + (j % cols) * (size + 4)
        y = top + 4 + (j // cols) * (size + lab + 4)
        sheet.paste(Image.fromarray(img), (x, y))
        _text(d, (x, y + size + 1), f"#{j + 1} a={attention[i]:.3g}")
    return np.asarray(sheet)


def _pick_heatmap_slides(preds: list[dict[str, Any]], attention: Mapping[str, np.ndarray], n: int, task: str,
                         class_names: Sequence[str]) -> list[str]:
    """Up to ``n`` slides: the most confident of each predicted class in turn (highest and lowest
    predictions in turn for a regression)."""
    rows = [r for r in preds if r["slide_id"] in attention]
    if n <= 0 or not rows:
        return []
    if task == "classification":
        queues = []
        for c in class_names:
            mine = [r for r in rows if r["prediction"] == c]
            queues.append([r["slide_id"] for r in sorted(mine, key=lambda r: -r[f"prob_{c}"])])
    else:
        by = sorted(rows, key=lambda r: r["prediction"])
        queues = [[r["slide_id"] for r in reversed(by)], [r["slide_id"] for r in by]]
    out: list[str] = []
    while len(out) < min(n, len(rows)) and any(queues):
        for q in queues:
            while q and q[0] in out:
                q.pop(0)
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def write_heatmaps(bags: Mapping[str, Bag], attention: Mapping[str, np.ndarray], slide_ids: Sequence[str],
                   out_dir: Path, captions: Mapping[str, str] | None = None, top_k: int = 16) -> list[Path]:
    """Write ``<slide>.attention.png`` and ``<slide>.top_patches.png`` for each slide; returns the paths."""
    paths = []
    for sid in slide_ids:
        bag, a = bags[sid], np.asarray(attention[sid], dtype=np.float64)
        title = (captions or {}).get(sid, sid)
        if bag.coords is None:
            continue
        paths.append(_save_png(out_dir / f"{sid}.attention.png", attention_heatmap(bag, a, title)))
        if top_k > 0:
            sheet = top_patches_sheet(bag, a, top_k, title=f"{sid}: top {min(top_k, len(a))} attended patches")
            if sheet is None:
                _warn(f"slide {sid!r}: no stored pixels and no slide file at {bag.slide_path}; "
                      "no contact sheet of its top patches")
            else:
                paths.append(_save_png(out_dir / f"{sid}.top_patches.png", sheet))
    return paths


# ============================================================================================== cross-validation
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


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


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


# ============================================================================================== evaluation
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
