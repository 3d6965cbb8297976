"""Slide feature bags with their texts, for slide-level models (PathFLIP, PathAlign).

A slide item is every tissue patch feature of one slide (cached by ``pathvl embed`` on the full grid of
``pathvl tile --mags 20 --parents all``), sampled down to at most ``max_patches``, plus the slide's
caption or report and its region sub-captions (:mod:`pathvl.text.decompose`), sampled or padded to
``n_subcaptions``. :func:`collate_slides` pads the patch bags of a batch to a common length with a mask.

The texts come from a CSV or JSONL file with one row per slide: a slide id column (``slide_id``,
``slide``, ``id``, ...) and a text column (``text``, ``caption``, ``report``, ...), optionally a
``subcaptions`` column (a JSON list or ``|``-separated) that overrides the decomposer. Mismatches between
the texts and the dataset are errors, never silent drops: a slide without text, a text without a slide,
an empty text or an empty list of sub-captions each raise :class:`~pathvl.data.dataset.DatasetError`
naming the slides.

Positions in a batch (``pos``) are patch centres divided by the slide's level-0 width and height
(``[0, 1]``, ``(x, y)``); they are not coordinates (which on disk are level-0 top-left pixels). ``rows``
keeps each patch's row in the slide file so that scores map back to level-0 coordinates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from pathvl import _const as K
from pathvl.data.dataset import Dataset, DatasetError
from pathvl.data.handles import DEFAULT_MAX_OPEN_FILES, HandleCache
from pathvl.data.index import load_index
from pathvl.data.tables import read_table

__all__ = [
    "ID_COLUMNS",
    "TEXT_COLUMNS",
    "SlideDataset",
    "SlideText",
    "caption_from_ground_truth",
    "collate_slides",
    "read_slide_texts",
]

#: Column names accepted for the slide id, in order of preference (case-insensitive).
ID_COLUMNS = ("slide_id", "slide", "id", "slide_name", "case_id", "sample_id", "tissue sample id")
#: Column names accepted for the slide text, in order of preference (case-insensitive).
TEXT_COLUMNS = ("text", "caption", "report", "description", "notes", "pathology notes", "findings")
#: Column holding precomputed sub-captions (JSON list or ``|``-separated).
SUBCAPTION_COLUMNS = ("subcaptions", "sub_captions", "findings_list")


@dataclass(frozen=True)
class SlideText:
    """The text of one slide.

    Attributes:
        caption: The slide caption or report.
        subcaptions: Region sub-captions given with the text (``None``: decompose the caption).
    """

    caption: str
    subcaptions: tuple[str, ...] | None = None


def _parse_subcaptions(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        s = str(value).strip()
        if not s:
            return None
        if s.startswith("["):
            try:
                items = [str(v) for v in json.loads(s)]
            except json.JSONDecodeError:
                items = s.strip("[]").split("|")
        else:
            items = s.split("|")
    return tuple(i.strip() for i in items)


def read_slide_texts(path: str | Path, id_column: str | None = None, text_column: str | None = None,
                     subcaption_column: str | None = None) -> dict[str, SlideText]:
    """Read slide texts from a CSV/TSV, JSON Lines or XLSX file (:func:`pathvl.data.tables.read_table`).

    Args:
        path: The file.
        id_column: Slide id column (default: the first of :data:`ID_COLUMNS` present).
        text_column: Text column (default: the first of :data:`TEXT_COLUMNS` present).
        subcaption_column: Optional column with precomputed sub-captions.

    Returns:
        ``{slide_id: SlideText}``. Texts are returned as written, empty ones included (the dataset
        reports them as slides without text).

    Raises:
        FileNotFoundError: No such file.
        DatasetError: A needed column is missing, a slide id repeats, or a JSON line is unreadable.
    """
    table = read_table(path, "slide texts")
    rows, columns = table.rows, table.columns
    id_col = table.column(id_column, ID_COLUMNS, "slide id", required=False)
    text_col = table.column(text_column, TEXT_COLUMNS, "text", required=False)
    if id_col is None or text_col is None:
        raise DatasetError(
            f"{path}: cannot tell which columns hold the slide id and the text (columns: {columns}); name a "
            f"slide id column one of {list(ID_COLUMNS)} and a text column one of {list(TEXT_COLUMNS)}, or pass "
            "id_column=/text_column="
        )
    sub_col = table.column(subcaption_column, SUBCAPTION_COLUMNS, "sub-captions", required=False)
    out: dict[str, SlideText] = {}
    for r in rows:
        sid = str(r.get(id_col) or "").strip()
        if not sid:
            continue
        if sid in out:
            raise DatasetError(f"{path}: slide {sid!r} appears twice; give one text per slide")
        text = r.get(text_col)
        subs = _parse_subcaptions(r.get(sub_col)) if sub_col else None
        out[sid] = SlideText(caption="" if text is None else str(text), subcaptions=subs)
    return out


def footprints(f: h5py.File) -> dict[float, float]:
    """``{magnification: level-0 footprint in pixels}`` of an open slide file (empty if unrecorded)."""
    if K.ATTR_FOOTPRINTS not in f.attrs:
        return {}
    return {float(k): float(v) for k, v in json.loads(f.attrs[K.ATTR_FOOTPRINTS]).items()}


def _as_texts(texts: str | Path | Mapping[str, Any]) -> dict[str, SlideText]:
    if isinstance(texts, (str, Path)):
        return read_slide_texts(texts)
    out = {}
    for sid, t in texts.items():
        if isinstance(t, SlideText):
            out[str(sid)] = t
        elif isinstance(t, str) or t is None:
            out[str(sid)] = SlideText("" if t is None else t)
        else:  # (caption, subcaptions)
            cap, subs = t
            out[str(sid)] = SlideText(cap, None if subs is None else tuple(subs))
    return out


class SlideDataset(TorchDataset):
    """Map-style dataset of slides: patch features, normalised coordinates, caption and sub-captions.

    Args:
        root: Dataset folder (``pathvl tile`` then ``pathvl embed``).
        texts: Slide texts: a CSV/JSONL path (:func:`read_slide_texts`) or a mapping ``slide_id ->
            caption`` (or :class:`SlideText`, or ``(caption, subcaptions)``); None for features only
            (evaluation: items then carry an empty caption and no sub-captions).
        features: Encoder name under ``features/`` (as given to ``pathvl embed --encoder``).
        slide_ids: Use these slides only (e.g. a split); texts of other slides are then ignored.
            Default: every slide of the dataset, and the texts must match the dataset exactly.
        max_patches: At most this many patches per slide (random without replacement when ``train``,
            evenly spaced otherwise); 0 keeps all.
        n_subcaptions: ``K`` sub-captions per slide (sampled when more, padded with a mask when fewer).
        decomposer: ``"rules"``, ``"lm:<dir>"`` or a callable ``caption -> list[str]``; used for slides
            whose text carries no sub-captions.
        mags: Keep only these magnifications (default: all patches of the file).
        train: Random patch / sub-caption sampling (re-drawn per epoch, see :meth:`set_epoch`).
        seed: Seed of the sampling.
        max_open_files: Bound of slide files open at once in each process (:mod:`pathvl.data.handles`).

    Raises:
        DatasetError: No slides, missing features (the message names ``pathvl embed``), slides without
            text, texts without slides, empty texts or empty sub-caption lists.
    """

    def __init__(self, root: str | Path, texts: str | Path | Mapping[str, Any] | None, features: str, *,
                 slide_ids: Sequence[str] | None = None, max_patches: int = 4096, n_subcaptions: int = 8,
                 decomposer: str | Callable[[str], list[str]] = "rules", mags: Sequence[float] = (),
                 train: bool = True, seed: int = 0, max_open_files: int = DEFAULT_MAX_OPEN_FILES) -> None:
        from pathvl.text.decompose import build_decomposer

        self.ds = Dataset(root)
        self.root = Path(root)
        self.features = features
        self.feat_key = K.features_key(features)
        self.max_patches = int(max_patches)
        self.n_subcaptions = int(n_subcaptions)
        if self.n_subcaptions < 1:
            raise ValueError(f"n_subcaptions must be >= 1, got {n_subcaptions}")
        self.mags = tuple(float(m) for m in mags)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.has_texts = texts is not None
        all_texts = _as_texts(texts) if texts is not None else {}
        done = self.ds.slide_ids()
        if not done:
            raise DatasetError(f"{root}: no tiled slides; run `pathvl tile SLIDES --dataset {root}` first")
        if slide_ids is None:
            ids = done
            orphans = sorted(set(all_texts) - set(done))
            if orphans:
                raise DatasetError(
                    f"texts without slides: {len(orphans)} text(s) name slides that are not in {root} "
                    f"(e.g. {orphans[:3]}); tile those slides, remove the rows, or pass slide_ids="
                )
        else:
            ids = list(slide_ids)
            unknown = sorted(set(ids) - set(done))
            if unknown:
                raise DatasetError(f"{root}: {len(unknown)} requested slide(s) are not tiled (e.g. {unknown[:3]})")
        missing = [s for s in ids if s not in all_texts] if self.has_texts else []
        if missing:
            raise DatasetError(
                f"slides without text: {len(missing)} slide(s) of {root} have no row in the texts "
                f"(e.g. {missing[:3]}); add their caption/report or restrict slide_ids="
            )
        empty = [s for s in ids if self.has_texts and not all_texts[s].caption.strip()]
        if empty:
            raise DatasetError(f"slides without text: {len(empty)} slide(s) have an empty caption (e.g. {empty[:3]})")
        index = load_index(self.ds, list(ids))
        index.require(self.feat_key, f"pathvl embed --dataset {root} --encoder {features}")
        dec = build_decomposer(decomposer) if isinstance(decomposer, str) else decomposer
        self.slide_ids = list(ids)
        self.captions: list[str] = []
        self.subcaptions: list[list[str]] = []
        for sid in self.slide_ids:
            if not self.has_texts:
                self.captions.append("")
                self.subcaptions.append([])
                continue
            t = all_texts[sid]
            subs = list(t.subcaptions) if t.subcaptions is not None else dec(t.caption)
            subs = [s.strip() for s in subs if s is not None]
            if not subs or any(not s for s in subs):
                raise DatasetError(
                    f"slide {sid}: empty sub-caption list or an empty sub-caption ({subs!r}) from caption "
                    f"{t.caption!r}; every slide needs at least one non-empty sub-caption"
                )
            self.captions.append(t.caption.strip())
            self.subcaptions.append(subs)
        # per-slide static info (from the slide index: no file opened when it is fresh)
        self._rows: list[np.ndarray] = []
        self._size: list[tuple[float, float]] = []
        self.feature_dim = 0
        for sid in self.slide_ids:
            e = index[sid]
            rows = e.rows_at(self.mags)
            if len(rows) == 0:
                raise DatasetError(f"slide {sid}: no patches{' at ' + str(self.mags) if self.mags else ''}")
            if e.slide_size is None:
                raise DatasetError(f"{self.ds.path(sid)}: no {K.ATTR_SLIDE_SIZE} attribute; re-tile the slide")
            self.feature_dim = int(e.datasets[self.feat_key][1])
            self._rows.append(rows)
            self._size.append(e.slide_size)
        self.handles = HandleCache(max_open_files)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the random patch and sub-caption samples (call once per epoch)."""
        self.epoch = int(epoch)

    def _file(self, i: int) -> h5py.File:
        return self.handles.get(self.ds.path(self.slide_ids[i]))

    def close(self) -> None:
        """Close the slide files opened by this process."""
        self.handles.close()

    def feature_stats(self, max_patches: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and standard deviation of the patch features (of up to ``max_patches`` patches
        drawn evenly from the slides), for :meth:`pathvl.models.pathflip.PathFLIP.set_feature_stats`."""
        rng = np.random.default_rng(seed)
        per = max(1, max_patches // max(1, len(self)))
        total = np.zeros(self.feature_dim)
        sq = np.zeros(self.feature_dim)
        n = 0
        for i in range(len(self)):
            rows = self._rows[i]
            if len(rows) > per:
                rows = np.sort(rng.choice(rows, per, replace=False))
            x = self._file(i)[self.feat_key][rows].astype(np.float64)
            total += x.sum(0)
            sq += (x * x).sum(0)
            n += len(x)
        mean = total / n
        std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
        return mean.astype(np.float32), std.astype(np.float32)

    def patch_rows(self, i: int) -> np.ndarray:
        """Rows of slide ``i`` that an item draws from (all patches at the kept magnifications)."""
        return self._rows[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One slide.

        Returns:
            ``features (n, D)`` float32, ``pos (n, 2)`` float32 patch centres in ``[0, 1]``, ``rows (n,)``
            int64 rows in the slide file, ``caption`` str, ``subcaptions`` list of ``K`` str (padded with
            ""), ``subcaption_mask`` list of ``K`` bool, ``index`` int, ``slide_id`` str.
        """
        from pathvl.text.decompose import select_subcaptions

        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        rows = self._rows[i]
        n = len(rows)
        if self.max_patches and n > self.max_patches:
            if rng is not None:
                pick = np.sort(rng.choice(n, self.max_patches, replace=False))
            else:
                pick = np.unique(np.linspace(0, n - 1, self.max_patches).round().astype(np.int64))
            rows = rows[pick]
        f = self._file(i)
        contiguous = len(rows) == rows[-1] - rows[0] + 1
        sl = slice(int(rows[0]), int(rows[-1]) + 1)
        feats = f[self.feat_key][sl] if contiguous else f[self.feat_key][rows]
        coords = f[K.COORDS][sl] if contiguous else f[K.COORDS][rows]
        mags = f[K.MAGNIFICATION][sl] if contiguous else f[K.MAGNIFICATION][rows]
        fps = footprints(f)
        fp = np.array([fps.get(float(m), 0.0) for m in mags], np.float64)
        w, h = self._size[i]
        centre = (coords.astype(np.float64) + fp[:, None] / 2.0) / np.array([w, h])
        subs, mask = (select_subcaptions(self.subcaptions[i], self.n_subcaptions, rng) if self.has_texts
                      else ([], []))
        return {
            "features": np.asarray(feats, dtype=np.float32), "pos": centre.astype(np.float32),
            "rows": rows.astype(np.int64), "caption": self.captions[i], "subcaptions": subs,
            "subcaption_mask": mask, "index": i, "slide_id": self.slide_ids[i],
        }


def pad_slides(items: Sequence[Mapping[str, Any]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pads the patch bags of slides (:class:`SlideDataset` items) to one length, with a mask.

    Args:
        items: Items with ``features (n, D)`` and optionally ``pos (n, 2)``, ``rows (n,)``, ``index``.
        pad_to: Pad the patch axis to this length (default: the longest slide).

    Returns:
        ``features (B, N, D)`` float32 (zeros at padding), ``patch_mask (B, N)`` bool (True for real
        patches), ``pos (B, N, 2)`` float32, ``rows (B, N)`` int64 (-1 at padding), ``index (B,)`` int64.

    Raises:
        DatasetError: A slide without patches (named).
    """
    if not items:
        raise ValueError("pad_slides: empty batch")
    lens = [len(it["features"]) for it in items]
    if min(lens) == 0:
        raise DatasetError(f"slide {items[lens.index(0)].get('slide_id', '?')} has no patch features")
    N = max(lens) if pad_to is None else int(pad_to)
    if max(lens) > N:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest slide ({max(lens)} patches)")
    B, D = len(items), int(np.asarray(items[0]["features"]).shape[1])
    feats, pos = torch.zeros(B, N, D), torch.zeros(B, N, 2)
    mask = torch.zeros(B, N, dtype=torch.bool)
    rows = torch.full((B, N), -1, dtype=torch.long)
    for b, it in enumerate(items):
        n = lens[b]
        feats[b, :n] = torch.as_tensor(np.asarray(it["features"], dtype=np.float32))
        if "pos" in it:
            pos[b, :n] = torch.as_tensor(np.asarray(it["pos"], dtype=np.float32))
        if "rows" in it:
            rows[b, :n] = torch.as_tensor(np.asarray(it["rows"], dtype=np.int64))
        mask[b, :n] = True
    index = torch.tensor([int(it.get("index", b)) for b, it in enumerate(items)])
    return {"features": feats, "patch_mask": mask, "pos": pos, "rows": rows, "index": index}


def collate_slides(items: Sequence[Mapping[str, Any]], tokenizer: Any, max_tokens: int = 64,
                   pad_to: int | None = None, dedupe_subcaptions: bool = True,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Pad slides into one batch and tokenise their texts.

    Identical sub-captions of different slides (same words, case and spacing ignored) would be each
    other's negatives in :class:`~pathvl.losses.RegionAlignLoss` while being the same text: a target no
    region can meet, which leaves the region attention unconstrained. With ``dedupe_subcaptions`` such a
    text is kept for one of its slides only, drawn at random (torch's generator), and masked for the
    others in this batch; across batches every slide gets its turn.

    Args:
        items: From :class:`SlideDataset` (each with ``K`` sub-captions; all the same ``K``).
        tokenizer: The model's text tokenizer (``model.tokenizer``).
        max_tokens: Truncation of captions and sub-captions.
        pad_to: Pad the patch axis to this length (default: the longest slide of the batch).
        dedupe_subcaptions: Keep a sub-caption shared by several slides for one of them only (see above).
        generator: Random generator of that choice (default: torch's global one).

    Returns:
        :func:`pad_slides`' ``features``, ``patch_mask``, ``pos``, ``rows``, ``index``; ``caption_ids`` /
        ``caption_mask (B, L)``, ``subcap_ids`` / ``subcap_attn (B, K, Ls)``, ``subcap_mask (B, K)`` bool,
        ``index (B,)`` int64 (dataset index of each slide).

    Raises:
        DatasetError: An item without patches, or with no valid sub-caption.
    """
    from pathvl.text.tokenize import tokenize

    if not items:
        raise ValueError("collate_slides: empty batch")
    B = len(items)
    padded = pad_slides(items, pad_to)
    Kn = len(items[0]["subcaptions"])
    subs: list[str] = []
    smask = torch.zeros(B, Kn, dtype=torch.bool)
    for b, it in enumerate(items):
        if len(it["subcaptions"]) != Kn:
            raise ValueError("collate_slides: every item needs the same number of sub-captions")
        m = [bool(v) for v in it["subcaption_mask"]]
        if not any(m):
            raise DatasetError(f"slide {it.get('slide_id', '?')}: empty sub-caption list")
        subs += list(it["subcaptions"])
        smask[b] = torch.tensor(m)
    if dedupe_subcaptions and B > 1:
        groups: dict[str, list[tuple[int, int]]] = {}
        for b in range(B):
            for k in range(Kn):
                if smask[b, k]:
                    groups.setdefault(" ".join(subs[b * Kn + k].lower().split()), []).append((b, k))
        for places in groups.values():
            if len({b for b, _ in places}) > 1:
                keep = int(torch.randint(len(places), (1,), generator=generator))
                for j, (b, k) in enumerate(places):
                    if j != keep:
                        smask[b, k] = False
    cap = tokenize(tokenizer, [it["caption"] for it in items], max_length=max_tokens)
    st = tokenize(tokenizer, subs, max_length=max_tokens)
    return {
        **padded,
        "caption_ids": cap["input_ids"], "caption_mask": cap["attention_mask"],
        "subcap_ids": st["input_ids"].view(B, Kn, -1), "subcap_attn": st["attention_mask"].view(B, Kn, -1),
        "subcap_mask": smask,
    }


# ------------------------------------------------------------------------------ synthetic captions
_PHRASES = {"adipose": "adipose tissue", "lymphocytes": "lymphocytes", "necrosis": "necrosis",
            "tumor": "tumor", "stroma": "stroma", "mucosa": "mucosa"}


def _where(cx: float, cy: float) -> str:
    col = 0 if cx < 1 / 3 else (2 if cx > 2 / 3 else 1)
    row = 0 if cy < 1 / 3 else (2 if cy > 2 / 3 else 1)
    return [["upper left", "top", "upper right"], ["left", "centre", "right"],
            ["lower left", "bottom", "lower right"]][row][col]


def caption_from_ground_truth(gt: Any, min_fraction: float = 0.01) -> str:
    """A slide caption from a synthetic slide's ground truth, one finding per class.

    For every class covering at least ``min_fraction`` of the slide, largest first: ``"<class> in the
    <position>"`` where the position (upper left, top, ..., centre, ..., lower right) is the class's
    centroid on a 3x3 grid; findings are joined by ``"; "``, e.g. ``"tumor in the upper left; adipose
    tissue in the lower right"``.

    Args:
        gt: A :class:`pathvl.synthetic.GroundTruth`.
        min_fraction: Classes smaller than this fraction of the slide area are left out.
    """
    labels = np.asarray(gt.labels)
    h, w = labels.shape
    total = labels.size
    parts = []
    for k, name in enumerate(gt.classes, start=1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) < min_fraction * total or len(ys) == 0:
            continue
        where = _where((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h)
        parts.append((len(ys), f"{_PHRASES.get(name, name)} in the {where}"))
    if not parts:
        return "no tissue"
    return "; ".join(p for _, p in sorted(parts, key=lambda t: -t[0]))
