"""Settings of a fine-tuning run: the run folder's file names, the error type, LoRA and training settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from pathvl.errors import UserError

if TYPE_CHECKING:
    from torch import nn

FORMAT = "pathvl-finetune/1"
CONFIG_FILE = "finetune.json"
MODEL_FILE = "model.safetensors"
SPLITS_FILE = "splits.json"
HISTORY_FILE = "history.jsonl"
PREDICTIONS_FILE = "predictions.csv"
MONITORS = ("balanced_accuracy", "loss")


class FinetuneError(UserError, ValueError):
    """Fine-tuning or loading that cannot go on as asked; the message names the file, class or value."""


@dataclass(frozen=True)
class LoRASettings:
    """LoRA adapters on the attention layers of a ViT encoder (Hu et al., "LoRA: Low-Rank Adaptation of Large
    Language Models", ICLR 2022), injected by peft (:func:`pathvl.models.finetune.apply_lora`).

    Attributes:
        rank: Rank ``r`` of each adapter.
        alpha: Scale numerator: the update is ``(alpha / r) B A x``.
        dropout: Dropout on the adapters' input.
        targets: Names of the linear layers inside each attention block to adapt (``qkv`` and ``proj`` in
            timm ViTs: UNI, Virchow, the tiny twins).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise FinetuneError(f"LoRA rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise FinetuneError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise FinetuneError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        if not self.targets:
            raise FinetuneError("LoRA needs at least one target layer name (e.g. qkv proj)")
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))

    def apply(self, module: nn.Module) -> nn.Module:
        """Freeze ``module`` and add the adapters, in place (:func:`pathvl.models.finetune.apply_lora`)."""
        from pathvl.models.finetune import apply_lora

        return apply_lora(module, rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what a run's config stores)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoRASettings:
        """Inverse of :meth:`to_dict`."""
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   targets=tuple(d.get("targets", ("qkv", "proj"))))


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (``pathvl finetune`` takes its defaults from here).

    Attributes:
        head: ``linear`` or ``mlp`` classification head.
        hidden: Hidden width of the ``mlp`` head.
        dropout: Dropout before the head's last layer.
        epochs: Most epochs to train.
        batch_size: Tiles per step.
        lr: AdamW learning rate of the head and the image side.
        encoder_lr: AdamW learning rate of the LoRA adapters.
        weight_decay: AdamW weight decay.
        patience: Stop after this many epochs without a better validation score.
        monitor: ``balanced_accuracy`` (higher is better; ties go to the lower loss) or ``loss``.
        val_fraction: Share of all tiles held out for validation (of the training split for benchmarks).
        test_fraction: Share of all tiles held out for testing when the data has no test split.
        seed: Seed of the split, the initialisation and the order of the tiles.
        train_image_side: Train the image side (the MR-PLIP projection and image head) with the head;
            False trains the head alone.
        lora: LoRA adapters in the encoder; None keeps the encoder frozen.
        n_bootstrap: Bootstrap resamples for the confidence intervals of the test metrics.
        workers: DataLoader workers reading tiles.
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto`` (a GPU when there is one).
    """

    head: str = "linear"
    hidden: int = 256
    dropout: float = 0.0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 5
    monitor: str = "balanced_accuracy"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    train_image_side: bool = True
    lora: LoRASettings | None = None
    n_bootstrap: int = 0
    workers: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and self.encoder_lr > 0, "learning rates must be positive"),
            (self.patience >= 1, f"patience must be at least 1, got {self.patience}"),
            (self.monitor in MONITORS, f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}"),
            (0 < self.val_fraction < 1, f"val fraction must lie in (0, 1), got {self.val_fraction}"),
            (0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
             f"test fraction must lie in (0, 1) and leave tiles for training, got {self.test_fraction}"),
            (0 <= self.dropout < 1, f"dropout must lie in [0, 1), got {self.dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FinetuneError(message)
        from pathvl.models.finetune import HEADS

        if self.head not in HEADS:
            raise FinetuneError(f"unknown head {self.head!r}; heads: {', '.join(HEADS)}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lora"] = self.lora.to_dict() if self.lora else None
        return d
