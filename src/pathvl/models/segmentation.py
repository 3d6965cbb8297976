"""Segmentation heads on a ViT's dense patch tokens, and the encoder-plus-head network.

Both heads read the ``(B, C, h, w)`` patch-token grid of :meth:`pathvl.encoders.VisionEncoder.dense_tokens`
and return class logits upsampled (bilinearly) to the image, ``(B, K, H, W)``:

- :class:`LinearSegHead`: BatchNorm and a 1x1 convolution on the tokens, the linear protocol of DINOv2
  (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024);
- :class:`UPerNetHead`: a light UPerNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding",
  ECCV 2018): a pyramid pooling module (Zhao et al., PSPNet, CVPR 2017) on the coarsest level and an FPN
  (Lin et al., CVPR 2017) whose levels are fused. A plain ViT has one scale, so the four levels are made
  from it as in ViTDet's simple feature pyramid (Li et al., "Exploring Plain Vision Transformer Backbones
  for Object Detection", ECCV 2022): strides 4, 2, 1 and 1/2 of the token grid by two, one and no
  transposed convolutions and a max-pool.

Networks only: nothing here reads or writes a file (:mod:`pathvl.eval.segment` trains, saves and loads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.encoders.vision import dense_patch_tokens
from pathvl.errors import UserError

__all__ = ["SEG_HEADS", "LinearSegHead", "SegHeadError", "SegmentationModel", "UPerNetHead", "build_seg_head"]

#: Segmentation head names (:func:`build_seg_head`).
SEG_HEADS = ("linear", "upernet")


class SegHeadError(UserError, ValueError):
    """A segmentation head that cannot be built as asked."""


def _upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def _conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 convolution on the patch tokens, upsampled to the image (DINOv2's linear head,
    Oquab et al., TMLR 2024).

    Args:
        in_channels: Token width ``C``.
        num_classes: Number of classes ``K``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, tokens: Tensor, size: Sequence[int]) -> Tensor:
        """``(B, C, h, w)`` tokens -> ``(B, K, H, W)`` logits at ``size = (H, W)``."""
        return _upsample(self.classifier(self.norm(tokens)), size)


class _PPM(nn.Module):
    """Pyramid pooling (PSPNet): average-pool to each scale, 1x1 conv, upsample back, concatenate."""

    def __init__(self, channels: int, scales: Sequence[int]) -> None:
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        self.branches = nn.ModuleList(_conv_bn_relu(channels, channels, 1) for _ in self.scales)
        self.bottleneck = _conv_bn_relu(channels * (1 + len(self.scales)), channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [x]
        for s, branch in zip(self.scales, self.branches):
            outs.append(_upsample(branch(F.adaptive_avg_pool2d(x, s)), size))
        return self.bottleneck(torch.cat(outs, dim=1))


class UPerNetHead(nn.Module):
    """A light UPerNet over single-scale ViT tokens (Xiao et al., ECCV 2018; pyramid as in ViTDet, Li et al.,
    ECCV 2022).

    Shapes for a ``(B, C, h, w)`` token grid: levels ``(B, width, 4h, 4w)``, ``(2h, 2w)``, ``(h, w)`` and
    ``(ceil(h/2), ceil(w/2))``; the PPM runs on the last, the FPN adds each coarser level into the next finer
    one, every level is upsampled to ``(4h, 4w)`` and concatenated, fused by a 3x3 convolution and
    classified by a 1x1 convolution; the logits are upsampled to the image.

    Args:
        in_channels: Token width ``C``.
        num_classes: Number of classes ``K``.
        width: Channels of every pyramid level.
        pool_scales: Output sizes of the PPM's average pools.
        dropout: Dropout before the classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        up = nn.ConvTranspose2d
        self.pyramid = nn.ModuleList([
            nn.Sequential(up(in_channels, width, 2, stride=2), nn.BatchNorm2d(width), nn.GELU(),
                          up(width, width, 2, stride=2)),                                     # stride 1/4
            up(in_channels, width, 2, stride=2),                                              # stride 1/2
            nn.Conv2d(in_channels, width, 1),                                                 # stride 1
            nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(in_channels, width, 1)),  # stride 2
        ])
        self.ppm = _PPM(width, pool_scales)
        self.lateral = nn.ModuleList(_conv_bn_relu(width, width, 1) for _ in range(3))
        self.fpn = nn.ModuleList(_conv_bn_relu(width, width, 3) for _ in range(3))
        self.fuse = _conv_bn_relu(4 * width, width, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, tokens: Tensor, size: Sequence[int]) -> Tensor:
        """``(B, C, h, w)`` tokens -> ``(B, K, H, W)`` logits at ``size = (H, W)``."""
        levels = [p(tokens) for p in self.pyramid]  # fine to coarse
        top = self.ppm(levels[-1])
        lat = [lateral(x) for lateral, x in zip(self.lateral, levels[:-1])] + [top]
        for i in range(len(lat) - 2, -1, -1):  # top-down: coarser level added into the finer one
            lat[i] = lat[i] + _upsample(lat[i + 1], lat[i].shape[-2:])
        outs = [fpn(x) for fpn, x in zip(self.fpn, lat[:-1])] + [top]
        finest = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_upsample(x, finest) for x in outs], dim=1))
        return _upsample(self.classifier(self.dropout(fused)), size)


def build_seg_head(kind: str, in_channels: int, num_classes: int, width: int = 64, dropout: float = 0.1) -> nn.Module:
    """A segmentation head by name (:data:`SEG_HEADS`).

    Raises:
        SegHeadError: Unknown kind, or fewer than two classes.
    """
    if num_classes < 2:
        raise SegHeadError(f"segmentation needs at least two classes, got {num_classes}")
    if kind == "linear":
        return LinearSegHead(in_channels, num_classes)
    if kind == "upernet":
        return UPerNetHead(in_channels, num_classes, width=width, dropout=dropout)
    raise SegHeadError(f"unknown segmentation head {kind!r}; heads: {', '.join(SEG_HEADS)}")


class SegmentationModel(nn.Module):
    """Patch encoder (frozen, or with LoRA adapters) -> dense patch tokens -> segmentation head.

    Args:
        encoder: The encoder's module (a ViT: :func:`pathvl.encoders.vision.dense_patch_tokens` reads it).
        head: A head from :func:`build_seg_head`.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def encoder_trains(self) -> bool:
        """Whether the encoder has trainable parameters (LoRA adapters)."""
        return any(p.requires_grad for p in self.encoder.parameters())

    def tokens(self, x: Tensor) -> Tensor:
        """``(B, C, h, w)`` float32 patch tokens of ``(B, 3, H, W)`` normalised images (gradients only where
        the encoder trains)."""
        p = next(self.encoder.parameters())
        x = x.to(device=p.device, dtype=p.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trains):
            return dense_patch_tokens(self.encoder, x).float()

    def decode(self, tokens: Tensor, size: Sequence[int]) -> Tensor:
        """``(B, K, H, W)`` logits of ``(B, C, h, w)`` tokens."""
        return self.head(tokens, size)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, K, H, W)`` logits of ``(B, 3, H, W)`` normalised images."""
        return self.decode(self.tokens(x), x.shape[-2:])
