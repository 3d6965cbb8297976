"""The ``template`` captioner: synthetic template text from ground-truth class maps and slide labels;
not a model."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathvl.data.captioners.base import Captioner, _mag_text, register_captioner
from pathvl.data.tables import read_labels

#: Magnifications below this are described at low power (architecture), at or above it at high power
#: (cells).
HIGH_POWER_FROM = 20.0

#: Minimum area fraction for a class to be mentioned in a template caption.
MENTION_FRACTION = 0.05


def _patch_rng(seed: int, m: dict) -> np.random.Generator:
    """Generator seeded by the patch itself (slide, level-0 corner, magnification): order-independent."""
    x, y = (int(v) for v in m["coords"])
    return np.random.default_rng(
        [int(seed) & 0xFFFFFFFF, zlib.crc32(str(m["slide_id"]).encode("utf-8")), max(x, 0), max(y, 0),
         round(float(m["magnification"]) * 1000)]
    )


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
