"""Image-text matching (ITM) and its hard-negative sampler (ALBEF / BLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ITMLoss", "itm_pairs", "sample_hard_negatives"]


class ITMLoss(nn.Module):
    r"""Binary image-text matching loss.

    Li et al., "Align before Fuse (ALBEF)", NeurIPS 2021; Li et al., "BLIP", ICML 2022. A fusion encoder
    scores image-text pairs (positives plus hard negatives drawn with :func:`sample_hard_negatives`) with a
    two-way head, and

    .. math:: \mathcal{L}_{itm} = \frac{1}{M}\sum_{m=1}^{M} -\log p_m(y_m),\quad p_m=\mathrm{softmax}(\ell_m),

    where :math:`y_m = 1` for a matching pair and 0 otherwise. Labels equal to ``ignore_index`` are skipped.

    Args:
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy`.
        ignore_index: Label value that is ignored.

    Inputs:
        itm_logits: ``(M, 2)`` logits, column 1 = "match".
        itm_labels: ``(M,)`` long, 1 for matching pairs, 0 for negatives.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = ignore_index

    def forward(self, itm_logits: Tensor, itm_labels: Tensor, **_: object) -> Tensor:
        if itm_logits.dim() != 2 or itm_logits.shape[-1] != 2:
            raise ValueError(f"itm_logits must be (M, 2), got shape {tuple(itm_logits.shape)}")
        if itm_logits.shape[0] == 0 or bool((itm_labels == self.ignore_index).all()):
            return itm_logits.sum() * 0.0  # no pair to score (e.g. every caption identical): 0, still in the graph
        return F.cross_entropy(
            itm_logits.float(),
            itm_labels.long(),
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )


@torch.no_grad()
def sample_hard_negatives(
    sim: Tensor,
    positive_index: Tensor,
    generator: torch.Generator | None = None,
    exclude: Tensor | None = None,
) -> Tensor:
    r"""Draws one hard negative column per row, with probability proportional to ``exp(sim)``.

    ALBEF/BLIP hard-negative mining: for row :math:`i` with positive column :math:`p_i` and candidate set
    :math:`C_i = \{j : j \ne p_i, \neg\,\mathrm{exclude}_{ij}\}`,

    .. math::
        P(j \mid i) = \frac{e^{\mathrm{sim}_{ij}}}{\sum_{j' \in C_i} e^{\mathrm{sim}_{ij'}}},
        \quad j \in C_i,

    and 0 elsewhere. Pass already-scaled similarities (BLIP uses ``sim / temp``, i.e. the ITC logits). The
    positive and excluded columns (e.g. other samples with the same caption text, or the same slide) are
    never drawn. Columns whose similarity is ``-inf`` get probability 0; a row whose candidates are all
    ``-inf`` falls back to a uniform draw over its candidates. Runs without gradient.

    Args:
        sim: ``(B, B')`` similarity logits (rows: anchors, e.g. images; columns: the other modality,
            possibly gathered from all ranks).
        positive_index: ``(B,)`` long, the positive column of each row.
        generator: Optional random generator for reproducible draws.
        exclude: Optional ``(B, B')`` bool mask of columns that must not be drawn.

    Returns:
        ``(B,)`` long tensor of sampled column indices.

    Raises:
        ValueError: On shape mismatch, or if some row has no admissible negative.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be (B, B'), got shape {tuple(sim.shape)}")
    rows, cols = sim.shape
    positive_index = positive_index.to(device=sim.device, dtype=torch.long).reshape(-1)
    if positive_index.shape[0] != rows:
        raise ValueError(f"positive_index has {positive_index.shape[0]} entries for {rows} rows")
    if rows and (positive_index.min() < 0 or positive_index.max() >= cols):
        raise ValueError("positive_index out of range")
    invalid = torch.zeros(rows, cols, dtype=torch.bool, device=sim.device)
    invalid[torch.arange(rows, device=sim.device), positive_index] = True
    if exclude is not None:
        if exclude.shape != sim.shape:
            raise ValueError(f"exclude must have shape {tuple(sim.shape)}, got {tuple(exclude.shape)}")
        invalid |= exclude.to(device=sim.device, dtype=torch.bool)
    valid = ~invalid
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        bad = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"no admissible negative for row(s) {bad[:10]} (all columns positive or excluded)")
    logits = torch.nan_to_num(
        sim.detach().float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf")
    )
    logits = logits.masked_fill(invalid, float("-inf"))
    all_neg_inf = torch.isneginf(logits).all(dim=1)
    if bool(all_neg_inf.any()):
        logits[all_neg_inf] = torch.where(valid[all_neg_inf], 0.0, float("-inf"))
    probs = torch.softmax(logits, dim=1)  # (B, B'), zero on invalid columns
    draws = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return draws


@torch.no_grad()
def itm_pairs(sim: Tensor, same: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The ITM pairs of a batch (ALBEF/BLIP): every positive, a hard-negative text for each image and a
    hard-negative image for each text, drawn from the ITC similarities.

    Rows whose every other sample has the same text (``same`` true across the row) cannot have a negative
    and are left out; when fewer than two rows remain there are no pairs at all (then :class:`ITMLoss` is 0),
    never a made-up pair.

    Args:
        sim: ``(n, n)`` scaled image-text similarities; the diagonal holds the positives.
        same: ``(n, n)`` bool, True where two samples have identical text (never drawn as negatives).
        generator: Random generator.

    Returns:
        ``(image_index (3m,), text_index (3m,), labels (3m,))`` into the ``n`` rows: ``m`` positives (label 1),
        then ``m`` negative texts and ``m`` negative images (label 0).
    """
    keep = torch.nonzero((~same).any(1)).flatten()
    if len(keep) < 2:
        empty = torch.zeros(0, dtype=torch.long, device=sim.device)
        return empty, empty, empty
    sub, ex = sim[keep][:, keep], same[keep][:, keep]
    pos = torch.arange(len(keep), device=sim.device)
    neg_txt = sample_hard_negatives(sub, pos, generator=generator, exclude=ex)
    neg_img = sample_hard_negatives(sub.t(), pos, generator=generator, exclude=ex.t())
    img = torch.cat([keep, keep, keep[neg_img]])
    txt = torch.cat([keep, keep[neg_txt], keep])
    m = len(keep)
    labels = torch.cat([torch.ones(m), torch.zeros(2 * m)]).long().to(sim.device)
    return img, txt, labels
