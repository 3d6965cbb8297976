"""Eval preprocessing of patches: resize (antialiased), centre crop and normalise.

One tensor code path serves both the picklable per-image :class:`PatchTransform` (CPU data loaders)
and batched preprocessing on whatever device a uint8 batch lives on (GPU-side preprocessing, see
NOTES.md on feeding a ViT-L), so the two agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenAI CLIP's normalisation (used by CONCH, whose factory sets it after building the model).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    resize_size: int | None = None,
) -> torch.Tensor:
    """Resize (shorter side to ``resize_size``, antialiased), centre crop to ``size``, and normalise.

    With ``resize_size`` None (or equal to ``size``), square patches, the usual case, are simply
    resized to ``size`` x ``size``, and patches already of that size are left alone. A larger
    ``resize_size`` reproduces the ``Resize(256), CenterCrop(224)`` recipes of some model cards.

    Args:
        images: (B, H, W, 3) or (B, 3, H, W), uint8 in [0, 255] or float in [0, 1], any device.
        size: Output side in pixels.
        mean: Per-channel mean, in [0, 1] units.
        std: Per-channel standard deviation, in [0, 1] units.
        interpolation: ``bicubic``, ``bilinear`` or ``nearest``.
        resize_size: Shorter side before the centre crop (default: ``size``).

    Returns:
        (B, 3, size, size) float32 on the input's device.
    """
    from torchvision.transforms.v2 import functional as TF

    x = to_bchw(images)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    h, w = x.shape[-2:]
    scale = size if resize_size is None else int(resize_size)
    if (h, w) != (size, size) or scale != size:
        x = TF.resize(x, [scale], interpolation=_interp_mode(interpolation), antialias=True)
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
        resize_size: Shorter side before the centre crop (None: ``size``).
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        size: int,
        interpolation: str,
        resize_size: int | None = None,
    ) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.size = int(size)
        self.interpolation = interpolation
        self.resize_size = None if resize_size is None else int(resize_size)

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
            t, size=self.size, mean=self.mean, std=self.std, interpolation=self.interpolation,
            resize_size=self.resize_size,
        )
        return out[0]

    def __repr__(self) -> str:
        resize = "" if self.resize_size in (None, self.size) else f"resize_size={self.resize_size}, "
        return (
            f"PatchTransform(size={self.size}, {resize}interpolation={self.interpolation!r}, "
            f"mean={self.mean}, std={self.std})"
        )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PatchTransform",
    "resize_normalise",
    "to_bchw",
]
