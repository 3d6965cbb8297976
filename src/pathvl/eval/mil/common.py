"""Shared by the MIL modules: the run folder's file names, errors and warnings, and atomic writers.

Every file of a run is written under a temporary name and renamed when complete (:func:`_atomic`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl import _const as K
from pathvl.errors import UserError

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


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + K.TMP_SUFFIX)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_json(path: Path, obj: Any) -> Path:
    return _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return _atomic(path, lambda p: p.write_text(buf.getvalue()))


def _save_state(path: Path, state: Mapping[str, torch.Tensor], meta: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return _atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def _save_png(path: Path, img: np.ndarray) -> Path:
    from PIL import Image

    return _atomic(path, lambda p: Image.fromarray(img).save(p, format="PNG"))
