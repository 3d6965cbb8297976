"""Shared layers of the three model families: one attention (SDPA), MLPs, fusion (self + cross
attention) blocks, Fourier position features, masks and a prefix-LM decoder.

Shapes are written ``(B, L, d)``: batch, sequence, width. **One mask convention everywhere: boolean,
True where attention is allowed** (padding masks are True for real tokens, the Hugging Face convention;
:func:`causal_mask` is True on and below the diagonal), which is what
:func:`torch.nn.functional.scaled_dot_product_attention` takes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.errors import UserError


class ModelInputError(UserError, ValueError):
    """Inputs a model cannot take: features of another width, a slide without patches, NaN features."""


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, heads: int, dropout: float = 0.0) -> Tensor:
    """Multi-head scaled dot-product attention of ``q (B, Sq, d)`` over ``k, v (B, Sk, d)``.

    Args:
        q: Queries (already projected).
        k: Keys (already projected).
        v: Values (already projected).
        allowed: ``(B, Sq, Sk)`` or ``(Sq, Sk)`` boolean, True where attention is allowed (None: all).
        heads: Heads; ``d`` must be divisible by it.
        dropout: Attention dropout (pass 0 in eval mode).

    Returns:
        ``(B, Sq, d)``.
    """
    B, Sq, d = q.shape

    def split(x: Tensor) -> Tensor:  # (B, S, d) -> (B, h, S, d/h)
        return x.view(B, x.shape[1], heads, d // heads).transpose(1, 2)

    mask = None
    if allowed is not None:
        mask = allowed[None, None] if allowed.dim() == 2 else allowed[:, None]
    o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, dropout_p=dropout)
    return o.transpose(1, 2).reshape(B, Sq, d)


def key_mask(x_len: int, key_valid: Tensor | None, attn: Tensor | None = None) -> Tensor | None:
    """``(B, Lq, Lk)`` allowed-mask from a key padding mask ``(B, Lk)`` (True = real) and an optional
    ``(Lq, Lk)`` allowed pattern (e.g. :func:`causal_mask`); None when neither is given."""
    if key_valid is None:
        return attn
    m = key_valid.bool()[:, None, :].expand(-1, x_len, -1)
    return m if attn is None else m & attn[None]


class MultiHeadAttention(nn.Module):
    """Multi-head attention on SDPA with separate query/key/value/output projections.

    Initialised like :class:`torch.nn.MultiheadAttention` (Xavier-uniform projections, zero biases).

    Args:
        d: Width.
        heads: Heads.
        dropout: Attention dropout.
    """

    def __init__(self, d: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"width {d} is not divisible by {heads} heads")
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        for lin in (self.q, self.k, self.v):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.out.bias)
        self.heads = heads
        self.dropout = dropout

    def forward(self, x: Tensor, memory: Tensor | None = None, allowed: Tensor | None = None) -> Tensor:
        """``x (B, Lq, d)`` attends to ``memory (B, Lk, d)`` (default: itself); ``allowed`` as in :func:`attend`."""
        m = x if memory is None else memory
        p = self.dropout if self.training else 0.0
        return self.out(attend(self.q(x), self.k(m), self.v(m), allowed, self.heads, p))


def fourier_features(pos: Tensor, octaves: int) -> Tensor:
    """``(..., 2)`` positions in [0, 1] -> ``(..., 4 * octaves)`` sines and cosines at ``2^i * pi``."""
    freqs = (2.0 ** torch.arange(octaves, device=pos.device, dtype=torch.float32)) * math.pi
    x = pos.float()[..., None] * freqs  # (..., 2, F)
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2)


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
        self.self_attn = MultiHeadAttention(d, heads, dropout)
        self.cross = cross
        if cross:
            self.norm2 = nn.LayerNorm(d)
            self.norm_mem = nn.LayerNorm(d)
            self.cross_attn = MultiHeadAttention(d, heads, dropout)
        self.norm3 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, d))

    def forward(self, x: Tensor, memory: Tensor | None = None, x_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``(B, Lq, d)`` queries.
            memory: ``(B, Lm, d)`` tokens attended by cross-attention.
            x_mask: ``(B, Lq)`` True for real query tokens.
            memory_mask: ``(B, Lm)`` True for real memory tokens.
            attn_mask: ``(Lq, Lq)`` boolean, True where attention is allowed (e.g. :func:`causal_mask`).
        """
        Lq = x.shape[1]
        x = x + self.self_attn(self.norm1(x), allowed=key_mask(Lq, x_mask, attn_mask))
        if self.cross and memory is not None:
            x = x + self.cross_attn(self.norm2(x), self.norm_mem(memory), key_mask(Lq, memory_mask))
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


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x (B, L, d)`` over positions where ``mask (B, L)`` is True."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def causal_mask(n: int, device: torch.device | None = None) -> Tensor:
    """``(n, n)`` boolean mask, True on and below the diagonal (a token sees itself and earlier tokens)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def prefix_lm_mask(n_prefix: int, n_text: int, device: torch.device | None = None) -> Tensor:
    """Prefix-LM attention mask (True = allowed) over ``[prefix; text]``.

    The prefix attends to itself bidirectionally and never to the text; text token ``t`` sees the whole
    prefix and text tokens ``<= t`` (Raffel et al. 2020, "prefix LM"; SimVLM, Wang et al. 2022).
    """
    n = n_prefix + n_text
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    allowed[:, :n_prefix] = True
    allowed[n_prefix:, n_prefix:] = causal_mask(n_text, device)
    return allowed


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

    def hidden(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The last hidden states of the text positions, ``(B, L, d)`` (arguments as in :meth:`forward`):
        ``head`` of a row gives its logits, so a loss can project only the rows it scores."""
        B, L = input_ids.shape
        P = prefix.shape[1]
        t = self.in_proj(self.embed(input_ids)) + self.pos[:, :L]
        x = torch.cat([prefix, t], dim=1)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([torch.ones(B, P, dtype=torch.bool, device=x.device), attention_mask.bool()], dim=1)
        h = self.blocks(x, x_mask=mask, attn_mask=prefix_lm_mask(P, L, x.device))
        return h[:, P:]

    def forward(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Args:
            prefix: ``(B, P, d)`` visual prefix tokens.
            input_ids: ``(B, L)`` text tokens (L <= max_len).
            attention_mask: ``(B, L)`` True/1 for real tokens.

        Returns:
            ``(B, L, vocab)`` logits; position ``t`` predicts token ``t + 1`` (shifted in :class:`LMLoss`).
        """
        return self.head(self.hidden(prefix, input_ids, attention_mask))

    @torch.no_grad()
    def generate(self, prefix: Tensor, bos_id: int, eos_id: int, max_new_tokens: int = 40,
                 num_beams: int = 1) -> list[list[int]]:
        """Decoding after the prefix with :func:`~pathvl.models.decoding.beam_search` (``num_beams=1``:
        greedy); returns the generated token ids of each row, without ``bos_id`` and ``eos_id``."""
        from pathvl.models.decoding import beam_search

        def step(seqs: Tensor, src: Tensor) -> Tensor:
            ids = torch.cat([torch.full((len(seqs), 1), bos_id, dtype=torch.long, device=seqs.device), seqs], 1)
            return self.forward(prefix[src], ids)[:, -1]

        return beam_search(step, prefix.shape[0], eos_id, num_beams, min(max_new_tokens, self.max_len - 1),
                           device=prefix.device)
