"""Semantic segmentation of tiles: mask folders, synthetic data, training, mIoU and Dice, run folders, loading.

``pathvl segment train`` learns a segmentation head (:mod:`pathvl.models.segmentation`: linear, or a light
UPerNet) on the dense patch tokens of a vision encoder (:meth:`pathvl.encoders.VisionEncoder.dense_tokens`),
the encoder frozen or with LoRA adapters (:func:`pathvl.models.finetune.apply_lora`). Data is a folder::

    DATA/images/<name>.png      RGB tiles (png, jpg, tif, ...)
    DATA/masks/<name>.png       one class id per pixel (8- or 16-bit greyscale), 255 = unlabelled
    DATA/classes.json           optional: ["background", "tumor", ...] (id = position), or
                                {"classes": [...], "ignore_index": 255}; without it the ids found are the classes

:func:`make_synthetic_segmentation` (``pathvl segment make-synthetic``) writes such a folder from generated
synthetic slides (:mod:`pathvl.synthetic`): tiles read at a physical magnification and the ground-truth label
map resampled to each tile (nearest label pixel to each tile pixel's centre, in level-0 coordinates).

Metrics (:func:`confusion_matrix`, :func:`segmentation_scores`): one confusion matrix over every labelled
pixel of the set (unlabelled pixels, ``ignore_index``, are left out); per class IoU = TP / (TP + FP + FN)
and Dice = 2 TP / (2 TP + FP + FN); a class absent from both the truth and the prediction has no score
(NaN, null in JSON) and is left out of the means (mIoU, mean Dice). This is the convention of mmsegmentation
and of Cityscapes' evaluation (scores over the whole set, not averaged per image).

A run folder::

    RUN/segment.json        format, classes, ignore index, tile size, encoder (name, weights, sha256), head,
                            LoRA settings, training settings, best epoch
    RUN/model.safetensors   the best epoch: head and LoRA adapters (not the frozen encoder weights)
    RUN/splits.json         training and validation images
    RUN/history.jsonl       per epoch: training loss, validation loss, mIoU
    RUN/report.json, .md    validation scores of the best epoch

Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl import __version__
from pathvl.errors import UserError
from pathvl.eval.finetune import (
    LoRASettings,
    _atomic,
    _read_run_config,
    build_encoder,
    load_weights,
    resolve_device,
    save_weights,
    write_csv,
    write_json,
)

if TYPE_CHECKING:
    import torch

    from pathvl.encoders import VisionEncoder
    from pathvl.models.segmentation import SegmentationModel

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "IGNORE_INDEX",
    "MaskDataset",
    "SegmentConfig",
    "SegmentError",
    "SegmentResult",
    "Segmenter",
    "confusion_matrix",
    "evaluate_segmentation",
    "label_tile",
    "load_segmenter",
    "make_synthetic_segmentation",
    "mask_folder",
    "segmentation_scores",
    "train_segmentation",
]

FORMAT = "pathvl-segment/1"
CONFIG_FILE = "segment.json"
MODEL_FILE = "model.safetensors"
IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MONITORS = ("miou", "loss")


class SegmentError(UserError, ValueError):
    """Segmentation data, settings or runs that cannot be used; the message names the file or class."""


# ============================================================================================== metrics
def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """Pixel confusion matrix ``(K, K)`` int64: rows are true classes, columns predicted ones.

    Args:
        pred: Predicted class ids, any shape.
        target: True class ids, the same shape; pixels equal to ``ignore_index`` are left out.
        num_classes: ``K``.
        ignore_index: The unlabelled id (None: every pixel counts).

    Raises:
        SegmentError: Shapes differ, or an id outside ``0..K-1`` (other than ``ignore_index``).
    """
    p = np.asarray(pred).astype(np.int64, copy=False).ravel()
    t = np.asarray(target).astype(np.int64, copy=False).ravel()
    if np.shape(pred) != np.shape(target):
        raise SegmentError(f"prediction shape {np.shape(pred)} differs from target shape {np.shape(target)}")
    keep = np.ones_like(t, dtype=bool) if ignore_index is None else t != ignore_index
    p, t = p[keep], t[keep]
    for name, a in (("target", t), ("prediction", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            bad = int(a[(a < 0) | (a >= num_classes)][0])
            raise SegmentError(f"{name} holds class id {bad}, outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """IoU and Dice per class, their means over the classes that occur, and pixel accuracy.

    Args:
        cm: ``(K, K)`` confusion matrix (rows true, columns predicted), e.g. summed over a data set.
        class_names: Name of each class (default: the ids).

    Returns:
        ``{"miou", "mdice", "pixel_accuracy", "n_pixels", "per_class": [{"name", "iou", "dice", "pixels",
        "predicted"}], "confusion_matrix"}``; a class with no true and no predicted pixel has IoU and Dice
        None and is left out of the means.
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(union > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = cm.sum()

    def mean(v: np.ndarray) -> float | None:
        return float(np.nanmean(v)) if np.isfinite(v).any() else None

    def opt(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    return {
        "miou": mean(iou),
        "mdice": mean(dice),
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "n_pixels": int(total),
        "per_class": [{"name": names[i], "iou": opt(iou[i]), "dice": opt(dice[i]), "pixels": int(cm[i].sum()),
                       "predicted": int(cm[:, i].sum())} for i in range(k)],
        "confusion_matrix": cm.tolist(),
    }


# ================================================================================================= data
def _read_classes(root: Path) -> tuple[list[str] | None, int]:
    file = root / "classes.json"
    if not file.is_file():
        return None, IGNORE_INDEX
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SegmentError(f"{file}: not valid JSON ({e})") from None
    ignore = IGNORE_INDEX
    if isinstance(raw, dict):
        ignore = int(raw.get("ignore_index", IGNORE_INDEX))
        raw = raw.get("classes")
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise SegmentError(f"{file}: expected a list of class names (id = position) or "
                           '{"classes": [...], "ignore_index": 255}')
    if not raw:
        raise SegmentError(f"{file}: the class list is empty; name every class id (e.g. [\"background\", \"tumor\"])")
    if len(set(raw)) != len(raw):
        raise SegmentError(f"{file}: class names repeat ({raw})")
    if 0 <= ignore < len(raw):
        raise SegmentError(f"{file}: ignore_index {ignore} is also the id of class {raw[ignore]!r}")
    return list(raw), ignore


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise SegmentError(f"mask {path}: mode {im.mode} is not one class id per pixel; save it as 8-bit "
                                   "greyscale (mode L) holding the class ids")
            return np.asarray(im).astype(np.int64)
    except OSError as e:
        raise SegmentError(f"mask {path}: unreadable ({e})") from None


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise SegmentError(f"image {path}: unreadable ({e})") from None


@dataclass
class MaskDataset:
    """Images with per-pixel class masks, resized to ``tile_px`` (images bilinear, masks nearest).

    ``self[i]`` is ``(image (S, S, 3) uint8, mask (S, S) int64)``.

    Attributes:
        images: Image files.
        masks: Mask file of each image.
        classes: Class name of each id.
        ignore_index: The id of unlabelled pixels.
        tile_px: Side ``S`` the pairs are resized to (None: their own size, which must then be one).
        root: The folder.
    """

    images: list[Path]
    masks: list[Path]
    classes: list[str]
    ignore_index: int = IGNORE_INDEX
    tile_px: int | None = None
    root: Path = field(default_factory=Path)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.images]

    def subset(self, indices: Sequence[int]) -> MaskDataset:
        return MaskDataset([self.images[i] for i in indices], [self.masks[i] for i in indices], self.classes,
                           self.ignore_index, self.tile_px, self.root)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        from pathvl.eval.tiles import read_image

        img = read_image(self.images[i])
        mask = _read_mask(self.masks[i])
        if self.tile_px is not None and img.size != (self.tile_px, self.tile_px):
            img = img.resize((self.tile_px, self.tile_px), Image.Resampling.BILINEAR)
            rows = (np.arange(self.tile_px) + 0.5) * mask.shape[0] / self.tile_px
            cols = (np.arange(self.tile_px) + 0.5) * mask.shape[1] / self.tile_px
            mask = mask[rows.astype(np.int64)[:, None], cols.astype(np.int64)[None, :]]
        return np.asarray(img, dtype=np.uint8), mask


def mask_folder(root: str | Path, tile_px: int | None = None, classes: Sequence[str] | None = None,
                ignore_index: int | None = None) -> MaskDataset:
    """An ``images/`` + ``masks/`` folder (see the module docstring), every pair checked.

    Args:
        root: The folder.
        tile_px: Resize every pair to this side (None: keep their size, which must be one for all).
        classes: The class names a trained run expects; the folder's ``classes.json``, if any, must agree.
        ignore_index: Unlabelled id when the folder has no ``classes.json`` (default 255).

    Raises:
        SegmentError: No images, an image without a mask, a mask whose size differs from its image's, a
            mask id that is not a class, or an empty class list; the message names the file.
    """
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise SegmentError(f"{root}: no {d.name}/ folder; expected {root}/images/<name>.png and "
                               f"{root}/masks/<name>.png (class ids), plus an optional classes.json")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise SegmentError(f"{img_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    by_stem = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [p.name for p in images if p.stem not in by_stem]
    if missing:
        raise SegmentError(f"{mask_dir}: no mask for {len(missing)} images, e.g. {missing[:3]} (a mask has the "
                           "image's name, as .png)")
    masks = [by_stem[p.stem] for p in images]
    names, ignore = _read_classes(root)
    if names is None and ignore_index is not None:
        ignore = int(ignore_index)
    if classes is not None:
        if not classes:
            raise SegmentError(f"{root}: the class list is empty")
        if names is not None and list(names) != list(classes):
            raise SegmentError(f"{root / 'classes.json'}: classes {names} differ from the model's {list(classes)}")
        names = list(classes)
    sizes, seen = set(), set()
    for img, m in zip(images, masks):
        size = _image_size(img)
        arr = _read_mask(m)
        if (arr.shape[1], arr.shape[0]) != size:
            raise SegmentError(f"mask {m}: size {arr.shape[1]}x{arr.shape[0]} differs from its image {img.name} "
                               f"({size[0]}x{size[1]})")
        ids = np.unique(arr)
        ids = ids[ids != ignore]
        if names is not None and ids.size and (ids.min() < 0 or ids.max() >= len(names)):
            bad = [int(i) for i in ids if i < 0 or i >= len(names)]
            raise SegmentError(f"mask {m}: class id {bad[0]} is not a class (ids 0..{len(names) - 1}: {names}; "
                               f"{ignore} = unlabelled)")
        seen.update(int(i) for i in ids)
        sizes.add(size)
    if names is None:
        if not seen:
            raise SegmentError(f"{mask_dir}: every pixel is unlabelled ({ignore}) and there is no classes.json")
        names = [str(i) for i in range(max(seen) + 1)]
    if tile_px is None and len(sizes) > 1:
        raise SegmentError(f"{img_dir}: images have {len(sizes)} sizes ({sorted(sizes)[:3]}...); pass --tile-px to "
                           "resize them to one")
    return MaskDataset(images, masks, names, ignore, tile_px, root)


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


def _save_png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    return _atomic(path, lambda p: Image.fromarray(arr).save(p, format="PNG"))


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


# ============================================================================================= training
@dataclass
class SegmentConfig:
    """Settings of ``pathvl segment train`` (its defaults come from here).

    Attributes:
        head: ``linear`` or ``upernet``.
        width: Channels of the UPerNet levels.
        dropout: Dropout before the UPerNet classifier.
        epochs: Most epochs.
        batch_size: Tiles per step.
        lr: AdamW learning rate of the head.
        encoder_lr: AdamW learning rate of the LoRA adapters.
        weight_decay: AdamW weight decay.
        patience: Stop after this many epochs without a better validation score.
        monitor: ``miou`` (higher is better) or ``loss``.
        val_fraction: Share of the images held out for validation when no validation folder is given.
        seed: Seed of the split, the initialisation and the order.
        tile_px: Side the tiles are resized to (None: the encoder's input size); a multiple of the patch size.
        lora: LoRA adapters in the encoder; None keeps it frozen.
        cache_gb: With a frozen encoder, keep the training and validation tokens in memory (float16) when they
            fit in this many GiB, so each epoch runs the head only.
        workers: DataLoader workers.
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    head: str = "linear"
    width: int = 64
    dropout: float = 0.1
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 5
    monitor: str = "miou"
    val_fraction: float = 0.2
    seed: int = 0
    tile_px: int | None = None
    lora: LoRASettings | None = None
    cache_gb: float = 2.0
    workers: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        from pathvl.models.segmentation import SEG_HEADS

        checks = [
            (self.head in SEG_HEADS, f"unknown head {self.head!r}; heads: {', '.join(SEG_HEADS)}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and self.encoder_lr > 0, "learning rates must be positive"),
            (self.patience >= 1, f"patience must be at least 1, got {self.patience}"),
            (self.monitor in MONITORS, f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}"),
            (0 < self.val_fraction < 1, f"val fraction must lie in (0, 1), got {self.val_fraction}"),
            (self.tile_px is None or self.tile_px >= 16, f"tile size must be at least 16 px, got {self.tile_px}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SegmentError(message)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lora"] = self.lora.to_dict() if self.lora else None
        return d


def _patch_size(module: Any) -> int | None:
    pe = getattr(module, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is not None:
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    cfg = getattr(module, "config", None)
    return int(cfg.patch_size) if cfg is not None and hasattr(cfg, "patch_size") else None


def _normalise(enc: VisionEncoder, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) normalised float32 on ``device`` (no resize: the tiles are S already)."""
    from pathvl.encoders.preprocess import resize_normalise

    return resize_normalise(images.to(device), size=int(images.shape[1]), mean=enc.mean, std=enc.std,
                            interpolation=enc.interpolation)


def _loader(ds: MaskDataset, batch_size: int, workers: int, shuffle: bool, seed: int) -> Iterator[Any]:
    import torch
    from torch.utils.data import DataLoader

    def collate(items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.stack([a for a, _ in items])), torch.from_numpy(np.stack([m for _, m in items])))

    gen = torch.Generator().manual_seed(seed)
    yield from DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate,
                          generator=gen)


@dataclass
class _Cached:
    tokens: torch.Tensor  # (N, C, h, w) float16
    masks: torch.Tensor  # (N, S, S) int64


def _cache_tokens(model: SegmentationModel, enc: VisionEncoder, ds: MaskDataset, cfg: SegmentConfig,
                  device: torch.device) -> _Cached:
    import torch

    toks, masks = [], []
    with torch.no_grad():
        for x, m in _loader(ds, max(cfg.batch_size, 32), cfg.workers, False, 0):
            toks.append(model.tokens(_normalise(enc, x, device)).half().cpu())
            masks.append(m)
    return _Cached(torch.cat(toks), torch.cat(masks))


def _batches(model: SegmentationModel, enc: VisionEncoder, ds: MaskDataset, cached: _Cached | None,
             cfg: SegmentConfig, device: torch.device, shuffle: bool, seed: int) -> Iterator[Any]:
    """``(logits (B, K, S, S), masks (B, S, S))`` batches, from cached tokens or by running the encoder."""
    import torch

    if cached is not None:
        n = len(cached.tokens)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        size = tuple(cached.masks.shape[-2:])
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            yield model.decode(cached.tokens[idx].to(device).float(), size), cached.masks[idx].to(device)
    else:
        for x, m in _loader(ds, cfg.batch_size, cfg.workers, shuffle, seed):
            yield model(_normalise(enc, x, device)), m.to(device)


def _evaluate(model: SegmentationModel, enc: VisionEncoder, ds: MaskDataset, cached: _Cached | None,
              cfg: SegmentConfig, device: torch.device, num_classes: int) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over labelled pixels and the confusion matrix of a set."""
    import torch
    import torch.nn.functional as F

    model.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum, n_pix = 0.0, 0
    with torch.no_grad():
        for logits, m in _batches(model, enc, ds, cached, cfg, device, False, 0):
            valid = int((m != ds.ignore_index).sum())
            if valid:
                loss_sum += float(F.cross_entropy(logits.float(), m, ignore_index=ds.ignore_index,
                                                  reduction="sum"))
                n_pix += valid
            cm += confusion_matrix(logits.argmax(1).cpu().numpy(), m.cpu().numpy(), num_classes, ds.ignore_index)
    return loss_sum / max(n_pix, 1), cm


def _better(monitor: str, loss: float, miou: float, best: tuple[float, float] | None) -> bool:
    if best is None:
        return True
    return loss < best[0] if monitor == "loss" else miou > best[1] + 1e-12 or (
        abs(miou - best[1]) <= 1e-12 and loss < best[0])


def _to_save(model: SegmentationModel) -> dict[str, torch.Tensor]:
    from pathvl.models.finetune import LORA_MARK

    return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.") or LORA_MARK in k}


def _load_state(model: SegmentationModel, state: Mapping[str, torch.Tensor], file: Path) -> None:
    from pathvl.models.finetune import LORA_MARK

    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("encoder.") or LORA_MARK in k]
    if missing or result.unexpected_keys:
        raise SegmentError(f"{file} does not fit the model of its segment.json: missing {missing[:6]}, "
                           f"unexpected {list(result.unexpected_keys)[:6]}")


def _markdown(report: Mapping[str, Any], title: str) -> str:
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"# {title}", "", f"{report['n_pixels']} labelled pixels, {len(report['per_class'])} classes.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(report.get(k))} |" for k in ("miou", "mdice", "pixel_accuracy")]
    lines += ["", "## Per class", "", "| class | IoU | Dice | true pixels | predicted pixels |",
              "|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {fmt(c['iou'])} | {fmt(c['dice'])} | {c['pixels']} | {c['predicted']} |"
              for c in report["per_class"]]
    return "\n".join(lines) + "\n"


@dataclass
class SegmentResult:
    """What :func:`train_segmentation` returns: the run folder, the validation report of the best epoch, the
    history, the best epoch and the model (eval mode)."""

    run_dir: Path
    report: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    model: SegmentationModel


def train_segmentation(data: str | Path, out: str | Path, *, encoder: str = "tiny-vit",
                       encoder_weights: str | None = None, cfg: SegmentConfig | None = None,
                       val_data: str | Path | None = None,
                       progress: Callable[[str], None] | None = None) -> SegmentResult:
    """Train a segmentation head on an encoder's dense patch tokens.

    Args:
        data: A mask folder (:func:`mask_folder`).
        out: The run folder to write.
        encoder: Vision encoder name (a ViT: ``uni``, ``timm:vit_*``, ``tiny-vit``...).
        encoder_weights: Its weights file, when it needs one.
        cfg: Settings (default :class:`SegmentConfig`).
        val_data: A validation mask folder (default: a ``val_fraction`` share of ``data`` drawn with the seed).
        progress: Called with one line per epoch.

    Raises:
        SegmentError: Bad data or settings, named; EncoderError: an encoder without patch tokens.
    """
    import torch
    import torch.nn.functional as F

    from pathvl.models.finetune import trainable_parameter_count
    from pathvl.models.segmentation import SegmentationModel, build_seg_head

    cfg = cfg or SegmentConfig()
    say = progress or (lambda _line: None)
    run = Path(out)
    if (run / CONFIG_FILE).exists():
        raise SegmentError(f"{run}: already holds a segmentation run; choose another --out or delete it")
    device = resolve_device(cfg.device)
    enc = build_encoder(encoder, encoder_weights)
    tile_px = cfg.tile_px or enc.input_size
    ps = _patch_size(enc.model)
    if ps and tile_px % ps:
        raise SegmentError(f"tile size {tile_px} px is not a multiple of {encoder}'s patch size {ps}; pass --tile-px "
                           f"{max(ps, tile_px // ps * ps)}")
    ds = mask_folder(data, tile_px=tile_px)
    classes = ds.classes
    if val_data is not None:
        train_ds = ds
        val_ds = mask_folder(val_data, tile_px=tile_px, classes=classes, ignore_index=ds.ignore_index)
        split = {"train": ds.names, "val": [f"{val_data}/{n}" for n in val_ds.names], "source": "val_data"}
    else:
        if len(ds) < 2:
            raise SegmentError(f"{data}: one image cannot be split into training and validation; add images or "
                               "pass --val-data")
        perm = np.random.default_rng(cfg.seed).permutation(len(ds))
        n_val = min(max(1, round(len(ds) * cfg.val_fraction)), len(ds) - 1)
        val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        train_ds, val_ds = ds.subset(tr_idx), ds.subset(val_idx)
        split = {"train": train_ds.names, "val": val_ds.names, "source": "random", "seed": cfg.seed,
                 "val_fraction": cfg.val_fraction}
    enc.to(device)
    with torch.no_grad():
        probe_tokens = enc.dense_tokens(_normalise(enc, torch.zeros(1, tile_px, tile_px, 3, dtype=torch.uint8),
                                                   device))
    channels = int(probe_tokens.shape[1])
    with torch.random.fork_rng(devices=[]):  # peft draws the LoRA A matrices from the global generator
        torch.manual_seed(cfg.seed)
        if cfg.lora is not None:
            cfg.lora.apply(enc.model)
        head = build_seg_head(cfg.head, channels, len(classes), width=cfg.width, dropout=cfg.dropout)
        model = SegmentationModel(enc.model, head).to(device)
    cached_train = cached_val = None
    if not model.encoder_trains:
        h, w = probe_tokens.shape[-2:]
        gib = (len(train_ds) + len(val_ds)) * channels * h * w * 2 / 2**30
        if gib <= cfg.cache_gb:
            cached_train = _cache_tokens(model, enc, train_ds, cfg, device)
            cached_val = _cache_tokens(model, enc, val_ds, cfg, device)
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    adapters = [p for p in model.encoder.parameters() if p.requires_grad]
    if adapters:
        groups.append({"params": adapters, "lr": cfg.encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    config = {
        "format": FORMAT, "pathvl_version": __version__, "torch_version": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "classes": classes, "ignore_index": ds.ignore_index,
        "tile_px": tile_px,
        "encoder": {"name": enc.name, "weights_path": enc.weights_path, "weights_sha256": enc.weights_sha256,
                    "token_channels": channels, "mean": list(enc.mean), "std": list(enc.std)},
        "head": {"kind": cfg.head, "width": cfg.width, "dropout": cfg.dropout},
        "lora": cfg.lora.to_dict() if cfg.lora else None,
        "trainable_parameters": {"head": trainable_parameter_count(model.head),
                                 "encoder_adapters": trainable_parameter_count(model.encoder)},
        "train": {k: v for k, v in cfg.to_dict().items() if k != "lora"}, "data": str(data), "best_epoch": None,
    }
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "splits.json", split)
    history: list[dict[str, Any]] = []
    lines: list[str] = []
    best: tuple[float, float] | None = None
    best_epoch, bad, best_state, best_cm = 0, 0, None, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            if not model.encoder_trains:
                model.encoder.eval()
            total, n = 0.0, 0
            for logits, m in _batches(model, enc, train_ds, cached_train, cfg, device, True, cfg.seed * 1000 + epoch):
                loss = F.cross_entropy(logits.float(), m, ignore_index=ds.ignore_index)  # logits (B, K, S, S)
                if not torch.isfinite(loss):
                    if not bool((m != ds.ignore_index).any()):
                        continue  # a batch of unlabelled pixels only
                    raise SegmentError(f"epoch {epoch}: the training loss is {float(loss)}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(m)
                n += len(m)
            val_loss, cm = _evaluate(model, enc, val_ds, cached_val, cfg, device, len(classes))
            scores = segmentation_scores(cm, classes)
            miou = scores["miou"] if scores["miou"] is not None else 0.0
            improved = _better(cfg.monitor, val_loss, miou, best)
            rec = {"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss, "val_miou": miou,
                   "val_mdice": scores["mdice"], "best": improved, "seconds": round(time.perf_counter() - t0, 3)}
            history.append(rec)
            lines.append(json.dumps(rec))
            _atomic(run / "history.jsonl", lambda p: p.write_text("\n".join(lines) + "\n", encoding="utf-8"))
            say(f"epoch {epoch}: train loss {rec['train_loss']:.4f}, val loss {val_loss:.4f}, val mIoU {miou:.4f}"
                + (" (best)" if improved else ""))
            if improved:
                best, best_epoch, bad, best_cm = (val_loss, miou), epoch, 0, cm
                best_state = {k: v.detach().clone() for k, v in _to_save(model).items()}
                save_weights(run / MODEL_FILE, best_state, "segmentation")
                config["best_epoch"] = epoch
                config["best_val"] = {"loss": val_loss, "miou": miou, "mdice": scores["mdice"]}
                write_json(run / CONFIG_FILE, config)
            else:
                bad += 1
                if bad >= cfg.patience:
                    say(f"stopping: no better validation {cfg.monitor} for {cfg.patience} epochs")
                    break
    assert best_state is not None and best_cm is not None
    _load_state(model, best_state, run / MODEL_FILE)
    model.eval()
    report = segmentation_scores(best_cm, classes)
    report.update(split="validation", best_epoch=best_epoch, epochs_run=len(history),
                  model={"run": str(run), "encoder": enc.name, "head": cfg.head, "lora": config["lora"],
                         "tile_px": tile_px, "trainable_parameters": config["trainable_parameters"]})
    write_json(run / "report.json", report)
    _atomic(run / "report.md", lambda p: p.write_text(
        _markdown(report, f"Segmentation, validation split of {Path(data).name}"), encoding="utf-8"))
    return SegmentResult(run, report, history, best_epoch, model)


# ============================================================================================= loading
@dataclass
class Segmenter:
    """A trained segmentation model with its preprocessing (what :func:`load_segmenter` returns).

    Attributes:
        model: The :class:`~pathvl.models.segmentation.SegmentationModel` (eval mode).
        vision: The vision encoder (its module is ``model.encoder``).
        classes: Class name of each id.
        ignore_index: Id of unlabelled pixels in masks.
        tile_px: Side of the tiles the model reads.
        config: The run's ``segment.json``.
        source: The run folder.
    """

    model: SegmentationModel
    vision: VisionEncoder
    classes: list[str]
    ignore_index: int
    tile_px: int
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, K, S, S)`` logits of ``(B, S, S, 3)`` uint8 tiles."""
        import torch

        with torch.no_grad():
            return self.model(_normalise(self.vision, images, self.device)).float()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, S, S)`` int64 class ids of ``(B, S, S, 3)`` uint8 tiles, on the CPU."""
        return self.logits(images).argmax(1).cpu()


def load_segmenter(run_dir: str | Path, device: str | torch.device = "cpu",
                   encoder_weights: str | None = None) -> Segmenter:
    """Loads a ``pathvl segment train`` run folder (its best epoch).

    Raises:
        SegmentError: Not a segmentation run (another kind of run says which), or weights that do not fit.
    """
    import torch

    from pathvl.eval.finetune import FinetuneError
    from pathvl.models.segmentation import SegmentationModel, build_seg_head

    run = Path(run_dir)
    try:
        cfg = _read_run_config(run, CONFIG_FILE, FORMAT, "a segmentation run", "pathvl segment train")
        e = cfg["encoder"]
        enc = build_encoder(e["name"], encoder_weights or e.get("weights_path"), e.get("weights_sha256"),
                            where=f"{run / CONFIG_FILE}: ")
        state = load_weights(run / MODEL_FILE, "segmentation")
    except FinetuneError as err:
        raise SegmentError(str(err)) from None
    if cfg.get("lora"):
        LoRASettings.from_dict(cfg["lora"]).apply(enc.model)
    h = cfg["head"]
    head = build_seg_head(h["kind"], int(e["token_channels"]), len(cfg["classes"]), width=int(h["width"]),
                          dropout=float(h["dropout"]))
    model = SegmentationModel(enc.model, head)
    _load_state(model, state, run / MODEL_FILE)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    model.to(dev).eval()
    return Segmenter(model, enc, list(cfg["classes"]), int(cfg["ignore_index"]), int(cfg["tile_px"]), cfg, str(run))


def evaluate_segmentation(run_dir: str | Path, data: str | Path, *, encoder_weights: str | None = None,
                          batch_size: int = 16, workers: int = 0, device: str = "cpu",
                          out: str | Path | None = None, save_masks: bool = False) -> dict[str, Any]:
    """mIoU, Dice per class and pixel accuracy of a trained run on a mask folder.

    The folder's masks are read with the run's classes (a mask id that is not one of them is an error).

    Args:
        run_dir: A ``pathvl segment train`` run folder.
        data: A mask folder.
        encoder_weights: The encoder's weights, when the recorded file is elsewhere here.
        batch_size: Tiles per batch.
        workers: DataLoader workers.
        device: Where to run.
        out: Write ``segment_eval.json``/``.md`` there (and the predicted masks with ``save_masks``).
        save_masks: Also write ``OUT/predictions/<name>.png`` (class ids).

    Raises:
        SegmentError: Not a segmentation run, or masks that do not fit.
    """
    seg = load_segmenter(run_dir, device=device, encoder_weights=encoder_weights)
    ds = mask_folder(data, tile_px=seg.tile_px, classes=seg.classes, ignore_index=seg.ignore_index)
    k = len(seg.classes)
    cm = np.zeros((k, k), dtype=np.int64)
    names = ds.names
    i = 0
    for x, m in _loader(ds, batch_size, workers, False, 0):
        pred = seg.predict(x).numpy()
        cm += confusion_matrix(pred, m.numpy(), k, ds.ignore_index)
        if out is not None and save_masks:
            for p in pred:
                _save_png(Path(out) / "predictions" / (Path(names[i]).stem + ".png"), p.astype(np.uint8))
                i += 1
    report = segmentation_scores(cm, seg.classes)
    report["model"] = {"run": str(run_dir), "encoder": seg.config["encoder"]["name"],
                       "head": seg.config["head"]["kind"], "lora": seg.config.get("lora"), "tile_px": seg.tile_px}
    report["data"] = {"masks": str(data), "images": len(ds)}
    if out is not None:
        write_json(Path(out) / "segment_eval.json", report)
        _atomic(Path(out) / "segment_eval.md", lambda p: p.write_text(
            _markdown(report, f"Segmentation: {Path(data).name}"), encoding="utf-8"))
    return report
