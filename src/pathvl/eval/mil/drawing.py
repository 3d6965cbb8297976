"""Pictures of a run: attention heatmaps over slide thumbnails and contact sheets of the top patches.

Coordinates are level-0 pixels (x, y) of each patch's top-left corner, as stored in the dataset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathvl import _const as K
from pathvl.eval.mil.bags import Bag
from pathvl.eval.mil.common import MILError, _save_png, _warn


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
