"""Frozen patch (tile) encoders: the module, its eval transform, its width and preferred precision.

Preprocessing travels with the weights (timm's ``PretrainedCfg``, TRIDENT's encoder triples): a
:class:`VisionEncoder` carries mean, std, input size and interpolation, a picklable per-image
``transform`` for CPU data loaders, and :meth:`VisionEncoder.preprocess_batch` doing the same
resize and normalisation on whatever device a uint8 batch already lives on (GPU-side preprocessing,
see NOTES.md on feeding a ViT-L). Both paths run the same tensor code, so they agree.

A :class:`VisionEncoder` also names its output rule (:data:`OUTPUT_RULES`: the module's own output, the
class token concatenated with the mean of the patch tokens, or a transformers model's class token) and
gives dense patch tokens on the patch grid (:meth:`VisionEncoder.dense_tokens`) for segmentation heads.

Registered here:

- ``uni``: UNI (Chen et al., "Towards a general-purpose foundation model for computational
  pathology", Nature Medicine 2024), a DINOv2-trained ViT-L/16; the user supplies the weights file.
- ``tiny-vit`` and ``tiny-cnn``: randomly initialised (fixed seed) tiny twins for tests.

Elsewhere: the preprocessing in :mod:`pathvl.encoders.preprocess` (re-exported here), ``timm:<arch>`` in
:mod:`pathvl.encoders.timm_models`, the named pathology encoders in :mod:`pathvl.encoders.pathology`,
``colour-texture`` in :mod:`pathvl.encoders.handcrafted`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvl.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD, PatchTransform, resize_normalise, to_bchw
from pathvl.encoders.registry import register_vision
from pathvl.encoders.weights import EncoderError, build_with_weights

#: timm constructor arguments of UNI (MahmoodLab/UNI model card); 303.4M parameters, 342 keys.
UNI_ARCH = "vit_large_patch16_224"
UNI_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 16,
    "init_values": 1e-5,
    "num_classes": 0,
    "dynamic_img_size": True,
}
UNI_HINT = (
    "UNI's weights are obtained from the MahmoodLab/UNI page on Hugging Face after accepting its "
    "licence (download pytorch_model.bin there); pathvl never downloads them."
)
UNI_CITATION = (
    "Chen et al., Towards a general-purpose foundation model for computational pathology, Nat. Med. 2024"
)

#: How :meth:`VisionEncoder.encode` turns a batch into one vector per image.
OUTPUT_RULES: dict[str, str] = {
    "model": "the module's own output (e.g. the class token of a timm ViT with num_classes=0)",
    "cls+mean": "class token concatenated with the mean of the patch tokens (register tokens excluded), "
    "from timm forward_features",
    "hf-cls": "class token of last_hidden_state (transformers model)",
}


# --------------------------------------------------------------------------------------------------
# the encoder record


@dataclass
class VisionEncoder:
    """A frozen patch encoder together with everything needed to use it and record provenance.

    Attributes:
        name: Registry name it was built from.
        model: The module, in eval mode with gradients off. Its state dict is exactly the checkpoint's
            (the output rule is applied by :meth:`encode`, not by a wrapper module).
        width: Embedding width.
        precision: Preferred dtype on a GPU (bfloat16 for ViTs).
        transform: Per-image eval transform (PIL / HWC uint8 -> (3, S, S) float).
        mean: Normalisation mean.
        std: Normalisation standard deviation.
        input_size: Side of the square input in pixels (after the centre crop).
        interpolation: Resize filter.
        weights_path: Local weights file, or None for built-in / random weights.
        weights_sha256: sha256 of the weights file, or None.
        description: What the encoder is, in one sentence.
        extra: Further provenance (e.g. ``model_args`` of a ``timm:`` encoder and where they came from).
        resize_size: Shorter side before the centre crop; None means ``input_size``.
        output: Output rule, a key of :data:`OUTPUT_RULES`.
    """

    name: str
    model: nn.Module
    width: int
    precision: torch.dtype
    transform: Callable[[Any], torch.Tensor] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 224
    interpolation: str = "bicubic"
    weights_path: str | None = None
    weights_sha256: str | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    resize_size: int | None = None
    output: str = "model"

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.resize_size == self.input_size:
            self.resize_size = None
        if self.output not in OUTPUT_RULES:
            rules = ", ".join(OUTPUT_RULES)
            raise ValueError(f"encoder {self.name!r}: unknown output rule {self.output!r} (use {rules})")
        if self.transform is None:
            self.transform = PatchTransform(
                self.mean, self.std, self.input_size, self.interpolation, resize_size=self.resize_size
            )
        self.model.eval()
        self.model.requires_grad_(False)

    def preprocess_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Resize (antialiased) and normalise a uint8 batch on the device it already lives on.

        Args:
            images: (B, H, W, 3) or (B, 3, H, W) uint8 (or float in [0, 1]).

        Returns:
            (B, 3, S, S) float32, identical to stacking :attr:`transform` over the images.
        """
        return resize_normalise(
            images, size=self.input_size, mean=self.mean, std=self.std, interpolation=self.interpolation,
            resize_size=self.resize_size,
        )

    def transform_desc(self) -> dict[str, Any]:
        """JSON-able description of the eval transform (and output rule), stored with features.

        Keys beyond the original five appear only when they differ from the defaults, so features
        cached by older versions of an unchanged encoder still count as done.
        """
        desc: dict[str, Any] = {
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
            "interpolation": self.interpolation,
            "resize": "shorter side to input_size (antialiased), centre crop, clamp to [0, 1]",
        }
        if self.resize_size is not None:
            desc["resize"] = "shorter side to resize_size (antialiased), centre crop to input_size, clamp to [0, 1]"
            desc["resize_size"] = self.resize_size
        if self.output != "model":
            desc["output"] = self.output
        if self.extra.get("model_args"):
            desc["model_args"] = self.extra["model_args"]
        return desc

    def provenance(self) -> dict[str, Any]:
        """JSON-able record of the encoder: name, width, weights file and hash, transform."""
        prov = {
            "encoder": self.name,
            "width": self.width,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "transform": self.transform_desc(),
        }
        for key in ("args_source", "preprocessing_from"):  # where constructor args / preprocessing came from
            if self.extra.get(key):
                prov[key] = self.extra[key]
        return prov

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        for t in (*self.model.parameters(), *self.model.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
        return torch.device("cpu"), torch.float32

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> VisionEncoder:
        """Move the model (in place) and return self.

        Args:
            device: Target device.
            dtype: Target dtype; None keeps the current one. Pass :attr:`precision` on a GPU.
        """
        if dtype is None:
            self.model.to(device)
        else:
            self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a preprocessed batch with the encoder's output rule (:attr:`output`).

        Args:
            x: (B, 3, S, S) normalised images; moved to the model's device and dtype.

        Returns:
            (B, width) float32 embeddings.
        """
        device, dtype = self._device_dtype()
        x = x.to(device=device, dtype=dtype)
        if self.output == "cls+mean":
            tokens = self.model.forward_features(x)  # (B, prefix + h*w, C), final norm applied
            n_prefix = int(self.model.num_prefix_tokens)  # class token + register tokens
            out = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)
        elif self.output == "hf-cls":
            out = self.model(pixel_values=x).last_hidden_state[:, 0]
        else:
            out = self.model(x)
        return out.float()

    @torch.no_grad()
    def dense_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens on the patch grid, for segmentation heads.

        The class and register tokens are dropped; token ``i * w + j`` of the last layer (after the
        final norm) becomes position ``[:, :, i, j]``.

        Args:
            x: (B, 3, H, W) normalised images; H and W should be multiples of the patch size (the
                remainder is ignored, as the patch-embedding convolution does).

        Returns:
            (B, C, H // patch, W // patch) float32, C the token width (the class-token width, which
            for ``cls+mean`` encoders is half of :attr:`width`).

        Raises:
            EncoderError: The encoder has no patch tokens (a CNN or the hand-crafted features).
        """
        device, dtype = self._device_dtype()
        x = x.to(device=device, dtype=dtype)
        return dense_patch_tokens(self.model, x, encoder=self.name).float()


# --------------------------------------------------------------------------------------------------
# dense patch tokens


def _to_grid(patch_tokens: torch.Tensor, h: int, w: int, encoder: str) -> torch.Tensor:
    b, n, c = patch_tokens.shape
    if n != h * w:
        raise EncoderError(f"encoder {encoder!r}: {n} patch tokens do not fill a {h}x{w} patch grid")
    return patch_tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)


def dense_patch_tokens(model: nn.Module, x: torch.Tensor, *, encoder: str = "encoder") -> torch.Tensor:
    """Dense patch tokens (B, C, h, w) of a ViT-type module (see :meth:`VisionEncoder.dense_tokens`).

    Understands modules with their own ``dense_tokens`` method, timm ViTs (``patch_embed`` and
    ``num_prefix_tokens``: class and register tokens are dropped) and transformers DINOv2 models.

    Args:
        model: The encoder's module.
        x: (B, 3, H, W) input already on the module's device and dtype.
        encoder: Name used in error messages.
    """
    own = getattr(model, "dense_tokens", None)
    if callable(own):
        return own(x)
    height, width = x.shape[-2:]
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(model, "num_prefix_tokens") and hasattr(model, "forward_features"):
        if hasattr(patch_embed, "dynamic_feat_size"):
            h, w = patch_embed.dynamic_feat_size((height, width))
        else:
            ph, pw = patch_embed.patch_size
            h, w = height // ph, width // pw
        tokens = model.forward_features(x)  # (B, prefix + h*w, C)
        return _to_grid(tokens[:, int(model.num_prefix_tokens) :], h, w, encoder)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", "") in ("dinov2", "dinov2_with_registers"):
        p = int(config.patch_size)
        n_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        tokens = model(pixel_values=x).last_hidden_state
        return _to_grid(tokens[:, n_prefix:], height // p, width // p, encoder)
    raise EncoderError(
        f"encoder {encoder!r} has no patch tokens ({type(model).__name__}): dense_tokens needs a ViT-type "
        "encoder such as uni, uni2-h, virchow2, h-optimus-0, gigapath, phikon-v2, conch or timm:vit_*"
    )


# --------------------------------------------------------------------------------------------------
# helpers for builders


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build a module with a fixed seed without disturbing the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _with_optional_weights(
    name: str, build: Callable[[], nn.Module], weights: str | Path | None, seed: int = 0
) -> tuple[nn.Module, str | None, str | None]:
    if weights is None:
        return _seeded(build, seed), None, None
    model, digest = build_with_weights(build, weights, encoder=name)
    return model, str(weights), digest


def _timm_create(arch: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, **kwargs)


def uni_architecture(device: torch.device | str | None = None) -> nn.Module:
    """UNI's architecture without its weights (timm ViT-L/16, ``UNI_KWARGS``): internal/test hook.

    Args:
        device: ``"meta"`` builds it without memory or initialisation (for key and shape checks);
            None builds it on the CPU with timm's random initialisation.
    """
    if device is None:
        return _timm_create(UNI_ARCH, **UNI_KWARGS)
    with torch.device(device):
        return _timm_create(UNI_ARCH, **UNI_KWARGS)


# --------------------------------------------------------------------------------------------------
# entries


@register_vision(
    "uni",
    width=1024,
    input_size=224,
    needs_weights=True,
    description="UNI ViT-L/16 (DINOv2 on 100M H&E patches); user-supplied weights from MahmoodLab/UNI.",
    citation=UNI_CITATION,
    weights_hint=UNI_HINT,
    source="huggingface.co/MahmoodLab/UNI (timm kwargs; ImageNet mean/std, 224 px)",
)
def _build_uni(weights: str | Path | None = None, *, _random_init: bool = False) -> VisionEncoder:
    """Build UNI (Chen et al., Nat. Med. 2024) from a local weights file.

    Args:
        weights: Path to UNI's ``pytorch_model.bin`` (or a ``.safetensors`` conversion).
        _random_init: Internal hook for tests and benchmarks: build the architecture with random
            weights instead of requiring a file.
    """
    if weights is None and not _random_init:
        raise FileNotFoundError(
            f"encoder 'uni' needs its weights file. {UNI_HINT} Then pass it with "
            "`--weights /path/to/pytorch_model.bin` (build_vision('uni', weights=...))."
        )
    if weights is None:
        model, path, digest = _seeded(uni_architecture), None, None
    else:
        model, digest = build_with_weights(uni_architecture, weights, encoder="uni", hint=UNI_HINT)
        path = str(weights)
    return VisionEncoder(
        name="uni",
        model=model,
        width=1024,
        precision=torch.bfloat16,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        interpolation="bicubic",
        weights_path=path,
        weights_sha256=digest,
        description="UNI ViT-L/16" + ("" if path else " (RANDOM weights: test hook)"),
    )


def _tiny_vit_module() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        num_classes=0, dynamic_img_size=True,
    )


@register_vision(
    "tiny-vit",
    width=32,
    input_size=64,
    description="Tiny random ViT (timm VisionTransformer, dim 32, depth 2, 2 heads, 64 px; seed 0) for tests.",
    tags=("test",),
)
def _build_tiny_vit(weights: str | Path | None = None) -> VisionEncoder:
    """Tiny ViT twin of ``uni``: random init with a fixed seed, or local weights."""
    model, path, digest = _with_optional_weights("tiny-vit", _tiny_vit_module, weights)
    return VisionEncoder(
        name="tiny-vit", model=model, width=32, precision=torch.bfloat16, input_size=64,
        interpolation="bicubic", weights_path=path, weights_sha256=digest,
        description="tiny random ViT (tests only)",
    )


def _tiny_cnn_module() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    )


@register_vision(
    "tiny-cnn",
    width=32,
    input_size=64,
    description="Tiny random 3-layer CNN (seed 0, 64 px) for tests.",
    tags=("test",),
)
def _build_tiny_cnn(weights: str | Path | None = None) -> VisionEncoder:
    """Tiny CNN for tests: random init with a fixed seed, or local weights."""
    model, path, digest = _with_optional_weights("tiny-cnn", _tiny_cnn_module, weights)
    return VisionEncoder(
        name="tiny-cnn", model=model, width=32, precision=torch.float32, input_size=64,
        interpolation="bilinear", weights_path=path, weights_sha256=digest,
        description="tiny random CNN (tests only)",
    )


def __getattr__(name: str) -> Any:
    # ``colour-texture`` moved to pathvl.encoders.handcrafted; keep the old import path working.
    if name in ("ColourTextureFeatures", "COLOUR_TEXTURE_PX"):
        from pathvl.encoders import handcrafted

        return getattr(handcrafted, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OUTPUT_RULES",
    "UNI_ARCH",
    "UNI_KWARGS",
    "PatchTransform",
    "VisionEncoder",
    "dense_patch_tokens",
    "resize_normalise",
    "to_bchw",
    "uni_architecture",
]
