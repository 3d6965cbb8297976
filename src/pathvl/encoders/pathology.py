"""Named pathology foundation encoders: the published architecture, preprocessing and output rule of each.

Every entry is written down once, as a :class:`PathologySpec`, from its model card and from TRIDENT's
loaders (``mahmoodlab/TRIDENT``, ``trident/patch_encoder_models/load.py``), which reproduce the cards:

=========== ============================= ===== =====================================================
name        architecture                  width preprocessing (shorter side, crop, filter, mean/std)
=========== ============================= ===== =====================================================
uni2-h      timm ViT-H/14, 8 registers    1536  224, 224, bilinear, ImageNet
virchow2    timm ViT-H/14, 4 registers    2560  224, 224, bicubic, ImageNet; cls + mean(patches)
h-optimus-0 timm ViT-g/14, 4 registers    1536  224, 224, bicubic, H-optimus mean/std
gigapath    timm ViT-g/16 (tile encoder)  1536  256, 224, bicubic, ImageNet
phikon-v2   transformers Dinov2 ViT-L/16  1024  224, 224, bilinear, ImageNet (or the folder's own)
conch       timm ViT-B/16 + attn. pooler  512   448, 448, bicubic, OpenAI CLIP
=========== ============================= ===== =====================================================

All prefer bfloat16 on a GPU: ``pathvl embed`` casts the weights themselves (not autocast), and the
fp16 the Virchow2, H-optimus-0 and GigaPath cards use under autocast could overflow a residual stream
kept in half precision; bfloat16 has fp32's range.

Weights are always the user's local files (the models are gated or licensed; nothing is downloaded) and
load strictly into the exact architecture. Each entry has a tiny twin (``build_vision(name, _tiny=True)``:
same builder, transform and output rule, depth 2 and width 32) for tests.

CONCH's vision tower is rebuilt without the ``conch`` package: its trunk is a plain timm
``VisionTransformer`` (``conch/open_clip_custom/coca_model.py``) and its head two attentional poolers
(``transformer.py``) with the same parameter names, so the ``visual.*`` tensors of CONCH's
``pytorch_model.bin`` load strictly; the text tower and decoder in that file are ignored. Its embedding is
CONCH's ``encode_image(proj_contrast=False, normalize=False)``, the 512-d pooled feature TRIDENT extracts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvl.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pathvl.encoders.registry import register_vision
from pathvl.encoders.timm_models import create_timm, resolve_layers
from pathvl.encoders.vision import VisionEncoder, _seeded
from pathvl.encoders.weights import EncoderError, _first_line, build_with_weights

#: Overrides that turn an architecture into its tiny twin, per family.
TINY = {
    "timm": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "dinov2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
    "conch": {"width": 32, "depth": 2, "heads": 2, "embed_dim": 16, "embed_dim_caption": 32,
              "n_queries_caption": 4, "pooler_heads": 2},
}
#: Dinov2Config fields a Phikon-v2 folder's config.json must agree on.
DINOV2_CHECKED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "mlp_ratio",
                  "use_swiglu_ffn")
_PIL_FILTERS = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class PathologySpec:
    """One named encoder as published.

    Attributes:
        name: Registry name.
        family: ``timm`` (``timm.create_model(arch, **kwargs)``), ``dinov2`` (transformers
            ``Dinov2Model(Dinov2Config(**kwargs))``) or ``conch`` (:class:`ConchVisual`).
        arch: timm architecture name (``timm`` family only).
        kwargs: Constructor arguments, JSON-able (layer classes by name, see
            :func:`~pathvl.encoders.timm_models.resolve_layers`).
        width: Embedding width.
        output: Output rule (:data:`~pathvl.encoders.vision.OUTPUT_RULES`).
        mean: Normalisation mean.
        std: Normalisation std.
        input_size: Side after the centre crop.
        resize_size: Shorter side before the crop.
        interpolation: Resize filter.
        precision: Preferred GPU dtype.
        n_params_m: Published parameter count in millions (checked by the tests on the meta device).
        description: One sentence for the registry listing.
        citation: Paper to cite.
        source: Where the weights and the preprocessing are published.
        hint: How to obtain the weights, for the missing-file message.
    """

    name: str
    family: str
    arch: str
    kwargs: Mapping[str, Any]
    width: int
    output: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    resize_size: int
    interpolation: str
    precision: torch.dtype
    n_params_m: float
    description: str
    citation: str
    source: str
    hint: str = field(default="")


def _hint(repo: str, files: str) -> str:
    return (f"Its weights are published at huggingface.co/{repo} (gated: accept the licence there, then "
            f"download {files}); pathvl never downloads them.")


SPECS: dict[str, PathologySpec] = {s.name: s for s in (
    PathologySpec(
        name="uni2-h", family="timm", arch="vit_giant_patch14_224",
        kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked", "act_layer": "silu", "reg_tokens": 8, "dynamic_img_size": True},
        width=1536, output="model", mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224, resize_size=224,
        interpolation="bilinear", precision=torch.bfloat16, n_params_m=681.4,
        description="UNI2-h ViT-H/14 with 8 registers (DINOv2 on 200M+ H&E and IHC tiles); class token.",
        citation="Chen et al., Towards a general-purpose foundation model for computational pathology, "
        "Nat. Med. 2024 (UNI2-h model card)",
        source="huggingface.co/MahmoodLab/UNI2-h; github.com/mahmoodlab/UNI README (timm kwargs, "
        "Resize(224)+CenterCrop(224), ImageNet)",
        hint=_hint("MahmoodLab/UNI2-h", "pytorch_model.bin"),
    ),
    PathologySpec(
        name="virchow2", family="timm", arch="vit_huge_patch14_224",
        kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
                "global_pool": "", "dynamic_img_size": True, "mlp_layer": "SwiGLUPacked", "act_layer": "silu"},
        width=2560, output="cls+mean", mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224, resize_size=224,
        interpolation="bicubic", precision=torch.bfloat16, n_params_m=631.2,
        description="Virchow2 ViT-H/14 with 4 registers; class token concatenated with the mean of the 256 "
        "patch tokens (registers excluded).",
        citation="Zimmermann et al., Virchow2: Scaling self-supervised mixed magnification models in "
        "pathology, arXiv:2408.00738, 2024",
        source="huggingface.co/paige-ai/Virchow2 (timm kwargs, pretrained_cfg: bicubic, crop_pct 1, ImageNet; "
        "output cat(cls, mean(tokens[:, 5:])))",
        hint=_hint("paige-ai/Virchow2", "pytorch_model.bin"),
    ),
    PathologySpec(
        name="h-optimus-0", family="timm", arch="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token",
                "dynamic_img_size": True},
        width=1536, output="model", mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        input_size=224, resize_size=224, interpolation="bicubic", precision=torch.bfloat16, n_params_m=1134.8,
        description="H-optimus-0 ViT-g/14 with 4 registers (Bioptimus); class token. Expects 224 px tiles "
        "at 0.5 um/px.",
        citation="Saillard et al., H-optimus-0, Bioptimus 2024 (github.com/bioptimus/releases)",
        source="huggingface.co/bioptimus/H-optimus-0 (timm kwargs; ToTensor + Normalize(H-optimus mean/std) "
        "on 224 px tiles)",
        hint=_hint("bioptimus/H-optimus-0", "pytorch_model.bin"),
    ),
    PathologySpec(
        name="gigapath", family="timm", arch="vit_giant_patch14_dinov2",
        kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0,
                "dynamic_img_size": True, "mlp_layer": "SwiGLUPacked", "act_layer": "silu"},
        width=1536, output="model", mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224, resize_size=256,
        interpolation="bicubic", precision=torch.bfloat16, n_params_m=1135.0,
        description="Prov-GigaPath tile encoder, ViT-g/16 (DINOv2 on 1.3B tiles); class token.",
        citation="Xu et al., A whole-slide foundation model for digital pathology from real-world data, "
        "Nature 2024",
        source="huggingface.co/prov-gigapath/prov-gigapath (timm config; Resize(256, bicubic)+CenterCrop(224), "
        "ImageNet)",
        hint=_hint("prov-gigapath/prov-gigapath", "pytorch_model.bin"),
    ),
    PathologySpec(
        name="phikon-v2", family="dinov2", arch="",
        kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16,
                "image_size": 224, "mlp_ratio": 4, "use_swiglu_ffn": False, "layer_norm_eps": 1e-6,
                "qkv_bias": True, "hidden_act": "gelu"},
        width=1024, output="hf-cls", mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224, resize_size=224,
        interpolation="bilinear", precision=torch.bfloat16, n_params_m=303.4,
        description="Phikon-v2 ViT-L/16 (DINOv2 on 460M tiles), transformers Dinov2Model; class token. A "
        "local model folder or its model.safetensors.",
        citation="Filiot et al., Phikon-v2, a large and public feature extractor for biomarker prediction, "
        "arXiv:2409.09173, 2024",
        source="huggingface.co/owkin/phikon-v2 (config.json; preprocessor_config.json when in the folder, "
        "else TRIDENT's Resize(224)+CenterCrop(224), ImageNet)",
        hint="Its weights are published at huggingface.co/owkin/phikon-v2 (download config.json, "
        "preprocessor_config.json and model.safetensors into one folder); pathvl never downloads them.",
    ),
    PathologySpec(
        name="conch", family="conch", arch="vit_base_patch16_224",
        kwargs={"width": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0, "img_size": 448, "patch_size": 16,
                "embed_dim": 512, "embed_dim_caption": 768, "n_queries_caption": 256, "pooler_heads": 8},
        width=512, output="model", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, input_size=448, resize_size=448,
        interpolation="bicubic", precision=torch.bfloat16, n_params_m=90.4,
        description="CONCH vision tower, ViT-B/16 at 448 px with its attentional pooler, rebuilt without the "
        "conch package; 512-d encode_image(proj_contrast=False, normalize=False).",
        citation="Lu et al., A visual-language foundation model for computational pathology, Nat. Med. 2024",
        source="huggingface.co/MahmoodLab/CONCH; github.com/mahmoodlab/CONCH conch_ViT-B-16.json "
        "(Resize(448, bicubic)+CenterCrop(448), OpenAI CLIP mean/std)",
        hint=_hint("MahmoodLab/CONCH", "pytorch_model.bin"),
    ),
)}


# --------------------------------------------------------------------------------------------------
# CONCH's vision tower, parameter for parameter


class AttentionalPooler(nn.Module):
    """Cross-attention of learned queries over the trunk's tokens (CoCa; CONCH's two poolers).

    Parameter names follow ``conch/open_clip_custom/transformer.py`` (``query``, ``attn``, ``ln_q``,
    ``ln_k``) so that CONCH's checkpoint loads as is.

    Args:
        d_model: Query (and output) width.
        context_dim: Width of the tokens attended over.
        n_head: Attention heads.
        n_queries: Number of learned queries.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map tokens (B, L, context_dim) to (B, n_queries, d_model)."""
        kv = self.ln_k(x).permute(1, 0, 2)  # (L, B, C): MultiheadAttention is sequence-first here
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[0], -1)  # (Q, B, D)
        out = self.attn(q, kv, kv, need_weights=False)[0]
        return out.permute(1, 0, 2)  # (B, Q, D)


class ConchVisual(nn.Module):
    """CONCH's vision tower (Lu et al., Nat. Med. 2024): a timm ViT-B/16 trunk at 448 px and two poolers.

    The output is CONCH's ``encode_image(proj_contrast=False, normalize=False)``: the contrastive pooler's
    single query over the trunk's tokens, layer-normed (512-d). ``proj_contrast`` and the captioning
    pooler are kept so the checkpoint loads strictly.

    Args:
        width: Trunk width.
        depth: Trunk blocks.
        heads: Trunk attention heads.
        mlp_ratio: Trunk MLP ratio.
        img_size: Native input side.
        patch_size: Patch side.
        embed_dim: Contrastive embedding width.
        embed_dim_caption: Captioning pooler width.
        n_queries_caption: Captioning pooler queries.
        pooler_heads: Pooler attention heads.
    """

    def __init__(self, *, width: int, depth: int, heads: int, mlp_ratio: float, img_size: int, patch_size: int,
                 embed_dim: int, embed_dim_caption: int, n_queries_caption: int, pooler_heads: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, img_size=img_size,
            patch_size=patch_size, num_classes=0, dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(embed_dim, width, pooler_heads, 1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(embed_dim, embed_dim))
        self.attn_pool_caption = AttentionalPooler(embed_dim_caption, width, pooler_heads, n_queries_caption)
        self.ln_caption = nn.LayerNorm(embed_dim_caption)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, embed_dim) pooled features (no projection, not normalised)."""
        tokens = self.trunk.forward_features(x)  # (B, 1 + h*w, width)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    def dense_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the trunk's patch tokens (B, width, H // 16, W // 16)."""
        from pathvl.encoders.vision import dense_patch_tokens

        return dense_patch_tokens(self.trunk, x, encoder="conch")


# --------------------------------------------------------------------------------------------------
# building


def _kwargs(spec: PathologySpec, tiny: bool) -> dict[str, Any]:
    return {**spec.kwargs, **(TINY[spec.family] if tiny else {})}


def _dinov2(config: Mapping[str, Any]) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config.from_dict(dict(config)))


def architecture(
    name: str, *, tiny: bool = False, device: torch.device | str | None = None,
    config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The architecture of a named entry without its weights (test and benchmark hook).

    Args:
        name: A key of :data:`SPECS`.
        tiny: Build the tiny twin (depth 2, width 32) instead.
        device: ``"meta"`` builds without memory or initialisation; None builds on the CPU.
        config: ``dinov2`` family only: a config read from the weights' folder, instead of the spec's.
    """
    spec = SPECS[name]
    kwargs = dict(config) if config is not None else _kwargs(spec, tiny)
    if spec.family == "timm":
        kwargs = resolve_layers(kwargs, source=f"encoder {name!r}")

        def build() -> nn.Module:
            return create_timm(spec.arch, kwargs, source=f"encoder {name!r}")
    elif spec.family == "dinov2":
        def build() -> nn.Module:
            return _dinov2(kwargs)
    else:
        def build() -> nn.Module:
            return ConchVisual(**kwargs)
    if device is None:
        return build()
    with torch.device(device):
        return build()


def _side(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") == value.get("width") and value.get("height") is not None:
            return int(value["height"])
    return None


def hf_preprocessing(path: Path) -> dict[str, Any]:
    """Mean, std, sizes and filter from a transformers ``preprocessor_config.json``.

    Raises:
        EncoderError: Unreadable file, or a resize this pipeline cannot reproduce.
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{path}: cannot be read as JSON ({_first_line(exc)})") from None
    resize = _side(doc.get("size")) if doc.get("do_resize", True) else None
    crop = _side(doc.get("crop_size")) if doc.get("do_center_crop", False) else resize
    if resize is None or crop is None:
        raise EncoderError(f"{path}: size {doc.get('size')!r} / crop_size {doc.get('crop_size')!r} is not a "
                           "square resize this pipeline can reproduce")
    resample = doc.get("resample", 3)
    if resample not in _PIL_FILTERS:
        raise EncoderError(f"{path}: resample {resample!r} is not one of {sorted(_PIL_FILTERS)} (PIL codes)")
    out: dict[str, Any] = {"input_size": crop, "resize_size": resize, "interpolation": _PIL_FILTERS[resample]}
    if doc.get("do_normalize", True):
        out["mean"] = tuple(float(v) for v in doc.get("image_mean", IMAGENET_MEAN))
        out["std"] = tuple(float(v) for v in doc.get("image_std", IMAGENET_STD))
    return out


def _dinov2_sources(spec: PathologySpec, weights: Path, reference: Mapping[str, Any]) -> tuple[Path, dict, dict]:
    """Weights file, Dinov2 config and preprocessing overrides for a Phikon-v2 file or model folder."""
    folder = weights if weights.is_dir() else weights.parent
    if weights.is_dir():
        found = [weights / n for n in ("model.safetensors", "pytorch_model.bin") if (weights / n).is_file()]
        if not found:
            sharded = (weights / "model.safetensors.index.json").is_file()
            raise FileNotFoundError(
                f"encoder {spec.name!r}: {weights} holds no model.safetensors or pytorch_model.bin"
                + (" (sharded checkpoints are not supported)" if sharded else "") + f". {spec.hint}"
            )
        weights = found[0]
    config = dict(reference)
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        try:
            doc = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise EncoderError(f"{cfg_path}: cannot be read as JSON ({_first_line(exc)})") from None
        if doc.get("model_type") != "dinov2":
            raise EncoderError(f"{cfg_path}: model_type {doc.get('model_type')!r} is not 'dinov2', so this is "
                               f"not a {spec.name} folder")
        for key in DINOV2_CHECKED:
            if key in doc and doc[key] != reference[key]:
                raise EncoderError(f"{cfg_path}: {key} {doc[key]!r} differs from {spec.name}'s {reference[key]!r}")
        config = {k: v for k, v in doc.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    pre_path = folder / "preprocessor_config.json"
    pre = hf_preprocessing(pre_path) if pre_path.is_file() else {}
    return weights, config, pre


def _select_visual(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CONCH's full checkpoint holds visual.*, text.*, text_decoder.*: keep the vision tower's tensors."""
    if any(k.startswith("visual.") for k in state_dict):
        return {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    return state_dict


def build_pathology(
    name: str, weights: str | Path | None = None, *, _tiny: bool = False, _random_init: bool = False,
) -> VisionEncoder:
    """Build a named pathology encoder from the user's local weights (see :data:`SPECS`).

    Args:
        name: A key of :data:`SPECS`.
        weights: The published checkpoint (``pytorch_model.bin`` / ``.safetensors``; for ``phikon-v2`` also
            the model folder, whose ``config.json`` and ``preprocessor_config.json`` are then used).
        _tiny: Test hook: the tiny twin (random with a fixed seed, or ``weights`` saved from one).
        _random_init: Test and benchmark hook: random weights instead of a file.

    Raises:
        FileNotFoundError: No weights given, or the file is missing; the message says where to get them.
        EncoderError: Unreadable or unsafe file, or one of another architecture (missing, unexpected or
            mis-shaped keys, a few of them named).
    """
    spec = SPECS[name]
    if weights is None and not (_tiny or _random_init):
        raise FileNotFoundError(f"encoder {name!r} needs its weights file. {spec.hint} Then pass it with "
                                f"`--weights /path/to/file` (build_vision({name!r}, weights=...)).")
    reference = _kwargs(spec, _tiny)
    config, pre, path, digest = None, {}, None, None
    if weights is not None:
        path = Path(weights).expanduser()
        if spec.family == "dinov2":
            path, config, pre = _dinov2_sources(spec, path, reference)

    def build() -> nn.Module:
        return architecture(name, tiny=_tiny, config=config)

    if path is None:
        model = _seeded(build)
    else:
        select: Callable | None = _select_visual if spec.family == "conch" else None
        model, digest = build_with_weights(build, path, encoder=name, hint=spec.hint, select=select)
    width = spec.width
    if _tiny:
        base = model.config.hidden_size if spec.family == "dinov2" else (
            reference["embed_dim"] if spec.family == "conch" else model.num_features)
        width = 2 * base if spec.output == "cls+mean" else base
    note = " (tiny twin: tests only)" if _tiny else ("" if path else " (RANDOM weights: test hook)")
    return VisionEncoder(
        name=name,
        model=model,
        width=width,
        precision=spec.precision,
        mean=pre.get("mean", spec.mean),
        std=pre.get("std", spec.std),
        input_size=pre.get("input_size", spec.input_size),
        resize_size=pre.get("resize_size", spec.resize_size),
        interpolation=pre.get("interpolation", spec.interpolation),
        output=spec.output,
        weights_path=None if path is None else str(path),
        weights_sha256=digest,
        description=spec.description + note,
        extra={"preprocessing_from": str(path.parent / "preprocessor_config.json")} if pre else {},
    )


def _register(spec: PathologySpec) -> None:
    def builder(weights: str | Path | None = None, *, _tiny: bool = False,
                _random_init: bool = False) -> VisionEncoder:
        return build_pathology(spec.name, weights, _tiny=_tiny, _random_init=_random_init)

    builder.__name__ = builder.__qualname__ = f"_build_{spec.name.replace('-', '_')}"
    builder.__doc__ = f"Build ``{spec.name}`` ({spec.citation}); see :func:`build_pathology`."
    register_vision(
        spec.name, width=spec.width, input_size=spec.input_size, needs_weights=True,
        description=spec.description, citation=spec.citation, weights_hint=spec.hint, source=spec.source,
    )(builder)


for _spec in SPECS.values():
    _register(_spec)

__all__ = ["SPECS", "AttentionalPooler", "ConchVisual", "PathologySpec", "architecture", "build_pathology",
           "hf_preprocessing"]
