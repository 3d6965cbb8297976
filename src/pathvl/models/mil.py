"""Slide-level multiple-instance learning networks: a bag of patch features in, slide logits out.

A slide is a bag of ``N`` patch feature vectors ``(B, N, D)`` with an optional boolean mask ``(B, N)``
(True = a real patch; bags of different sizes are padded). Every network's ``forward`` returns a dict:

- ``logits`` ``(B, C)``: class logits, or ``(B, 1)`` predicted values for a regression target;
- ``attention`` ``(B, N)``: the weight of each patch in the slide representation (sums to 1 over the
  real patches; uniform for mean pooling), which is what attention heatmaps draw;
- ``slide_embedding`` ``(B, H)``: the pooled representation before the classifier;
- ``instance_loss`` (scalar, CLAM-SB only, when ``label`` is given): the clustering loss on the most and
  least attended patches.

Networks only: no file I/O, no training loop (that lives in :mod:`pathvl.eval.mil`). Every architecture
is registered by name in :data:`MIL_MODELS` and built with :func:`build_mil_model`; ``hidden`` and
``attn_dim`` make the tiny twins tests use.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ABMIL",
    "CLAMSB",
    "MIL_MODELS",
    "GatedAttention",
    "LinearHead",
    "MeanPool",
    "build_mil_model",
    "masked_softmax",
]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis with masked-out entries at exactly 0.

    Args:
        scores: ``(B, N)`` attention logits.
        mask: ``(B, N)`` bool, True for real patches, or None (all real).
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row gives zeros, not NaN


def _embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


class GatedAttention(nn.Module):
    """Gated attention pooling scores (Ilse, Tomczak and Welling, ICML 2018, eq. 9).

    ``a_k = w^T (tanh(V h_k) * sigmoid(U h_k))`` for each patch embedding ``h_k``; the softmax over the
    patches of a bag (:func:`masked_softmax`) turns these logits into pooling weights. The sigmoid gate
    lets the score be non-linear in ``h_k`` beyond what tanh alone can express.

    Args:
        dim: Width of the patch embeddings ``h_k``.
        attn_dim: Width ``L`` of ``V`` and ``U``.
        branches: Number of attention heads (one score per head).
        dropout: Dropout on the gated hidden layer.
    """

    def __init__(self, dim: int, attn_dim: int = 128, branches: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, branches)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` ``(B, N, dim)`` -> attention logits ``(B, N, branches)``."""
        return self.w(self.drop(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))))


class ABMIL(nn.Module):
    """Attention-based deep MIL with gated attention (Ilse, Tomczak and Welling, ICML 2018).

    ``h_k = ReLU(W x_k)``, ``a = softmax_k(gated_attention(h))``, ``z = sum_k a_k h_k``, ``logits = C z``:
    the slide is the attention-weighted mean of its patch embeddings, so the attention weights say which
    patches made the prediction.

    Args:
        in_dim: Width ``D`` of the patch features.
        n_outputs: Number of classes (1 for a regression target).
        hidden: Width of the patch embeddings.
        attn_dim: Width of the gated attention layer.
        dropout: Dropout after the patch embedding and in the attention layer.
    """

    def __init__(self, in_dim: int, n_outputs: int, hidden: int = 256, attn_dim: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, 1, dropout)
        self.classifier = nn.Linear(hidden, n_outputs)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, label: Any = None
                ) -> dict[str, torch.Tensor]:
        """``features`` ``(B, N, D)``, ``mask`` ``(B, N)`` bool or None; ``label`` is ignored."""
        h = self.embed(features)  # (B, N, H)
        a = masked_softmax(self.attention(h).squeeze(-1), mask)  # (B, N)
        z = torch.einsum("bn,bnh->bh", a, h)  # (B, H)
        return {"logits": self.classifier(z), "attention": a, "slide_embedding": z}


class MeanPool(nn.Module):
    """Mean-pooling baseline: the slide is the plain mean of its embedded patches.

    The same patch embedding and classifier as :class:`ABMIL` with every attention weight equal to
    ``1 / N``: the usual baseline against which attention MIL is measured (Ilse et al., ICML 2018).

    Args:
        in_dim: Width ``D`` of the patch features.
        n_outputs: Number of classes (1 for a regression target).
        hidden: Width of the patch embeddings.
        dropout: Dropout after the patch embedding.
    """

    def __init__(self, in_dim: int, n_outputs: int, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_outputs)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, label: Any = None
                ) -> dict[str, torch.Tensor]:
        """``features`` ``(B, N, D)``, ``mask`` ``(B, N)`` bool or None; ``label`` is ignored."""
        h = self.embed(features)  # (B, N, H)
        m = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask
        a = m.to(h.dtype) / m.sum(dim=1, keepdim=True).clamp_min(1).to(h.dtype)  # (B, N) uniform
        z = torch.einsum("bn,bnh->bh", a, h)
        return {"logits": self.classifier(z), "attention": a, "slide_embedding": z}


class CLAMSB(nn.Module):
    """CLAM, single attention branch (Lu et al., Nature Biomedical Engineering 2021).

    Gated attention pooling as :class:`ABMIL` for the slide prediction, plus one instance classifier per
    class trained on pseudo-labels from the attention ("instance-level clustering"): for the slide's
    true class, the ``k`` most attended patches are positives and the ``k`` least attended negatives; in
    subtyping mode (mutually exclusive classes) the ``k`` most attended patches are also negatives for
    every other class. The training loss is ``bag_weight * CE(logits, y) + (1 - bag_weight) *
    instance_loss`` (CLAM's default ``bag_weight`` is 0.7; the loop in :mod:`pathvl.eval.mil` applies
    it). The instance loss here is cross-entropy (CLAM's default is a smooth top-1 SVM; CE is its
    documented alternative).

    Args:
        in_dim: Width ``D`` of the patch features.
        n_outputs: Number of classes (at least 2).
        hidden: Width of the patch embeddings (CLAM: 512).
        attn_dim: Width of the gated attention layer (CLAM: 256).
        dropout: Dropout after the patch embedding and in the attention layer.
        k_sample: Patches taken from each end of the attention ranking (CLAM: 8); fewer when a bag has
            under ``2 * k_sample`` patches.
        subtyping: Also train the out-of-class instance classifiers (mutually exclusive subtypes).
    """

    def __init__(self, in_dim: int, n_outputs: int, hidden: int = 512, attn_dim: int = 256, dropout: float = 0.25,
                 k_sample: int = 8, subtyping: bool = True) -> None:
        super().__init__()
        if n_outputs < 2:
            raise ValueError(f"CLAM-SB classifies slides: it needs at least 2 classes, got n_outputs={n_outputs}")
        self.embed = _embed(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, 1, dropout)
        self.classifier = nn.Linear(hidden, n_outputs)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_outputs))
        self.k_sample = int(k_sample)
        self.subtyping = bool(subtyping)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, label: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``features`` ``(B, N, D)``, ``mask`` ``(B, N)``; ``label`` ``(B,)`` class indices adds
        ``instance_loss`` to the output."""
        h = self.embed(features)  # (B, N, H)
        logit_a = self.attention(h).squeeze(-1)  # (B, N)
        a = masked_softmax(logit_a, mask)
        z = torch.einsum("bn,bnh->bh", a, h)
        out = {"logits": self.classifier(z), "attention": a, "slide_embedding": z}
        if label is not None:
            out["instance_loss"] = self.instance_loss(h, logit_a, mask, label)
        return out

    def instance_loss(self, h: torch.Tensor, logit_a: torch.Tensor, mask: torch.Tensor | None,
                      label: torch.Tensor) -> torch.Tensor:
        """Mean over the bags of the summed instance losses, divided by the number of classes (CLAM)."""
        losses = []
        n_cls = len(self.instance_classifiers)
        for b in range(h.shape[0]):
            keep = slice(None) if mask is None else mask[b]
            hb, sb = h[b][keep], logit_a[b][keep]  # (n, H), (n,)
            k = min(self.k_sample, len(sb) // 2)
            if k < 1:
                continue
            order = torch.argsort(sb, descending=True)
            top, bottom = hb[order[:k]], hb[order[-k:]]
            y = int(label[b])
            total = h.new_zeros(())
            for c, clf in enumerate(self.instance_classifiers):
                if c == y:  # in-class: top-k are class evidence, bottom-k are not
                    x = torch.cat([top, bottom])
                    t = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                elif self.subtyping:  # out-of-class: what this bag attends most is not class c
                    x, t = top, torch.zeros(k, dtype=torch.long, device=h.device)
                else:
                    continue
                total = total + F.cross_entropy(clf(x), t)
            losses.append(total / n_cls)
        return torch.stack(losses).mean() if losses else h.new_zeros(())


class LinearHead(nn.Module):
    """A linear classifier (or regressor) on precomputed slide embeddings, the linear-probe protocol on
    slide representations (as in CLIP's linear probes, Radford et al., ICML 2021, applied to slides).

    Inputs are standardised with the ``mean`` and ``std`` buffers (set from the training fold and saved
    with the weights).

    Args:
        in_dim: Width of the slide embeddings.
        n_outputs: Number of classes (1 for a regression target).
        dropout: Dropout on the standardised input.
    """

    def __init__(self, in_dim: int, n_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, n_outputs)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, label: Any = None
                ) -> dict[str, torch.Tensor]:
        """``features`` ``(B, D)`` slide embeddings."""
        x = (features - self.mean) / self.std
        return {"logits": self.linear(self.drop(x)), "slide_embedding": x}


#: Registered networks by name; each takes ``(in_dim, n_outputs, **kwargs)``.
MIL_MODELS: dict[str, type[nn.Module]] = {"abmil": ABMIL, "mean": MeanPool, "clam-sb": CLAMSB, "linear": LinearHead}

#: What :func:`build_mil_model` passes to each network unless told otherwise (the papers' widths).
MIL_DEFAULTS: dict[str, dict[str, Any]] = {
    "abmil": {"hidden": 256, "attn_dim": 128, "dropout": 0.25},
    "mean": {"hidden": 256, "dropout": 0.25},
    "clam-sb": {"hidden": 512, "attn_dim": 256, "dropout": 0.25, "k_sample": 8, "subtyping": True},
    "linear": {"dropout": 0.0},
}


def build_mil_model(name: str, in_dim: int, n_outputs: int, **kwargs: Any) -> nn.Module:
    """Build a registered network.

    Args:
        name: One of :data:`MIL_MODELS` (``abmil``, ``mean``, ``clam-sb``, ``linear``).
        in_dim: Width of the input features.
        n_outputs: Number of classes, or 1 for regression.
        **kwargs: Overrides of :data:`MIL_DEFAULTS` (``hidden``, ``attn_dim``, ``dropout``, ...); keys the
            network does not take are an error.

    Raises:
        ValueError: Unknown name or argument.
    """
    if name not in MIL_MODELS:
        raise ValueError(f"unknown MIL model {name!r}; choose one of {', '.join(MIL_MODELS)}")
    args = {**MIL_DEFAULTS[name], **{k: v for k, v in kwargs.items() if v is not None}}
    allowed = set(MIL_DEFAULTS[name])
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"MIL model {name!r} takes {sorted(allowed)}, not {unknown}")
    return MIL_MODELS[name](in_dim, n_outputs, **args)
