"""Text-to-patch heatmaps of a slide and their localisation score.

For a trained slide-language model (PathFLIP, Liu et al. 2025) and a text ("tumor"), every patch of a
slide gets a score (:meth:`pathvl.models.pathflip.PathFLIP.patch_text_scores`: the cosine similarity of
the text's local embedding to the patch's, or the text's region-pooling attention). :class:`Heatmap`
keeps those scores with the patches' level-0 boxes, rasterises them onto a thumbnail, draws them as a
PNG over it, and scores localisation against ground truth: the patch-level AUROC of the scores for
"the patch is mostly this class" (:meth:`Heatmap.auroc`, e.g. on generated slides with
:func:`pathvl.synthetic.load_ground_truth`).

Coordinates: ``coords`` are level-0 pixels ``(x, y)`` of each patch's top-left corner and ``footprint``
its level-0 side, as stored in the dataset; a thumbnail of downsample ``ds`` shows level-0 pixel ``x``
at ``x / ds``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathvl import _const as K
from pathvl.data.dataset import Dataset, DatasetError

__all__ = ["Heatmap", "colorize", "compose_figure", "heatmap_filename", "localization_auroc", "slide_heatmaps"]

# A perceptually ordered dark-blue -> cyan -> yellow -> red ramp (anchors of matplotlib's "turbo").
_RAMP = np.array([[48, 18, 59], [70, 107, 227], [40, 188, 235], [50, 241, 152], [164, 252, 60],
                  [239, 207, 58], [251, 128, 34], [208, 47, 5], [122, 4, 3]], dtype=np.float64)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (NaN allowed) to uint8 RGB ``(..., 3)``; NaN becomes black."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(v).astype(int), len(_RAMP) - 2)
    f = (v - i)[..., None]
    rgb = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    rgb[np.isnan(np.asarray(values, dtype=np.float64))] = 0
    return rgb.round().astype(np.uint8)


@dataclass
class Heatmap:
    """Scores of one text over the patches of one slide.

    Attributes:
        slide_id: The slide.
        text: The query text.
        scores: ``(N,)`` float32 per patch (higher = more related).
        coords: ``(N, 2)`` int64 level-0 top-left corners.
        footprint: ``(N,)`` level-0 side of each patch in pixels.
        slide_size: Level-0 ``(width, height)``.
        mode: ``similarity`` or ``attention``.
        slide_path: The slide file (for the thumbnail), if known.
    """

    slide_id: str
    text: str
    scores: np.ndarray
    coords: np.ndarray
    footprint: np.ndarray
    slide_size: tuple[int, int]
    mode: str = "similarity"
    slide_path: str | None = None

    def raster(self, size: tuple[int, int]) -> np.ndarray:
        """Scores on a ``(width, height)`` grid covering the slide: ``(height, width)`` float32, the mean of
        the patches covering each pixel, NaN where no patch lies."""
        w, h = int(size[0]), int(size[1])
        sx, sy = self.slide_size[0] / w, self.slide_size[1] / h
        acc = np.zeros((h, w), np.float64)
        cnt = np.zeros((h, w), np.float64)
        for (x, y), fp, s in zip(self.coords, self.footprint, self.scores):
            if not np.isfinite(s):
                continue
            x0, y0 = int(np.floor(x / sx)), int(np.floor(y / sy))
            x1, y1 = max(x0 + 1, int(np.ceil((x + fp) / sx))), max(y0 + 1, int(np.ceil((y + fp) / sy)))
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:  # wholly outside the slide: paints nothing
                continue
            acc[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] += s
            cnt[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            out = acc / cnt
        out[cnt == 0] = np.nan
        return out.astype(np.float32)

    def scale(self, vmin: float | None = None, vmax: float | None = None) -> tuple[float, float]:
        """The score range the colours span: ``vmin``/``vmax`` where given, else this slide's range."""
        finite = self.scores[np.isfinite(self.scores)]
        lo = float(vmin) if vmin is not None else (float(finite.min()) if len(finite) else 0.0)
        hi = float(vmax) if vmax is not None else (float(finite.max()) if len(finite) else 1.0)
        return lo, hi

    def overlay(self, thumbnail: np.ndarray, alpha: float = 0.5, vmin: float | None = None,
                vmax: float | None = None) -> np.ndarray:
        """The heatmap drawn over an RGB thumbnail of the whole slide (uint8 ``(h, w, 3)``).

        Scores are scaled to [vmin, vmax] (default: their range on this slide, :meth:`scale`); pixels without
        a patch show the thumbnail only.
        """
        th = np.asarray(thumbnail)[..., :3]
        h, w = th.shape[:2]
        r = self.raster((w, h))
        lo, hi = self.scale(vmin, vmax)
        norm = (r - lo) / max(hi - lo, 1e-12)
        colour = colorize(norm).astype(np.float64)
        out = th.astype(np.float64)
        m = np.isfinite(r)
        out[m] = (1 - alpha) * out[m] + alpha * colour[m]
        return out.round().clip(0, 255).astype(np.uint8)

    def save_png(self, path: str | Path, thumbnail: np.ndarray | None = None, max_px: int = 1024,
                 alpha: float = 0.5, vmin: float | None = None, vmax: float | None = None,
                 title: str | None = None) -> Path:
        """Write the heatmap over the slide thumbnail as a PNG a reader can interpret: a title band (the
        query, the slide, the score type), the overlay, and a colour bar labelled with the score values and
        the scale used (the thumbnail is read from ``slide_path`` when not given; without a slide file the
        heatmap is drawn on white). Written to a temporary name and renamed.

        Args:
            path: The PNG to write.
            thumbnail: RGB thumbnail of the whole slide.
            max_px: Longest side of the thumbnail read from the slide.
            alpha: Opacity of the colours.
            vmin: Score at the bottom of the colour bar (default: the lowest score on this slide).
            vmax: Score at the top (default: the highest on this slide).
            title: First line of the title band (default: the query text).

        Returns:
            The path written.
        """
        from PIL import Image

        if thumbnail is None:
            thumbnail = self._thumbnail(max_px)
        lo, hi = self.scale(vmin, vmax)
        body = self.overlay(thumbnail, alpha=alpha, vmin=lo, vmax=hi)
        stated = "fixed range" if vmin is not None and vmax is not None else "range on this slide"
        lines = [title or f"query: {self.text}", f"slide {self.slide_id} - {self.mode} ({stated})"]
        figure = compose_figure(body, lines, lo, hi)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(figure).save(tmp, format="PNG")
        tmp.replace(path)
        return path

    def _thumbnail(self, max_px: int) -> np.ndarray:
        if self.slide_path and Path(self.slide_path).exists():
            from pathvl.slide.reader import open_slide

            with open_slide(self.slide_path) as s:
                return s.thumbnail(max_px)[0]
        W, H = self.slide_size
        scale = max(W, H) / max_px if max(W, H) > max_px else 1.0
        return np.full((max(1, round(H / scale)), max(1, round(W / scale)), 3), 255, np.uint8)

    def patch_labels(self, gt: Any, label: int | str, min_fraction: float = 0.5) -> np.ndarray:
        """Boolean ``(N,)``: the patch's area is at least ``min_fraction`` class ``label`` in ``gt``
        (a :class:`pathvl.synthetic.GroundTruth`)."""
        k = gt.class_index(label) if isinstance(label, str) else int(label)
        return np.array([gt.fractions(float(x), float(y), float(fp), float(fp))[k] >= min_fraction
                         for (x, y), fp in zip(self.coords, self.footprint)])

    def auroc(self, gt: Any, label: int | str, min_fraction: float = 0.5) -> float:
        """Patch-level localisation AUROC: scores against :meth:`patch_labels` (see
        :func:`localization_auroc`)."""
        return localization_auroc(self, gt, label, min_fraction)


#: Layout of :func:`compose_figure`, in pixels.
BAR_WIDTH, BAR_GAP, BAR_LABELS, TITLE_LINE = 18, 12, 64, 16


def compose_figure(body: np.ndarray, lines: Sequence[str], lo: float, hi: float) -> np.ndarray:
    """A white canvas with ``lines`` of title above ``body`` and a vertical colour bar (``lo`` at the
    bottom, ``hi`` at the top, with tick labels) on its right: uint8 RGB.

    The bar's pixel column ``BAR_GAP`` right of the body holds ``colorize`` of its height's values, so a
    reader (or a test) can map any colour back to a score.
    """
    from PIL import Image, ImageDraw, ImageFont

    h, w = body.shape[:2]
    top = TITLE_LINE * len(lines) + 8
    label_w = BAR_LABELS
    H, W = top + max(h, 120) + 8, w + BAR_GAP + BAR_WIDTH + label_w
    canvas = np.full((H, W, 3), 255, np.uint8)
    canvas[top : top + h, :w] = body
    bar_h = max(h, 120)
    ramp = colorize(np.linspace(1.0, 0.0, bar_h))  # top = high
    x0 = w + BAR_GAP
    canvas[top : top + bar_h, x0 : x0 + BAR_WIDTH] = ramp[:, None, :]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, text in enumerate(lines):
        draw.text((4, 4 + TITLE_LINE * i), text, fill=(0, 0, 0), font=font)
    for frac in (0.0, 0.5, 1.0):
        y = top + round((1 - frac) * (bar_h - 1))
        value = lo + frac * (hi - lo)
        draw.line([(x0 + BAR_WIDTH, y), (x0 + BAR_WIDTH + 4, y)], fill=(0, 0, 0))
        draw.text((x0 + BAR_WIDTH + 6, min(max(y - 6, top), top + bar_h - 12)), f"{value:.3g}", fill=(0, 0, 0),
                  font=font)
    return np.asarray(img)


def heatmap_filename(slide_id: str, text: str, checkpoint: str | Path | None = None, mode: str | None = None) -> str:
    """A readable file name for a heatmap: ``<slide>.<query words>[.<mode>].<run>.png``, so heatmaps of
    other queries, score types or checkpoints never overwrite each other."""
    import hashlib
    import re

    words = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:48] or "query"
    if words.replace("-", " ") != text:  # the slug lost something: keep distinct queries apart
        words += "-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]
    parts = [slide_id, words]
    if mode:
        parts.append(mode)
    if checkpoint is not None:
        run = Path(checkpoint).resolve()
        parts.append(re.sub(r"[^A-Za-z0-9_.-]+", "-", run.name if run.name else "run"))
    return ".".join(parts) + ".png"


def localization_auroc(heatmap: Heatmap, gt: Any, label: int | str, min_fraction: float = 0.5) -> float:
    """AUROC of a heatmap's patch scores for "the patch is mostly class ``label``" (Mann-Whitney, ties
    counted half), over all scored patches.

    Raises:
        ValueError: Every patch is positive or every patch is negative (AUROC undefined).
    """
    y = heatmap.patch_labels(gt, label, min_fraction)
    s = np.asarray(heatmap.scores, dtype=np.float64)
    keep = np.isfinite(s)
    y, s = y[keep], s[keep]
    if y.all() or not y.any():
        raise ValueError(f"slide {heatmap.slide_id}: {int(y.sum())} of {len(y)} patches are {label!r}; the AUROC "
                         "needs patches of both kinds")
    from pathvl.eval.metrics import roc_auc_binary

    return float(roc_auc_binary(y.astype(int), s))


@torch.no_grad()
def slide_heatmaps(ev: Any, root: str | Path, slide_id: str, texts: str | Sequence[str | Sequence[str]],
                   mode: str | None = None) -> list[Heatmap]:
    """Heatmaps of ``texts`` over every patch of one slide of a dataset, at the model's magnifications.

    Args:
        ev: An :class:`~pathvl.eval.loading.EvalModel` (any family: the scores are
            :func:`pathvl.eval.slides.patch_text_scores`).
        root: Dataset folder.
        slide_id: The slide.
        texts: One text or several; an inner list of strings is a prompt ensemble scored as one query
            (its heatmap's ``text`` joins them with " | ").
        mode: A model's own score type where it has several (PathFLIP: ``similarity`` or ``attention``).

    Returns:
        One :class:`Heatmap` per text.

    Raises:
        DatasetError: The slide is not in the dataset, or it was not embedded with ``features``; the
            message names the command to run.
    """
    from pathvl.eval.slides import patch_text_scores

    features, mags = ev.features, ev.mags
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("no texts given for the heatmap")
    ds = Dataset(root)
    if slide_id not in ds.slide_ids():
        raise DatasetError(f"{root}: slide {slide_id!r} is not in the dataset (tiled slides: "
                           f"{ds.slide_ids()[:5]}...); tile it with `pathvl tile SLIDE --dataset {root}`")
    key = K.features_key(features)
    with ds.open(slide_id) as f:
        if key not in f:
            raise DatasetError(f"slide {slide_id!r} of {root} was not embedded with {features!r} (no {key}); run "
                               f"`pathvl embed --dataset {root} --encoder {features}` first")
        feats = f[key][:].astype(np.float32)
        coords = f[K.COORDS][:]
        mag = f[K.MAGNIFICATION][:]
        size = tuple(int(v) for v in f.attrs[K.ATTR_SLIDE_SIZE])
        fps = {float(k): float(v) for k, v in json.loads(f.attrs[K.ATTR_FOOTPRINTS]).items()}
        slide_path = f.attrs.get(K.ATTR_SLIDE_PATH)
    keep = np.arange(len(coords))
    if mags:
        keep = np.flatnonzero(np.isin(mag, np.asarray(mags, dtype=mag.dtype)))
        if not len(keep):
            raise DatasetError(f"slide {slide_id!r}: no patches at magnifications {list(mags)}")
    fp = np.array([fps[float(m)] for m in mag[keep]])
    centre = (coords[keep] + fp[:, None] / 2.0) / np.asarray(size, dtype=np.float64)
    scores = patch_text_scores(ev, torch.from_numpy(feats[keep]), torch.from_numpy(centre.astype(np.float32)),
                               texts, mode=mode)  # (Q, N)
    path = str(slide_path) if slide_path is not None else None
    return [Heatmap(slide_id=slide_id, text=t if isinstance(t, str) else " | ".join(t),
                    scores=scores[q].astype(np.float32), coords=coords[keep].astype(np.int64), footprint=fp,
                    slide_size=(size[0], size[1]), mode=mode or "similarity", slide_path=path)
            for q, t in enumerate(texts)]
