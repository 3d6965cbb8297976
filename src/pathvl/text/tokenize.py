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
    tokenizer: Any,
    *,
    probability: float = 0.15,
    special_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking for masked language modelling (Devlin et al., NAACL 2019).

    Each non-special token is selected with ``probability``; a selected token becomes [MASK] 80% of
    the time, a random token 10%, and stays unchanged 10%.

    Args:
        input_ids: (B, L) token ids (not modified).
        tokenizer: Supplies ``mask_token_id`` and the vocabulary size.
        probability: Selection probability per token.
        special_mask: (B, L) bool of tokens never selected; computed from the tokenizer if None.
        generator: Random generator on the ids' device, for reproducible masks.

    Returns:
        ``(masked_ids, labels)``: labels hold the original id at selected positions and
        ``IGNORE_INDEX`` elsewhere.
    """
    if tokenizer.mask_token_id is None:
        raise ValueError("this tokenizer has no [MASK] token; it cannot be used for masked LM")
    if special_mask is None:
        special_mask = special_tokens_mask(input_ids, tokenizer)
    dev = input_ids.device

    def rand() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=dev)

    selected = (rand() < probability) & ~special_mask
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    masked = input_ids.clone()
    to_mask = selected & (rand() < 0.8)
    masked[to_mask] = tokenizer.mask_token_id
    to_random = selected & ~to_mask & (rand() < 0.5)
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator, device=dev)
    masked[to_random] = random_ids[to_random].to(masked.dtype)
    return masked, labels
