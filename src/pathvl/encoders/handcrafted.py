"""The download-free default patch encoder: hand-crafted colour and texture statistics.

``colour-texture`` needs no weights and has no learned parameters: RGB and H&E stain-deconvolution
statistics (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001), stain histograms and a fixed
Gabor/LoG filter bank. It is the default for demos; a baseline, not a foundation model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pathvl.encoders.registry import register_vision
from pathvl.encoders.vision import VisionEncoder
from pathvl.encoders.weights import EncoderError

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
        raise EncoderError("encoder 'colour-texture' has no weights; do not pass --weights")
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


__all__ = ["COLOUR_TEXTURE_PX", "ColourTextureFeatures"]
