"""Slide labels: reading label files, inferring the task and class order, matching labels to slide ids."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pathvl.eval.mil.common import MILError, _some, _warn

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
