"""Global image-text contrastive objectives: ITC (softmax), SigLIP (sigmoid), Q-Former ITC (max over queries).

All three gather features across ranks with gradients through
:func:`pathvl.dist.gather_with_grad` and work unchanged in a single process. Each rank
scores its LOCAL rows against ALL gathered columns; the local positives sit at column offset
``rank * B``. The value a rank returns, averaged over ranks, equals the single-process loss on the
concatenated batch (log :func:`~pathvl.dist.all_reduce_mean` of it); gradients then match
the single-process ones after DDP's averaging (see the distributed module docstring). Every rank must
hold the same local batch size ``B``.

``logit_scale`` convention (CLIP): the model keeps the learnable ``log`` of the scale and passes
``logit_scale = log_scale.exp()`` (optionally clamped to 100); the losses multiply cosine similarities
by it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.dist import all_gather_no_grad, gather_with_grad, get_rank, get_world_size

__all__ = ["ITCLoss", "QFormerITCLoss", "SigLIPLoss"]


# Helpers shared by the loss modules (not re-exported from pathvl.losses).

def zero_loss(*tensors: Tensor | None) -> Tensor:
    """A scalar 0 that stays connected to the graph of ``tensors``.

    Used when a batch has nothing to score (no masked token, no parent-child pair), so that the
    backward still reaches every parameter (DDP expects all ranks to produce gradients) and the
    training step can add it without special cases.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros(())
    total = present[0].new_zeros((), dtype=torch.float32)
    for t in present:
        if t.is_floating_point() and t.requires_grad:
            total = total + t.sum() * 0.0
    return total


_F = TypeVar("_F", bound=Callable[..., Tensor])


def fp32_forward(fn: _F) -> _F:
    """Runs a loss ``forward`` with autocast disabled, so similarities and logits are computed in fp32.

    Under bf16 autocast a ``(B, D) @ (D, N)`` similarity times a scale near 100 would lose about one
    logit unit of precision; the losses cast their inputs to fp32 themselves.
    """

    @functools.wraps(fn)
    def wrapper(self: nn.Module, *args: object, **kwargs: object) -> Tensor:
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        if not torch.amp.is_autocast_available(device_type):
            return fn(self, *args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def as_scalar(x: Tensor | float, like: Tensor) -> Tensor:
    """``x`` as a 0-d tensor on ``like``'s device (a Python float is accepted for convenience)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"expected a scalar, got shape {tuple(x.shape)}")
        return x.reshape(())
    return torch.tensor(float(x), device=like.device, dtype=torch.float32)


def _local_targets(batch: int, device: torch.device, gathered: bool) -> Tensor:
    offset = get_rank() * batch if gathered else 0
    return torch.arange(batch, device=device) + offset


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same batch size: {a.shape[0]} vs {b.shape[0]}")


class ITCLoss(nn.Module):
    r"""Symmetric image-text contrastive loss (InfoNCE), as in CLIP.

    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021;
    also the ITC term of ALBEF (Li et al., NeurIPS 2021) and BLIP (Li et al., ICML 2022).

    With L2-normalised embeddings :math:`u_i` (image) and :math:`v_j` (text), scale :math:`s` and
    :math:`N` pairs,

    .. math::
        \mathcal{L} = \tfrac{1}{2N}\sum_i \Big[-\log\frac{e^{s\,u_i^\top v_i}}{\sum_j e^{s\,u_i^\top v_j}}
        -\log\frac{e^{s\,v_i^\top u_i}}{\sum_j e^{s\,v_i^\top u_j}}\Big],

    with optional label smoothing in both cross-entropies. Under several processes the image and text
    embeddings are gathered with gradients; each rank computes the two cross-entropies for its local rows
    against all columns, and the mean over ranks equals :math:`\mathcal{L}` on the whole batch.

    **Identical texts** (``caption_group``): generated captions repeat, and a pair whose texts are equal is
    no negative. With groups :math:`g`, the target of row :math:`i` spreads over every column with the same
    text, :math:`y_{ij} = [g_i = g_j] / |\{k: g_k = g_i\}|` (multi-positive targets, as BLIP's retrieval
    fine-tuning spreads its targets over the captions of one image id), in both directions:

    .. math::
        \mathcal{L} = \tfrac{1}{2N}\sum_i \Big[-\sum_j y_{ij}\log\mathrm{softmax}_j(s\,u_i^\top v_j)
        -\sum_j y_{ij}\log\mathrm{softmax}_j(s\,v_i^\top u_j)\Big],

    label smoothing mixing :math:`y` with the uniform distribution. Groups are gathered across ranks (no
    gradient) with the embeddings, so equal ids must mean equal texts on every rank (MR-PLIP's
    :func:`~pathvl.data.bagdata.collate_bags` gives content hashes); without groups this is the loss above.

    Args:
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy`.
        gather: Gather columns across ranks (no effect in a single process).

    Inputs (keywords of :meth:`forward`):
        image_emb: ``(B, D)`` image embeddings, un-normalised.
        text_emb: ``(B, D)`` text embeddings, un-normalised.
        logit_scale: Scalar multiplier, already exponentiated (CLIP: ``exp(log_scale)``).
        caption_group: Optional ``(B,)`` integer id of each pair's text (equal ids: identical texts).
    """

    def __init__(self, label_smoothing: float = 0.0, gather: bool = True) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.gather = gather

    @fp32_forward
    def forward(
        self, image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, caption_group: Tensor | None = None,
        **_: object,
    ) -> Tensor:
        _check_pair(image_emb, text_emb, "image_emb", "text_emb")
        img = F.normalize(image_emb.float(), dim=-1)  # (B, D)
        txt = F.normalize(text_emb.float(), dim=-1)  # (B, D)
        scale = as_scalar(logit_scale, img).float()
        gathered = self.gather and get_world_size() > 1
        img_all = gather_with_grad(img) if gathered else img  # (W*B, D)
        txt_all = gather_with_grad(txt) if gathered else txt  # (W*B, D)
        targets: Tensor = _local_targets(img.shape[0], img.device, gathered)  # (B,)
        if caption_group is not None:
            g = caption_group.reshape(-1).long().to(img.device)
            if g.shape[0] != img.shape[0]:
                raise ValueError(f"caption_group has {g.shape[0]} entries for {img.shape[0]} pairs")
            g_all = all_gather_no_grad(g) if gathered else g  # (W*B,)
            same = (g[:, None] == g_all[None, :]).float()  # (B, W*B), the diagonal included
            targets = same / same.sum(dim=1, keepdim=True)  # multi-positive target distribution
        logits_i2t = scale * img @ txt_all.t()  # (B, W*B)
        logits_t2i = scale * txt @ img_all.t()  # (B, W*B)
        ls = self.label_smoothing
        return 0.5 * (
            F.cross_entropy(logits_i2t, targets, label_smoothing=ls)
            + F.cross_entropy(logits_t2i, targets, label_smoothing=ls)
        )


class SigLIPLoss(nn.Module):
    r"""Pairwise sigmoid image-text loss (SigLIP).

    Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023. With L2-normalised
    :math:`u_i, v_j`, scale :math:`t` (already exponentiated; the paper learns :math:`t'=\log t`,
    initialised at :math:`\log 10`) and bias :math:`b` (initialised at -10), over a batch of :math:`N`
    pairs,

    .. math::
        \mathcal{L} = -\frac{1}{N}\sum_{i=1}^{N}\sum_{j=1}^{N}
        \log\sigma\big(z_{ij}\,(t\,u_i^\top v_j + b)\big),\qquad z_{ij}=1 \text{ if } i=j \text{ else } -1 .

    Under several processes only the text embeddings need gathering: rank ``r`` scores its local images
    against all texts and divides by its local ``B``, so the mean over ranks equals :math:`\mathcal{L}`
    on the whole batch (every pair is counted exactly once across ranks).

    Args:
        gather: Gather texts across ranks (no effect in a single process).

    Inputs:
        image_emb: ``(B, D)`` image embeddings, un-normalised.
        text_emb: ``(B, D)`` text embeddings, un-normalised.
        logit_scale: Scalar :math:`t` (already exponentiated).
        logit_bias: Scalar :math:`b`.
    """

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    @fp32_forward
    def forward(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float,
        **_: object,
    ) -> Tensor:
        _check_pair(image_emb, text_emb, "image_emb", "text_emb")
        img = F.normalize(image_emb.float(), dim=-1)  # (B, D)
        txt = F.normalize(text_emb.float(), dim=-1)  # (B, D)
        scale = as_scalar(logit_scale, img).float()
        bias = as_scalar(logit_bias, img).float()
        gathered = self.gather and get_world_size() > 1
        txt_all = gather_with_grad(txt) if gathered else txt  # (W*B, D)
        batch = img.shape[0]
        logits = scale * img @ txt_all.t() + bias  # (B, W*B)
        targets = _local_targets(batch, img.device, gathered)
        signs = -torch.ones_like(logits)
        signs[torch.arange(batch, device=img.device), targets] = 1.0
        return -F.logsigmoid(signs * logits).sum() / batch


class QFormerITCLoss(nn.Module):
    r"""Image-text contrastive loss with learned queries (BLIP-2 ITC, as used by PathAlign).

    Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
    Language Models", ICML 2023; Ahmed et al., "PathAlign: A vision-language model for whole slide images
    in histopathology", 2024. The image is represented by :math:`Q` query outputs :math:`q_{i1..iQ}`;
    with L2-normalised queries and text embedding :math:`v_j`, the similarity is the best query,

    .. math::
        S_{ij} = \max_{q}\; q_{iq}^\top v_j ,

    and the loss is the symmetric cross-entropy of :class:`ITCLoss` on :math:`s\,S` (rows: images over
    texts; columns: texts over images), i.e.
    :math:`\tfrac{1}{2N}\sum_i[-\log\mathrm{softmax}_j(sS_{ij})_i - \log\mathrm{softmax}_j(sS_{ji})_i]`.
    Gathered like :class:`ITCLoss`.

    Args:
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy`.
        gather: Gather across ranks (no effect in a single process).

    Inputs:
        query_emb: ``(B, Q, D)`` projected query outputs, un-normalised.
        text_emb: ``(B, D)`` projected text ([CLS]) embeddings, un-normalised.
        logit_scale: Scalar multiplier, already exponentiated (BLIP-2 uses ``1 / temp``).
    """

    def __init__(self, label_smoothing: float = 0.0, gather: bool = True) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.gather = gather

    @fp32_forward
    def forward(
        self, query_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, **_: object
    ) -> Tensor:
        if query_emb.dim() != 3:
            raise ValueError(f"query_emb must be (B, Q, D), got shape {tuple(query_emb.shape)}")
        _check_pair(query_emb, text_emb, "query_emb", "text_emb")
        qry = F.normalize(query_emb.float(), dim=-1)  # (B, Q, D)
        txt = F.normalize(text_emb.float(), dim=-1)  # (B, D)
        scale = as_scalar(logit_scale, txt).float()
        gathered = self.gather and get_world_size() > 1
        qry_all = gather_with_grad(qry) if gathered else qry  # (W*B, Q, D)
        txt_all = gather_with_grad(txt) if gathered else txt  # (W*B, D)
        targets = _local_targets(txt.shape[0], txt.device, gathered)
        sim_i2t = torch.einsum("bqd,nd->bnq", qry, txt_all).amax(dim=-1)  # (B, W*B)
        sim_t2i = torch.einsum("bd,nqd->bnq", txt, qry_all).amax(dim=-1)  # (B, W*B)
        ls = self.label_smoothing
        return 0.5 * (
            F.cross_entropy(scale * sim_i2t, targets, label_smoothing=ls)
            + F.cross_entropy(scale * sim_t2i, targets, label_smoothing=ls)
        )
