"""Fine-tuning networks: a classifier over a tile model's image side, and LoRA adapters on a ViT encoder.

:class:`TileClassifier` puts a classification head on the image embedding of a
:class:`~pathvl.eval.protocols.TileModel` (for MR-PLIP, the projection of frozen patch features and the
image head: ``encode_image(features)``) and holds the patch encoder's module that makes the features.
The encoder stays frozen, or learns through low-rank adapters on its attention layers (LoRA: Hu et al.,
"LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022), injected by the ``peft`` library
(:func:`apply_lora`): each adapted linear layer computes ``W x + (alpha / r) B A x`` with ``A`` (r x in) and
``B`` (out x r, zero at the start), so training starts from the frozen encoder exactly and only
``r * (in + out)`` numbers per layer learn.

Networks only: nothing here reads or writes a file (:mod:`pathvl.eval.finetune` trains, saves and loads).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from pathvl.errors import UserError

__all__ = [
    "HEADS",
    "ModelSetupError",
    "TileClassifier",
    "adapter_names",
    "apply_lora",
    "build_head",
    "encoder_forward",
    "image_side_parameters",
    "load_trained_state",
    "lora_target_regex",
    "trainable_parameter_count",
    "trained_state",
]

#: Classification heads over an image embedding.
HEADS = ("linear", "mlp")

#: Marker of peft's adapter parameters in a state dict (``...qkv.lora_A.default.weight``).
LORA_MARK = "lora_"


class ModelSetupError(UserError, ValueError):
    """A network that cannot be set up as asked (LoRA targets that match nothing, an unknown head)."""


def lora_target_regex(targets: Sequence[str]) -> str:
    """The module-name pattern peft full-matches: the named linear layers inside attention blocks
    (``blocks.3.attn.qkv``; ``patch_embed.proj`` is not in an attention block and stays frozen)."""
    names = "|".join(re.escape(str(t)) for t in targets)
    return rf"(?:.*\.)?(?:attn|attention)\.(?:{names})"


def apply_lora(module: nn.Module, *, rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> nn.Module:
    """Freeze ``module`` and inject trainable LoRA adapters into its attention layers, in place (peft).

    The adapted layers keep their original weights under ``<layer>.base_layer``; only the adapters
    (``lora_A``, ``lora_B``) require gradients afterwards. The defaults live in
    :class:`pathvl.eval.finetune.LoRASettings`.

    Args:
        module: An encoder module (a timm ViT).
        rank: Rank ``r`` of each adapter.
        alpha: Scale numerator: the update is ``(alpha / r) B A x``.
        dropout: Dropout on the adapters' input.
        targets: Names of the linear layers inside each attention block to adapt (``qkv`` and ``proj`` in
            timm ViTs).

    Returns:
        The same module.

    Raises:
        ModelSetupError: No linear layer of the module matches the targets.
    """
    import peft

    if rank < 1:
        raise ModelSetupError(f"LoRA rank must be at least 1, got {rank}")
    if not targets:
        raise ModelSetupError("LoRA needs at least one target layer name (e.g. qkv proj)")
    pattern = lora_target_regex(targets)
    linear = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    if not linear:
        attn = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                       if isinstance(m, nn.Linear) and re.search(r"(?:attn|attention)\.", n)})
        raise ModelSetupError(
            f"LoRA: no linear layer of {type(module).__name__} matches targets {list(targets)} inside an "
            f"attention block; its attention layers are named {attn or 'nothing (no attention blocks)'}")
    module.requires_grad_(False)
    config = peft.LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=pattern,
                             bias="none")
    peft.inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_(LORA_MARK in name)
    return module


def adapter_names(module: nn.Module) -> list[str]:
    """State-dict names of the LoRA adapter tensors of ``module`` (empty when it has none)."""
    return [n for n in module.state_dict() if LORA_MARK in n]


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """The state worth saving of a model with a frozen ``encoder``: everything but the encoder's own
    weights (its LoRA adapters are kept)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.") or LORA_MARK in k}


def load_trained_state(model: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Loads :func:`trained_state` back; returns the ``(missing, unexpected)`` keys that matter (the frozen
    encoder weights are expected to be missing)."""
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("encoder.") or LORA_MARK in k]
    return missing, list(result.unexpected_keys)


def require_trained_state(model: nn.Module, state: dict[str, Tensor], file: Path | str, meta: str,
                          error: type[Exception]) -> None:
    """:func:`load_trained_state`, raising ``error`` naming ``file`` (and its ``meta`` JSON) when keys do not fit."""
    missing, unexpected = load_trained_state(model, dict(state))
    if missing or unexpected:
        raise error(f"{file} does not fit the model of its {meta}: missing {missing[:6]}, unexpected {unexpected[:6]}")


def trainable_parameter_count(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (shared ones once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def encoder_forward(module: nn.Module, x: Tensor, output: str = "model") -> Tensor:
    """What :meth:`pathvl.encoders.VisionEncoder.encode` computes, with gradients (for LoRA training).

    Args:
        module: The encoder's module.
        x: ``(B, 3, S, S)`` normalised images on the module's device and dtype.
        output: The encoder's output rule (:data:`pathvl.encoders.vision.OUTPUT_RULES`).

    Returns:
        ``(B, width)`` float32 features.
    """
    if output == "cls+mean":
        tokens = module.forward_features(x)  # (B, prefix + h*w, C)
        n_prefix = int(module.num_prefix_tokens)
        out = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)
    elif output == "hf-cls":
        out = module(pixel_values=x).last_hidden_state[:, 0]
    else:
        out = module(x)
    return out.float()


def image_side_parameters(image_model: nn.Module, feature_dim: int) -> list[str]:
    """Names of the parameters that ``image_model.encode_image`` uses (for MR-PLIP: the feature projection,
    its norm and the image head), found by one backward pass on two random feature vectors.

    The global random state is left as it was.
    """
    device = next(image_model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, feature_dim, generator=gen).to(device)
    was_training = image_model.training
    image_model.eval()
    saved = {n: p.requires_grad for n, p in image_model.named_parameters()}
    image_model.requires_grad_(True)
    image_model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            image_model.encode_image(feats, normalize=False).float().square().sum().backward()
        used = [n for n, p in image_model.named_parameters() if p.grad is not None]
    finally:
        image_model.zero_grad(set_to_none=True)
        for n, p in image_model.named_parameters():
            p.requires_grad_(saved[n])
        image_model.train(was_training)
    return used


def build_head(kind: str, embed_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.0) -> nn.Module:
    """A classification head over an embedding: ``linear`` (one layer) or ``mlp`` (Linear-GELU-Dropout-Linear).

    Raises:
        ModelSetupError: An unknown kind, or fewer than two classes.
    """
    if num_classes < 2:
        raise ModelSetupError(f"a classifier needs at least two classes, got {num_classes}")
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_classes))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    raise ModelSetupError(f"unknown classification head {kind!r}; heads: {', '.join(HEADS)}")


class TileClassifier(nn.Module):
    """A tile classifier: patch encoder -> a tile model's image side -> classification head.

    ``logits = head(sqrt(E) * normalize(image_model.encode_image(encoder(x))))``: the head reads the same
    L2-normalised embedding the zero-shot and linear-probe protocols read (CLIP, Radford et al., ICML 2021),
    so a fine-tuned model and a frozen probe are compared on one footing; the fixed factor ``sqrt(E)`` gives
    its coordinates unit mean square, the scale a default-initialised linear layer expects. The MR-PLIP image
    side is the feature projection and image head of "Multi-Resolution Pathology-Language Pre-training Model
    with Text-Guided Visual Representation" (MR-PLIP, 2025); the optional encoder adapters are LoRA (Hu et al.,
    ICLR 2022).

    Args:
        image_model: A :class:`~pathvl.eval.protocols.TileModel` (``encode_image(features)``).
        encoder: The patch encoder's module (frozen, or with LoRA adapters from :func:`apply_lora`).
        embed_dim: Width of ``encode_image``'s output.
        num_classes: Number of classes.
        head: ``linear`` or ``mlp`` (:func:`build_head`).
        hidden: Hidden width of the ``mlp`` head.
        dropout: Dropout before the last layer of the head.
        output: The encoder's output rule (how its module's output becomes one feature vector).
    """

    def __init__(self, image_model: nn.Module, encoder: nn.Module, embed_dim: int, num_classes: int, *,
                 head: str = "linear", hidden: int = 256, dropout: float = 0.0, output: str = "model") -> None:
        super().__init__()
        self.image_model = image_model
        self.encoder = encoder
        self.head = build_head(head, embed_dim, num_classes, hidden, dropout)
        self.output = output
        self.num_classes = num_classes
        self.input_scale = math.sqrt(embed_dim)

    @property
    def encoder_trains(self) -> bool:
        """Whether the encoder has trainable parameters (LoRA adapters)."""
        return any(p.requires_grad for p in self.encoder.parameters())

    def features(self, x: Tensor) -> Tensor:
        """``(B, D)`` patch features of ``(B, 3, S, S)`` normalised images (with gradients only where the
        encoder trains)."""
        p = next(self.encoder.parameters())
        x = x.to(device=p.device, dtype=p.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trains):
            return encoder_forward(self.encoder, x, self.output)

    def encode_image(self, features: Tensor, normalize: bool = True) -> Tensor:
        """``(N, E)`` image embeddings of ``(N, D)`` patch features (the tile model's own)."""
        return self.image_model.encode_image(features, normalize=normalize)

    def classify(self, features: Tensor) -> Tensor:
        """``(N, C)`` class logits of ``(N, D)`` patch features."""
        e = self.encode_image(features, normalize=True).float()  # (N, E), unit norm
        return self.head(e * self.input_scale)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C)`` class logits of ``(B, 3, S, S)`` normalised images."""
        return self.classify(self.features(x))

    def tokenize(self, texts: Sequence[str]) -> Mapping[str, Tensor]:
        """The tile model's tokenizer (texts still embed with the tile model's text side)."""
        return self.image_model.tokenize(list(texts))

    def encode_text(self, tokens: Mapping[str, Tensor], normalize: bool = True) -> Tensor:
        """The tile model's text embeddings (unchanged by fine-tuning, which trains no text parameter)."""
        return self.image_model.encode_text(tokens, normalize=normalize)

