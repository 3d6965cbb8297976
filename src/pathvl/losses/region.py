"""PathFLIP fine-grained region alignment: text-conditioned region embeddings vs region sub-captions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.dist import all_gather_no_grad, gather_with_grad, get_rank, get_world_size
from pathvl.losses.contrastive import as_scalar, fp32_forward, zero_loss

__all__ = ["RegionAlignLoss"]

_SAME_SLIDE = ("ignore", "positive", "negative")


class RegionAlignLoss(nn.Module):
    r"""Sigmoid alignment of text-conditioned region embeddings with sub-captions.

    PathFLIP (Liu et al., "PathFLIP: Fine-grained Language-Image Pretraining for Versatile Computational
    Pathology", 2025) splits each slide caption into region sub-captions and pools the slide's patches
    with each sub-caption as the query (text-conditioned attention pooling, as in FLAIR, Xiao et al.,
    arXiv:2412.03561, 2024); the pairs are scored with the sigmoid loss of SigLIP (Zhai et al., ICCV 2023).

    Scoring used here (well defined although region embeddings depend on their query text): slide
    :math:`i` has sub-captions :math:`k = 1..K` (valid where ``subcap_mask``), sub-caption embeddings
    :math:`t_{ik}` and region embeddings :math:`r_{ik}` = slide :math:`i`'s patches pooled with
    :math:`t_{ik}` as query (only the slide's OWN sub-captions condition its regions: no region is ever
    computed for a foreign text). Every region row :math:`(i,k)` is scored against every sub-caption
    column :math:`(j,l)` of the batch (all ranks):

    .. math::
        \ell_{ik,jl} = t\,\hat r_{ik}^\top \hat t_{jl} + b,\qquad
        \mathcal{L} = -\frac{1}{|\mathcal{R}|}\sum_{(i,k)\in\mathcal{R}}\ \sum_{(j,l)\in\mathcal{C}_{ik}}
        \log\sigma\big(y_{ik,jl}\,\ell_{ik,jl}\big),

    with hats denoting L2 normalisation, :math:`\mathcal{R}` the valid sub-captions of the whole batch,
    and labels :math:`y=+1` for the own sub-caption (:math:`j=i, l=k`), :math:`y=-1` for every
    sub-caption of another slide :math:`j\ne i`. Pairs with another sub-caption of the same slide
    (:math:`j=i, l\ne k`) are governed by ``same_slide``: ``"ignore"`` (default: left out of
    :math:`\mathcal{C}_{ik}`, since two regions of one slide may overlap or differ), ``"positive"``
    (every sub-caption of the slide counts as a positive of each of its regions) or ``"negative"``.

    Distributed: sub-caption embeddings and masks are gathered (embeddings with gradients); each rank
    scores its local region rows against all columns and divides by the GLOBAL number of valid rows times
    ``1 / world_size``, so the mean over ranks equals :math:`\mathcal{L}` on the whole batch.

    Args:
        same_slide: Treatment of (region, other sub-caption of the same slide) pairs.
        gather: Gather sub-captions across ranks (no effect in a single process).

    Inputs:
        region_emb: ``(B, K, D)`` text-conditioned region embeddings, un-normalised.
        subcap_emb: ``(B, K, D)`` sub-caption embeddings, un-normalised.
        subcap_mask: ``(B, K)`` bool, False for padded sub-captions.
        logit_scale: Scalar :math:`t`, already exponentiated.
        logit_bias: Scalar :math:`b`.
    """

    def __init__(self, same_slide: str = "ignore", gather: bool = True) -> None:
        super().__init__()
        if same_slide not in _SAME_SLIDE:
            raise ValueError(f"same_slide must be one of {_SAME_SLIDE}, got {same_slide!r}")
        self.same_slide = same_slide
        self.gather = gather

    @fp32_forward
    def forward(
        self,
        region_emb: Tensor,
        subcap_emb: Tensor,
        subcap_mask: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float,
        **_: object,
    ) -> Tensor:
        if region_emb.shape != subcap_emb.shape or region_emb.dim() != 3:
            raise ValueError(
                f"region_emb {tuple(region_emb.shape)} and subcap_emb {tuple(subcap_emb.shape)} "
                "must both be (B, K, D)"
            )
        b, k, d = region_emb.shape
        if subcap_mask.shape != (b, k):
            raise ValueError(f"subcap_mask must be ({b}, {k}), got {tuple(subcap_mask.shape)}")
        device = region_emb.device
        gathered = self.gather and get_world_size() > 1
        world = get_world_size() if gathered else 1
        rank = get_rank() if gathered else 0

        rows = F.normalize(region_emb.float(), dim=-1).reshape(b * k, d)  # (B*K, D)
        cols = F.normalize(subcap_emb.float(), dim=-1)  # (B, K, D)
        mask = subcap_mask.to(device=device, dtype=torch.bool)
        cols_all = gather_with_grad(cols) if gathered else cols  # (W*B, K, D)
        mask_all = all_gather_no_grad(mask) if gathered else mask  # (W*B, K)
        n_valid = mask_all.sum()
        if int(n_valid) == 0:
            return zero_loss(region_emb, subcap_emb)
        cols_all = cols_all.reshape(-1, d)  # (W*B*K, D)

        scale = as_scalar(logit_scale, rows).float()
        bias = as_scalar(logit_bias, rows).float()
        logits = scale * rows @ cols_all.t() + bias  # (B*K, W*B*K)

        row_slide = torch.arange(b, device=device).repeat_interleave(k) + rank * b  # (B*K,)
        row_global = torch.arange(b * k, device=device) + rank * b * k  # (B*K,)
        n_cols = cols_all.shape[0]
        col_slide = torch.arange(n_cols // k, device=device).repeat_interleave(k)  # (W*B*K,)
        col_index = torch.arange(n_cols, device=device)
        own = row_global.unsqueeze(1) == col_index.unsqueeze(0)  # (B*K, W*B*K)
        same = (row_slide.unsqueeze(1) == col_slide.unsqueeze(0)) & ~own
        labels = torch.where(own, 1.0, -1.0)
        weight = mask.reshape(-1, 1) & mask_all.reshape(1, -1)
        if self.same_slide == "ignore":
            weight = weight & ~same
        elif self.same_slide == "positive":
            labels = torch.where(same, 1.0, labels)

        pair_loss = -F.logsigmoid(labels * logits)  # (B*K, W*B*K)
        total = torch.where(weight, pair_loss, torch.zeros_like(pair_loss)).sum()
        return total * world / n_valid.to(total.dtype)
