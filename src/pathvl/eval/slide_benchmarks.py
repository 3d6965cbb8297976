"""Slide-level benchmarks: the public label files of the usual MIL tasks, and how to read them.

pathvl ships no label file and downloads nothing: each entry says which file the benchmark's maintainers
publish, its columns, how its labels map to classes and how its slide ids relate to slide file names, so
that ``pathvl mil train --benchmark NAME --root DIR`` finds the file under ``DIR`` (or takes ``--labels``),
maps it, and matches its slides to the dataset's (:func:`pathvl.eval.mil.match_labels`).

Layouts:

- TCGA subtyping files follow CLAM's ``dataset_csv/`` (Lu et al., Nature Biomedical Engineering 2021;
  e.g. ``tcga_kidney_clean.csv``: an unnamed index column, then ``case_id,slide_id,label`` with labels
  ``TCGA-KIRC``, ``TCGA-KIRP``, ``TCGA-KICH``; ``tumor_subtyping_dummy_clean.csv``:
  ``case_id,slide_id,label``). ``slide_id`` is the diagnostic slide's file name without ``.svs``, a TCGA
  barcode plus the file UUID (``TCGA-2K-A9WE-01Z-00-DX1.ED8ADE3B-...``); ``case_id`` is the patient
  (``TCGA-2K-A9WE``, the barcode's first 12 characters, derived when the column is absent).
- CPTAC mutation files hold one 0/1 column per gene beside ``case_id,slide_id`` (slide ids as in the
  TCIA CPTAC pathology collections, ``C3L-00001-21``; the patient is ``C3L-00001``); ``--target`` picks the
  gene.
- BCNB (Xu et al., Frontiers in Oncology 2021) publishes ``patient-clinical-data.xlsx`` with
  ``Patient ID`` (1..1058, one biopsy slide ``WSIs/<id>.jpg`` each) and ``ALN status`` (``N0``,
  ``N+(1-2)``, ``N+(>2)``).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathvl.eval.mil import MILError, MILWarning, SlideLabels, read_labels

__all__ = ["SLIDE_BENCHMARKS", "SlideBenchmark", "benchmark_labels", "describe_benchmarks", "find_label_file",
           "get_benchmark", "tcga_case_id"]

_TCGA_CASE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)
_CPTAC_CASE = re.compile(r"^(C3[LN]-\d{5}|\d{2}[A-Z]{2}\d{3})", re.IGNORECASE)


def tcga_case_id(slide_id: str) -> str | None:
    """The TCGA patient (case) of a barcode: ``TCGA-2K-A9WE-01Z-00-DX1.ED8A...`` -> ``TCGA-2K-A9WE``."""
    m = _TCGA_CASE.match(slide_id.strip())
    return m.group(1).upper() if m else None


def cptac_case_id(slide_id: str) -> str | None:
    """The CPTAC patient of a slide id: ``C3L-00001-21`` -> ``C3L-00001``."""
    m = _CPTAC_CASE.match(slide_id.strip())
    return m.group(1).upper() if m else None


@dataclass(frozen=True)
class SlideBenchmark:
    """How one benchmark's public label file reads.

    Attributes:
        name: Registry name (``--benchmark``).
        title: One line for ``pathvl mil --list``.
        task: What is predicted.
        classes: Class names in index order (for two, the second is the positive class).
        label_files: File name patterns looked for under ``--root`` (first match wins).
        slide_column: Column of slide ids.
        label_column: Column of labels (None: ``--target`` must name one, e.g. a gene).
        patient_column: Column of patients, if the file has one.
        label_map: Raw label -> class (None: left out); raw values outside it are an error.
        patient_fn: Patient of a slide id when the file has no patient column.
        slide_ids: How slide ids relate to slide files.
        source: Who publishes the file and the paper to cite.
        targets: Columns ``--target`` may name (mutation genes).
        notes: Anything else worth knowing.
    """

    name: str
    title: str
    task: str
    classes: tuple[str, ...]
    label_files: tuple[str, ...]
    slide_column: str
    label_column: str | None
    patient_column: str | None
    label_map: Mapping[str, str | None]
    patient_fn: Callable[[str], str | None] | None = None
    slide_ids: str = ""
    source: str = ""
    targets: tuple[str, ...] = ()
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """Several lines: classes, file, columns, ids, source."""
        cols = [f"{self.slide_column} (slide)"]
        if self.patient_column:
            cols.append(f"{self.patient_column} (patient)")
        cols.append(f"{self.label_column} (label)" if self.label_column else "one 0/1 column per gene (--target)")
        lines = [f"{self.name}: {self.title}",
                 f"  task      {self.task}; classes {', '.join(self.classes)}"
                 + (f" (positive: {self.classes[1]})" if len(self.classes) == 2 else ""),
                 f"  file      {' or '.join(self.label_files)} under --root (or --labels FILE)",
                 f"  columns   {', '.join(cols)}",
                 "  labels    " + ", ".join(f"{k} -> {v if v is not None else '(left out)'}"
                                            for k, v in self.label_map.items())]
        if self.targets:
            lines.append(f"  targets   {', '.join(self.targets)}")
        if self.slide_ids:
            lines.append(f"  slide ids {self.slide_ids}")
        if self.source:
            lines.append(f"  source    {self.source}")
        if self.notes:
            lines.append(f"  note      {self.notes}")
        return "\n".join(lines)


def _both(names: Sequence[str], prefix: str = "TCGA-") -> dict[str, str]:
    """``{NAME: NAME, TCGA-NAME: NAME}`` for each class."""
    out = {}
    for n in names:
        out[n] = n
        out[prefix + n] = n
    return out


_TCGA_IDS = ("diagnostic slide file name without .svs: TCGA barcode + '.' + file UUID "
             "(TCGA-2K-A9WE-01Z-00-DX1.ED8ADE3B-D49B-403B-B4EB-BD11D91DD676); a barcode without the UUID "
             "also matches; patient = first 12 characters")

SLIDE_BENCHMARKS: dict[str, SlideBenchmark] = {
    b.name: b
    for b in (
        SlideBenchmark(
            name="tcga-nsclc", title="TCGA NSCLC subtyping: lung adenocarcinoma vs squamous cell carcinoma",
            task="subtyping", classes=("LUAD", "LUSC"),
            label_files=("tcga_lung*.csv", "*nsclc*.csv", "*lung*.csv"),
            slide_column="slide_id", label_column="label", patient_column="case_id",
            label_map={**_both(["LUAD", "LUSC"]), "lung_adenocarcinoma": "LUAD", "lung_squamous": "LUSC"},
            patient_fn=tcga_case_id, slide_ids=_TCGA_IDS,
            source="CLAM dataset_csv layout (Lu et al., Nat. Biomed. Eng. 2021); TCGA-LUAD and TCGA-LUSC diagnostic "
                   "slides from the GDC portal"),
        SlideBenchmark(
            name="tcga-rcc", title="TCGA RCC subtyping: clear cell vs papillary vs chromophobe renal cell carcinoma",
            task="subtyping", classes=("KIRC", "KIRP", "KICH"),
            label_files=("tcga_kidney_clean.csv", "tcga_kidney*.csv", "*rcc*.csv"),
            slide_column="slide_id", label_column="label", patient_column="case_id",
            label_map=_both(["KIRC", "KIRP", "KICH"]), patient_fn=tcga_case_id, slide_ids=_TCGA_IDS,
            source="CLAM dataset_csv/tcga_kidney_clean.csv (index, case_id, slide_id, label = TCGA-KIRC/KIRP/KICH; "
                   "Lu et al., Nat. Biomed. Eng. 2021)"),
        SlideBenchmark(
            name="tcga-brca", title="TCGA BRCA subtyping: invasive ductal vs invasive lobular carcinoma",
            task="subtyping", classes=("IDC", "ILC"),
            label_files=("tcga_brca*.csv", "*brca*.csv"),
            slide_column="slide_id", label_column="label", patient_column="case_id",
            label_map={"IDC": "IDC", "ILC": "ILC", "Infiltrating Ductal Carcinoma": "IDC",
                       "Infiltrating Lobular Carcinoma": "ILC", "Infiltrating duct carcinoma, NOS": "IDC",
                       "Lobular carcinoma, NOS": "ILC", "Mixed": None, "Other": None},
            patient_fn=tcga_case_id, slide_ids=_TCGA_IDS,
            source="CLAM dataset_csv layout (case_id, slide_id, label); labels from TCGA-BRCA's histological type",
            notes="mixed and other histologies are left out; ILC is the positive class"),
        SlideBenchmark(
            name="cptac-mutation", title="CPTAC mutation status from H&E (e.g. LUAD: EGFR, KRAS, STK11, TP53)",
            task="binary mutation status", classes=("wildtype", "mutant"),
            label_files=("cptac*mutation*.csv", "cptac*.csv", "cptac*.tsv", "cptac*.xlsx"),
            slide_column="slide_id", label_column=None, patient_column="case_id",
            label_map={"0": "wildtype", "1": "mutant", "0.0": "wildtype", "1.0": "mutant", "WT": "wildtype",
                       "MUT": "mutant", "wildtype": "wildtype", "mutant": "mutant", "False": "wildtype",
                       "True": "mutant"},
            patient_fn=cptac_case_id, targets=("EGFR", "KRAS", "STK11", "TP53", "ALK", "BRAF", "PIK3CA", "PTEN"),
            slide_ids="TCIA CPTAC pathology slide id (C3L-00001-21, file C3L-00001-21.svs); patient = C3L-00001",
            source="CPTAC (Clinical Proteomic Tumor Analysis Consortium) somatic mutation calls per case, one 0/1 "
                   "column per gene"),
        SlideBenchmark(
            name="bcnb-aln", title="BCNB axillary lymph node status from core-needle biopsies: N0 vs N+",
            task="binary metastasis status", classes=("N0", "N+"),
            label_files=("patient-clinical-data.xlsx", "*clinical*.xlsx", "*clinical*.csv"),
            slide_column="Patient ID", label_column="ALN status", patient_column=None,
            label_map={"N0": "N0", "N+(1-2)": "N+", "N+(>2)": "N+"},
            slide_ids="Patient ID = the WSI's file stem (WSIs/1.jpg -> slide 1); one slide per patient",
            source="BCNB, Xu et al., Frontiers in Oncology 2021 (bupt-ai-cz.github.io/BCNB)"),
        SlideBenchmark(
            name="bcnb-aln3", title="BCNB axillary lymph node status, three classes: N0, N+(1-2), N+(>2)",
            task="metastasis burden", classes=("N0", "N+(1-2)", "N+(>2)"),
            label_files=("patient-clinical-data.xlsx", "*clinical*.xlsx", "*clinical*.csv"),
            slide_column="Patient ID", label_column="ALN status", patient_column=None,
            label_map={"N0": "N0", "N+(1-2)": "N+(1-2)", "N+(>2)": "N+(>2)"},
            slide_ids="Patient ID = the WSI's file stem (WSIs/1.jpg -> slide 1); one slide per patient",
            source="BCNB, Xu et al., Frontiers in Oncology 2021 (bupt-ai-cz.github.io/BCNB)"),
        SlideBenchmark(
            name="clam-dummy", title="CLAM's dummy tumour subtyping file (three made-up subtypes), to check a setup",
            task="subtyping", classes=("subtype_1", "subtype_2", "subtype_3"),
            label_files=("tumor_subtyping_dummy_clean.csv",),
            slide_column="slide_id", label_column="label", patient_column="case_id",
            label_map={"subtype_1": "subtype_1", "subtype_2": "subtype_2", "subtype_3": "subtype_3"},
            slide_ids="slide_0 ... slide_499; patients patient_0 ... (some have two or three slides)",
            source="CLAM dataset_csv/tumor_subtyping_dummy_clean.csv (Lu et al., Nat. Biomed. Eng. 2021)"),
    )
}


def get_benchmark(name: str) -> SlideBenchmark:
    """A registered benchmark.

    Raises:
        MILError: Unknown name (the message lists the known ones).
    """
    try:
        return SLIDE_BENCHMARKS[name]
    except KeyError:
        raise MILError(f"unknown benchmark {name!r}; known: {', '.join(SLIDE_BENCHMARKS)} "
                       "(see `pathvl mil --list`)") from None


def describe_benchmarks() -> str:
    """What ``pathvl mil --list`` prints."""
    return "\n\n".join(b.describe() for b in SLIDE_BENCHMARKS.values())


def find_label_file(bench: SlideBenchmark, root: str | os.PathLike[str]) -> Path:
    """The benchmark's label file under ``root`` (searched recursively, patterns in order).

    Raises:
        FileNotFoundError: ``root`` is missing, or holds none of the files (named in the message).
    """
    r = Path(root)
    if r.is_file():
        return r
    if not r.is_dir():
        raise FileNotFoundError(f"--root {r}: no such folder")
    for pat in bench.label_files:
        hits = sorted(p for p in r.rglob(pat) if p.is_file())
        if hits:
            return hits[0]
    raise FileNotFoundError(f"--root {r}: none of {', '.join(bench.label_files)} found for benchmark {bench.name}; "
                            "pass the file with --labels")


def benchmark_labels(name: str, root: str | os.PathLike[str] | None = None,
                     labels: str | os.PathLike[str] | None = None, target: str | None = None) -> SlideLabels:
    """Read a benchmark's label file with its layout.

    Args:
        name: Registry name (:data:`SLIDE_BENCHMARKS`).
        root: Folder holding the benchmark's files (its label file is found there).
        labels: The label file itself (overrides ``root``).
        target: The label column for benchmarks with several (a gene of ``cptac-mutation``).

    Raises:
        MILError: Unknown benchmark, a missing ``--target``, or labels outside the benchmark's map.
        FileNotFoundError: No label file under ``root``.

    Warns:
        MILWarning: A class of the benchmark has no slide in the file (it is dropped from the task).
    """
    bench = get_benchmark(name)
    if labels is None and root is None:
        raise MILError(f"benchmark {name}: give --root DIR (holding {bench.label_files[0]}) or --labels FILE")
    path = Path(labels) if labels is not None else find_label_file(bench, root)
    column = target or bench.label_column
    if column is None:
        raise MILError(f"benchmark {name}: pass --target with the label column, one of {', '.join(bench.targets)}")
    lab = read_labels(path, slide_column=bench.slide_column, label_column=column,
                      patient_column=bench.patient_column, label_map=bench.label_map, classes=bench.classes,
                      task="classification", patient_fn=bench.patient_fn)
    lab, dropped = lab.compact()
    if dropped:
        warnings.warn(f"{path}: no slide of class(es) {', '.join(dropped)} of benchmark {name}; the task has "
                      f"{len(lab.class_names)} classes: {', '.join(lab.class_names)}", MILWarning, stacklevel=2)
    return lab
