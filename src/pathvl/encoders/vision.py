"""Frozen patch (tile) encoders: the module, its eval transform, its width and preferred precision.

Preprocessing travels with the weights (timm's ``PretrainedCfg``, TRIDENT's encoder triples): a
:class:`VisionEncoder` carries mean, std, input size and interpolation, a picklable per-image
``transform`` for CPU data loaders, and :meth:`VisionEncoder.preprocess_batch` doing the same
resize and normalisation on whatever device a uint8 batch already lives on (GPU-side preprocessing,
see NOTES.md on feeding a ViT-L). Both paths run the same tensor code, so they agree.

Registered entries:

- ``uni``: UNI (Chen et al., "Towards a general-purpose foundation model for computational
  pathology", Nature Medicine 2024), a DINOv2-trained ViT-L/16; the user supplies the weights file.
- ``timm:<arch>``: any timm architecture, built with ``pretrained=False`` and loaded from a local file.
- ``colour-texture``: a deterministic, non-learned colour and texture feature extractor that needs no
  download (the default for demos; it is not a foundation model).
- ``tiny-vit`` and ``tiny-cnn``: randomly initialised (fixed seed) tiny twins for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathvl.encoders.registry import register_vision
from pathvl.encoders.weights import build_with_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
TIMM_HINT = (
    "timm:<arch> encoders are built with pretrained=False and never fetched from a hub: download the "
    "checkpoint (.safetensors or .bin) yourself."
)
UNI_CITATION = (
    "Chen et al., Towards a general-purpose foundation model for computational pathology, Nat. Med. 2024"
)


# --------------------------------------------------------------------------------------------------
# preprocessing


def _interp_mode(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name.lower())
    except ValueError as exc:
        raise ValueError(f"unknown interpolation {name!r} (use bilinear, bicubic, nearest)") from exc


def to_bchw(images: torch.Tensor) -> torch.Tensor:
    """View a batch as (B, 3, H, W), accepting channels-last (B, H, W, 3) or a single image.

    Args:
        images: (B, H, W, 3), (B, 3, H, W), (H, W, 3) or (3, H, W).

    Returns:
        (B, 3, H, W), same dtype and device (a view where possible).
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (B, H, W, 3) or (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 3 and images.shape[-1] != 3:
        return images
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    if images.shape[1] == 3:
        return images
    raise ValueError(f"cannot find the 3 colour channels in a batch of shape {tuple(images.shape)}")


def resize_normalise(
    images: torch.Tensor,
    *,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Resize (shorter side to ``size``, antialiased, then centre crop) and normalise a batch.

    Square patches, the usual case, are simply resized to ``size`` x ``size``.

    Args:
        images: (B, H, W, 3) or (B, 3, H, W), uint8 in [0, 255] or float in [0, 1], any device.
        size: Output side in pixels.
        mean: Per-channel mean, in [0, 1] units.
        std: Per-channel standard deviation, in [0, 1] units.
        interpolation: ``bicubic``, ``bilinear`` or ``nearest``.

    Returns:
        (B, 3, size, size) float32 on the input's device.
    """
    from torchvision.transforms.v2 import functional as TF

    x = to_bchw(images)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        x = TF.resize(x, [size], interpolation=_interp_mode(interpolation), antialias=True)
        x = TF.center_crop(x, [size, size]).clamp_(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class PatchTransform:
    """Per-image eval transform: PIL image or HWC uint8 array -> normalised (3, S, S) float tensor.

    A plain class rather than a closure so that DataLoader workers can pickle it.

    Args:
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        size: Output side in pixels.
        interpolation: Resize filter name.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int, interpolation: str) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.size = int(size)
        self.interpolation = interpolation

    def __call__(self, image: Any) -> torch.Tensor:
        """Transform one image (PIL, numpy HWC uint8, or a CHW/HWC tensor)."""
        if isinstance(image, torch.Tensor):
            t = image
        else:
            arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            if arr.shape[-1] == 4:
                arr = arr[..., :3]
            if not arr.flags.writeable:  # PIL hands out read-only buffers
                arr = arr.copy()
            t = torch.from_numpy(np.ascontiguousarray(arr))
        out = resize_normalise(
            t, size=self.size, mean=self.mean, std=self.std, interpolation=self.interpolation
        )
        return out[0]

    def __repr__(self) -> str:
        return (
            f"PatchTransform(size={self.size}, interpolation={self.interpolation!r}, "
            f"mean={self.mean}, std={self.std})"
        )


# --------------------------------------------------------------------------------------------------
# the encoder record


@dataclass
class VisionEncoder:
    """A frozen patch encoder together with everything needed to use it and record provenance.

    Attributes:
        name: Registry name it was built from.
        model: The module, in eval mode with gradients off; maps (B, 3, S, S) to (B, width).
        width: Embedding width.
        precision: Preferred dtype on a GPU (bfloat16 for ViTs).
        transform: Per-image eval transform (PIL / HWC uint8 -> (3, S, S) float).
        mean: Normalisation mean.
        std: Normalisation standard deviation.
        input_size: Side of the square input in pixels.
        interpolation: Resize filter.
        weights_path: Local weights file, or None for built-in / random weights.
        weights_sha256: sha256 of the weights file, or None.
        description: What the encoder is, in one sentence.
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

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.transform is None:
            self.transform = PatchTransform(self.mean, self.std, self.input_size, self.interpolation)
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
            images, size=self.input_size, mean=self.mean, std=self.std, interpolation=self.interpolation
        )

    def transform_desc(self) -> dict[str, Any]:
        """JSON-able description of the eval transform, stored with features for provenance."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
            "interpolation": self.interpolation,
            "resize": "shorter side to input_size (antialiased), centre crop, clamp to [0, 1]",
        }

    def provenance(self) -> dict[str, Any]:
        """JSON-able record of the encoder: name, width, weights file and hash, transform."""
        return {
            "encoder": self.name,
            "width": self.width,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "transform": self.transform_desc(),
        }

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
        """Embed a preprocessed batch.

        Args:
            x: (B, 3, S, S) normalised images; moved to the model's device and dtype.

        Returns:
            (B, width) float32 embeddings.
        """
        device, dtype = self._device_dtype()
        out = self.model(x.to(device=device, dtype=dtype))
        return out.float()


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


@register_vision(
    "timm",
    prefix=True,
    width=None,
    needs_weights=True,
    description="Any timm architecture by name (`timm:<arch>`), built with pretrained=False, "
    "weights from a local file; mean/std/size from timm's default config of the architecture.",
    citation="Wightman, PyTorch Image Models (timm)",
    weights_hint=TIMM_HINT,
)
def _build_timm(
    arch: str,
    weights: str | Path | None = None,
    *,
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
        mean: Override of the normalisation mean (default: timm's config for ``arch``).
        std: Override of the normalisation std.
        input_size: Override of the input side.
        interpolation: Override of the resize filter.
        precision: Preferred GPU dtype.
        _random_init: Internal hook: random weights instead of a file.
        **model_kwargs: Extra ``timm.create_model`` arguments (``num_classes`` is forced to 0).
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
    model_kwargs["num_classes"] = 0

    def build() -> nn.Module:
        return _timm_create(arch, **model_kwargs)

    if weights is None:
        model, path, digest = _seeded(build), None, None
    else:
        model, digest = build_with_weights(build, weights, encoder=name, hint=TIMM_HINT)
        path = str(weights)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = input_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    width = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return VisionEncoder(
        name=name,
        model=model,
        width=width,
        precision=precision,
        mean=tuple(mean or cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(std or cfg.get("std", IMAGENET_STD)),
        input_size=size,
        interpolation=interpolation or cfg.get("interpolation", "bicubic"),
        weights_path=path,
        weights_sha256=digest,
        description=f"timm {arch}" + ("" if path else " (RANDOM weights: test hook)"),
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


# --------------------------------------------------------------------------------------------------
# the honest default: hand-crafted colour and texture statistics


# Ruifrok & Johnston (2001) stain optical-density vectors: haematoxylin, eosin, DAB.
_STAIN_OD = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), (0.268, 0.570, 0.776))


def _gabor(lam: float, theta: float, size: int) -> torch.Tensor:
    sigma = 0.56 * lam
    r = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    xr = xx * math.cos(theta) + yy * math.sin(theta)
    yr = -xx * math.sin(theta) + yy * math.cos(theta)
    k = torch.exp(-(xr**2 + 0.25 * yr**2) / (2 * sigma**2)) * torch.cos(2 * math.pi * xr / lam)
    return k


def _log(sigma: float, size: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    q = (xx**2 + yy**2) / (2 * sigma**2)
    return -(1 - q) * torch.exp(-q)


#: Input side of ``colour-texture``: small, so the CPU demo embeds thousands of patches per minute.
COLOUR_TEXTURE_PX = 128


class ColourTextureFeatures(nn.Module):
    """Deterministic colour and texture statistics of an H&E patch; no learned parameters.

    Input: (B, 3, S, S) RGB in [0, 1] (the transform uses mean 0, std 1). Output (B, 52):

    - RGB mean and standard deviation (6);
    - haematoxylin, eosin and residual concentrations from optical-density colour deconvolution
      (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001): mean and std (6);
    - soft 8-bin histograms of the haematoxylin and eosin concentrations at quarter resolution (16);
    - a fixed filter bank on the haematoxylin channel at half resolution: 8 Gabor filters (wavelengths
      4 and 8 px, 4 orientations) and 4 Laplacian-of-Gaussian filters (sigma 1, 1.5, 2, 3), each
      pooled as mean absolute response and response std (24).

    Every constant is a non-persistent buffer, so the state dict is empty and there is nothing to
    download. It is a baseline that captures stain and texture, not a pathology foundation model.
    """

    HIST_BINS = 8
    KERNEL = 15
    WIDTH = 6 + 6 + 2 * HIST_BINS + 2 * 12

    def __init__(self) -> None:
        super().__init__()
        od = torch.tensor(_STAIN_OD, dtype=torch.float64)
        od = od / od.norm(dim=1, keepdim=True)
        self.register_buffer("unmix", torch.linalg.inv(od).float(), persistent=False)  # OD -> conc
        kernels = [_gabor(lam, k * math.pi / 4, self.KERNEL) for lam in (4.0, 8.0) for k in range(4)]
        kernels += [_log(s, self.KERNEL) for s in (1.0, 1.5, 2.0, 3.0)]
        bank = torch.stack([k - k.mean() for k in kernels])
        bank = bank / bank.abs().sum(dim=(1, 2), keepdim=True)
        self.register_buffer("bank", bank.float().unsqueeze(1), persistent=False)  # (12, 1, K, K)
        self.register_buffer("centres", torch.linspace(0.0, 1.75, self.HIST_BINS), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 3, S, S) RGB in [0, 1] to (B, 52) features."""
        x = x.float().clamp(0.0, 1.0)
        b = x.shape[0]
        rgb = x.flatten(2)  # (B, 3, N)
        feats = [rgb.mean(-1), rgb.std(-1)]
        od = -torch.log(x.clamp_min(1.0 / 255.0))  # (B, 3, S, S)
        conc = torch.einsum("bchw,cs->bshw", od, self.unmix.to(od.dtype))  # (B, 3 stains, S, S)
        flat = conc.flatten(2)
        feats += [flat.mean(-1), flat.std(-1)]
        half = F.avg_pool2d(conc[:, :2], 2)  # (B, 2, S/2, S/2): haematoxylin, eosin
        vals = F.avg_pool2d(half, 2).flatten(2).unsqueeze(-1)  # (B, 2, N, 1) at quarter resolution
        width = float(self.centres[1] - self.centres[0])
        w = torch.exp(-0.5 * ((vals - self.centres) / width) ** 2)  # (B, 2, N, bins)
        hist = w.mean(2)
        hist = hist / hist.sum(-1, keepdim=True).clamp_min(1e-8)
        feats.append(hist.reshape(b, -1))
        resp = F.conv2d(half[:, :1], self.bank.to(half.dtype), padding=self.KERNEL // 2)  # (B, 12, s, s)
        resp = resp.flatten(2)
        feats += [resp.abs().mean(-1), resp.std(-1)]
        return torch.cat(feats, dim=1)


@register_vision(
    "colour-texture",
    width=ColourTextureFeatures.WIDTH,
    input_size=COLOUR_TEXTURE_PX,
    description="Deterministic hand-crafted features, NO pretrained or learned weights: RGB and H&E "
    "stain-deconvolution statistics, stain histograms and a fixed Gabor/LoG filter bank. Default for "
    "demos; a baseline, not a foundation model.",
    citation="Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001 (colour deconvolution)",
    tags=("demo",),
)
def _build_colour_texture(weights: str | Path | None = None) -> VisionEncoder:
    """The download-free default encoder (see :class:`ColourTextureFeatures`)."""
    if weights is not None:
        raise ValueError("encoder 'colour-texture' has no weights; do not pass --weights")
    return VisionEncoder(
        name="colour-texture",
        model=ColourTextureFeatures(),
        width=ColourTextureFeatures.WIDTH,
        precision=torch.float32,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        input_size=COLOUR_TEXTURE_PX,
        interpolation="bilinear",
        description="hand-crafted colour/texture statistics; no learned weights",
    )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "UNI_ARCH",
    "UNI_KWARGS",
    "ColourTextureFeatures",
    "PatchTransform",
    "VisionEncoder",
    "resize_normalise",
    "to_bchw",
    "uni_architecture",
]
