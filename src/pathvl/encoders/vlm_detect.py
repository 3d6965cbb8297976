"""Recognising a published vision-language model from its files: ``vlm_kind``, ``vlm_name`` and CONCH.

A path is an OpenCLIP model (a folder with ``open_clip_config.json``, or an ``openclip:...`` name), a
Hugging Face CLIP (a folder whose ``config.json`` has ``model_type: clip``, PLIP's layout) or CONCH (Lu et
al., Nat. Med. 2024), which is recognised and refused (:func:`conch_reason`); pathvl run and checkpoint
folders are never VLMs. Only configs and tensor names are read here; :mod:`pathvl.encoders.vlm` loads the
models.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pathvl.encoders.weights import EncoderError, _first_line

__all__ = ["HF_CONFIG", "OPENCLIP_CONFIG", "OPENCLIP_HINT", "conch_reason", "vlm_kind", "vlm_name"]

OPENCLIP_CONFIG = "open_clip_config.json"
HF_CONFIG = "config.json"
#: Files that make a folder a pathvl run or checkpoint (never a VLM).
_PATHVL_MARKERS = ("trainer.json", "latest")
OPENCLIP_HINT = ("An OpenCLIP model is a folder with open_clip_config.json and open_clip_pytorch_model.bin (or "
                 "open_clip_model.safetensors), as on its hub page, or openclip:<model>:<weights file>.")


def _norm(text: str) -> str:
    return os.path.normpath(os.path.expanduser(text))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{path}: cannot be read as JSON ({_first_line(exc)})") from None


def _weight_keys(path: Path) -> list[str]:
    """Tensor names of a weights file without reading the tensors (safetensors header or a mmapped zip)."""
    from pickle import UnpicklingError

    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (OSError, RuntimeError, ValueError, EOFError, UnpicklingError, zipfile.BadZipFile, SafetensorError):
        return []  # a peek only: the real load reports an unreadable file
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    return [str(k) for k in obj] if isinstance(obj, Mapping) else []


def _conch_config(cfg: Any) -> bool:
    if not isinstance(cfg, Mapping):
        return False
    cfg = cfg.get("model_cfg", cfg)
    vision = cfg.get("vision_cfg", {}) if isinstance(cfg, Mapping) else {}
    return isinstance(cfg, Mapping) and ("embed_dim_caption" in cfg or (
        isinstance(vision, Mapping) and "attentional_pool_contrast" in vision))


def conch_reason(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` (a CONCH folder, weights file or ``openclip:conch...`` name) cannot be used as a VLM, or None.

    CONCH is recognised by its config (``embed_dim_caption``, ``attentional_pool_contrast``) or by the
    tensors of its checkpoint (``visual.trunk.*`` with ``visual.attn_pool_contrast.*``).
    """
    text = os.fspath(path)
    weights: Path | None = None
    if text.startswith("openclip:"):
        arg = text[len("openclip:"):]
        if not arg.lower().startswith("conch"):
            return None
    else:
        p = Path(_norm(text))
        folder = p if p.is_dir() else p.parent
        if any((folder / m).exists() for m in _PATHVL_MARKERS):
            return None
        cfg_file = folder / OPENCLIP_CONFIG
        found = cfg_file.is_file() and _conch_config(_read_json(cfg_file))
        if not found:
            candidates = [p] if p.is_file() else [folder / n for n in ("pytorch_model.bin", "model.safetensors")]
            for c in candidates:
                if c.is_file():
                    keys = _weight_keys(c)
                    if any(k.startswith("visual.attn_pool_contrast.") for k in keys) and any(
                            k.startswith("visual.trunk.") for k in keys):
                        found, weights = True, c
                        break
        if not found:
            return None
    file = weights or "pytorch_model.bin"
    return (f"{text} is CONCH, which pathvl cannot run as a vision-language model: its text encoder and "
            "tokenizer (conch_byte_level_bpe_uncased.json) exist only in MahmoodLab's conch package and are not "
            "an OpenCLIP architecture; its vision tower is the `conch` encoder: "
            f"`pathvl probe --features conch --weights {file} ...` or `pathvl embed --encoder conch --weights {file}`")


def vlm_kind(path: str | os.PathLike[str]) -> str | None:
    """``openclip``, ``hfclip`` or ``conch`` when ``path`` names a published VLM, else None.

    Recognised: ``openclip:...`` and ``hfclip:...`` names; a folder (or a file in one) holding
    ``open_clip_config.json``; a folder whose ``config.json`` has ``model_type: clip``; a CONCH folder or
    checkpoint (:func:`conch_reason`). pathvl run and checkpoint folders are never VLMs.
    """
    text = os.fspath(path)
    for prefix in ("openclip", "hfclip"):
        if text.startswith(prefix + ":"):
            return "conch" if conch_reason(text) else prefix
    p = Path(_norm(text))
    if not p.exists():
        return None
    folder = p if p.is_dir() else p.parent
    if any((folder / m).exists() for m in _PATHVL_MARKERS):
        return None
    if conch_reason(p):
        return "conch"
    if (folder / OPENCLIP_CONFIG).is_file():
        return "openclip"
    hf = folder / HF_CONFIG
    if hf.is_file():
        doc = _read_json(hf)
        if isinstance(doc, Mapping) and doc.get("model_type") == "clip":
            return "hfclip"
    return None


def vlm_name(path: str | os.PathLike[str]) -> str:
    """The vision-encoder registry name of a VLM path (``openclip:<dir>``, ``hfclip:<dir>``).

    Raises:
        EncoderError: ``path`` is not a VLM (or is CONCH).
    """
    text = os.fspath(path)
    kind = vlm_kind(text)
    if kind == "conch":
        raise EncoderError(conch_reason(text) or f"{text}: CONCH")
    if kind is None:
        raise EncoderError(f"{text}: not a published VLM. {OPENCLIP_HINT} A PLIP-style model is a Hugging Face "
                           "CLIP folder (config.json with model_type clip).")
    if text.startswith(kind + ":"):
        head, arg = text.split(":", 1)
        return f"{head}:{_norm(arg) if Path(_norm(arg)).exists() else arg}"
    p = Path(_norm(text))
    if kind == "openclip" and p.is_file():
        return f"openclip:{_norm(text)}"
    return f"{kind}:{_norm(str(p if p.is_dir() else p.parent))}"
