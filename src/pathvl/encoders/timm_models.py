"""Any timm architecture by name (``timm:<arch>``), with constructor arguments from a file or the CLI.

timm is only ever asked for an architecture (``pretrained=False``); the weights come from a local file and
load strictly (:mod:`pathvl.encoders.weights`). Many pathology checkpoints need constructor arguments that
differ from the architecture's defaults (UNI2-h: ``patch_size=14, reg_tokens=8, mlp_layer=SwiGLUPacked``,
...). They come, in this order of precedence, from:

1. ``args=`` of :func:`~pathvl.encoders.build_vision` (``pathvl embed --encoder-args``): a mapping, a JSON
   string (``'{"img_size": 224, "reg_tokens": 8}'``) or the path of a ``.json`` / ``.yaml`` file;
2. otherwise a file beside the weights, the first of :data:`ARGS_FILE_NAMES` that exists (for
   ``/models/uni2/model.safetensors``: ``model.json``, ``model.yaml``, ``model.yml``, ``encoder.json``,
   ``encoder.yaml``, ``encoder.yml``, then ``config.json`` if it is a timm hub config, i.e. has an
   ``architecture`` key; a transformers ``config.json`` is skipped).

Two layouts are read. The flat one maps constructor arguments directly, with two reserved keys::

    img_size: 224
    patch_size: 14
    reg_tokens: 8
    mlp_layer: SwiGLUPacked      # layer classes by name: Mlp, SwiGLUPacked, SwiGLU, GluMlp, GatedMlp
    act_layer: SiLU              # any name timm's get_act_layer knows (silu, gelu, ...); torch.nn.SiLU too
    pretrained_cfg: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], input_size: 224,
                     interpolation: bicubic, crop_pct: 1.0}   # the published preprocessing (optional)
    output: cls+mean             # optional output rule: model (default) or cls+mean

The timm hub layout (a model repository's ``config.json``) puts the arguments under ``model_args`` beside
``architecture`` (which must name the same architecture) and ``pretrained_cfg``. Every other key must be
an argument of the timm model's constructor: an unknown key is refused with one line naming the file and
the key, before any weights are read. ``num_classes`` is always 0 (features, not logits), and arguments
that would fetch or load weights themselves (``pretrained``, ``checkpoint_path``, ...) are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvl.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD
from pathvl.encoders.registry import register_vision
from pathvl.encoders.vision import VisionEncoder, _seeded
from pathvl.encoders.weights import EncoderError, _first_line, build_with_weights

TIMM_HINT = (
    "timm:<arch> encoders are built with pretrained=False and never fetched from a hub: download the "
    "checkpoint (.safetensors or .bin) yourself."
)
#: Files looked for beside the weights, in order (``{stem}``: the weights file's name without suffix).
ARGS_FILE_NAMES = (
    "{stem}.json", "{stem}.yaml", "{stem}.yml", "encoder.json", "encoder.yaml", "encoder.yml", "config.json",
)
#: Keys of a timm hub ``config.json`` besides the constructor arguments (informational ones are ignored).
HUB_KEYS = frozenset({
    "architecture", "model_args", "pretrained_cfg", "num_classes", "num_features", "global_pool",
    "label_names", "label_descriptions", "output",
})
#: Constructor arguments pathvl refuses: they would fetch or load weights behind the strict loader's back,
#: or change what the model returns.
REFUSED_KEYS = {
    "pretrained": "weights come from --weights only",
    "checkpoint_path": "weights come from --weights only",
    "pretrained_cfg_overlay": "give the preprocessing as pretrained_cfg",
    "cache_dir": "nothing is downloaded",
    "features_only": "the encoder must return features, not a feature pyramid",
}
#: timm MLP layer classes accepted by name for ``mlp_layer``.
MLP_LAYERS = {"mlp": "Mlp", "swiglupacked": "SwiGLUPacked", "swiglu": "SwiGLU", "glumlp": "GluMlp",
              "gatedmlp": "GatedMlp"}
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


@dataclass
class EncoderArgs:
    """Constructor arguments and published preprocessing read from a file, a JSON string or a mapping.

    Attributes:
        kwargs: Constructor arguments as given (layer classes still as names).
        preprocess: Any of ``mean``, ``std``, ``input_size``, ``resize_size``, ``interpolation``.
        output: Output rule, or None for the default.
        source: Where they came from (a path, ``--encoder-args``), used in messages and provenance.
    """

    kwargs: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    source: str = ""


def _label(source: str) -> str:
    """How messages name where arguments came from: ``encoder args FILE``, ``--encoder-args``, ``encoder args``."""
    return source if source.startswith("--") or source == "encoder args" else f"encoder args {source}"


def find_args_file(weights: str | Path) -> Path | None:
    """The constructor-arguments file beside ``weights`` (see :data:`ARGS_FILE_NAMES`), or None."""
    w = Path(os.fspath(weights)).expanduser()
    for pattern in ARGS_FILE_NAMES:
        candidate = w.parent / pattern.format(stem=w.stem)
        if candidate == w or not candidate.is_file():
            continue
        if candidate.name == "config.json":
            try:
                doc = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            if not (isinstance(doc, Mapping) and "architecture" in doc):
                continue  # a transformers config.json, not timm's
        return candidate
    return None


def _read_document(args: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(args, Mapping):
        return args, "encoder args"
    text = os.fspath(args)
    if isinstance(args, str) and text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            why = _first_line(exc)
            raise EncoderError(f"--encoder-args: not valid JSON ({why}); give a JSON object or a file") from None
        source = "--encoder-args"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise EncoderError(
                f"--encoder-args: no such file {path} (give a JSON object such as '{{\"img_size\": 224}}', "
                "or a .json/.yaml file)"
            )
        import yaml

        try:
            raw = path.read_text()
            doc = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            why = _first_line(exc)
            raise EncoderError(f"{_label(str(path))}: cannot be read as {path.suffix or 'YAML'} ({why})") from None
        source = str(path)
    if not isinstance(doc, Mapping):
        raise EncoderError(f"{_label(source)}: expected a mapping of argument names to values")
    return doc, source


def _preprocess_from_cfg(cfg: Any, source: str) -> dict[str, Any]:
    if not isinstance(cfg, Mapping):
        raise EncoderError(f"{_label(source)}: pretrained_cfg must be a mapping")
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        if key in cfg:
            vals = cfg[key]
            if not (isinstance(vals, list | tuple) and len(vals) == 3):
                raise EncoderError(f"{_label(source)}: pretrained_cfg.{key} must be 3 numbers")
            out[key] = tuple(float(v) for v in vals)
    if "input_size" in cfg:
        size = cfg["input_size"]
        dims = [int(size)] * 2 if isinstance(size, int | float) else [int(v) for v in size][-2:]
        if len(dims) != 2 or dims[0] != dims[1]:
            raise EncoderError(f"{_label(source)}: pretrained_cfg.input_size {size!r} is not a square size")
        out["input_size"] = dims[0]
    if "interpolation" in cfg:
        out["interpolation"] = str(cfg["interpolation"])
    if cfg.get("crop_mode", "center") != "center":
        raise EncoderError(f"{_label(source)}: pretrained_cfg.crop_mode {cfg['crop_mode']!r} is not supported "
                           "(only 'center')")
    if "crop_pct" in cfg and "input_size" in out:
        out["resize_size"] = math.floor(out["input_size"] / float(cfg["crop_pct"]))  # timm's eval transform
    return out


def load_encoder_args(args: str | Path | Mapping[str, Any], *, arch: str) -> EncoderArgs:
    """Read constructor arguments (see the module docstring for the two layouts).

    Args:
        args: A mapping, a JSON object string, or a ``.json`` / ``.yaml`` path.
        arch: The timm architecture they are for (a hub config naming another one is refused).

    Raises:
        EncoderError: Unreadable file, bad JSON, a hub config for another architecture, bad preprocessing.
    """
    doc, source = _read_document(args)
    if "architecture" in doc and str(doc["architecture"]) != arch:
        raise EncoderError(f"{_label(source)}: written for architecture {doc['architecture']!r}, not {arch!r}")
    if "model_args" in doc:  # timm hub layout
        unknown = [k for k in doc if k not in HUB_KEYS]
        if unknown:
            raise EncoderError(f"{_label(source)}: unknown key {unknown[0]!r} beside model_args (timm hub "
                               f"config keys: {', '.join(sorted(HUB_KEYS))})")
        kwargs = doc["model_args"]
        if not isinstance(kwargs, Mapping):
            raise EncoderError(f"{_label(source)}: model_args must be a mapping")
        kwargs = dict(kwargs)
    else:
        kwargs = {k: v for k, v in doc.items() if k not in ("architecture", "pretrained_cfg", "output")}
    preprocess = _preprocess_from_cfg(doc["pretrained_cfg"], source) if "pretrained_cfg" in doc else {}
    output = doc.get("output")
    if output is not None and output not in ("model", "cls+mean"):
        raise EncoderError(f"{_label(source)}: output {output!r} must be 'model' or 'cls+mean'")
    return EncoderArgs(kwargs=kwargs, preprocess=preprocess, output=output, source=source)


def resolve_layers(kwargs: Mapping[str, Any], *, source: str = "encoder args") -> dict[str, Any]:
    """Replace layer names (``mlp_layer``, ``act_layer``, ``norm_layer``) by timm/torch classes.

    Args:
        kwargs: Constructor arguments; values that are already classes are kept.
        source: Named in the error message.

    Raises:
        EncoderError: A layer name timm does not know.
    """
    from timm import layers

    out = dict(kwargs)
    value = out.get("mlp_layer")
    if isinstance(value, str):
        key = value.rsplit(".", 1)[-1].replace("_", "").lower()
        if key not in MLP_LAYERS:
            raise EncoderError(f"{_label(source)}: mlp_layer {value!r} is not one of "
                               f"{', '.join(MLP_LAYERS.values())}")
        out["mlp_layer"] = getattr(layers, MLP_LAYERS[key])
    for key, getter in (("act_layer", layers.get_act_layer), ("norm_layer", layers.get_norm_layer)):
        value = out.get(key)
        if isinstance(value, str):
            try:
                resolved = getter(value.rsplit(".", 1)[-1].lower())
            except (KeyError, ValueError, AssertionError):
                resolved = None
            if resolved is None:
                raise EncoderError(f"{_label(source)}: {key} {value!r} is not a layer timm knows")
            out[key] = resolved
    return out


def create_timm(arch: str, kwargs: Mapping[str, Any], *, source: str = "encoder args") -> nn.Module:
    """``timm.create_model(arch, pretrained=False, **kwargs)`` with an unknown key reported as one line.

    Args:
        arch: timm architecture name.
        kwargs: Constructor arguments, layer classes resolved (:func:`resolve_layers`).
        source: The file or flag the arguments came from, named in the message.

    Raises:
        EncoderError: ``kwargs`` holds a key that the architecture's constructor does not accept.
    """
    import timm

    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as exc:
        m = _UNEXPECTED.search(str(exc))
        if m:
            raise EncoderError(f"{_label(source)}: unknown key {m.group(1)!r} (not an argument of timm's "
                               f"{arch} constructor)") from None
        why = _first_line(exc)
        raise EncoderError(f"{_label(source)}: timm cannot build {arch} with these arguments: {why}") from exc


def _jsonable(value: Any) -> Any:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


@register_vision(
    "timm",
    prefix=True,
    width=None,
    needs_weights=True,
    takes_args=True,
    description="Any timm architecture by name (`timm:<arch>`), built with pretrained=False, weights from a "
    "local file; constructor arguments from --encoder-args or a file beside the weights (encoder.yaml, "
    "<weights>.json, a timm config.json); mean/std/size from that file or timm's default config.",
    citation="Wightman, PyTorch Image Models (timm)",
    weights_hint=TIMM_HINT,
    source="your checkpoint; arguments from --encoder-args or beside the weights",
)
def _build_timm(
    arch: str,
    weights: str | Path | None = None,
    *,
    args: str | Path | Mapping[str, Any] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    input_size: int | None = None,
    interpolation: str | None = None,
    precision: torch.dtype = torch.bfloat16,
    _random_init: bool = False,
    **model_kwargs: Any,
) -> VisionEncoder:
    """Build ``timm:<arch>`` with local weights only (timm is never asked to fetch anything).

    Args:
        arch: timm architecture name, e.g. ``vit_base_patch16_224``.
        weights: Local weights file (required).
        args: Constructor arguments (module docstring); None looks for a file beside ``weights``.
        mean: Override of the normalisation mean (default: the args file, else timm's config).
        std: Override of the normalisation std.
        input_size: Override of the input side.
        interpolation: Override of the resize filter.
        precision: Preferred GPU dtype.
        _random_init: Internal hook: random weights instead of a file.
        **model_kwargs: Extra ``timm.create_model`` arguments, over those of ``args``.
    """
    import timm

    name = f"timm:{arch}"
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise KeyError(f"timm has no architecture {arch!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if weights is None and not _random_init:
        raise FileNotFoundError(
            f"encoder {name!r} needs a local weights file. {TIMM_HINT} Pass it with "
            "`--weights /path/to/model.safetensors`."
        )
    if args is None and weights is not None:
        beside = find_args_file(weights)
        spec = load_encoder_args(beside, arch=arch) if beside is not None else EncoderArgs()
    else:
        spec = load_encoder_args(args, arch=arch) if args is not None else EncoderArgs()
    source = spec.source or "encoder args"
    for key in (*spec.kwargs, *model_kwargs):
        if key in REFUSED_KEYS:
            raise EncoderError(f"{_label(source)}: key {key!r} is refused ({REFUSED_KEYS[key]})")
    given = {**spec.kwargs, **model_kwargs}
    given.pop("num_classes", None)
    kwargs = resolve_layers({**given, "num_classes": 0}, source=source)

    def build() -> nn.Module:
        return create_timm(arch, kwargs, source=source)

    if weights is None:
        model, path, digest = _seeded(build), None, None
    else:
        try:
            with torch.device("meta"):
                build()  # refuse unknown constructor arguments before reading gigabytes of weights
        except (RuntimeError, NotImplementedError):
            pass  # not buildable on the meta device; build_with_weights builds it on the CPU
        model, digest = build_with_weights(build, weights, encoder=name, hint=TIMM_HINT)
        path = str(weights)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    pre = spec.preprocess
    output = spec.output or "model"
    width = int(getattr(model, "head_hidden_size", None) or model.num_features)
    if output == "cls+mean":
        if getattr(model, "cls_token", None) is None or not hasattr(model, "num_prefix_tokens"):
            raise EncoderError(f"{_label(source)}: output 'cls+mean' needs a ViT with a class token ({arch} "
                               "has none with these arguments)")
        width = 2 * int(model.num_features)
    native = given.get("img_size") if isinstance(given.get("img_size"), int) else None  # the model's own grid
    extra: dict[str, Any] = {}
    if given:
        extra["model_args"] = _jsonable(given)
    if spec.source:
        extra["args_source"] = spec.source
    return VisionEncoder(
        name=name,
        model=model,
        width=width,
        precision=precision,
        mean=tuple(mean or pre.get("mean") or cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(std or pre.get("std") or cfg.get("std", IMAGENET_STD)),
        input_size=input_size or pre.get("input_size") or native or int(cfg.get("input_size", (3, 224, 224))[-1]),
        interpolation=interpolation or pre.get("interpolation") or cfg.get("interpolation", "bicubic"),
        resize_size=None if input_size else pre.get("resize_size"),
        output=output,
        weights_path=path,
        weights_sha256=digest,
        description=f"timm {arch}" + ("" if path else " (RANDOM weights: test hook)"),
        extra=extra,
    )


__all__ = [
    "ARGS_FILE_NAMES",
    "TIMM_HINT",
    "EncoderArgs",
    "create_timm",
    "find_args_file",
    "load_encoder_args",
    "resolve_layers",
]
