"""The Querying Transformer of BLIP-2 (Li et al., ICML 2023) over a slide's patch features, as PathAlign
(Ahmed et al. 2024) uses it.

The Q-Former is a BERT whose layers are shared by two streams: ``num_queries`` learned query tokens and the
report's tokens. Both streams use the same self-attention layers (so queries and text can attend to each
other when the mask allows); only the queries cross-attend to the slide's patch tokens, in every
``cross_every``-th layer (BLIP-2: every other layer), and each stream has its own feed-forward block (the
query one starts as a copy of the text one). It is initialised from a registry text encoder; the
cross-attention layers are new. Attention runs on SDPA with boolean masks, True where attention is allowed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.models.layers import attend, causal_mask, fourier_features


def multimodal_causal_mask(n_query: int, text_mask: Tensor) -> Tensor:
    """BLIP-2's ITG mask over ``[queries; text]``, True where attention is allowed.

    Queries see all queries and no text; text token ``t`` sees every query and the real text tokens
    ``<= t`` (never a later token).

    Args:
        n_query: Number of query tokens ``Q``.
        text_mask: ``(B, L)`` True/1 for real text tokens.

    Returns:
        ``(B, Q + L, Q + L)`` bool.
    """
    B, L = text_mask.shape
    S = n_query + L
    allowed = torch.zeros(B, S, S, dtype=torch.bool, device=text_mask.device)
    allowed[:, :, :n_query] = True
    lower = causal_mask(L, text_mask.device)  # (L, L) True on and below the diagonal
    allowed[:, n_query:, n_query:] = lower[None] & text_mask.bool()[:, None, :]
    return allowed


class _FFN(nn.Module):
    """BERT's post-norm feed-forward sub-block: ``LN(x + drop(W2 act(W1 x)))``."""

    def __init__(self, fc1: nn.Linear, act: Any, fc2: nn.Linear, norm: nn.LayerNorm, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = fc1, fc2, norm
        self.act = act if isinstance(act, nn.Module) else _Fn(act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.fc2(self.act(self.fc1(x)))))


class _Fn(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class _CrossAttention(nn.Module):
    """BERT-style (post-norm) cross-attention of the queries to the patch tokens (new in the Q-Former)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.heads = heads
        self.p = dropout

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None) -> Tensor:
        allowed = None
        if memory_mask is not None:
            allowed = memory_mask.bool()[:, None, :].expand(-1, x.shape[1], -1)
        a = attend(self.q(x), self.k(memory), self.v(memory), allowed, self.heads, self.p if self.training else 0.0)
        return self.norm(x + self.drop(self.out(a)))

    def weights(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None) -> Tensor:
        """Attention weights ``(B, Lq, Lm)`` of the queries over the memory, averaged over heads (what
        :meth:`forward` computes inside SDPA, written out for heatmaps)."""
        B, Lq, d = x.shape
        h = self.heads
        q = self.q(x).view(B, Lq, h, d // h).transpose(1, 2)
        k = self.k(memory).view(B, memory.shape[1], h, d // h).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)  # (B, h, Lq, Lm)
        if memory_mask is not None:
            logits = logits.masked_fill(~memory_mask.bool()[:, None, None, :], float("-inf"))
        return torch.softmax(logits.float(), dim=-1).mean(1)


class QFormerLayer(nn.Module):
    """One Q-Former layer built around a pretrained BERT layer (BLIP-2, Li et al. 2023).

    The BERT layer's self-attention is shared by queries and text, its feed-forward block serves the text,
    a copy of it serves the queries, and (when ``cross``) a new cross-attention lets the queries read the
    patch tokens. The input is ``[queries (n_query); text]``; either part may be empty.

    Args:
        bert_layer: A ``BertLayer`` (or one with the same sub-module names).
        heads: Attention heads.
        cross: Add the cross-attention sub-block.
        dropout: Dropout.
    """

    def __init__(self, bert_layer: nn.Module, heads: int, cross: bool, dropout: float) -> None:
        super().__init__()
        sa = bert_layer.attention.self
        self.q_proj, self.k_proj, self.v_proj = sa.query, sa.key, sa.value
        self.attn_out = bert_layer.attention.output.dense
        self.attn_norm = bert_layer.attention.output.LayerNorm
        self.text_ffn = _FFN(bert_layer.intermediate.dense, bert_layer.intermediate.intermediate_act_fn,
                             bert_layer.output.dense, bert_layer.output.LayerNorm, dropout)
        self.query_ffn = copy.deepcopy(self.text_ffn)  # BLIP-2 initialises it from the text FFN
        d = self.q_proj.in_features
        self.cross = _CrossAttention(d, heads, dropout) if cross else None
        self.drop = nn.Dropout(dropout)
        self.heads = heads
        self.p = dropout

    def forward(self, x: Tensor, n_query: int, allowed: Tensor | None, image: Tensor | None = None,
                image_mask: Tensor | None = None, past: tuple[Tensor, Tensor] | None = None,
                maps: list[Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Args:
            x: ``(B, S, d)``: ``n_query`` query tokens then text tokens.
            n_query: Query tokens at the start of ``x``.
            allowed: ``(B, S, P + S)`` True where attention is allowed (None: everything), ``P`` the length
                of ``past``.
            image: ``(B, N, d)`` patch tokens (for the cross-attention of the queries).
            image_mask: ``(B, N)`` True for real patches.
            past: Cached ``(keys, values)`` ``(B, P, d)`` placed before this call's own (ITG's query cache).
            maps: When a list, the cross-attention weights ``(B, Q, N)`` of this layer are appended to it.

        Returns:
            ``(out (B, S, d), (keys, values) of x)``.
        """
        k, v = self.k_proj(x), self.v_proj(x)
        kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        a = attend(self.q_proj(x), k, v, allowed, self.heads, self.p if self.training else 0.0)
        h = self.attn_norm(x + self.drop(self.attn_out(a)))
        hq, ht = h[:, :n_query], h[:, n_query:]
        parts = []
        if n_query:
            if self.cross is not None:
                if image is None:
                    raise ValueError("the queries need the patch tokens (image) in a cross-attention layer")
                if maps is not None:
                    maps.append(self.cross.weights(hq, image, image_mask))
                hq = self.cross(hq, image, image_mask)
            parts.append(self.query_ffn(hq))
        if ht.shape[1]:
            parts.append(self.text_ffn(ht))
        return torch.cat(parts, dim=1), kv


def check_bert_layout(model: nn.Module, name: str) -> None:
    try:
        emb = model.embeddings
        _ = emb.word_embeddings, emb.position_embeddings, emb.LayerNorm
        for layer in model.encoder.layer:
            _ = layer.attention.self.query, layer.attention.self.key, layer.attention.self.value
            _ = layer.attention.output.dense, layer.attention.output.LayerNorm
            _ = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
            _ = layer.output.dense, layer.output.LayerNorm
    except AttributeError as e:
        raise ValueError(
            f"text encoder {name!r} ({type(model).__name__}) does not have BERT's layer layout ({e}); the Q-Former "
            "is initialised from BERT-layout encoders: tiny-text, minilm, or bert:<dir> of a BERT/RoBERTa model"
        ) from None
    pet = getattr(model.config, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise ValueError(f"text encoder {name!r} uses {pet!r} position embeddings; the Q-Former needs absolute ones")


class QFormer(nn.Module):
    """The Querying Transformer of BLIP-2 (Li et al., ICML 2023) over a slide's patch features, as PathAlign
    (Ahmed et al. 2024) uses it; see the module docstring.

    Args:
        bert: A BERT-layout ``transformers`` encoder (its embeddings and layers are taken over).
        feature_dim: Width of the patch features.
        num_queries: Learned queries.
        cross_every: Cross-attention in layers ``0, cross_every, 2 * cross_every, ...``.
        dropout: Dropout.
        pos_frequencies: Octaves of Fourier position features of the patches (0: none).
    """

    def __init__(self, bert: nn.Module, feature_dim: int, num_queries: int = 32, cross_every: int = 2,
                 dropout: float = 0.1, pos_frequencies: int = 0) -> None:
        super().__init__()
        check_bert_layout(bert, type(bert).__name__)
        d = int(bert.config.hidden_size)
        heads = int(bert.config.num_attention_heads)
        emb = bert.embeddings
        self.width = d
        self.word_embeddings = emb.word_embeddings
        self.position_embeddings = emb.position_embeddings
        self.token_type_embeddings = getattr(emb, "token_type_embeddings", None)
        self.emb_norm = emb.LayerNorm
        pad = getattr(emb, "padding_idx", None)  # RoBERTa counts positions from padding_idx + 1
        self.pos_offset = int(pad) + 1 if isinstance(pad, int) else 0
        self.max_positions = self.position_embeddings.num_embeddings - self.pos_offset
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(layer, heads, cross=(i % cross_every == 0), dropout=dropout)
            for i, layer in enumerate(bert.encoder.layer)
        )
        self.num_queries = num_queries
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, d) * 0.02)
        self.dec_embed = nn.Parameter(emb.word_embeddings.weight.detach().mean(0).clone())  # the [DEC] token
        self.patch_in = nn.Sequential(nn.Linear(feature_dim, d), nn.GELU(), nn.Linear(d, d))
        self.pos = nn.Linear(4 * pos_frequencies, d) if pos_frequencies else None
        if self.pos is not None:  # start position-blind
            nn.init.zeros_(self.pos.weight)
            nn.init.zeros_(self.pos.bias)
        self.pos_frequencies = pos_frequencies
        self.patch_norm = nn.LayerNorm(d)

    # ---------------------------------------------------------------- embeddings
    def image_tokens(self, features: Tensor, pos: Tensor | None = None) -> Tensor:
        """``(B, N, Dv)`` patch features -> ``(B, N, d)`` tokens the queries cross-attend to."""
        p = self.patch_in(features.float())
        if self.pos is not None:
            c = pos if pos is not None else features.new_zeros(*features.shape[:2], 2)
            p = p + self.pos(fourier_features(c, self.pos_frequencies))
        return self.patch_norm(p)

    def embed_queries(self, batch: int) -> Tensor:
        """``(B, Q, d)`` query embeddings (LayerNorm and dropout of the BERT embeddings, as in LAVIS)."""
        return self.drop(self.emb_norm(self.query_tokens.expand(batch, -1, -1)))

    def embed_text(self, ids: Tensor, dec: bool = False) -> Tensor:
        """``(B, L)`` token ids -> ``(B, L, d)``; with ``dec`` the first token is the learned [DEC] token."""
        B, n_tok = ids.shape
        if n_tok > self.max_positions:
            raise ValueError(f"{n_tok} text tokens but the text encoder has {self.max_positions} positions")
        w = self.word_embeddings(ids)
        if dec:
            w = torch.cat([self.dec_embed.to(w.dtype).expand(B, 1, -1), w[:, 1:]], dim=1)
        pos = torch.arange(self.pos_offset, self.pos_offset + n_tok, device=ids.device)
        e = w + self.position_embeddings(pos)[None]
        if self.token_type_embeddings is not None:
            e = e + self.token_type_embeddings.weight[0]
        return self.drop(self.emb_norm(e))

    # ---------------------------------------------------------------- streams
    def encode_queries(self, image: Tensor, image_mask: Tensor | None, maps: list[Tensor] | None = None
                       ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Queries alone (no text): ``(query states (B, Q, d), per-layer (keys, values) of the queries)``;
        ``maps`` (a list) receives each cross-attention layer's weights ``(B, Q, N)``."""
        x = self.embed_queries(image.shape[0])
        cache = []
        for layer in self.layers:
            x, kv = layer(x, self.num_queries, None, image, image_mask, maps=maps)
            cache.append(kv)
        return x, cache

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Text alone, bidirectional (ITC): ``(B, L, d)``."""
        x = self.embed_text(ids)
        allowed = mask.bool()[:, None, :].expand(-1, ids.shape[1], -1)
        for layer in self.layers:
            x, _ = layer(x, 0, allowed)
        return x

    def encode_joint(self, image: Tensor, image_mask: Tensor | None, ids: Tensor, mask: Tensor) -> Tensor:
        """Queries and text attending to each other (ITM): the query states ``(B, Q, d)``."""
        B, Q = ids.shape[0], self.num_queries
        x = torch.cat([self.embed_queries(B), self.embed_text(ids)], dim=1)
        valid = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=ids.device), mask.bool()], dim=1)
        allowed = valid[:, None, :].expand(-1, x.shape[1], -1)
        for layer in self.layers:
            x, _ = layer(x, Q, allowed, image, image_mask)
        return x[:, :Q]

    def decode_text(self, ids: Tensor, mask: Tensor, cache: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Text under the multimodal causal mask, reading the queries' cached keys/values (ITG): ``(B, L, d)``.

        Equal to the text part of :meth:`decode_joint` (the queries never see the text, so their states do
        not depend on it), without recomputing the queries.
        """
        x = self.embed_text(ids, dec=True)
        allowed = multimodal_causal_mask(self.num_queries, mask)[:, self.num_queries:]  # (B, L, Q + L)
        for layer, past in zip(self.layers, cache):
            x, _ = layer(x, 0, allowed, past=past)
        return x

    def decode_joint(self, image: Tensor, image_mask: Tensor | None, ids: Tensor, mask: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """Reference ITG pass over ``[queries; text]`` with :func:`multimodal_causal_mask` (no cache)."""
        B, Q = ids.shape[0], self.num_queries
        x = torch.cat([self.embed_queries(B), self.embed_text(ids, dec=True)], dim=1)
        allowed = multimodal_causal_mask(Q, mask)
        for layer in self.layers:
            x, _ = layer(x, Q, allowed, image, image_mask)
        return x[:, :Q], x[:, Q:]

    def query_parameters(self) -> list[nn.Parameter]:
        """Parameters on the path from the patches to the query outputs (what stage 2 can train)."""
        params = [self.query_tokens, *self.emb_norm.parameters(), *self.patch_in.parameters(),
                  *self.patch_norm.parameters()]
        if self.pos is not None:
            params += list(self.pos.parameters())
        for layer in self.layers:
            for m in (layer.q_proj, layer.k_proj, layer.v_proj, layer.attn_out, layer.attn_norm, layer.query_ffn,
                      layer.cross):
                if m is not None:
                    params += list(m.parameters())
        return params


def query_text_similarity(query_emb: Tensor, text_emb: Tensor, chunk: int | None = None) -> Tensor:
    r"""Slide-text similarity of BLIP-2's ITC: the best query, :math:`S_{ij} = \max_q \langle z_{iq}, t_j\rangle`.

    Args:
        query_emb: ``(S, Q, E)`` query embeddings (normalise them first for cosine similarity).
        text_emb: ``(T, E)`` text embeddings.
        chunk: Slides per block (memory ``chunk * T * Q``; default: blocks of about 16M similarities).

    Returns:
        ``(S, T)``.
    """
    if query_emb.dim() != 3 or text_emb.dim() != 2:
        raise ValueError(f"expected query_emb (S, Q, E) and text_emb (T, E), got {tuple(query_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    if chunk is None:
        chunk = max(1, (1 << 24) // max(1, text_emb.shape[0] * query_emb.shape[1]))
    rows = [torch.einsum("sqe,te->stq", query_emb[i : i + chunk], text_emb).amax(-1)
            for i in range(0, query_emb.shape[0], chunk)]
    return torch.cat(rows) if rows else query_emb.new_zeros(0, text_emb.shape[0])


class _LMHead(nn.Module):
    """BERT's LM head (dense, GELU, LayerNorm) with the decoder tied to the word embeddings."""

    def __init__(self, embeddings: nn.Embedding) -> None:
        super().__init__()
        d = embeddings.embedding_dim
        self.transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=1e-12))
        self.embeddings = embeddings  # shared (tied) with the Q-Former's word embeddings
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(self.transform(h), self.embeddings.weight, self.bias)
