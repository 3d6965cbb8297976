"""LoRA adapters through peft, for any module: the causal LM of the LM bridge
(:class:`pathvl.models.lm_bridge.LMBridge`, stage 2) and PathFLIP's text encoder.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (:func:`apply_lora`); the
target layers are guessed from the architecture (:func:`default_lora_targets`) unless named.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

__all__ = ["apply_lora", "default_lora_targets", "has_lora", "lora_parameters"]

_TARGET_SETS = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("qkv_proj",), ("Wqkv",), ("query_key_value",))


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """LoRA targets for common architectures: Llama/Mistral/Qwen/Gemma ``q_proj, v_proj``; BERT
    ``query, value``; GPT-2 ``c_attn``; Phi-3 ``qkv_proj``; MPT ``Wqkv``; Falcon/NeoX ``query_key_value``.

    Raises:
        ValueError: None of these names exist; the message lists the model's linear layers.
    """
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for targets in _TARGET_SETS:
        if all(t in names for t in targets):
            return targets
    raise ValueError(f"cannot guess LoRA targets; linear layers are named {sorted(_linear_names(model))}; "
                     "pass lora_targets=")


def _is_conv1d(m: nn.Module) -> bool:  # transformers.pytorch_utils.Conv1D (GPT-2): weight stored (in, out)
    return hasattr(m, "nf") and hasattr(m, "weight")


def _linear_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}


def has_lora(model: nn.Module) -> bool:
    """True when ``model`` already holds peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def apply_lora(model: nn.Module, targets: Sequence[str] | None = None, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> list[str]:
    r"""Adds LoRA adapters to the linear layers named by ``targets``, in place, through the peft library.

    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022: a frozen map becomes
    :math:`h = W x + \frac{\alpha}{r} B A x` with ``A`` Kaiming-uniform and ``B`` zero (so the output is
    unchanged at first). ``peft.inject_adapter_in_model`` replaces each target by a ``peft`` LoRA layer
    (the base weight moves to ``<name>.base_layer.weight``, the factors are
    ``<name>.lora_A.default.weight`` / ``lora_B``); the model keeps its own class (no ``PeftModel``
    wrapper), so ``inputs_embeds``, ``logits_to_keep`` and the KV cache work as before. Every parameter of
    ``model`` but the LoRA factors is frozen; GPT-2's ``Conv1D`` layers are handled (``fan_in_fan_out``).

    Args:
        model: Any module (a Hugging Face causal LM, a BERT text encoder).
        targets: Last name components (``q_proj``) or dotted suffixes; default :func:`default_lora_targets`.
        rank: LoRA rank :math:`r`.
        alpha: LoRA :math:`\alpha`.
        dropout: Dropout on the input of the low-rank branch.

    Returns:
        The names of the adapted modules; ``[]`` when ``model`` already has LoRA layers (idempotent).

    Raises:
        ValueError: Nothing matched ``targets``, or ``rank < 1``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if has_lora(model):
        return []
    targets = tuple(targets) if targets else default_lora_targets(model)
    matched = [(name, m) for name, m in model.named_modules()
               if any(name == t or name.endswith("." + t) for t in targets)
               and (isinstance(m, nn.Linear) or _is_conv1d(m))]
    if not matched:
        raise ValueError(f"LoRA targets {targets} matched no linear layer; linear layers are named "
                         f"{sorted(_linear_names(model))}")
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), bias="none",
                     target_modules=[n for n, _ in matched], fan_in_fan_out=any(_is_conv1d(m) for _, m in matched))
    inject_adapter_in_model(cfg, model)
    return [n for n, _ in matched]


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every LoRA ``A`` and ``B`` matrix in ``model``."""
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            yield name, p
