"""Shared by the MIL modules: the run folder's file names, errors and warnings, and atomic writers.

Every file of a run is written under a temporary name and renamed when complete (:func:`_atomic`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl.errors import UserError
from pathvl.eval.report import write_atomic, write_csv, write_json

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
SPLITS_FILE = "splits.json"
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.safetensors"
HISTORY_FILE = "history.json"
HEATMAP_DIR = "heatmaps"
RUN_FORMAT = "pathvl-mil-run"
SPLITS_FORMAT = "pathvl-mil-splits"


class MILError(UserError, ValueError):
    """Bad input to slide-level MIL (labels, splits, features); the message names the slide or the file."""


class MILWarning(UserWarning):
    """Input that MIL can work around (labelled slides the dataset lacks, unlabelled rows)."""


def _warn(msg: str) -> None:
    warnings.warn(msg, MILWarning, stacklevel=3)


def _some(items: Sequence[Any], n: int = 8) -> str:
    items = list(items)
    head = ", ".join(str(x) for x in items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "")


_atomic = write_atomic  # one home for atomic writers: pathvl.eval.report
_write_json = write_json
_write_csv = write_csv


def _save_state(path: Path, state: Mapping[str, torch.Tensor], meta: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return _atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def _save_png(path: Path, img: np.ndarray) -> Path:
    from PIL import Image

    return _atomic(path, lambda p: Image.fromarray(img).save(p, format="PNG"))
