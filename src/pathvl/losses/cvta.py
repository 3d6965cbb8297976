"""MR-PLIP Cross-resolution Visual-Textual Alignment (CVTA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.losses.contrastive import fp32_forward, zero_loss

__all__ = ["CVTALoss", "select_positive_keywords"]


@torch.no_grad()
def select_positive_keywords(sim: Tensor, keyword_mask: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Marks, for each patch, its ``top_k`` most similar candidate keywords as positives.

    A patch with ``n`` candidates gets ``min(top_k, n - 1)`` positives, so that at least one candidate
    is left as a negative; patches with fewer than two candidates get none. Ties are broken by
    :func:`torch.topk`. Runs without gradient (the selection is not differentiated).

    Args:
        sim: ``(N, K)`` patch-keyword similarities (any monotone score, e.g. cosine).
        keyword_mask: ``(N, K)`` bool, True where keyword ``k`` is a candidate for patch ``n``.
        top_k: Number of positives wanted per patch (MR-PLIP's :math:`k_o`).

    Returns:
        ``(positive, n_pos)``: ``(N, K)`` bool positives (a subset of the candidates) and ``(N,)`` long
        number of positives per patch.
    """
    if sim.shape != keyword_mask.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and keyword_mask {tuple(keyword_mask.shape)} disagree")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n, k = sim.shape
    cand = keyword_mask.bool()
    n_pos = (cand.sum(dim=1) - 1).clamp(min=0, max=top_k)  # (N,)
    positive = torch.zeros(n, k, dtype=torch.bool, device=sim.device)
    kk = min(top_k, k)
    if n == 0 or kk == 0:
        return positive, n_pos
    scores = sim.detach().float().masked_fill(~cand, float("-inf"))
    top = scores.topk(kk, dim=1).indices  # (N, kk), best first
    take = torch.arange(kk, device=sim.device).unsqueeze(0) < n_pos.unsqueeze(1)  # (N, kk)
    positive.scatter_(1, top, take)
    return positive & cand, n_pos


class CVTALoss(nn.Module):
    r"""MR-PLIP cross-resolution visual-textual alignment: multi-positive patch-keyword contrast.

    MR-PLIP, "Multi-Resolution Pathology-Language Pre-training Model with Text-Guided Visual
    Representation" (2025), CVTA. Every patch of a 5x bag (at any of 5x/10x/20x/40x)
    is contrasted with the keywords of its bag's textual bag. Let :math:`s_{nk}=\cos(x_n, w_k)`,
    :math:`C_n` the candidate keywords of patch :math:`n` (``keyword_mask``), :math:`P_n\subset C_n` its
    positives: the :math:`\min(k_o, |C_n|-1)` candidates with the highest :math:`s_{nk}`, chosen without
    gradient (:func:`select_positive_keywords`); the other candidates are its negatives. The loss is the
    supervised-contrastive average over positives (Khosla et al., "Supervised Contrastive Learning",
    NeurIPS 2020, :math:`\mathcal{L}_{out}`), with the positives kept in the denominator:

    .. math::
        \mathcal{L}_{cvta} = \frac{1}{|\mathcal{V}|}\sum_{n\in\mathcal{V}} -\frac{1}{|P_n|}
        \sum_{p\in P_n}\log\frac{\exp(s_{np}/\tau)}{\sum_{c\in C_n}\exp(s_{nc}/\tau)},

    where :math:`\mathcal{V}` are the patches that are not padding (``patch_mask``) and have
    :math:`|C_n|\ge 2` (others are skipped; 0 connected to the graph if none is left). The temperature
    :math:`\tau=\exp(\theta)` is learnable through its log, initialised at 0.07 and clamped to
    ``[min_temperature, max_temperature]`` in the forward (as CLIP clamps its scale at 100).

    Args:
        top_k: Number of positive keywords per patch (:math:`k_o`).
        init_temperature: Initial :math:`\tau`.
        learnable: Make :math:`\log\tau` a parameter (else a buffer).
        min_temperature: Lower clamp of :math:`\tau`.
        max_temperature: Upper clamp of :math:`\tau`.

    Inputs:
        patch_emb: ``(N, D)`` patch embeddings, un-normalised.
        keyword_emb: ``(K, D)`` keyword embeddings (all keywords of the batch), un-normalised.
        keyword_mask: ``(N, K)`` bool, True where keyword ``k`` is in the textual bag of patch ``n``'s
            5x parent.
        patch_mask: Optional ``(N,)`` bool, False for padded patches.
    """

    def __init__(
        self,
        top_k: int = 5,
        init_temperature: float = 0.07,
        learnable: bool = True,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0 < min_temperature <= init_temperature <= max_temperature:
            raise ValueError("need 0 < min_temperature <= init_temperature <= max_temperature")
        self.top_k = int(top_k)
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        log_tau = torch.tensor(math.log(init_temperature), dtype=torch.float32)
        if learnable:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    @property
    def temperature(self) -> Tensor:
        """Current clamped temperature :math:`\\tau`."""
        return self.log_temperature.exp().clamp(self.min_temperature, self.max_temperature)

    def similarity(self, patch_emb: Tensor, keyword_emb: Tensor) -> Tensor:
        """Cosine similarities ``(N, K)``."""
        return F.normalize(patch_emb.float(), dim=-1) @ F.normalize(keyword_emb.float(), dim=-1).t()

    @fp32_forward
    def forward(
        self,
        patch_emb: Tensor,
        keyword_emb: Tensor,
        keyword_mask: Tensor,
        patch_mask: Tensor | None = None,
        **_: object,
    ) -> Tensor:
        n, k = patch_emb.shape[0], keyword_emb.shape[0]
        if keyword_mask.shape != (n, k):
            raise ValueError(f"keyword_mask must be ({n}, {k}), got {tuple(keyword_mask.shape)}")
        cand = keyword_mask.bool()
        sim = self.similarity(patch_emb, keyword_emb)  # (N, K)
        positive, n_pos = select_positive_keywords(sim, cand, self.top_k)  # (N, K), (N,)
        valid = n_pos > 0
        if patch_mask is not None:
            valid = valid & patch_mask.bool().reshape(-1)
        if not bool(valid.any()):
            return zero_loss(patch_emb, keyword_emb, self.log_temperature)
        logits = (sim / self.temperature).masked_fill(~cand, float("-inf"))  # (N, K)
        logits, positive, n_pos = logits[valid], positive[valid], n_pos[valid]
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # -inf off the candidates
        pos_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)  # (V,)
        return -(pos_log_prob / n_pos.to(log_prob.dtype)).mean()
