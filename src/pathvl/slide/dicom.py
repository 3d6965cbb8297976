"""DICOM WSI files grouped into slides by SeriesInstanceUID (pydicom), one slide per series."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

#: File extensions a folder scan picks up as slides.


#: SOP class of VL Whole Slide Microscopy images, the only DICOM objects that are slides.
DICOM_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


_DICOM_TAGS = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"]


@dataclass(frozen=True)
class DicomSeries:
    """The ``.dcm`` files of one folder that share a ``SeriesInstanceUID``: one slide.

    Attributes:
        folder: The folder holding the files.
        uid: The ``SeriesInstanceUID`` (``""`` for a file pydicom cannot parse: a series of its own).
        files: The series' files, sorted.
        main: The file to open: the largest ``VOLUME`` instance (the pyramid's base), else the first file.
        is_wsi: Whether a file is a VL Whole Slide Microscopy image (or unparsable, so that opening it says
            why); other DICOM objects (annotations, CT...) are not slides.
        slide_id: The slide id (see :func:`slide_id_for`).
    """

    folder: Path
    uid: str
    files: tuple[Path, ...]
    main: Path
    is_wsi: bool
    slide_id: str


@dataclass(frozen=True)
class _DicomHeader:
    sop: str
    uid: str
    flavour: str
    pixels: int


def _dicom_header(path: Path) -> _DicomHeader | None:
    """The few tags that group a file into its series, or None when it is not a readable DICOM file."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_DICOM_TAGS))
    except Exception:  # pydicom raises many types for foreign or truncated files
        return None
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else "") or "")
    kind = ds.get("ImageType") or []
    kind = [kind] if isinstance(kind, str) else list(kind)
    pixels = int(ds.get("TotalPixelMatrixColumns") or 0) * int(ds.get("TotalPixelMatrixRows") or 0)
    return _DicomHeader(sop=sop, uid=str(ds.get("SeriesInstanceUID") or "").strip(),
                        flavour=str(kind[2]).upper() if len(kind) > 2 else "", pixels=pixels)


def _dcm_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == ".dcm" and f.is_file())


def dicom_series(folder: str | Path) -> list[DicomSeries]:
    """The DICOM series of a folder, one per ``SeriesInstanceUID``, in order of their first file.

    Headers are read once per folder state (file names, sizes and times), so naming and opening the
    slides of a folder reads each header once.

    Raises:
        SlideError: Several ``.dcm`` files and pydicom is not installed (it groups them).
    """
    folder = Path(folder)
    files = _dcm_files(folder)
    state = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return list(_series_of_folder(str(folder), state))


@functools.lru_cache(maxsize=256)
def _series_of_folder(folder_str: str, state: tuple) -> tuple[DicomSeries, ...]:
    folder = Path(folder_str)
    files = [folder / name for name, _, _ in state]
    try:
        headers = [_dicom_header(f) for f in files]
    except ImportError:
        if len(files) > 1:
            raise _slide_error()(
                f"{folder}: {len(files)} DICOM files; grouping them into slides (one per SeriesInstanceUID) "
                "needs pydicom: pip install pydicom"
            ) from None
        headers = [None] * len(files)
    groups: dict[str, list[tuple[Path, _DicomHeader | None]]] = {}
    for f, h in zip(files, headers):
        key = h.uid if h is not None and h.uid else f"file:{f.name}"
        groups.setdefault(key, []).append((f, h))
    out = []
    for key, members in groups.items():
        paths = tuple(f for f, _ in members)
        uid = "" if key.startswith("file:") else key
        volumes = [i for i, (_, h) in enumerate(members) if h is not None and h.flavour == "VOLUME"]
        main = paths[max(volumes, key=lambda i: (members[i][1].pixels, -i))] if volumes else paths[0]
        is_wsi = any(h is None or h.sop == DICOM_WSI_SOP_CLASS for _, h in members)
        if len(paths) == 1:  # a lone .dcm (single-file WSI): its own name
            candidates = [paths[0].stem, uid]
        elif len(groups) == 1:  # the folder is the series' own: its name, as for a one-slide folder
            candidates = [folder.resolve().name, uid, main.stem]
        else:
            candidates = [uid, main.stem]
        sid = next(c for c in candidates if c)
        out.append(DicomSeries(folder=folder, uid=uid, files=paths, main=main, is_wsi=is_wsi, slide_id=sid))
    return tuple(out)


def _series_of(path: Path) -> DicomSeries:
    """The series a ``.dcm`` file belongs to."""
    for s in dicom_series(path.parent):
        if any(f.name == path.name for f in s.files):
            return s
    return DicomSeries(folder=path.parent, uid="", files=(path,), main=path, is_wsi=True, slide_id=path.stem)


def _only_series(folder: Path) -> DicomSeries:
    """The one DICOM WSI series of a folder.

    Raises:
        SlideError: No ``.dcm`` file, no WSI among them, or several series (naming them).
    """
    if not _dcm_files(folder):
        raise _slide_error()(f"{folder}: a folder but not a DICOM WSI series (no .dcm files)")
    series = [s for s in dicom_series(folder) if s.is_wsi]
    if not series:
        raise _slide_error()(f"{folder}: its .dcm files hold no VL Whole Slide Microscopy image")
    if len(series) > 1:
        ids = ", ".join(s.slide_id for s in series)
        raise _slide_error()(f"{folder}: holds {len(series)} DICOM WSI series ({ids}); open one of their files "
                         f"(e.g. {series[0].main}) or tile the folder, which gives one slide per series")
    return series[0]


def _slide_error() -> type[Exception]:
    from pathvl.slide.reader import SlideError  # reader imports this module: look it up when raising

    return SlideError
