"""Thin helpers around a Hugging Face tokenizer: padded batches, special-token masks, MLM masking.

Tokenisation happens outside a model's ``forward`` (DESIGN.md); models receive the dict returned
here (``input_ids``, ``attention_mask`` and optionally ``special_tokens_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100  # label value ignored by torch.nn.functional.cross_entropy


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    pad_to_max_length: bool = False,
    return_special_tokens_mask: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenise a batch of texts into padded, truncated tensors.

    Args:
        tokenizer: A Hugging Face tokenizer (fast or slow).
        texts: The texts; ``None`` entries are treated as empty strings.
        max_length: Truncate to this many tokens, special tokens included.
        pad_to_max_length: Pad to ``max_length`` instead of to the longest text of the batch.
        return_special_tokens_mask: Add ``special_tokens_mask`` (bool, True at [CLS], [SEP], [PAD]...).

    Returns:
        ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64, and optionally
        ``special_tokens_mask`` (B, L) bool.
    """
    batch = tokenizer(
        [t if t is not None else "" for t in texts],
        padding="max_length" if pad_to_max_length else "longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    out = {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}
    if return_special_tokens_mask:
        out["special_tokens_mask"] = special_tokens_mask(out["input_ids"], tokenizer)
    return out


def special_tokens_mask(input_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Boolean mask of special tokens ([CLS], [SEP], [PAD], [MASK], [UNK] excluded).

    Args:
        input_ids: (B, L) token ids.
        tokenizer: The tokenizer that produced them.

    Returns:
        (B, L) bool, True where the token must never be masked or predicted.
    """
    special = set(tokenizer.all_special_ids)
    if tokenizer.unk_token_id is not None:
        special.discard(tokenizer.unk_token_id)
    ids = torch.tensor(sorted(special), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, ids)


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: picks tokens with probability ``prob`` and corrupts them 80 / 10 / 10.

    Devlin et al., "BERT", NAACL 2019. Each non-special token is selected independently with probability
    ``prob``; a selected token is replaced by ``mask_token_id`` with probability 0.8, by a token drawn
    uniformly from ``[0, vocab_size)`` with probability 0.1, and kept with probability 0.1. Special
    tokens (CLS, SEP, padding, ...) are never selected. The input is not modified.

    Args:
        input_ids: ``(B, L)`` long token ids.
        special_mask: ``(B, L)`` bool, True where a token must not be masked (include padding).
        vocab_size: Size of the vocabulary for the random replacements.
        mask_token_id: Id of the ``[MASK]`` token.
        prob: Selection probability.
        generator: Optional random generator (on ``input_ids``' device).

    Returns:
        ``(masked_ids, labels)``: the corrupted ids, and labels holding the original id at selected
        positions and -100 elsewhere (feed them to :class:`MLMLoss`).
    """
    if input_ids.shape != special_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and special_mask {tuple(special_mask.shape)} disagree"
        )
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    device = input_ids.device

    def _rand(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device)

    selected = (_rand(input_ids.shape) < prob) & ~special_mask.bool()
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    corrupt = _rand(input_ids.shape)
    to_mask = selected & (corrupt < 0.8)
    to_random = selected & (corrupt >= 0.8) & (corrupt < 0.9)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=device)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids[to_random].to(masked.dtype)
    return masked, labels


def mask_with_tokenizer(
    input_ids: torch.Tensor,
    tokenizer: Any,
    *,
    probability: float = 0.15,
    special_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mask_tokens` with the [MASK] id, vocabulary and special tokens taken from ``tokenizer``.

    Raises:
        ValueError: The tokenizer has no [MASK] token.
    """
    if tokenizer.mask_token_id is None:
        raise ValueError("this tokenizer has no [MASK] token; it cannot be used for masked LM")
    if special_mask is None:
        special_mask = special_tokens_mask(input_ids, tokenizer)
    return mask_tokens(input_ids, special_mask, len(tokenizer), tokenizer.mask_token_id, probability, generator)
