"""Published vision-language models as frozen encoders: ``openclip:<dir>`` and ``hfclip:<dir>``.

The image tower of a published VLM is a patch encoder like any other: ``build_vision("openclip:<dir>")``
returns a :class:`~pathvl.encoders.vision.VisionEncoder` whose features are the model's own (projected,
not normalised) image embeddings, with the preprocessing published with the weights, so ``pathvl embed``,
the tile evaluations and a linear probe run it unchanged. The text tower is wrapped for evaluation in
:mod:`pathvl.eval.baselines`; both use :func:`load_vlm`.

Two layouts are read, from local files only (nothing is downloaded):

- **OpenCLIP** (QuiltNet, ...; Ilharco et al., OpenCLIP, 2021; Ikezogwo et al., Quilt-1M, NeurIPS 2023):
  a folder with the hub's ``open_clip_config.json`` (``model_cfg``: ``embed_dim``, ``vision_cfg``,
  ``text_cfg``; ``preprocess_cfg``: ``mean``, ``std``, ``interpolation``, ``resize_mode``) and
  ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``; or ``openclip:<model>:<weights>``,
  one of open_clip's built-in configs (``ViT-B-32``, ...) with a local weights file (open_clip's default
  preprocessing: OpenAI CLIP mean/std, bicubic). The network is built from the config by open_clip's own
  classes (``CLIP``, ``CustomTextCLIP``, ``CoCa``); the weights load strictly, so a config that does not
  describe its weights is refused with one line naming missing, unexpected and mis-shaped keys. A text
  tower that is a Hugging Face model (``text_cfg.hf_model_name``) must name a local folder.
- **Hugging Face CLIP** (PLIP, Huang et al., Nature Medicine 2023): a folder whose ``config.json`` has
  ``model_type: clip``, with ``model.safetensors`` or ``pytorch_model.bin`` and the processor files,
  read by transformers' ``CLIPModel`` / ``CLIPProcessor`` (``local_files_only=True``). The image feature is
  ``visual_projection(vision_model(x).pooler_output)``, what ``CLIPModel.get_image_features`` computes.

CONCH (Lu et al., Nat. Med. 2024) is recognised and refused as a VLM (:func:`conch_reason`): its text
encoder and tokenizer exist only in MahmoodLab's ``conch`` package; its vision tower is the ``conch`` entry.
Recognising a VLM from its files (:func:`vlm_kind`, :func:`vlm_name`, :func:`conch_reason`) lives in
:mod:`pathvl.encoders.vlm_detect`; this module re-exports those names.

A loaded model is shared while something holds it (a weak cache keyed by the files' identity): the text
wrapper of :func:`pathvl.eval.loading.load_for_eval` and the vision encoder that ``tile_embeddings``
builds for the same folder are one model in memory, read from disk once.

Preprocessing: square tiles are resized to the model's input size (bicubic by default) and normalised;
non-square tiles take the shorter side and a centre crop (open_clip's ``resize_mode: shortest``).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvl.encoders.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pathvl.encoders.registry import register_vision
from pathvl.encoders.vision import VisionEncoder
from pathvl.encoders.vlm_detect import (
    HF_CONFIG,
    OPENCLIP_CONFIG,
    OPENCLIP_HINT,
    _norm,
    _read_json,
    conch_reason,
    vlm_kind,
    vlm_name,
)
from pathvl.encoders.weights import EncoderError, _first_line, read_state_dict, sha256_file

#: Weights files of an OpenCLIP folder, in open_clip's order of preference.
OPENCLIP_WEIGHTS = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
_MAX_LISTED = 5


@dataclass(eq=False)
class LoadedVLM:
    """A published vision-language model read from local files.

    Attributes:
        kind: ``openclip`` or ``hfclip``.
        name: Vision-encoder registry name (``openclip:<dir>``, ``openclip:<model>:<weights>``, ``hfclip:<dir>``).
        model: The whole network (open_clip ``CLIP``/``CustomTextCLIP``/``CoCa`` or transformers
            ``CLIPModel``), in eval mode, gradients off.
        tokenize: Texts -> ``{"input_ids" (T, L)[, "attention_mask"]}`` with the model's own tokenizer.
        width: Joint embedding width.
        mean: Normalisation mean.
        std: Normalisation std.
        input_size: Side of the square input.
        resize_size: Shorter side before the centre crop (None: ``input_size``).
        interpolation: Resize filter.
        weights_path: The weights file.
        weights_sha256: Its sha256.
        config_path: The config the network was built from (or the open_clip built-in name).
        extra: Provenance (preprocessing source, tokenizer).
    """

    kind: str
    name: str
    model: nn.Module
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    resize_size: int | None
    interpolation: str
    weights_path: str
    weights_sha256: str
    config_path: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's learned temperature, as the log (CLIP convention: logits = exp(logit_scale) * cosine)."""
        return self.model.logit_scale


_CACHE: weakref.WeakValueDictionary[tuple, LoadedVLM] = weakref.WeakValueDictionary()


# --------------------------------------------------------------------------------------------------
# OpenCLIP


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _openclip_sources(arg: str, weights: str | Path | None) -> tuple[dict, dict, Path, str, str]:
    """(model_cfg, preprocess_cfg, weights file, config description, registry name) of ``openclip:<arg>``."""
    path = Path(_norm(arg))
    if path.is_dir() or (path.is_file() and (path.parent / OPENCLIP_CONFIG).is_file()):
        folder = path if path.is_dir() else path.parent
        cfg_file = folder / OPENCLIP_CONFIG
        if not cfg_file.is_file():
            raise EncoderError(f"{folder}: no {OPENCLIP_CONFIG}. {OPENCLIP_HINT}")
        doc = _read_json(cfg_file)
        model_cfg = doc.get("model_cfg") if isinstance(doc, Mapping) else None
        if not isinstance(model_cfg, Mapping):
            raise EncoderError(f"{cfg_file}: no model_cfg (the hub layout is "
                               "{'model_cfg': {embed_dim, vision_cfg, text_cfg}, 'preprocess_cfg': {...}})")
        pre = doc.get("preprocess_cfg") or {}
        if weights is not None:
            w = Path(_norm(os.fspath(weights)))
        elif path.is_file():
            w = path
        else:
            found = _first_existing(folder, OPENCLIP_WEIGHTS)
            if found is None:
                raise EncoderError(f"{folder}: no weights file ({', '.join(OPENCLIP_WEIGHTS)})")
            w = found
        return dict(model_cfg), dict(pre), w, str(cfg_file), f"openclip:{_norm(arg)}"
    model, sep, file = arg.partition(":")
    if not sep and weights is None:
        raise EncoderError(f"openclip:{arg}: no such folder, and no weights file given. {OPENCLIP_HINT}")
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        close = [m for m in open_clip.list_models() if model.split("-")[0].lower() in m.lower()][:8]
        raise EncoderError(f"openclip:{arg}: {model!r} is neither a folder nor one of open_clip's model configs"
                           + (f" (similar: {', '.join(close)})" if close else ""))
    w = Path(_norm(file if sep else os.fspath(weights)))
    return dict(cfg), {}, w, f"open_clip built-in config {model}", f"openclip:{model}:{_norm(file) if sep else w}"


def _openclip_network(model_cfg: Mapping[str, Any], source: str) -> nn.Module:
    """open_clip's network for ``model_cfg``, chosen as open_clip's factory chooses it, with no weights fetched."""
    import open_clip

    cfg = deepcopy(dict(model_cfg))
    vision, text = cfg.get("vision_cfg"), cfg.get("text_cfg")
    if not isinstance(vision, Mapping) or not isinstance(text, Mapping) or "embed_dim" not in cfg:
        raise EncoderError(f"{source}: model_cfg needs embed_dim, vision_cfg and text_cfg")
    vision, text = dict(vision), dict(text)
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False  # never ask timm to fetch weights
    hf_text = text.get("hf_model_name")
    if hf_text:
        if not Path(_norm(str(hf_text))).is_dir():
            raise EncoderError(
                f"{source}: the text tower is the Hugging Face model {hf_text!r}, which open_clip would fetch from "
                "the hub; download its folder and set text_cfg.hf_model_name (and hf_tokenizer_name) to that folder")
        text["hf_model_name"] = _norm(str(hf_text))
        text["hf_model_pretrained"] = False  # its weights come from the OpenCLIP checkpoint
    cfg["vision_cfg"], cfg["text_cfg"] = vision, text
    custom = bool(cfg.pop("custom_text", False)) or bool(hf_text)
    cls = (open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP) if custom else open_clip.CLIP
    try:
        return cls(**cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        why = _first_line(exc)
        raise EncoderError(f"{source}: open_clip cannot build {cls.__name__} from model_cfg: {why}") from exc


def _openclip_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's own key conversions (old text layout, scalar logit scale), without resizing anything."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in sd and isinstance(own, torch.Tensor) and own.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(own.shape)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in sd and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    own_keys = model.state_dict()
    for key in [k for k in sd if k.endswith("position_ids") and k not in own_keys]:
        del sd[key]  # buffers that newer transformers no longer store
    return sd


def check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], *, weights: str, config: str) -> None:
    """Raise one line when ``state`` does not fit ``model`` exactly (keys and shapes).

    Raises:
        EncoderError: ``<weights> does not match <config>: 2 missing: ...; 1 shape mismatch: ...``.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:_MAX_LISTED])}{more}")
    if parts:
        raise EncoderError(f"weights {weights} do not match the model of {config} (config and weights of "
                           f"different models?): " + "; ".join(parts))


def _size(value: Any, source: str) -> int:
    dims = [int(value)] * 2 if isinstance(value, int | float) else [int(v) for v in value][-2:]
    if len(dims) != 2 or dims[0] != dims[1]:
        raise EncoderError(f"{source}: input size {value!r} is not square")
    return dims[0]


def _openclip_tokenizer(model_cfg: Mapping[str, Any], folder: Path | None, source: str) -> Callable:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text = model_cfg.get("text_cfg", {})
    ctx = int(text.get("context_length", 77))
    kwargs = dict(text.get("tokenizer_kwargs", {}) or {})
    hf_name = text.get("hf_tokenizer_name")
    if hf_name:
        if folder is not None and any((folder / f).is_file() for f in _TOKENIZER_FILES):
            where = folder
        elif Path(_norm(str(hf_name))).is_dir():
            where = Path(_norm(str(hf_name)))
        else:
            raise EncoderError(f"{source}: the tokenizer is the Hugging Face tokenizer {hf_name!r}, which open_clip "
                               "would fetch; put its files in the model folder or set hf_tokenizer_name to a folder")
        tok = HFTokenizer(str(where), context_length=ctx, tokenizer_mode=text.get("tokenizer_mode"), **kwargs)
    else:
        tok = SimpleTokenizer(context_length=ctx, **kwargs)  # OpenAI CLIP's BPE, bundled with open_clip

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": tok(list(texts))}

    return tokenize


def _load_openclip(arg: str, weights: str | Path | None) -> LoadedVLM:
    reason = conch_reason(f"openclip:{arg}") or conch_reason(arg)
    if reason:
        raise EncoderError(reason)
    model_cfg, pre, wpath, config, name = _openclip_sources(arg, weights)
    if not wpath.is_file():
        raise FileNotFoundError(f"weights file of {name} not found: {wpath}. {OPENCLIP_HINT}")
    model = _openclip_network(model_cfg, config)
    state = _openclip_state(model, read_state_dict(wpath, encoder=name))
    check_fit(model, state, weights=str(wpath), config=config)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    visual = model.visual
    size = _size(pre.get("size", getattr(visual, "image_size", 224)), config)
    resize_mode = str(pre.get("resize_mode", "shortest"))
    folder = Path(config).parent if config.endswith(OPENCLIP_CONFIG) else None
    return LoadedVLM(
        kind="openclip", name=name, model=model, tokenize=_openclip_tokenizer(model_cfg, folder, config),
        width=int(model_cfg["embed_dim"]), mean=tuple(pre.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(pre.get("std", OPENAI_CLIP_STD)), input_size=size, resize_size=None,
        interpolation=str(pre.get("interpolation", "bicubic")), weights_path=str(wpath),
        weights_sha256=sha256_file(wpath), config_path=config,
        extra={"preprocessing_from": config if pre else "open_clip defaults (OpenAI CLIP mean/std, bicubic)",
               "resize_mode": resize_mode, "architecture": type(model).__name__},
    )


# --------------------------------------------------------------------------------------------------
# Hugging Face CLIP (PLIP)


def _hf_preprocessing(processor: Any, source: str) -> dict[str, Any]:
    ip = processor.image_processor

    def side(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, int):
            return value
        get = value.get if isinstance(value, Mapping) else (lambda k: getattr(value, k, None))
        if get("shortest_edge"):
            return int(get("shortest_edge"))
        if get("height") and get("height") == get("width"):
            return int(get("height"))
        return None

    resize = side(getattr(ip, "size", None)) if getattr(ip, "do_resize", True) else None
    crop = side(getattr(ip, "crop_size", None)) if getattr(ip, "do_center_crop", False) else resize
    if resize is None or crop is None:
        raise EncoderError(f"{source}: the image processor's size {getattr(ip, 'size', None)!r} / crop_size "
                           f"{getattr(ip, 'crop_size', None)!r} is not a square resize this pipeline can reproduce")
    resample = getattr(ip, "resample", 3)
    filters = {0: "nearest", 2: "bilinear", 3: "bicubic"}
    resample = int(getattr(resample, "value", resample))
    if resample not in filters:
        raise EncoderError(f"{source}: resample {resample!r} is not one of {sorted(filters)} (PIL codes)")
    out: dict[str, Any] = {"input_size": crop, "resize_size": resize if resize != crop else None,
                           "interpolation": filters[resample]}
    if getattr(ip, "do_normalize", True):
        out["mean"] = tuple(float(v) for v in ip.image_mean)
        out["std"] = tuple(float(v) for v in ip.image_std)
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def _load_hfclip(arg: str, weights: str | Path | None) -> LoadedVLM:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    folder = Path(_norm(arg))
    if folder.is_file():
        folder = folder.parent
    cfg_file = folder / HF_CONFIG
    if not cfg_file.is_file():
        raise EncoderError(f"hfclip:{arg}: no {HF_CONFIG} in {folder} (a Hugging Face CLIP folder such as PLIP's)")
    doc = _read_json(cfg_file)
    if not isinstance(doc, Mapping) or doc.get("model_type") != "clip":
        have = doc.get("model_type") if isinstance(doc, Mapping) else None
        raise EncoderError(f"{cfg_file}: model_type is {have!r}, not 'clip'")
    wpath = Path(_norm(os.fspath(weights))) if weights is not None else _first_existing(folder, HF_WEIGHTS)
    if wpath is None:
        sharded = [p.name for p in folder.glob("*.index.json")]
        raise EncoderError(f"{folder}: no weights file ({', '.join(HF_WEIGHTS)})"
                           + (f"; sharded checkpoints ({sharded[0]}) are not read" if sharded else ""))
    name = f"hfclip:{_norm(str(folder))}"
    try:
        config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise EncoderError(f"{folder}: transformers cannot read this CLIP folder offline: {_first_line(exc)}") from exc
    model = CLIPModel(config)
    state = read_state_dict(wpath, encoder=name)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith("position_ids") and k not in own)}
    check_fit(model, state, weights=str(wpath), config=str(cfg_file))
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    pre = _hf_preprocessing(processor, str(folder))
    tok = processor.tokenizer
    ctx = int(config.text_config.max_position_embeddings)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        out = tok(list(texts), padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    return LoadedVLM(
        kind="hfclip", name=name, model=model, tokenize=tokenize, width=int(config.projection_dim),
        mean=pre["mean"], std=pre["std"], input_size=pre["input_size"], resize_size=pre["resize_size"],
        interpolation=pre["interpolation"], weights_path=str(wpath), weights_sha256=sha256_file(wpath),
        config_path=str(cfg_file), extra={"preprocessing_from": f"{folder} (CLIPProcessor)",
                                          "tokenizer": type(tok).__name__},
    )


class HFClipVision(nn.Module):
    """The image tower of a transformers ``CLIPModel``: ``visual_projection(vision_model(x).pooler_output)``.

    Holds the model's own ``vision_model`` and ``visual_projection``, so its state dict is the checkpoint's
    ``vision_model.*`` and ``visual_projection.*`` tensors.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, projection_dim) image embeddings (not normalised)."""
        return self.visual_projection(self.vision_model(pixel_values=x).pooler_output)


class _Pooled(nn.Module):
    """An open_clip image tower that also returns its tokens (CoCa): keep the pooled embedding only."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tower(x)
        return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------------
# loading, shared


def _identity(kind: str, arg: str, weights: str | Path | None) -> tuple:
    p = Path(_norm(arg))
    files = [p] if p.exists() else []
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
    if weights is not None:
        files.append(Path(_norm(os.fspath(weights))))
    stats = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists())
    return kind, arg, str(weights), stats


def load_vlm(name: str, weights: str | Path | None = None) -> LoadedVLM:
    """Load a published VLM by registry name (``openclip:<dir>``, ``openclip:<model>:<weights>``, ``hfclip:<dir>``).

    While the returned object is alive, loading the same unchanged files again returns it (weak cache).

    Args:
        name: The name; a bare folder is accepted too (its kind is recognised, :func:`vlm_kind`).
        weights: A weights file overriding the folder's (or completing ``openclip:<model>``).

    Raises:
        EncoderError: Not a VLM, CONCH, a config that does not match its weights, a tokenizer or text tower
            that would have to be downloaded.
        FileNotFoundError: The weights file is missing.
    """
    kind, sep, arg = name.partition(":")
    if not sep or kind not in ("openclip", "hfclip"):
        name = vlm_name(name)
        kind, _, arg = name.partition(":")
    key = _identity(kind, arg, weights)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    vlm = _load_openclip(arg, weights) if kind == "openclip" else _load_hfclip(arg, weights)
    _CACHE[key] = vlm
    return vlm


def vision_encoder(vlm: LoadedVLM) -> VisionEncoder:
    """The image tower of a loaded VLM as a frozen :class:`VisionEncoder` (features: its image embeddings)."""
    if vlm.kind == "hfclip":
        tower: nn.Module = HFClipVision(vlm.model)
    else:
        tower = vlm.model.visual
        if getattr(tower, "output_tokens", False):
            tower = _Pooled(tower)
    return VisionEncoder(
        name=vlm.name, model=tower, width=vlm.width, precision=torch.bfloat16, mean=vlm.mean, std=vlm.std,
        input_size=vlm.input_size, resize_size=vlm.resize_size, interpolation=vlm.interpolation,
        weights_path=vlm.weights_path, weights_sha256=vlm.weights_sha256,
        description=f"image tower of {vlm.name} ({vlm.extra.get('architecture', vlm.kind)}): its image embeddings",
        extra={k: v for k, v in vlm.extra.items() if k == "preprocessing_from"},
    )


@register_vision(
    "openclip",
    prefix=True,
    width=None,
    needs_weights=True,
    description="Image tower of a local OpenCLIP model (QuiltNet, ...): `openclip:<dir>` (open_clip_config.json + "
    "open_clip_pytorch_model.bin / open_clip_model.safetensors) or `openclip:<model>:<weights>`; features are its "
    "image embeddings, preprocessing from preprocess_cfg.",
    citation="Ilharco et al., OpenCLIP (2021); Ikezogwo et al., Quilt-1M, NeurIPS 2023",
    weights_hint=OPENCLIP_HINT,
    source="the folder's open_clip_config.json (model_cfg, preprocess_cfg)",
)
def _build_openclip(arg: str, weights: str | Path | None = None) -> VisionEncoder:
    """``openclip:<dir>`` or ``openclip:<model>:<weights>`` (see :func:`load_vlm`)."""
    return vision_encoder(load_vlm(f"openclip:{arg}", weights))


@register_vision(
    "hfclip",
    prefix=True,
    width=None,
    needs_weights=True,
    description="Image tower of a local Hugging Face CLIP folder (PLIP, ...): `hfclip:<dir>`; features are "
    "CLIPModel.get_image_features, preprocessing from its CLIPProcessor.",
    citation="Huang et al., A visual-language foundation model for pathology image analysis using medical "
    "Twitter, Nat. Med. 2023",
    weights_hint="A Hugging Face CLIP folder: config.json (model_type clip), model.safetensors or "
    "pytorch_model.bin, and the processor files.",
    source="the folder's preprocessor/processor config",
)
def _build_hfclip(arg: str, weights: str | Path | None = None) -> VisionEncoder:
    """``hfclip:<dir>`` (see :func:`load_vlm`)."""
    return vision_encoder(load_vlm(f"hfclip:{arg}", weights))


__all__ = [
    "OPENCLIP_CONFIG",
    "OPENCLIP_WEIGHTS",
    "HFClipVision",
    "LoadedVLM",
    "check_fit",
    "conch_reason",
    "load_vlm",
    "vision_encoder",
    "vlm_kind",
    "vlm_name",
]
