"""What a synthetic slide is and its ground truth: the label map and metadata written beside it."""


from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SyntheticSlide:
    """A synthetic slide on disk and where its ground truth lies.

    Attributes:
        path: The slide file.
        labels_path: The label map PNG (``<stem>.labels.png``).
        meta_path: The ground-truth metadata JSON (``<stem>.json``).
        classes: Class names; label ``k`` is ``classes[k - 1]``.
        mpp: Level-0 microns per pixel written into the file (``None``: none written).
        size: Level-0 ``(width, height)``.
        downsamples: Downsample of each pyramid level, level 0 (1) first.
        flavour: ``"aperio"`` or ``"generic"``.
    """

    path: Path
    labels_path: Path
    meta_path: Path
    classes: tuple[str, ...]
    mpp: float | None
    size: tuple[int, int]
    downsamples: tuple[int, ...] = (1,)
    flavour: str = "aperio"

    def ground_truth(self) -> GroundTruth:
        """Load the ground truth written beside the slide."""
        return load_ground_truth(self.path)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Label map of a synthetic slide.

    Attributes:
        labels: ``(h, w)`` uint8; 0 is background, ``k`` is ``classes[k - 1]``. Label pixel ``(i, j)``
            covers level-0 ``[j * downsample, (j + 1) * downsample) x [i * downsample, ...)``.
        downsample: Level-0 pixels per label pixel.
        classes: Class names.
        size: Level-0 ``(width, height)`` of the slide; ``None`` means the label map's extent.
    """

    labels: np.ndarray
    downsample: float
    classes: tuple[str, ...]
    size: tuple[int, int] | None = None

    @property
    def extent(self) -> tuple[float, float]:
        """Level-0 ``(width, height)`` covered by the slide."""
        if self.size is not None:
            return float(self.size[0]), float(self.size[1])
        h, w = self.labels.shape
        return w * self.downsample, h * self.downsample

    def class_index(self, name: str) -> int:
        """Label value of class ``name``."""
        return self.classes.index(name) + 1

    def fractions(self, x: float, y: float, w: float, h: float) -> np.ndarray:
        """Area fraction of each label in a level-0 box.

        The box is weighted exactly by area, also where it cuts label pixels; any part of it outside
        the slide counts as background.

        Args:
            x: Level-0 left edge.
            y: Level-0 top edge.
            w: Width in level-0 pixels (> 0).
            h: Height in level-0 pixels (> 0).

        Returns:
            ``(K + 1,)`` float64 fractions summing to 1; index 0 is background, ``k`` is
            ``classes[k - 1]``.
        """
        if w <= 0 or h <= 0:
            raise ValueError(f"box width and height must be positive, got {w}x{h}")
        k1 = len(self.classes) + 1
        W, H = self.extent
        ds = float(self.downsample)
        W, H = min(W, self.labels.shape[1] * ds), min(H, self.labels.shape[0] * ds)
        x0, x1 = max(float(x), 0.0), min(float(x + w), W)
        y0, y1 = max(float(y), 0.0), min(float(y + h), H)
        out = np.zeros(k1)
        if x1 > x0 and y1 > y0:
            cols, wx = _coverage(x0 / ds, x1 / ds, self.labels.shape[1])
            rows, wy = _coverage(y0 / ds, y1 / ds, self.labels.shape[0])
            block = self.labels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            weights = np.outer(wy, wx) * ds * ds
            out += np.bincount(block.ravel(), weights=weights.ravel(), minlength=k1)[:k1]
        area = float(w) * float(h)
        out[0] += area - out.sum()
        return np.clip(out / area, 0.0, 1.0)

    def majority(self, x: float, y: float, w: float, h: float) -> int:
        """Label covering most of a level-0 box (ties go to the lower label; 0 is background)."""
        return int(np.argmax(self.fractions(x, y, w, h)))

    def tissue_mask(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """Boolean tissue mask (label > 0), optionally resampled to a thumbnail.

        Args:
            size: ``(width, height)`` of a thumbnail of the whole slide; a thumbnail pixel is tissue
                when at least half its area is. ``None`` returns the mask at the label resolution.
        """
        return self.class_mask(None, size)

    def class_mask(self, label: int | str | None, size: tuple[int, int] | None = None) -> np.ndarray:
        """Boolean mask of one label (an index, a class name, or ``None`` for all tissue).

        Args:
            label: Label value, class name, or ``None`` for any tissue class.
            size: As in :meth:`tissue_mask`.
        """
        if isinstance(label, str):
            label = self.class_index(label)
        m = self.labels > 0 if label is None else self.labels == label
        if size is None:
            return m
        W, H = self.extent
        img = Image.fromarray(m.astype(np.uint8) * 255)
        box = (0.0, 0.0, W / self.downsample, H / self.downsample)
        small = img.resize((int(size[0]), int(size[1])), Image.Resampling.BOX, box=box)
        return np.asarray(small) >= 128


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def _coverage(a: float, b: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the unit cells meeting ``[a, b)`` (clipped to ``[0, n)``) and the length of each overlap."""
    i0 = min(max(math.floor(a), 0), n - 1)
    i1 = min(max(math.ceil(b) - 1, i0), n - 1)
    idx = np.arange(i0, i1 + 1)
    cover = np.minimum(idx + 1, b) - np.maximum(idx, a)
    return idx, np.clip(cover, 0.0, None)


def ground_truth_paths(slide_path: str | Path) -> tuple[Path, Path]:
    """``(labels_path, meta_path)`` of a synthetic slide: ``<stem>.labels.png`` and ``<stem>.json``."""
    p = Path(slide_path)
    return p.with_name(f"{p.stem}.labels.png"), p.with_name(f"{p.stem}.json")


def load_ground_truth(slide_path: str | Path) -> GroundTruth:
    """Load the ground truth written beside a synthetic slide.

    Args:
        slide_path: The slide file (its ``<stem>.labels.png`` and ``<stem>.json`` are read).

    Raises:
        FileNotFoundError: A ground-truth file is missing; the message names it.
    """
    labels_path, meta_path = ground_truth_paths(slide_path)
    for p in (meta_path, labels_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"no ground truth for {slide_path}: expected {p} (written by "
                "pathvl.synthetic.write_synthetic_slide beside the slide)"
            )
    meta = json.loads(meta_path.read_text())
    with Image.open(labels_path) as im:
        labels = np.array(im, dtype=np.uint8)
    return GroundTruth(
        labels=labels,
        downsample=float(meta["label_downsample"]),
        classes=tuple(meta["classes"]),
        size=(int(meta["size"][0]), int(meta["size"][1])),
    )



# --------------------------------------------------------------------------------------------------
# Periodic texture primitives (all arrays P x P, float32, wrap around at the edges)
