"""Files of a run (also used by :mod:`pathvl.eval.segment`): atomic JSON, CSV and safetensors writers,
the kind of a run folder, and reading a run's config with a message naming what the folder holds instead.

Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathvl.eval.finetune.config import CONFIG_FILE, FinetuneError
from pathvl.eval.report import write_atomic, write_csv, write_json  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch

_KIND_KEY = "pathvl_kind"
_ALIASES_KEY = "pathvl_aliases"


_atomic = write_atomic  # the run's files use the report module's atomic writers


def save_weights(path: Path, state: Mapping[str, torch.Tensor], kind: str) -> Path:
    """A state dict as safetensors (tied tensors once, their aliases in the metadata), atomically."""
    from safetensors.torch import save_file

    from pathvl.data.checkpoint import split_shared_tensors

    tensors, aliases = split_shared_tensors(state)
    meta = {"format": "pt", _KIND_KEY: kind, _ALIASES_KEY: json.dumps(aliases)}
    return _atomic(Path(path), lambda p: save_file(tensors, str(p), metadata=meta))


def load_weights(path: Path, kind: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_weights`; checks the file is of ``kind``.

    Raises:
        FinetuneError: Missing, unreadable, or weights of another kind.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FinetuneError(f"{path}: missing; the run folder is incomplete (was training interrupted before "
                            "its first epoch?)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise FinetuneError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get(_KIND_KEY) != kind:
        raise FinetuneError(f"{path}: holds {meta.get(_KIND_KEY) or 'unknown'} weights, not {kind} weights")
    for alias, canonical in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
        state[alias] = state[canonical]
    return state


def run_kind(path: str | Path) -> str:
    """What a folder holds: ``finetune``, ``segmentation``, ``mil``, ``pretrain`` or ``unknown``."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return "finetune"
    if (p / "segment.json").is_file():
        return "segmentation"
    if (p / "config.json").is_file():
        try:
            if str(json.loads((p / "config.json").read_text(encoding="utf-8")).get("format", "")).startswith(
                    "pathvl-mil"):
                return "mil"
        except (ValueError, AttributeError):
            pass
    if (p / "latest").is_file() or (p / "trainer.json").is_file():
        return "pretrain"
    return "unknown"


_RUN_KINDS = {
    "finetune": ("a fine-tuned tile classifier (`pathvl finetune`)", "`pathvl finetune eval`"),
    "segmentation": ("a segmentation run (`pathvl segment train`)", "`pathvl segment eval`"),
    "mil": ("a slide-level MIL run (`pathvl mil train`)", "`pathvl mil eval`"),
    "pretrain": ("a pretraining run (`pathvl pretrain`)", "the evaluation commands or `pathvl finetune --checkpoint`"),
}


def _read_run_config(run: Path, config_file: str, fmt: str, wanted: str, command: str) -> dict[str, Any]:
    if not run.is_dir():
        raise FinetuneError(f"{run}: no such run folder")
    file = run / config_file
    if not file.is_file():
        kind = run_kind(run)
        if kind in _RUN_KINDS:
            what, use = _RUN_KINDS[kind]
            raise FinetuneError(f"{run}: is {what}, not {wanted}; use it with {use}")
        raise FinetuneError(f"{run}: not {wanted} (no {config_file}); train one with `{command}`")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FinetuneError(f"{file}: not valid JSON ({e})") from None
    if cfg.get("format") != fmt:
        raise FinetuneError(f"{file}: not the config of {wanted} (format {cfg.get('format')!r}, expected {fmt!r})")
    return cfg
