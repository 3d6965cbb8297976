"""Shared by the segmentation modules: the run folder's file names, the unlabelled id, the error type, and
an atomic PNG writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathvl.errors import UserError
from pathvl.eval.finetune.files import _atomic

FORMAT = "pathvl-segment/1"
CONFIG_FILE = "segment.json"
MODEL_FILE = "model.safetensors"
IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MONITORS = ("miou", "loss")


class SegmentError(UserError, ValueError):
    """Segmentation data, settings or runs that cannot be used; the message names the file or class."""


def _save_png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    return _atomic(path, lambda p: Image.fromarray(arr).save(p, format="PNG"))
