"""Slides with their reports and clinical context: what PathAlign trains on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset as TorchDataset

from pathvl.text.reports import _check_file_encoding, check_report


def read_reports(path: str | Path, max_chars: int = 50_000, text_column: str | None = None) -> dict[str, Any]:
    """Slide reports from a UTF-8 CSV/JSONL (:func:`~pathvl.data.slidedata.read_slide_texts`), checked.

    Returns:
        ``{slide_id: SlideText}``.

    Raises:
        FileNotFoundError: No such file.
        ReportError: The file is not UTF-8, or a report fails :func:`check_report`.
    """
    from pathvl.data.slidedata import SlideText, read_slide_texts

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reports: no such file {p}")
    _check_file_encoding(p)
    texts = read_slide_texts(p, text_column=text_column)
    return {sid: SlideText(check_report(t.caption, sid, max_chars), t.subcaptions) for sid, t in texts.items()}


def _read_contexts(path: str | Path, max_chars: int) -> dict[str, str]:
    from pathvl.data.slidedata import read_slide_texts

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.contexts: no such file {p}")
    _check_file_encoding(p)
    texts = read_slide_texts(p, text_column="context")
    return {sid: check_report(t.caption, sid, max_chars, "clinical context") for sid, t in texts.items()
            if t.caption.strip()}


def _whole_report(caption: str) -> list[str]:
    return [caption]


class ReportDataset(TorchDataset):
    """Slides with their reports (checked) and optional clinical context: what PathAlign trains on.

    Args:
        slides: A :class:`~pathvl.data.slidedata.SlideDataset`.
        contexts: ``{slide_id: clinical context}`` for stage-2 prompts (missing slides: none).
        max_report_chars: See :func:`check_report`.

    Raises:
        ReportError: A report or context fails :func:`check_report`.
    """

    def __init__(self, slides: Any, contexts: Mapping[str, str] | None = None, max_report_chars: int = 50_000) -> None:
        for sid, cap in zip(slides.slide_ids, slides.captions):
            check_report(cap, sid, max_report_chars)
        self.slides = slides
        self.contexts = {str(k): check_report(v, str(k), max_report_chars, "clinical context")
                         for k, v in (contexts or {}).items() if v is not None and str(v).strip()}

    @property
    def slide_ids(self) -> list[str]:
        return list(self.slides.slide_ids)

    @property
    def captions(self) -> list[str]:
        return list(self.slides.captions)

    @property
    def feature_dim(self) -> int:
        return int(self.slides.feature_dim)

    def set_epoch(self, epoch: int) -> None:
        """See :meth:`SlideDataset.set_epoch`."""
        self.slides.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.slides[i])
        item["context"] = self.contexts.get(item["slide_id"], "")
        return item


def build_report_dataset(root: str | Path, reports: str | Path | Mapping[str, str], features: str, *,
                         contexts: str | Path | Mapping[str, str] | None = None, slide_ids: Sequence[str] | None = None,
                         max_patches: int = 1024, mags: Sequence[float] = (), train: bool = True, seed: int = 0,
                         max_report_chars: int = 50_000) -> ReportDataset:
    """A :class:`ReportDataset` over a tiled and embedded dataset folder.

    Args:
        root: Dataset folder (``pathvl tile`` then ``pathvl embed``).
        reports: CSV/JSONL of slide id and report (UTF-8), or ``{slide_id: report}``.
        features: Encoder name of the cached features.
        contexts: CSV/JSONL with a ``context`` column, or ``{slide_id: context}``.
        slide_ids: Restrict to these slides (a split).
        max_patches: Patches per slide (0: all).
        mags: Keep only these magnifications.
        train: Random patch sampling.
        seed: Sampling seed.
        max_report_chars: Longest accepted report.

    Raises:
        ReportError: Bad reports (empty, enormous, not UTF-8).
        DatasetError: Slides without reports, reports without slides, slides without features.
    """
    from pathvl.data.slidedata import SlideDataset, SlideText

    if isinstance(reports, Mapping):
        texts = {str(k): SlideText(check_report(v, str(k), max_report_chars)) for k, v in reports.items()}
    else:
        texts = read_reports(reports, max_report_chars)
    if contexts is None or isinstance(contexts, Mapping):
        ctx = dict(contexts or {})
    else:
        ctx = _read_contexts(contexts, max_report_chars)
    slides = SlideDataset(root, texts, features, slide_ids=slide_ids, max_patches=max_patches, n_subcaptions=1,
                          decomposer=_whole_report, mags=mags, train=train, seed=seed)
    return ReportDataset(slides, ctx, max_report_chars)
