"""Shared layers of the three model families: MLPs, fusion (self + cross attention) blocks, attention
pooling, and a prefix-LM decoder.

Shapes are written ``(B, L, d)``: batch, sequence, width. Padding masks are boolean with ``True`` for
real tokens (the Hugging Face convention), converted to PyTorch's "ignore" convention inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``Linear -> GELU -> ... -> Linear`` with optional LayerNorm on the output.

    Args:
        d_in: Input width.
        d_hidden: Hidden width.
        d_out: Output width.
        layers: Number of linear layers (1 = a plain projection).
        out_norm: LayerNorm the output.
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int = 2, out_norm: bool = False) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        if out_norm:
            mods.append(nn.LayerNorm(d_out))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FusionLayer(nn.Module):
    """Pre-norm transformer block: self-attention over the queries, cross-attention to a memory, MLP.

    The building block of the MR-PLIP multimodal encoder, the PathFLIP slide encoder and the PathAlign
    Q-Former (BLIP-2, Li et al. 2023: cross-attention "every other layer" is ``cross=False`` on
    alternate layers).

    Args:
        d: Width.
        heads: Attention heads.
        ff: MLP hidden width.
        cross: Include the cross-attention sub-block.
        dropout: Dropout in attention and MLP.
    """

    def __init__(self, d: int, heads: int, ff: int, cross: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross = cross
        if cross:
            self.norm2 = nn.LayerNorm(d)
            self.norm_mem = nn.LayerNorm(d)
            self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm3 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, d))

    def forward(self, x: Tensor, memory: Tensor | None = None, x_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``(B, Lq, d)`` queries.
            memory: ``(B, Lm, d)`` tokens attended by cross-attention.
            x_mask: ``(B, Lq)`` True for real query tokens.
            memory_mask: ``(B, Lm)`` True for real memory tokens.
            attn_mask: ``(Lq, Lq)`` boolean, True where attention is NOT allowed (e.g. causal).
        """
        h = self.norm1(x)
        kpm = None if x_mask is None else ~x_mask
        x = x + self.self_attn(h, h, h, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)[0]
        if self.cross and memory is not None:
            m = self.norm_mem(memory)
            mkpm = None if memory_mask is None else ~memory_mask
            x = x + self.cross_attn(self.norm2(x), m, m, key_padding_mask=mkpm, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class FusionEncoder(nn.Module):
    """A stack of :class:`FusionLayer` with a final LayerNorm.

    Args:
        d: Width.
        heads: Attention heads.
        layers: Number of blocks.
        ff: MLP hidden width (default ``4 * d``).
        cross_every: Cross-attention in every ``cross_every``-th block (1 = all, 2 = every other, 0 = none).
        dropout: Dropout.
    """

    def __init__(self, d: int, heads: int, layers: int, ff: int | None = None, cross_every: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            FusionLayer(d, heads, ff or 4 * d, cross=cross_every > 0 and i % cross_every == 0, dropout=dropout)
            for i in range(layers)
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, memory: Tensor | None = None, x_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory, x_mask, memory_mask, attn_mask)
        return self.norm(x)


class AttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018) of a bag of tokens into one vector.

    Args:
        d: Token width.
        hidden: Width of the attention network.
    """

    def __init__(self, d: int, hidden: int = 128) -> None:
        super().__init__()
        self.a = nn.Linear(d, hidden)
        self.b = nn.Linear(d, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(pooled (B, d), weights (B, L))`` for ``x (B, L, d)``."""
        logits = self.w(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x))).squeeze(-1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        w = torch.softmax(logits, dim=-1)
        return torch.einsum("bl,bld->bd", w, x), w


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x (B, L, d)`` over positions where ``mask (B, L)`` is True."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def causal_mask(n: int, device: torch.device | None = None) -> Tensor:
    """``(n, n)`` boolean mask, True above the diagonal (a token cannot see later tokens)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def prefix_lm_mask(n_prefix: int, n_text: int, device: torch.device | None = None) -> Tensor:
    """Prefix-LM attention mask (True = blocked) over ``[prefix; text]``.

    The prefix attends to itself bidirectionally and never to the text; text token ``t`` sees the whole
    prefix and text tokens ``<= t`` (Raffel et al. 2020, "prefix LM"; SimVLM, Wang et al. 2022).
    """
    n = n_prefix + n_text
    blocked = torch.zeros(n, n, dtype=torch.bool, device=device)
    blocked[:n_prefix, n_prefix:] = True
    blocked[n_prefix:, n_prefix:] = causal_mask(n_text, device)
    return blocked


class PrefixLMDecoder(nn.Module):
    """A small transformer that generates text after a visual prefix (prefix LM / captioning).

    Args:
        vocab_size: Tokenizer vocabulary size.
        d: Width.
        heads: Attention heads.
        layers: Blocks.
        max_len: Longest text (positions).
        word_embeddings: Optional embedding table to share with a text encoder (BLIP ties them).
    """

    def __init__(self, vocab_size: int, d: int, heads: int, layers: int, max_len: int = 128,
                 word_embeddings: nn.Embedding | None = None) -> None:
        super().__init__()
        self.embed = word_embeddings if word_embeddings is not None else nn.Embedding(vocab_size, d)
        self.in_proj = nn.Identity() if self.embed.embedding_dim == d else nn.Linear(self.embed.embedding_dim, d)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = FusionEncoder(d, heads, layers, cross_every=0)  # self-attention only
        self.head = nn.Linear(d, vocab_size)
        self.max_len = max_len

    def forward(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Args:
            prefix: ``(B, P, d)`` visual prefix tokens.
            input_ids: ``(B, L)`` text tokens (L <= max_len).
            attention_mask: ``(B, L)`` True/1 for real tokens.

        Returns:
            ``(B, L, vocab)`` logits; position ``t`` predicts token ``t + 1`` (shifted in :class:`LMLoss`).
        """
        B, L = input_ids.shape
        P = prefix.shape[1]
        t = self.in_proj(self.embed(input_ids)) + self.pos[:, :L]
        x = torch.cat([prefix, t], dim=1)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([torch.ones(B, P, dtype=torch.bool, device=x.device), attention_mask.bool()], dim=1)
        h = self.blocks(x, x_mask=mask, attn_mask=prefix_lm_mask(P, L, x.device))
        return self.head(h[:, P:])

    @torch.no_grad()
    def generate(self, prefix: Tensor, bos_id: int, eos_id: int, max_new_tokens: int = 40) -> Tensor:
        """Greedy decoding after the prefix; returns ``(B, T)`` token ids starting with ``bos_id``."""
        B = prefix.shape[0]
        ids = torch.full((B, 1), bos_id, dtype=torch.long, device=prefix.device)
        done = torch.zeros(B, dtype=torch.bool, device=prefix.device)
        for _ in range(min(max_new_tokens, self.max_len - 1)):
            nxt = self.forward(prefix, ids)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return ids


def l2norm(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)
