"""Language-modelling objectives: masked LM (BERT) and prefix / causal LM (captioning, ITG, PLM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.losses.contrastive import zero_loss
from pathvl.text.tokenize import IGNORE_INDEX, mask_tokens

__all__ = ["IGNORE_INDEX", "LMLoss", "MLMLoss", "mask_tokens", "pack_next_token"]



def pack_next_token(hidden: Tensor, ids: Tensor, mask: Tensor, head: nn.Module) -> dict[str, Tensor]:
    """Next-token logits only where a token is predicted, packed for :class:`LMLoss`.

    Projecting every position onto the vocabulary (``(n, L, V)``) costs the padding rows and, in the loss,
    zero-filled gradients of the shift and the selection at full vocabulary width. Here ``head`` sees only
    the T rows ``t`` whose token ``t + 1`` is real; ``lm_logits (1, T + 1, V)`` holds them then one
    unscored row and ``lm_labels (1, T + 1)`` is -100 then the T tokens, so that LMLoss's shift pairs packed
    row ``m`` with label ``m + 1``: the same loss as on the full logits.

    Args:
        hidden: ``(n, L, d)`` last hidden states of the text positions.
        ids: ``(n, L)`` token ids; ``mask``: ``(n, L)``, 0 at padding.
        head: The vocabulary projection, ``d -> V``.
    """
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)  # token t + 1, predicted at t
    keep = target != IGNORE_INDEX  # (n, L - 1)
    logits = head(hidden[:, :-1][keep])  # (T, V)
    lm_logits = torch.cat([logits, logits.new_zeros(1, logits.shape[-1])])[None]
    first = torch.full((1,), IGNORE_INDEX, dtype=torch.long, device=ids.device)
    return {"lm_logits": lm_logits, "lm_labels": torch.cat([first, target[keep]])[None]}


def _token_ce(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Mean cross-entropy over the labels that are not ``IGNORE_INDEX`` (0 with graph if none)."""
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # (B*L, V)
    flat_labels = labels.reshape(-1).long()  # (B*L,)
    keep = flat_labels != IGNORE_INDEX
    if not bool(keep.any()):
        return zero_loss(logits)
    if bool(keep.all()):  # packed logits (MR-PLIP PLM, PathAlign ITG): no (rows, vocab) copy for the selection
        return F.cross_entropy(flat_logits.float(), flat_labels, label_smoothing=label_smoothing)
    return F.cross_entropy(flat_logits[keep].float(), flat_labels[keep], label_smoothing=label_smoothing)


class MLMLoss(nn.Module):
    r"""Masked language modelling loss.

    Devlin et al., "BERT", NAACL 2019; the MLM term of ALBEF/BLIP-style vision-language pre-training (and
    of MR-PLIP's baseline objective). With :math:`\mathcal{M}` the masked positions of the whole batch,

    .. math:: \mathcal{L}_{mlm} = -\frac{1}{|\mathcal{M}|}\sum_{(b,t)\in\mathcal{M}} \log p_{b,t}(y_{b,t}).

    Positions whose label is -100 are ignored; labels are NOT shifted (the prediction at ``t`` is for
    token ``t``). Build inputs and labels with :func:`mask_tokens`. Returns 0 (connected to the graph)
    when nothing is masked.

    Args:
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy`.

    Inputs:
        mlm_logits: ``(B, L, V)``.
        mlm_labels: ``(B, L)`` long, original token ids at masked positions, -100 elsewhere.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, mlm_logits: Tensor, mlm_labels: Tensor, **_: object) -> Tensor:
        if mlm_logits.shape[:-1] != mlm_labels.shape:
            raise ValueError(
                f"mlm_logits {tuple(mlm_logits.shape)} and mlm_labels {tuple(mlm_labels.shape)} disagree"
            )
        return _token_ce(mlm_logits, mlm_labels, self.label_smoothing)


class LMLoss(nn.Module):
    r"""Autoregressive (prefix / causal) language-modelling loss: captioning, BLIP-2 ITG, MR-PLIP PLM.

    Li et al., "BLIP" (LM) and "BLIP-2" (image-grounded text generation), ICML 2022 / 2023; Wang et al.,
    "SimVLM" (prefix LM), ICLR 2022. With the labels aligned to the INPUT tokens (Hugging Face convention:
    ``lm_labels`` is ``input_ids`` with the prefix / prompt / padding set to -100), the loss shifts inside:
    the logits at position ``t`` predict the label at ``t + 1``,

    .. math:: \mathcal{L}_{lm} = -\frac{1}{|\mathcal{T}|}\sum_{(b,t)\in\mathcal{T}}
        \log p_{b,t}(y_{b,t+1}),\qquad \mathcal{T}=\{(b,t): t<L-1,\ y_{b,t+1}\neq -100\}.

    Pass ``shift=False`` when the labels are already aligned with the logits. Returns 0 (connected to
    the graph) when no label is left.

    Args:
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy` (BLIP uses 0.1).
        shift: Shift logits and labels by one position inside the loss.

    Inputs:
        lm_logits: ``(B, L, V)``.
        lm_labels: ``(B, L)`` long, -100 where ignored.
    """

    def __init__(self, label_smoothing: float = 0.0, shift: bool = True) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.shift = shift

    def forward(self, lm_logits: Tensor, lm_labels: Tensor, **_: object) -> Tensor:
        if lm_logits.shape[:-1] != lm_labels.shape:
            raise ValueError(
                f"lm_logits {tuple(lm_logits.shape)} and lm_labels {tuple(lm_labels.shape)} disagree"
            )
        if self.shift:
            lm_logits = lm_logits[:, :-1]  # (B, L-1, V): position t predicts token t+1
            lm_labels = lm_labels[:, 1:]  # (B, L-1)
        return _token_ce(lm_logits, lm_labels, self.label_smoothing)
