"""Segmentation data from synthetic slides: label maps resampled to tiles, and ``pathvl segment make-synthetic``.

Tile corners are level-0 pixels (x, y) of the slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathvl.eval.finetune.files import write_csv, write_json
from pathvl.eval.segment.common import IGNORE_INDEX, SegmentError, _save_png


def label_tile(gt: Any, x: int, y: int, footprint: int, tile_px: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A synthetic slide's label map resampled to one tile.

    Tile pixel ``(i, j)`` takes the label pixel under its centre, level-0 ``(x + (j + 0.5) * f, y + (i + 0.5) * f)``
    with ``f = footprint / tile_px``; pixels outside the slide are ``ignore_index``.

    Args:
        gt: :class:`pathvl.synthetic.GroundTruth`.
        x: Level-0 left edge of the tile.
        y: Level-0 top edge.
        footprint: Level-0 side of the tile.
        tile_px: Side of the tile in pixels.
        ignore_index: Id of pixels outside the slide.

    Returns:
        ``(tile_px, tile_px)`` uint8 class ids (0 background, k = ``gt.classes[k - 1]``).
    """
    f = footprint / tile_px
    cx = x + (np.arange(tile_px) + 0.5) * f  # level-0 centres of the tile's columns
    cy = y + (np.arange(tile_px) + 0.5) * f
    width, height = gt.extent
    h, w = gt.labels.shape
    cols = np.clip(np.floor(cx / gt.downsample).astype(np.int64), 0, w - 1)
    rows = np.clip(np.floor(cy / gt.downsample).astype(np.int64), 0, h - 1)
    out = gt.labels[rows[:, None], cols[None, :]].astype(np.uint8)
    outside = ((cy < 0) | (cy >= height))[:, None] | ((cx < 0) | (cx >= width))[None, :]
    out[outside] = ignore_index
    return out


def make_synthetic_segmentation(out: str | Path, *, slides: int = 2, size: tuple[int, int] = (2048, 1536),
                                magnification: float = 10.0, tile_px: int = 64, seed: int = 0,
                                classes: Sequence[str] | None = None, min_tissue: float = 0.25,
                                mpp: float = 0.25) -> dict[str, Any]:
    """Write a segmentation data folder (``images/``, ``masks/``, ``classes.json``) from synthetic slides.

    Slide ``i`` is :func:`pathvl.synthetic.write_synthetic_slide` with seed ``seed + i``, kept in
    ``OUT/slides/``; tiles of ``tile_px`` pixels at ``magnification`` (physical: mpp = 10 / magnification) are
    read on a non-overlapping grid from the pyramid level closest to that scale, and each tile's mask is the
    ground-truth label map resampled to it (:func:`label_tile`). Class 0 is the glass background.

    Args:
        out: The folder to write.
        slides: Number of slides.
        size: Level-0 ``(width, height)`` of each slide.
        magnification: Magnification of the tiles.
        tile_px: Tile side in pixels.
        seed: Seed of the first slide.
        classes: Tissue classes (default: all six of :data:`pathvl.synthetic.DEFAULT_CLASSES`).
        min_tissue: Keep tiles whose mask is at least this fraction tissue.
        mpp: Level-0 microns per pixel of the slides.

    Returns:
        ``{"out", "tiles", "classes", "slides", "magnification", "tile_px"}``.
    """
    from pathvl.slide.bags import read_patch
    from pathvl.slide.geometry import footprint_px, mag_to_mpp
    from pathvl.slide.reader import open_slide
    from pathvl.synthetic import DEFAULT_CLASSES, load_ground_truth, write_synthetic_slide

    if slides < 1:
        raise SegmentError(f"--slides must be at least 1, got {slides}")
    if tile_px < 16:
        raise SegmentError(f"--tile-px must be at least 16, got {tile_px}")
    root = Path(out)
    if (root / "images").is_dir() and any((root / "images").iterdir()):
        raise SegmentError(f"{root}: already holds tiles (images/); choose another --out or delete it")
    tissue = tuple(classes or DEFAULT_CLASSES)
    names = ["background", *tissue]
    rows: list[dict[str, Any]] = []
    for i in range(slides):
        sid = f"synthetic_{seed + i}"
        try:
            sp = write_synthetic_slide(root / "slides" / f"{sid}.svs", size, mpp=mpp, classes=tissue, seed=seed + i)
        except ValueError as e:  # an unknown class name, a size out of range: the generator says which
            raise SegmentError(f"make-synthetic: {e}") from None
        gt = load_ground_truth(sp.path)
        with open_slide(sp.path) as slide:
            slide_mpp = slide.require_mpp()
            fp = footprint_px(tile_px, mag_to_mpp(magnification), slide_mpp)
            W, H = slide.dimensions
            for y in range(0, H - fp + 1, fp):
                for x in range(0, W - fp + 1, fp):
                    mask = label_tile(gt, x, y, fp, tile_px)
                    if float(np.mean((mask > 0) & (mask != IGNORE_INDEX))) < min_tissue:
                        continue
                    img = read_patch(slide, x, y, fp, tile_px, fp / tile_px)
                    name = f"{sid}_x{x}_y{y}.png"
                    _save_png(root / "images" / name, img)
                    _save_png(root / "masks" / name, mask)
                    rows.append({"image": f"images/{name}", "mask": f"masks/{name}", "slide": sid, "x": x, "y": y,
                                 "footprint": fp, "magnification": magnification})
    if not rows:
        raise SegmentError(f"no tile of {slides} synthetic slides reached {min_tissue:g} tissue; lower --min-tissue")
    write_json(root / "classes.json", {"classes": names, "ignore_index": IGNORE_INDEX})
    write_csv(root / "tiles.csv", rows)
    summary = {"out": str(root), "tiles": len(rows), "classes": names, "slides": slides,
               "magnification": magnification, "tile_px": tile_px, "size": list(size), "seed": seed, "mpp": mpp,
               "coordinates": "level-0 pixels (x, y) of each tile's top-left corner"}
    write_json(root / "synthetic.json", summary)
    return summary
