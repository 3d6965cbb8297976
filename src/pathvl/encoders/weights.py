"""Loading encoder weights from local files, safely.

Only local files are read; nothing here touches a network. Two formats are accepted:

- ``.safetensors`` through :mod:`safetensors` (no code can run while reading);
- ``.bin``, ``.pth``, ``.pt``, ``.ckpt`` through ``torch.load(..., weights_only=True)``, which
  refuses pickles that would construct arbitrary objects or call functions.

Checkpoints that wrap the state dict (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and
the prefixes that training wrappers add (``module.``, ``model.``) are stripped when every key carries
them. Loading is strict: any missing or unexpected key or shape mismatch is an error that names the
encoder and a few offending keys, so a wrong file never yields a silently half-random model. Every such
error is an :class:`EncoderError` (a :class:`~pathvl.errors.UserError` and a ``ValueError``), which the
CLI prints as one line.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from pickle import UnpicklingError  # only to recognise torch.load(weights_only=True) refusing a file

import torch
from torch import nn

from pathvl.errors import UserError

TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
WRAPPER_KEYS = ("state_dict", "model", "module", "teacher", "model_state_dict")
STRIP_PREFIXES = ("module.", "model.")
_MAX_LISTED = 5


class EncoderError(UserError, ValueError):
    """An encoder cannot be built from what the user gave: a weights file that is unreadable, unsafe or of
    another architecture, or constructor arguments that the architecture does not accept. The message
    names the file (or flag) and the offending key."""


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message: errors here print as one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: How to turn a refused pickle into a safe file, without ever loading it here.
CONVERT_HINT = (
    "convert it to .safetensors where it was made, or on a machine you trust with code you trust: load the "
    "model there and save its state dict with safetensors.torch.save_file(model.state_dict(), "
    "'model.safetensors'), then pass that file"
)


def refusal_detail(exc: BaseException) -> str:
    """What the safe unpickler objected to (e.g. ``unsupported GLOBAL posix.system``), without torch's
    advice to retry with the unsafe loader."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "weights_only" not in ln and not ln.startswith("Check the documentation")
            and "can still be loaded" not in ln]
    return keep[0].rstrip(".") if keep else "it holds objects other than tensors"


def refusal_message(path: str | Path, exc: BaseException) -> str:
    """One line for a pickle that ``torch.load(weights_only=True)`` refused: what, why, how to convert."""
    return (f"refused to load {path}: it is not a plain tensor checkpoint ({refusal_detail(exc)}); the safe loader "
            f"never runs code from a file, and this one would need it. To use these weights, {CONVERT_HINT}")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so that large weights never sit in memory twice.

    Args:
        path: File to hash.
        chunk_bytes: Read size.

    Returns:
        The lowercase hexadecimal digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _missing_message(path: Path, encoder: str, hint: str, flag: str) -> str:
    msg = f"weights file for encoder {encoder!r} not found: {path}."
    if hint:
        msg += f" {hint}"
    msg += f" Pass the file with `{flag} /path/to/weights`."
    return msg


def _sniff_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive (torch.save) or legacy pickle
        return "torch"
    if len(head) == 8:
        return "safetensors"  # starts with a little-endian u64 header length
    raise EncoderError(
        f"cannot tell the format of weights file {path}: use one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise EncoderError(
            f"weights file {path} is not a readable safetensors file (truncated or corrupt?): {_first_line(exc)}"
        ) from exc


def _read_torch(path: Path) -> object:
    try:
        # zip checkpoints (torch.save) are memory-mapped: tensors are paged in once, when used
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except UnpicklingError as exc:
        # weights_only=True raises this both for pickles that reference code (a __reduce__ calling
        # os.system, a custom class) and for garbage; either way nothing was executed.
        raise EncoderError(refusal_message(path, exc)) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        why = _first_line(exc)
        raise EncoderError(f"weights file {path} could not be read (truncated or corrupt?): {why}") from exc


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"model": {"state_dict": {...}}} at most a few levels deep
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise EncoderError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EncoderError(f"weights file {path} holds no tensors (keys: {list(obj)[:_MAX_LISTED]})")
    return tensors


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``) that every key carries.

    A prefix is stripped only when all keys start with it, so a model whose own submodule happens to
    be called ``model`` is left intact.

    Args:
        state_dict: Tensors by name.

    Returns:
        A new dict with the shared prefixes removed (repeatedly: ``module.model.x`` becomes ``x``).
    """
    out = dict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def read_state_dict(
    path: str | Path, *, encoder: str, hint: str = "", flag: str = "--weights"
) -> dict[str, torch.Tensor]:
    """Read a state dict from a local weights file.

    Args:
        path: The ``.safetensors`` / ``.bin`` / ``.pth`` / ``.pt`` file.
        encoder: Encoder name, used in error messages.
        hint: Where to obtain the weights, appended to the not-found message.
        flag: The command-line flag that passes the file, named in the not-found message.

    Returns:
        Tensors by name, on the CPU, wrapper keys unwrapped and wrapper prefixes stripped.

    Raises:
        FileNotFoundError: The file does not exist.
        EncoderError: The file is truncated, corrupt, not a tensor checkpoint, or a pickle that
            would run code (a ``ValueError``).
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(_missing_message(p, encoder, hint, flag))
    fmt = _sniff_format(p)
    obj: object = _read_safetensors(p) if fmt == "safetensors" else _read_torch(p)
    return strip_prefixes(_unwrap(obj, p))


def check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, encoder: str, source: str) -> None:
    """Raise if ``state_dict`` does not match ``model`` key for key and shape for shape.

    Args:
        model: The module (may live on the meta device).
        state_dict: Tensors by name.
        encoder: Encoder name, used in the message.
        source: Where the tensors came from (a path), used in the message.

    Raises:
        EncoderError: Listing a few missing keys, unexpected keys and shape mismatches.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:_MAX_LISTED])}{more}")
    raise EncoderError(
        f"weights in {source} do not fit encoder {encoder!r} (wrong architecture or wrong file?): "
        + "; ".join(parts)
    )


def _has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def build_with_weights(
    build: Callable[[], nn.Module],
    path: str | Path,
    *,
    encoder: str,
    hint: str = "",
    flag: str = "--weights",
    select: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> tuple[nn.Module, str]:
    """Build a module and load local weights into it strictly.

    The module is first built on the meta device (no memory, no random initialisation: a ViT-L is
    ready in a fraction of a second instead of several seconds) and the tensors are assigned to it.
    Modules whose construction fails on the meta device, or that keep buffers outside their state
    dict, are built normally on the CPU and loaded by copy.

    Args:
        build: Zero-argument constructor of the architecture.
        path: Local weights file.
        encoder: Encoder name, used in messages.
        hint: Where to obtain the weights, used if the file is missing.
        flag: The command-line flag that passes the file.
        select: Optional map from the file's tensors to the module's (e.g. keep only the vision
            tower's ``visual.*`` keys of a CLIP checkpoint); strictness applies to what it returns.

    Returns:
        The module with its weights on the CPU, and the file's sha256.

    Raises:
        FileNotFoundError: The file does not exist.
        EncoderError: Unreadable file, unsafe pickle, or weights of another architecture.
    """
    state_dict = read_state_dict(path, encoder=encoder, hint=hint, flag=flag)
    if select is not None:
        state_dict = select(state_dict)
    source = str(path)
    try:
        with torch.device("meta"):
            model = build()
    except (RuntimeError, NotImplementedError, TypeError):
        model = None
    if model is not None:
        check_keys(model, state_dict, encoder=encoder, source=source)
        expected = model.state_dict()
        persistent = set(expected)
        non_persistent = [n for n, _ in model.named_buffers() if n not in persistent]
        if non_persistent:
            model = None  # such buffers are computed at construction: build for real
        else:
            cast = {
                k: (v.to(expected[k].dtype) if v.is_floating_point() and expected[k].is_floating_point() else v)
                for k, v in state_dict.items()
            }
            model.load_state_dict(cast, strict=True, assign=True)
            if _has_meta(model):
                model = None
    if model is None:
        model = build()
        check_keys(model, state_dict, encoder=encoder, source=source)
        model.load_state_dict(state_dict, strict=True)
    return model, sha256_file(path)


__all__ = [
    "CONVERT_HINT",
    "EncoderError",
    "build_with_weights",
    "check_keys",
    "read_state_dict",
    "refusal_detail",
    "refusal_message",
    "sha256_file",
    "strip_prefixes",
]
