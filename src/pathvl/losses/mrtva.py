"""MR-PLIP Multi-Resolution Text-guided Visual representation Alignment (MRTVA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.losses.contrastive import fp32_forward, zero_loss

__all__ = ["MRTVALoss"]


def _neg_cos(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, z), row-wise; ``z`` must already be detached."""
    return -(F.normalize(p.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(dim=-1)


class MRTVALoss(nn.Module):
    r"""Parent-child alignment of text-guided visual representations, SimSiam style.

    MR-PLIP, "Multi-Resolution Pathology-Language Pre-training Model with Text-Guided Visual
    Representation" (2025), MRTVA; the symmetric stop-gradient objective is SimSiam's (Chen & He,
    "Exploring Simple Siamese Representation Learning", CVPR 2021). For each parent-child pair
    :math:`(a, c)` of the batch (``parent[c] = a``: a 5x-10x, 10x-20x or 20x-40x link of the tiling tree),
    with projections :math:`z` and predictions :math:`p = h(z)`,

    .. math::
        \mathcal{L}_{ac} = \tfrac12 D\big(p_a, \mathrm{sg}(z_c)\big)
        + \tfrac12 D\big(p_c, \mathrm{sg}(z_a)\big),
        \qquad D(p, z) = -\frac{p^\top z}{\lVert p\rVert\,\lVert z\rVert},

    and :math:`\mathcal{L}_{mrtva}` is the mean of :math:`\mathcal{L}_{ac}` over all pairs whose two ends
    are present and not padding (``patch_mask``). :math:`\mathrm{sg}` is ``detach``: the targets ``z``
    receive no gradient from this loss, so a row's ``z`` gets gradient only through its own prediction
    ``p = h(z)``. Returns 0 (connected to the graph) when the batch holds no pair. The value lies in
    ``[-1, 1]`` (-1 = perfect alignment). :meth:`per_level` gives the same mean split by level pair.

    Inputs:
        z: ``(N, D)`` projections (targets).
        p: ``(N, D)`` predictions, ``predictor(z)``.
        parent: ``(N,)`` long, row of each row's parent within the batch, -1 for roots or absent parents.
        patch_mask: Optional ``(N,)`` bool, False for padded rows.
    """

    @staticmethod
    def _pairs(parent: Tensor, n: int, patch_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        parent = parent.reshape(-1).long()
        if parent.shape[0] != n:
            raise ValueError(f"parent has {parent.shape[0]} entries for {n} rows")
        if n and int(parent.max()) >= n:
            raise ValueError("parent index out of range (must be a row of the same batch, or -1)")
        has_parent = parent >= 0
        if patch_mask is not None:
            mask = patch_mask.reshape(-1).bool()
            has_parent = has_parent & mask & mask[parent.clamp(min=0)]
        child = torch.nonzero(has_parent).flatten()
        return parent[child], child

    def pair_losses(
        self, z: Tensor, p: Tensor, parent: Tensor, patch_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair losses.

        Returns:
            ``(loss, parent_rows, child_rows)``, each of shape ``(P,)``.
        """
        if z.shape != p.shape:
            raise ValueError(f"z {tuple(z.shape)} and p {tuple(p.shape)} disagree")
        a, c = self._pairs(parent.to(z.device), z.shape[0], patch_mask)
        loss = 0.5 * _neg_cos(p[a], z[c].detach()) + 0.5 * _neg_cos(p[c], z[a].detach())
        return loss, a, c

    @fp32_forward
    def forward(
        self, z: Tensor, p: Tensor, parent: Tensor, patch_mask: Tensor | None = None, **_: object
    ) -> Tensor:
        loss, _a, _c = self.pair_losses(z, p, parent, patch_mask)
        if loss.numel() == 0:
            return zero_loss(z, p)
        return loss.mean()

    @torch.no_grad()
    def per_level(
        self,
        z: Tensor,
        p: Tensor,
        parent: Tensor,
        magnification: Tensor,
        patch_mask: Tensor | None = None,
        **_: object,
    ) -> dict[str, Tensor]:
        """Mean pair loss for each (parent magnification, child magnification), for logging.

        Args:
            z: ``(N, D)`` projections.
            p: ``(N, D)`` predictions.
            parent: ``(N,)`` parent rows, -1 for none.
            magnification: ``(N,)`` magnification of each row (5, 10, 20, 40, ...).
            patch_mask: Optional ``(N,)`` bool.

        Returns:
            Detached scalars keyed ``"5x-10x"``, ``"10x-20x"``, ..., ordered by parent magnification;
            levels without a pair are absent.
        """
        loss, a, c = self.pair_losses(z, p, parent, patch_mask)
        mag = magnification.reshape(-1).to(loss.device).float()
        keys = torch.stack([mag[a], mag[c]], dim=1)  # (P, 2)
        out: dict[str, Tensor] = {}
        for pm, cm in sorted({(float(x), float(y)) for x, y in keys.tolist()}):
            sel = (keys[:, 0] == pm) & (keys[:, 1] == cm)
            out[f"{pm:g}x-{cm:g}x"] = loss[sel].mean().detach()
        return out
