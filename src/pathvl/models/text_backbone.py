"""The trainable text encoder every family starts from, and its tokenizer (one home for all three).

:func:`text_backbone` builds a registry text encoder (``tiny-text``, ``minilm``, ``bert:<dir>``; ``~`` is
expanded) or, with ``name="random"``, a fresh BERT of the given size on MiniLM's vocabulary, and sets how it
trains: ``full`` (every weight), ``lora`` (LoRA adapters only, Hu et al., ICLR 2022) or ``frozen``.
:func:`text_tokenizer` gives the tokenizer without building the encoder (for data loaders).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["RandomTextSpec", "text_backbone", "text_tokenizer"]

TRAIN_MODES = ("full", "lora", "frozen")


@dataclass(frozen=True)
class RandomTextSpec:
    """Size of a fresh (randomly initialised) BERT text encoder."""

    width: int = 768
    layers: int = 6
    heads: int = 12
    max_positions: int = 128


def text_tokenizer(name: str) -> Any:
    """The tokenizer of registry text encoder ``name`` (``random`` and ``tiny-text`` use MiniLM's)."""
    from pathvl.encoders.text import text_tokenizer as registry_tokenizer

    return registry_tokenizer("minilm" if name == "random" else name)


def text_backbone(name: str, train: str = "full", *, random: RandomTextSpec | None = None, lora_rank: int = 8,
                  lora_alpha: float = 16.0, lora_targets: Sequence[str] = ("query", "value")
                  ) -> tuple[nn.Module, Any, int]:
    """``(encoder (a Hugging Face BertModel-like module), tokenizer, width)``.

    Args:
        name: Registry text encoder, or ``random`` (then ``random`` gives the size).
        train: ``full``, ``lora`` or ``frozen``.
        random: Size of a ``random`` encoder.
        lora_rank: LoRA rank (``train="lora"``).
        lora_alpha: LoRA alpha.
        lora_targets: Modules given LoRA adapters.

    Raises:
        ValueError: Unknown ``train`` mode.
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"text training mode must be one of {TRAIN_MODES}, got {train!r}")
    if name == "random":
        from transformers import BertConfig, BertModel

        spec = random or RandomTextSpec()
        tok = text_tokenizer("minilm")
        bc = BertConfig(vocab_size=len(tok), hidden_size=spec.width, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, intermediate_size=4 * spec.width,
                        max_position_embeddings=spec.max_positions, pad_token_id=tok.pad_token_id)
        model, width = BertModel(bc, add_pooling_layer=False), spec.width
    else:
        from pathvl.encoders import build_text

        te = build_text(name)
        model, tok, width = te.model, te.tokenizer, te.width
    model.train()
    if train == "full":
        model.requires_grad_(True)
    elif train == "lora":
        from pathvl.models.lm_bridge import apply_lora, lora_parameters

        model.requires_grad_(False)
        apply_lora(model, list(lora_targets) or None, rank=lora_rank, alpha=lora_alpha)
        for _, p in lora_parameters(model):
            p.requires_grad_(True)
    else:
        model.requires_grad_(False)
    return model, tok, width
