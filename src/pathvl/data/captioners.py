"""Captioners: text for every patch of a dataset, from templates, from a file, or from a local model.

A captioner turns a batch of patches into one caption each::

    cap = build_captioner("template", seed=0)
    texts = cap.caption(patches, meta)   # patches: list of (H, W, 3) uint8, or None where not needed

``meta[i]`` describes patch ``i``: ``slide_id``, ``index`` (row in the slide's patch table), ``coords``
(level-0 ``(x, y)``, top-left), ``magnification``, ``footprint`` (level-0 side), ``patch_px``,
``slide_path``, ``mpp``, ``parent``, ``bag`` and ``tissue``. Captioners that declare
``needs_pixels = False`` receive ``None`` in place of every patch, so they never cost a slide read.

Three captioners are registered (``list_captioners()``); add more with :func:`register_captioner`:

- ``template``: synthetic template text, *not a model*. It describes the ground-truth class map written
  beside a synthetic slide (:func:`pathvl.synthetic.load_ground_truth`) inside each patch's
  level-0 footprint, in magnification-aware wording (architecture and layout at 5x/10x, cells at
  20x/40x), and/or a slide-level label from a CSV. Where neither exists it writes a generic caption
  and counts it.
- ``import``: captions produced elsewhere, read from a CSV/TSV or JSONL file and matched to patches by
  index or by level-0 coordinates and magnification.
- ``llava``: a local LLaVA-family vision-language model (e.g. Quilt-LLaVA converted to the Hugging Face
  format) asked MR-PLIP's question about each patch, as in MR-PLIP (Albastaki et al., 2025), which
  captioned its 34M patches with Quilt-LLaVA (Seyfioglu et al., CVPR 2024).

Every captioner keeps running counts in :attr:`Captioner.counts` (e.g. ``generic``, ``no_row``) that
``pathvl caption`` stores beside the captions and reports, and describes itself in :meth:`Captioner.info`
(written as attributes of the captions dataset).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pathvl.data.tables import read_labels, read_table

#: MR-PLIP's question to the vision-language model; ``{mag}`` becomes the patch magnification ("20").
DEFAULT_QUESTION = "Describe the histopathological features of this image patch at {mag}x magnification."

#: Prompt used when the processor has no chat template: LLaVA-1.5's conversation format, which
#: Quilt-LLaVA inherits. ``{question}`` is replaced by the question, ``<image>`` by the image tokens.
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"

#: Magnifications below this are described at low power (architecture), at or above it at high power
#: (cells).
HIGH_POWER_FROM = 20.0

#: Minimum area fraction for a class to be mentioned in a template caption.
MENTION_FRACTION = 0.05


class Captioner:
    """Base class of captioners (subclass and decorate with :func:`register_captioner`).

    Attributes:
        name: Registry name (set by :func:`register_captioner`).
        kind: ``"template"``, ``"import"`` or ``"model"``.
        needs_pixels: Whether :meth:`caption` needs the patches' pixels.
        batch_size: Patches per :meth:`caption` call.
        counts: Running counts of noteworthy cases, reported by ``pathvl caption``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    needs_pixels: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self) -> None:
        self.batch_size = 1024
        self.counts: Counter[str] = Counter()

    def prepare(self) -> None:
        """Load what the captioner needs (a model...); called once before the first patch."""

    def caption(self, patches: Sequence[np.ndarray | None], meta: Sequence[dict]) -> list[str]:
        """One caption per patch.

        Args:
            patches: ``(H, W, 3)`` uint8 arrays, or ``None`` each when ``needs_pixels`` is False.
            meta: One dict per patch (see the module docstring).

        Returns:
            The captions, in order.
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options the captioner was built with (JSON-serialisable)."""
        return {}

    def identity(self) -> dict[str, str]:
        """Attributes that must match for stored captions to count as this captioner's (resume check)."""
        return {"captioner": self.name}

    def info(self) -> dict[str, Any]:
        """What the captioner is, written as attributes of every captions dataset it produces."""
        return {"captioner": self.name, "kind": self.kind, "description": self.description,
                "options": json.dumps(self.options(), sort_keys=True, default=str)}

    def finish(self, processed: Collection[str], known: Collection[str]) -> dict[str, int]:
        """Run-level counts once every slide is done (e.g. rows of an imported file never used).

        Args:
            processed: Slide ids captioned in this run.
            known: Every slide id of the dataset.
        """
        return {}


_REGISTRY: dict[str, type[Captioner]] = {}


def register_captioner(name: str) -> Callable[[type[Captioner]], type[Captioner]]:
    """Class decorator adding a :class:`Captioner` subclass to the registry under ``name``."""

    def decorator(cls: type[Captioner]) -> type[Captioner]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"captioner {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_captioners() -> list[str]:
    """Registered captioner names."""
    return sorted(_REGISTRY)


def captioner_class(name: str) -> type[Captioner]:
    """The class registered as ``name``.

    Raises:
        ValueError: Unknown name; the message lists the registered ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown captioner {name!r}; available: {', '.join(list_captioners())}")
    return _REGISTRY[name]


def build_captioner(name: str, **opts: Any) -> Captioner:
    """Build a registered captioner.

    Args:
        name: Registry name (``template``, ``import``, ``llava``, ...).
        **opts: The captioner's options; ``None`` values are dropped so callers can pass every CLI
            option through.

    Raises:
        ValueError: Unknown captioner, or an option it does not take (the message lists valid ones).
    """
    cls = captioner_class(name)
    opts = {k: v for k, v in opts.items() if v is not None}
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"captioner {name!r} takes no option(s) {unknown}; valid options: {', '.join(valid)}")
    return cls(**opts)


def _mag_text(mag: float) -> str:
    return f"{float(mag):g}"


def _patch_rng(seed: int, m: dict) -> np.random.Generator:
    """Generator seeded by the patch itself (slide, level-0 corner, magnification): order-independent."""
    x, y = (int(v) for v in m["coords"])
    return np.random.default_rng(
        [int(seed) & 0xFFFFFFFF, zlib.crc32(str(m["slide_id"]).encode("utf-8")), max(x, 0), max(y, 0),
         round(float(m["magnification"]) * 1000)]
    )


# ------------------------------------------------------------------------------------------ template
#: Phrasings per class: ``low`` (architecture, 5x/10x), ``high`` (cells, 20x/40x). Each names the class
#: literally, so the caption always mentions it. Unknown classes get :func:`_fallback_phrases`.
CLASS_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "tumor": {
        "low": ("sheets of tumor", "solid nests of tumor", "crowded tumor nests with an infiltrative border",
                "confluent tumor growth"),
        "high": ("tumor cells with enlarged, hyperchromatic, pleomorphic nuclei",
                 "tumor cells with vesicular chromatin, prominent nucleoli and scattered mitotic figures",
                 "crowded tumor cells with a high nuclear-to-cytoplasmic ratio and irregular nuclear contours"),
    },
    "stroma": {
        "low": ("fibrous stroma", "bands of collagenous stroma", "desmoplastic stroma",
                "loose fibrous stroma"),
        "high": ("stroma of wavy pink collagen fibres with scattered spindle-shaped fibroblasts",
                 "stroma with elongated, bland fibroblast nuclei between collagen bundles",
                 "fibrous stroma with sparse spindle cells and eosinophilic extracellular matrix"),
    },
    "lymphocytes": {
        "low": ("dense infiltrates of lymphocytes", "sheets of lymphocytes",
                "a lymphoid aggregate packed with lymphocytes", "a band of lymphocytes"),
        "high": ("small round lymphocytes with dense, dark nuclei and scant cytoplasm",
                 "lymphocytes with round hyperchromatic nuclei and a thin rim of cytoplasm",
                 "closely packed lymphocytes with uniform, condensed chromatin"),
    },
    "necrosis": {
        "low": ("areas of necrosis", "geographic necrosis", "confluent necrosis with eosinophilic debris",
                "a zone of necrosis"),
        "high": ("necrosis with karyorrhectic nuclear debris and ghost cells",
                 "necrosis: granular eosinophilic debris with fragmented, pyknotic nuclei",
                 "necrosis with loss of cellular outlines and scattered nuclear dust"),
    },
    "adipose": {
        "low": ("adipose tissue", "lobules of mature adipose tissue", "fatty adipose tissue",
                "adipose tissue divided by thin septa"),
        "high": ("adipose tissue: large empty adipocytes with thin membranes and flattened peripheral nuclei",
                 "mature adipose tissue with clear vacuoles and compressed, eccentric nuclei",
                 "adipose tissue of polygonal fat cells with thin walls and few nuclei"),
    },
    "mucosa": {
        "low": ("mucosa with regularly spaced glands", "glandular mucosa with crypts in parallel rows",
                "intact mucosa with evenly distributed crypts", "mucosa with tubular glands"),
        "high": ("mucosa: columnar epithelium with basally placed nuclei and goblet cells",
                 "mucosa lined by columnar cells and mucin-filled goblet cells",
                 "glandular mucosa with uniform columnar cells and small basal nuclei"),
    },
}

_RELATIONS = ("bordered by", "next to", "adjacent to", "merging with", "interspersed with")
_MINOR = ("with", "and", "alongside")
_BACKGROUND_LOW = ("part of the field is empty glass", "empty glass fills part of the field",
                   "the rest of the field is background without tissue")
_GENERIC = ("H&E-stained tissue at {mag}x", "an H&E-stained tissue patch at {mag}x magnification",
            "H&E-stained tissue viewed at {mag}x")


def _fallback_phrases(name: str) -> dict[str, tuple[str, ...]]:
    return {"low": (f"regions of {name}", f"an area of {name}"),
            "high": (f"{name} at cellular detail", f"cells of the {name} region")}


def _phrases(name: str) -> dict[str, tuple[str, ...]]:
    return CLASS_PHRASES.get(name, _fallback_phrases(name))


def _position(mask: np.ndarray) -> str:
    """Where the True pixels of ``mask`` (a patch's label crop) lie, in words."""
    h, w = mask.shape
    if h < 3 or w < 3 or not mask.any():
        return ""
    ys, xs = np.nonzero(mask)
    cy = (ys.mean() + 0.5) / h - 0.5  # in [-0.5, 0.5], positive down
    cx = (xs.mean() + 0.5) / w - 0.5
    if math.hypot(cx, cy) < 0.12:
        return "in the centre" if mask.mean() < 0.5 else "throughout"
    vert = "top" if cy < -0.12 else ("bottom" if cy > 0.12 else "")
    horiz = "left" if cx < -0.12 else ("right" if cx > 0.12 else "")
    if vert and horiz:
        return f"at the {vert} {horiz}"
    return f"along the {vert or horiz} edge"


@register_captioner("template")
class TemplateCaptioner(Captioner):
    """Synthetic template text from ground-truth class maps and slide labels; not a model.

    For each patch the area fraction of every ground-truth class inside its level-0 footprint is
    measured. At low power (below :data:`HIGH_POWER_FROM`, i.e. 5x and 10x) the caption describes the
    architecture: the majority class, the next classes and where they lie in the patch ("low-power view
    at 5x: sheets of tumor bordered by fibrous stroma, with adipose tissue along the left edge"). At high
    power it describes the cells of the majority class ("high-power view at 40x: tumor cells with
    enlarged, hyperchromatic, pleomorphic nuclei"). Phrasings are drawn by a generator seeded with
    ``seed`` and the patch (slide, corner, magnification): varied, yet identical on every rerun.

    Counts: ``ground_truth`` (captions from a class map), ``label_only`` (only a slide label was known),
    ``generic`` (neither: "H&E-stained tissue at 20x").

    Args:
        labels: Optional CSV with columns ``slide_id,label``; the label is added to every caption of
            the slide (or is the whole description when the slide has no ground truth).
        seed: Seed of the phrasing choices.
        ground_truth: Use the class maps written beside synthetic slides (``<stem>.labels.png``).
    """

    kind = "template"
    needs_pixels = False
    description = ("synthetic template text generated from ground-truth class maps and/or slide labels; "
                   "not produced by a model and not a pathologist's description")

    def __init__(self, labels: str | Path | None = None, seed: int = 0, ground_truth: bool = True) -> None:
        super().__init__()
        self.batch_size = 4096
        self.labels_path = str(labels) if labels is not None else None
        self.labels = read_labels(labels) if labels is not None else {}
        self.seed = int(seed)
        self.use_ground_truth = bool(ground_truth)
        self._gt_cache: dict[str, Any] = {}

    def options(self) -> dict[str, Any]:
        return {"labels": self.labels_path, "seed": self.seed, "ground_truth": self.use_ground_truth}

    def _ground_truth(self, slide_path: str | None) -> Any:
        if not self.use_ground_truth or not slide_path:
            return None
        if slide_path not in self._gt_cache:
            from pathvl.synthetic import load_ground_truth

            try:
                gt = load_ground_truth(slide_path)
            except FileNotFoundError:
                gt = None
            self._gt_cache = {slide_path: gt}  # one slide at a time: keep only the current map
        return self._gt_cache[slide_path]

    def caption(self, patches: Sequence[np.ndarray | None], meta: Sequence[dict]) -> list[str]:
        return [self.caption_one(m) for m in meta]

    def caption_one(self, m: dict) -> str:
        """Caption of one patch from its meta dict (no pixels needed)."""
        rng = _patch_rng(self.seed, m)
        mag = _mag_text(m["magnification"])
        label = self.labels.get(str(m["slide_id"]))
        gt = self._ground_truth(m.get("slide_path"))
        high = float(m["magnification"]) >= HIGH_POWER_FROM
        view = f"{'high' if high else 'low'}-power view at {mag}x"
        if gt is None:
            if label is None:
                self.counts["generic"] += 1
                return str(rng.choice(_GENERIC)).format(mag=mag)
            self.counts["label_only"] += 1
            return f"{view}: H&E-stained tissue from a slide labelled {label}"
        self.counts["ground_truth"] += 1
        x, y = (int(v) for v in m["coords"])
        fp = int(m["footprint"])
        frac = gt.fractions(x, y, fp, fp)
        text = f"{view}: " + (self._high(gt, frac, rng) if high else self._low(gt, frac, x, y, fp, rng))
        if label is not None:
            text += f"; slide label: {label}"
        return text

    def _ranked(self, gt: Any, frac: np.ndarray) -> list[int]:
        order = [int(k) for k in np.argsort(-frac[1:], kind="stable") + 1]
        return [k for k in order if frac[k] >= MENTION_FRACTION]

    def _low(self, gt: Any, frac: np.ndarray, x: int, y: int, fp: int, rng: np.random.Generator) -> str:
        ranked = self._ranked(gt, frac)
        major = int(np.argmax(frac))
        if major == 0 or not ranked:
            if not ranked:
                return "background glass without tissue"
            k = ranked[0]
            pos = self._where(gt, k, x, y, fp)
            return f"mostly empty glass; {rng.choice(_phrases(gt.classes[k - 1])['low'])}" + (
                f" {pos}" if pos else "")
        others = [k for k in ranked if k != major]
        text = str(rng.choice(_phrases(gt.classes[major - 1])["low"]))
        if others:
            k = others[0]
            text += f" {rng.choice(_RELATIONS)} {rng.choice(_phrases(gt.classes[k - 1])['low'])}"
        if len(others) > 1:
            k = others[1]
            pos = self._where(gt, k, x, y, fp)
            text += f", {rng.choice(_MINOR)} {rng.choice(_phrases(gt.classes[k - 1])['low'])}" + (
                f" {pos}" if pos else "")
        if frac[0] >= 0.2:
            text += f"; {rng.choice(_BACKGROUND_LOW)}"
        return text

    def _high(self, gt: Any, frac: np.ndarray, rng: np.random.Generator) -> str:
        ranked = self._ranked(gt, frac)
        major = int(np.argmax(frac))
        if not ranked:
            return "background glass without cells"
        if major == 0:
            return f"mostly empty glass; at the tissue edge, {rng.choice(_phrases(gt.classes[ranked[0] - 1])['high'])}"
        text = str(rng.choice(_phrases(gt.classes[major - 1])["high"]))
        others = [k for k in ranked if k != major and frac[k] >= 0.2]
        if others:
            text += f"; also {rng.choice(_phrases(gt.classes[others[0] - 1])['low'])}"
        return text

    @staticmethod
    def _where(gt: Any, k: int, x: int, y: int, fp: int) -> str:
        ds = float(gt.downsample)
        h, w = gt.labels.shape
        r0, r1 = max(int(y // ds), 0), min(math.ceil((y + fp) / ds), h)
        c0, c1 = max(int(x // ds), 0), min(math.ceil((x + fp) / ds), w)
        if r1 <= r0 or c1 <= c0:
            return ""
        return _position(gt.labels[r0:r1, c0:c1] == k)


# -------------------------------------------------------------------------------------------- import
SLIDE_COLUMNS = ("slide_id", "slide")
TEXT_COLUMNS = ("caption", "text")
INDEX_COLUMNS = ("index", "patch_index")
MAG_COLUMNS = ("magnification", "mag")
EXPECTED_COLUMNS = ("slide_id, caption (or text), and either index or x, y, magnification "
                    "(JSONL: the same keys)")


@register_captioner("import")
class ImportCaptioner(Captioner):
    """Captions produced elsewhere, read from a CSV/TSV (with a header) or a JSONL file.

    Each row names a slide (``slide_id``) and a patch, either by its row in the slide's patch table
    (``index``) or by its level-0 top-left corner and magnification (``x``, ``y``, ``magnification``),
    and gives the text (``caption`` or ``text``). Patches without a row get an empty caption (counted
    as ``no_row``); rows that match no patch of a captioned slide, or name a slide the dataset lacks,
    are counted as ``unmatched_rows`` at the end. A later duplicate row replaces an earlier one
    (``duplicate_rows``).

    Args:
        path: The CSV, TSV or JSONL file.
        match: ``"auto"`` (index when the file has it, else coordinates), ``"index"`` or ``"coords"``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Wrong columns or unreadable values; the message names the file and what is expected.
    """

    kind = "import"
    needs_pixels = False
    description = "captions imported from a file produced outside pathvl"

    def __init__(self, path: str | Path | None = None, match: str = "auto") -> None:
        super().__init__()
        self.batch_size = 4096
        if path is None:
            raise ValueError("the import captioner needs the caption file: pass it with `--from FILE`")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"caption file not found: {p} (pass it with `--from FILE`)")
        if match not in ("auto", "index", "coords"):
            raise ValueError(f"match must be 'auto', 'index' or 'coords', got {match!r}")
        self.path = p
        table = read_table(p, "caption file")
        cols = table.columns
        rows = [{**r, "_line": line} for r, line in zip(table.rows, table.lines)]
        slide_col = table.column(None, SLIDE_COLUMNS, "slide id", required=False)
        text_col = table.column(None, TEXT_COLUMNS, "caption", required=False)
        index_col = table.column(None, INDEX_COLUMNS, "patch index", required=False)
        mag_col = table.column(None, MAG_COLUMNS, "magnification", required=False)
        x_col, y_col = table.column(None, ("x",), "x", required=False), table.column(None, ("y",), "y", required=False)
        has_coords = x_col is not None and y_col is not None and mag_col is not None
        if match == "auto":
            match = "index" if index_col else "coords"
        ok = slide_col and text_col and ((match == "index" and index_col) or (match == "coords" and has_coords))
        if not ok:
            raise ValueError(f"{p}: columns {list(cols)} do not fit (match={match}); expected {EXPECTED_COLUMNS}")
        self.match = match
        self.table: dict[tuple, str] = {}
        self._line: dict[tuple, int] = {}
        dup = 0
        for r in rows:
            try:
                sid = str(r[slide_col]).strip()
                if match == "index":
                    key = (sid, int(str(r[index_col]).strip()))
                else:
                    key = (sid, round(float(r[x_col])), round(float(r[y_col])),
                           round(float(r[mag_col]), 3))
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"{p}:{r['_line']}: unreadable slide id / patch ({e}); expected "
                                 f"{EXPECTED_COLUMNS}") from e
            text = r.get(text_col)
            if key in self.table:
                dup += 1
            self.table[key] = "" if text is None else str(text)
            self._line[key] = r["_line"]
        self.counts["duplicate_rows"] += dup
        self.n_rows = len(rows)
        self._used: set[tuple] = set()
        self._slides = {k[0] for k in self.table}

    def options(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "match": self.match}

    def identity(self) -> dict[str, str]:
        return {"captioner": self.name, "source_file": str(self.path.resolve())}

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["source_file"] = str(self.path.resolve())
        out["source_sha256"] = _sha256(self.path)
        return out

    def _key(self, m: dict) -> tuple:
        sid = str(m["slide_id"])
        if self.match == "index":
            return sid, int(m["index"])
        x, y = (int(v) for v in m["coords"])
        return sid, x, y, round(float(m["magnification"]), 3)

    def caption(self, patches: Sequence[np.ndarray | None], meta: Sequence[dict]) -> list[str]:
        out = []
        for m in meta:
            key = self._key(m)
            text = self.table.get(key)
            if text is None:
                self.counts["no_row"] += 1
                out.append("")
            else:
                self.counts["matched"] += 1
                self._used.add(key)
                out.append(text)
        return out

    def check_slides(self, slide_ids: Collection[str]) -> set[str]:
        """The slides among ``slide_ids`` (the dataset's) that the file has rows for.

        Raises:
            ValueError: The file names none of them (nothing would be imported; every caption would be
                empty); the message shows a few ids from each side.
        """
        known = set(slide_ids)
        hit = self._slides & known
        if not hit:
            raise ValueError(
                f"{self.path}: matches no slide of the dataset: its {len(self._slides)} slide id(s) "
                f"({_few(self._slides)}) are none of the dataset's {len(known)} ({_few(known)}); check the "
                "slide_id column (ids are file stems, e.g. 'TCGA-XX-1234' for TCGA-XX-1234.svs)"
            )
        return hit

    def has_rows(self, slide_id: str) -> bool:
        """Whether the file has any row for ``slide_id``."""
        return slide_id in self._slides

    def unmatched(self, processed: Collection[str], known: Collection[str]) -> list[str]:
        """Lines naming what in the file matched nothing: slide ids the dataset lacks, and the line numbers
        of rows that name no patch of a captioned slide."""
        processed, known = set(processed), set(known)
        out = []
        unknown = Counter(k[0] for k in self.table if k[0] not in known)
        if unknown:
            out.append(f"{sum(unknown.values())} row(s) of {self.path} name slide(s) the dataset lacks: "
                       f"{_few(unknown)}")
        lines = sorted(self._line[k] for k in self.table if k[0] in processed and k not in self._used)
        if lines:
            more = f" (+{len(lines) - 8} more)" if len(lines) > 8 else ""
            out.append(f"{len(lines)} row(s) of {self.path} match no patch of their slide ({self.match}): line(s) "
                       f"{', '.join(map(str, lines[:8]))}{more}")
        return out

    def finish(self, processed: Collection[str], known: Collection[str]) -> dict[str, int]:
        processed, known = set(processed), set(known)
        unknown_slide = sum(1 for k in self.table if k[0] not in known)
        no_patch = sum(1 for k in self.table if k[0] in processed and k not in self._used)
        return {"unmatched_rows": unknown_slide + no_patch, "rows_unknown_slide": unknown_slide,
                "rows_no_such_patch": no_patch, "rows": self.n_rows}


def _few(ids: Collection[str], k: int = 5) -> str:
    """A few ids for a message: ``a, b, c (+12 more)``."""
    ids = sorted(ids)
    more = f" (+{len(ids) - k} more)" if len(ids) > k else ""
    return ", ".join(repr(i) for i in ids[:k]) + more


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- llava
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _weights_sha256(folder: Path) -> str:
    """sha256 over the model's weight files (name and content digest of each, sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        h.update(f.name.encode("utf-8") + b"\0" + _sha256(f).encode("ascii") + b"\n")
    return h.hexdigest()


@register_captioner("llava")
class LlavaCaptioner(Captioner):
    """A local LLaVA-family model (``LlavaForConditionalGeneration``) asked a question about each patch.

    MR-PLIP (Albastaki et al., 2025) captioned every patch at every magnification with Quilt-LLaVA
    (Seyfioglu et al., 2024); this runs any LLaVA checkpoint in the Hugging Face format from a local
    folder (nothing is downloaded), batched, greedy, in bf16 on a GPU when one is present.

    Args:
        model: Folder with the model, its processor and tokenizer (``save_pretrained`` layout).
        question: Question per patch; ``{mag}`` becomes its magnification (``"20"``).
        prompt: Prompt around the question (``{question}`` and the processor's image token, e.g.
            ``<image>``). ``None``: the processor's chat template when it has one, else
            :data:`LLAVA_PROMPT`.
        max_new_tokens: Longest caption in tokens.
        batch_size: Patches per generation batch.
        device: ``"cuda"``, ``"cpu"``, ... (``None``: the GPU when present).
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (``None``: bf16 on a GPU, fp32 on a CPU).

    Raises:
        FileNotFoundError: ``model`` missing or not a model folder; the message names ``--model``.
    """

    kind = "model"
    needs_pixels = True
    description = "generated by a local LLaVA-family vision-language model (greedy decoding)"

    def __init__(self, model: str | Path | None = None, question: str = DEFAULT_QUESTION,
                 prompt: str | None = None, max_new_tokens: int = 128, batch_size: int = 8,
                 device: str | None = None, dtype: str | None = None) -> None:
        super().__init__()
        if model is None:
            raise FileNotFoundError("the llava captioner needs a local model folder: pass it with `--model PATH`")
        p = Path(model).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"llava model folder not found: {p}; pass a local LLaVA model in the "
                                    "Hugging Face format with `--model PATH`")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: no config.json, not a Hugging Face model folder; pass the folder "
                                    "written by save_pretrained with `--model PATH`")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be positive")
        if dtype not in (None, "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
        try:
            question.format(mag="20")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"question {question!r}: only {{mag}} may appear in braces ({e})") from e
        self.model_path = p.resolve()
        self.question = question
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.device_name = device
        self.dtype_name = dtype
        self._model = None
        self._processor = None
        self._sha: str | None = None

    def options(self) -> dict[str, Any]:
        return {"model": str(self.model_path), "question": self.question, "prompt": self.prompt,
                "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "device": self.device_name, "dtype": self.dtype_name, "decoding": "greedy"}

    def identity(self) -> dict[str, str]:
        return {"captioner": self.name, "model_path": str(self.model_path)}

    def info(self) -> dict[str, Any]:
        out = super().info()
        if self._sha is None:
            self._sha = _weights_sha256(self.model_path)
        out.update(model_path=str(self.model_path), model_sha256=self._sha, question=self.question)
        if self._model is not None:
            out.update(device=str(self._device), dtype=str(self._dtype).replace("torch.", ""))
        return out

    def prepare(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        dev = self.device_name or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(dev)
        names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        if self.dtype_name is not None:
            self._dtype = names[self.dtype_name]
        else:
            self._dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        self._processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
        tok = self._processor.tokenizer
        tok.padding_side = "left"  # generation continues every row at its end
        if tok.pad_token is None:  # LLaMA tokenizers often have none; padding is masked anyway
            tok.pad_token = tok.unk_token or tok.eos_token
        model = LlavaForConditionalGeneration.from_pretrained(
            self.model_path, local_files_only=True, dtype=self._dtype)
        self._model = model.to(self._device).eval()

    def _prompt(self, question: str) -> str:
        proc = self._processor
        image_token = getattr(proc, "image_token", "<image>")
        if self.prompt is not None:
            text = self.prompt.replace("{question}", question)
            return text if image_token in text else f"{image_token}\n{text}"
        if getattr(proc, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return proc.apply_chat_template(conv, add_generation_prompt=True)
        return LLAVA_PROMPT.replace("<image>", image_token).replace("{question}", question)

    def caption(self, patches: Sequence[np.ndarray | None], meta: Sequence[dict]) -> list[str]:
        import torch
        from PIL import Image

        self.prepare()
        out: list[str] = []
        for s in range(0, len(meta), self.batch_size):
            imgs = [Image.fromarray(np.asarray(p, dtype=np.uint8)) for p in patches[s:s + self.batch_size]]
            texts = [self._prompt(self.question.format(mag=_mag_text(m["magnification"])))
                     for m in meta[s:s + self.batch_size]]
            batch = self._processor(images=imgs, text=texts, return_tensors="pt", padding=True)
            batch = {k: (v.to(self._device, self._dtype) if k == "pixel_values" else v.to(self._device))
                     for k, v in batch.items()}
            tok = self._processor.tokenizer
            with torch.inference_mode():
                ids = self._model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                           num_beams=1, pad_token_id=tok.pad_token_id)
            new = ids[:, batch["input_ids"].shape[1]:]
            out += [t.strip() for t in self._processor.batch_decode(new, skip_special_tokens=True)]
            self.counts["generated"] += len(imgs)
        return out
