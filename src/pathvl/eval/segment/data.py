"""Mask folders (``images/`` + ``masks/`` + optional ``classes.json``), checked, and their batches of
normalised tiles."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl.eval.segment.common import IGNORE_INDEX, IMAGE_SUFFIXES, SegmentError

if TYPE_CHECKING:
    import torch

    from pathvl.encoders import VisionEncoder


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
