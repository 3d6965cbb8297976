"""Checkpoints: atomic, self-describing, loadable without unpickling code.

A run folder holds::

    RUN_DIR/
      config.yaml              resolved config of the (latest) start of the run
      metrics.jsonl            one JSON line per logged step
      latest                   name of the newest complete checkpoint ("ckpt-000500")
      ckpt-000500/
        model.safetensors      model weights (DDP unwrapped; tied tensors stored once, aliases in metadata)
        trainer.pt             optimizer, schedule, loss-module parameters, RNG and data position per rank,
                               step: tensors and primitive containers only (torch.load(weights_only=True))
        trainer.json           step, family, config hash, pathvl/torch versions, the resolved config

A checkpoint is written into ``ckpt-XXXXXX.tmp/`` and renamed when complete; ``latest`` is replaced
atomically after the rename; only the newest ``keep_last`` checkpoints are kept. Before writing, its size
is estimated from the tensors and refused when it does not fit (:func:`check_checkpoint_space`); a write
that fails anyway (a full disk) removes the partial ``.tmp`` folder and raises one line naming the file,
earlier checkpoints and ``latest`` untouched. Loading refuses pickles that would run code and truncated
safetensors with a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pathvl.data.dataset import check_space, disk_full_error, is_disk_full
from pathvl.errors import UserError

__all__ = [
    "CKPT_PREFIX",
    "LATEST",
    "META_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "CheckpointError",
    "check_checkpoint_space",
    "check_family",
    "checkpoint_bytes_estimate",
    "find_checkpoint",
    "get_rng_state",
    "latest_checkpoint",
    "load_into",
    "load_model_weights",
    "load_trainer_state",
    "read_meta",
    "save_checkpoint",
    "set_rng_state",
    "split_shared_tensors",
]

CKPT_PREFIX = "ckpt-"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer.pt"
META_FILE = "trainer.json"
_ALIASES_KEY = "pathvl_aliases"  # safetensors metadata: JSON {alias: canonical name}
_OMITTED_KEY = "pathvl_omitted"  # safetensors metadata: JSON [frozen names not stored]


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete, or not the kind the caller needs."""


def ckpt_name(step: int) -> str:
    """Folder name of the checkpoint at ``step`` (``ckpt-000500``)."""
    return f"{CKPT_PREFIX}{step:06d}"


# ---------------------------------------------------------------------------------------------- RNG
def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors and primitives (weights_only-safe)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`get_rng_state` returned."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- model weights
def split_shared_tensors(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Prepares a state dict for safetensors, which refuses tensors that share memory.

    Entries that are the same tensor view (tied embeddings, a head sharing a weight) are stored once
    under their first name; the others are returned as ``{alias: canonical}``. Tensors that only partly
    overlap another are copied. Everything is moved to the CPU and made contiguous.

    Returns:
        ``(tensors, aliases)``.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen_view: dict[tuple, str] = {}
    storages: dict[tuple, list[str]] = {}
    for name, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"cannot save {name!r}: it is on the meta device")
        ptr = (t.device.type, t.untyped_storage().data_ptr()) if t.numel() else ("empty", name)
        view = (*ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and view in seen_view:
            aliases[name] = seen_view[view]
            continue
        seen_view[view] = name
        storages.setdefault(ptr, []).append(name)
        tensors[name] = t
    shared = {n for names in storages.values() if len(names) > 1 for n in names}
    out = {}
    for name, t in tensors.items():
        t = t.to("cpu").contiguous()
        if name in shared or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # partial overlap or a view into a larger buffer: store its own copy
        out[name] = t
    return out, aliases


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, Tensor):
        if obj.device.type == "meta" or not obj.numel():
            return 0
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def checkpoint_bytes_estimate(model: nn.Module, trainer_state: Mapping[str, Any] | None = None, *,
                              save_frozen: bool = True) -> int:
    """Bytes a checkpoint of ``model`` and ``trainer_state`` will take (its tensors; metadata is small)."""
    state = model.state_dict()
    if not save_frozen:
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        state = {n: t for n, t in state.items() if n not in frozen}
    seen: set[int] = set()
    return _tensor_bytes(state, seen) + _tensor_bytes(trainer_state or {}, seen) + 64 * 1024


def check_checkpoint_space(run_dir: str | Path, step: int, need: int) -> None:
    """Refuse a checkpoint of about ``need`` bytes that does not fit beside ``run_dir``'s others.

    Raises:
        DiskFullError: One line with both numbers (a :class:`~pathvl.errors.UserError`).
    """
    check_space(Path(run_dir), need, f"checkpoint {ckpt_name(step)} in {run_dir}")


class _Recorder(io.RawIOBase):
    """A file torch.save writes to that remembers the OSError it hit (torch reports only a position)."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.fh.write(b)
        except OSError as e:
            self.error = e
            raise


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb", buffering=0) as fh:
        rec = _Recorder(fh)
        try:
            torch.save(obj, rec)
        except BaseException as e:
            if rec.error is not None:
                raise rec.error from e
            raise


def _write_model(model: nn.Module, path: Path, save_frozen: bool) -> None:
    state = model.state_dict()
    omitted: list[str] = []
    if not save_frozen:
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        omitted = sorted(n for n in state if n in frozen)
        state = {n: t for n, t in state.items() if n not in frozen}
    tensors, aliases = split_shared_tensors(state)
    metadata = {"format": "pt", _ALIASES_KEY: json.dumps(aliases), _OMITTED_KEY: json.dumps(omitted)}
    save_file(tensors, str(path), metadata=metadata)


#: Modes of checkpoint files and folders, set explicitly: a shared run is readable by the group (issue 15).
FILE_MODE = 0o644
DIR_MODE = 0o755


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    trainer_state: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    keep_last: int = 3,
    save_frozen: bool = True,
) -> Path:
    """Writes ``RUN_DIR/ckpt-XXXXXX`` atomically, points ``latest`` at it and prunes old checkpoints.

    Call it on rank 0 only.

    Args:
        run_dir: Run folder.
        step: Optimizer steps completed.
        model: The model (already unwrapped from DDP).
        trainer_state: Optimizer, schedule, RNG, data position...: tensors and primitive containers only.
        meta: JSON-serialisable description (family, config, versions); ``step`` is added.
        keep_last: Number of checkpoints to keep.
        save_frozen: Store parameters with ``requires_grad=False`` too.

    Returns:
        The checkpoint folder.
    """
    run_dir = Path(run_dir)
    final = run_dir / ckpt_name(step)
    tmp = run_dir / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_checkpoint_space(run_dir, step, checkpoint_bytes_estimate(model, trainer_state, save_frozen=save_frozen))
    current = tmp
    try:
        tmp.mkdir(parents=True)
        current = tmp / MODEL_FILE
        _write_model(model, current, save_frozen)
        current = tmp / STATE_FILE
        _save_torch(dict(trainer_state), current)
        current = tmp / META_FILE
        current.write_text(json.dumps({**meta, "step": step}, indent=2) + "\n", encoding="utf-8")
        for name in (MODEL_FILE, STATE_FILE, META_FILE):
            current = tmp / name
            current.chmod(FILE_MODE)  # readable by the group whatever the umask or a writer's temp file gave
            _fsync_file(current)
        tmp.chmod(DIR_MODE)
    except BaseException as e:  # this checkpoint's partial folder goes; earlier ones and `latest` stay
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(current, e) from e
        raise
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        old = run_dir / (final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    pointer = run_dir / (LATEST + ".tmp")
    try:
        pointer.write_text(final.name + "\n", encoding="utf-8")
        pointer.chmod(FILE_MODE)
        _fsync_file(pointer)
        pointer.replace(run_dir / LATEST)
    except BaseException as e:  # the new checkpoint is complete; `latest` still names the previous one
        pointer.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(run_dir / LATEST, e) from e
        raise
    _prune(run_dir, keep_last, keep=final.name)
    return final


def _list_checkpoints(run_dir: Path) -> list[Path]:
    found = []
    for path in run_dir.glob(f"{CKPT_PREFIX}*"):
        suffix = path.name[len(CKPT_PREFIX):]
        if path.is_dir() and suffix.isdigit():
            found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def _prune(run_dir: Path, keep_last: int, keep: str) -> None:
    ckpts = _list_checkpoints(run_dir)
    for path in ckpts[: max(0, len(ckpts) - keep_last)]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``RUN_DIR/latest`` points to, or None when the run has none yet."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text(encoding="utf-8").strip()
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def find_checkpoint(path: str | Path) -> Path:
    """Resolves a run folder (via ``latest``), a checkpoint folder, or a file inside one to its folder.

    Raises:
        FileNotFoundError: Nothing there.
        CheckpointError: A folder without a complete checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or run folder at {path}")
    if path.is_file():
        path = path.parent
    if (path / META_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} holds no checkpoint (expected {LATEST} or {META_FILE})")
    return latest


def read_meta(path: str | Path) -> dict[str, Any]:
    """``trainer.json`` of the checkpoint at ``path`` (run folder, checkpoint folder or a file in it)."""
    ckpt = find_checkpoint(path)
    return json.loads((ckpt / META_FILE).read_text(encoding="utf-8"))


def check_family(meta: Mapping[str, Any], family: str) -> None:
    """Raises a clear error when a checkpoint was trained as another model family.

    Raises:
        CheckpointError: ``checkpoint is a pathflip model, this command needs mrplip``.
    """
    have = meta.get("family")
    if have != family:
        raise CheckpointError(f"checkpoint is a {have} model, this command needs {family}")


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint, loaded on the CPU with ``weights_only=True``."""
    from pickle import UnpicklingError

    ckpt = find_checkpoint(path)
    file = ckpt / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except UnpicklingError as e:  # weights_only refused it: nothing was executed
        raise CheckpointError(f"{file}: refused to load: it is not a plain tensor state (a pickle that would "
                              "construct objects or run code); pathvl never writes such a file, so it was "
                              "replaced or tampered with: resume from another checkpoint") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read (truncated or corrupt?): {_first_line(e)}") from e


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model_weights(
    path: str | Path, *, family: str | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Model weights and metadata of a checkpoint, for evaluation commands.

    Tied tensors come back under every name (all pointing to one tensor), so
    ``model.load_state_dict(state)`` works with ``strict=True`` unless the run used
    ``run.save_frozen=false`` (then ``meta["omitted"]`` lists the frozen names not stored).

    Args:
        path: Run folder (its latest checkpoint), checkpoint folder, or ``model.safetensors``.
        family: When given, the checkpoint must be of this model family.
        device: Where to put the tensors.

    Returns:
        ``(state_dict, meta)``; ``meta`` is ``trainer.json`` (step, family, config, versions...).

    Raises:
        CheckpointError: Wrong family or incomplete checkpoint.
    """
    ckpt = find_checkpoint(path)
    meta = json.loads((ckpt / META_FILE).read_text(encoding="utf-8"))
    if family is not None:
        check_family(meta, family)
    file = ckpt / MODEL_FILE
    from safetensors import SafetensorError

    try:
        state = load_file(str(file), device=str(device))
        with safe_open(str(file), framework="pt") as fh:
            extra = fh.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(f"{file}: missing; the checkpoint {ckpt} is incomplete") from e
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): "
                              f"{_first_line(e)}") from e
    for alias, canonical in json.loads(extra.get(_ALIASES_KEY, "{}")).items():
        state[alias] = state[canonical]
    meta["omitted"] = json.loads(extra.get(_OMITTED_KEY, "[]"))
    return state, meta


def load_into(model: nn.Module, state: Mapping[str, Tensor], omitted: list[str] | tuple[str, ...] = ()) -> None:
    """``model.load_state_dict(state)``, strict except for the frozen names a checkpoint left out."""
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if k not in set(omitted)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
