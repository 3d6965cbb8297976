"""MR-PLIP Cross-resolution Visual-Textual Alignment (CVTA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.losses.contrastive import fp32_forward, zero_loss

__all__ = ["CVTALoss", "select_positive_keywords", "top_keywords"]


@torch.no_grad()
def top_keywords(sim: Tensor, keyword_mask: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    r"""The one rule MR-PLIP uses for "the top-:math:`k_o` keywords" of a patch, in CVTA and in the multimodal
    encoder: the :math:`\min(k_o, |C_n| - 1)` candidates with the highest similarity, best first (at least
    one candidate is left as a negative; a patch with one candidate gets none).

    Args:
        sim: ``(N, K)`` patch-keyword similarities (any monotone score, e.g. cosine).
        keyword_mask: ``(N, K)`` bool, True where keyword ``k`` is a candidate for patch ``n``.
        top_k: :math:`k_o`.

    Returns:
        ``(index (N, k), valid (N, k))`` with ``k = min(top_k, K)``: keyword indices, best first, and
        False where a patch has fewer than ``k`` candidates (those indices are 0 and mean nothing). Ties are
        broken by :func:`torch.topk`. Runs without gradient.
    """
    if sim.shape != keyword_mask.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and keyword_mask {tuple(keyword_mask.shape)} disagree")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n, K = sim.shape
    kk = min(top_k, K)
    if n == 0 or kk == 0:
        z = torch.zeros(n, kk, dtype=torch.long, device=sim.device)
        return z, z.bool()
    scores = sim.detach().float().masked_fill(~keyword_mask.bool(), float("-inf"))
    vals, idx = scores.topk(kk, dim=1)  # (N, kk), best first
    n_pos = (keyword_mask.bool().sum(dim=1) - 1).clamp(min=0, max=top_k)  # (N,)
    valid = torch.isfinite(vals) & (torch.arange(kk, device=sim.device)[None, :] < n_pos[:, None])
    return idx.masked_fill(~valid, 0), valid


@torch.no_grad()
def select_positive_keywords(sim: Tensor, keyword_mask: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Marks, for each patch, its top-``k_o`` candidate keywords as positives (:func:`top_keywords`: the
    same keywords the multimodal encoder fuses).

    Args:
        sim: ``(N, K)`` patch-keyword similarities.
        keyword_mask: ``(N, K)`` bool candidates.
        top_k: :math:`k_o`.

    Returns:
        ``(positive, n_pos)``: ``(N, K)`` bool positives and ``(N,)`` long ``min(top_k, |C_n| - 1)``.
    """
    idx, valid = top_keywords(sim, keyword_mask, top_k)
    positive = torch.zeros(sim.shape, dtype=torch.bool, device=sim.device)
    if idx.numel():
        positive.scatter_(1, idx, valid)
    positive &= keyword_mask.bool()
    return positive, valid.sum(dim=1)


class CVTALoss(nn.Module):
    r"""MR-PLIP cross-resolution visual-textual alignment: multi-positive patch-keyword contrast.

    MR-PLIP, "Multi-Resolution Pathology-Language Pre-training Model with Text-Guided Visual
    Representation" (2025), CVTA. Every patch of a 5x bag (at any of 5x/10x/20x/40x)
    is contrasted with the keywords of its bag's textual bag. Let :math:`s_{nk}=\cos(x_n, w_k)`,
    :math:`C_n` the candidate keywords of patch :math:`n` (``keyword_mask``), :math:`P_n\subset C_n` its
    positives: the :math:`|P_n| = \min(k_o, |C_n| - 1)` candidates with the highest :math:`s_{nk}`, chosen
    without gradient (:func:`top_keywords`); the other candidates, :math:`C_n\setminus P_n`, are its
    negatives. The loss is the supervised-contrastive average over positives (Khosla et al., "Supervised
    Contrastive Learning", NeurIPS 2020, :math:`\mathcal{L}_{out}`), with the positives kept in the
    denominator:

    .. math::
        \mathcal{L}_{cvta} = \frac{1}{|\mathcal{V}|}\sum_{n\in\mathcal{V}} -\frac{1}{|P_n|}
        \sum_{p\in P_n}\log\frac{\exp(s_{np}/\tau)}{\sum_{c\in C_n}\exp(s_{nc}/\tau)},

    where :math:`\mathcal{V}` are the patches that are not padding (``patch_mask``) and have
    :math:`|C_n|\ge 2` (others are skipped; 0 connected to the graph if none is left).

    Reading of the paper: "for each visual feature :math:`v_a`, the :math:`k_o` positive keywords with the
    highest cosine similarity in the textual bag; unrelated keywords are negatives", and the multimodal
    encoder "fuses visual features and the top-:math:`k_o` textual features". Both name one set, so one
    rule serves both (:func:`top_keywords`, also called by :class:`pathvl.models.mrplip.MRPLIP` for the
    fusion): the fused keywords are exactly the CVTA positives. A contrast needs a negative, so a bag with
    :math:`k_o` or fewer keywords keeps its least similar one(s) out of the positives, and out of the fusion
    too: :math:`|P_n| = \min(k_o, |C_n| - 1)`. (Letting small bags fuse every keyword and skipping them in
    CVTA instead removes most of the CVTA signal on template captions, whose bags hold a few keywords: the
    demo's held-out weighted F1 fell from 0.48 to 0.22.) The temperature
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
        valid = n_pos > 0  # n_pos <= |C| - 1: a negative is always left
        if patch_mask is not None:
            valid = valid & patch_mask.bool().reshape(-1)
        if not bool(valid.any()):
            return zero_loss(patch_emb, keyword_emb, self.log_temperature)
        logits = (sim / self.temperature).masked_fill(~cand, float("-inf"))  # (N, K)
        logits, positive, n_pos = logits[valid], positive[valid], n_pos[valid]
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # -inf off the candidates
        pos_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)  # (V,)
        return -(pos_log_prob / n_pos.to(log_prob.dtype)).mean()
