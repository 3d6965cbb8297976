"""The fine-tuned model: device and encoder resolution, preprocessing, saved state, and loading a run folder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl.eval.finetune.config import CONFIG_FILE, FORMAT, MODEL_FILE, FinetuneError, LoRASettings
from pathvl.eval.finetune.files import _read_run_config, load_weights

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pathvl.encoders import VisionEncoder
    from pathvl.models.finetune import TileClassifier


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is there, else ``cpu``; anything else as torch reads it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise FinetuneError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"device {device!r}: no GPU is available here (use --device cpu)")
    return dev


def build_encoder(name: str, weights: str | None, sha256: str | None = None, *, where: str = "") -> VisionEncoder:
    """The frozen vision encoder ``name`` (``weights`` when it needs them), checked against a recorded sha256.

    Raises:
        FinetuneError: A recorded weights file that is not here, or whose hash changed.
    """
    from pathvl.encoders import build_vision

    if weights is not None and not Path(weights).exists():
        raise FinetuneError(f"{where}encoder {name!r}: its weights {weights} are not on this machine; pass the file "
                            "with --encoder-weights")
    try:
        enc = build_vision(name, weights=weights)
    except KeyError as e:
        raise FinetuneError(f"{where}{e.args[0] if e.args else e}") from None
    if sha256 and enc.weights_sha256 and enc.weights_sha256 != sha256:
        raise FinetuneError(f"{where}encoder {name!r}: {weights} has sha256 {enc.weights_sha256[:12]}..., the run was "
                            f"trained with {sha256[:12]}...; give the same weights file")
    return enc


def _embed_dim(image_model: nn.Module, feature_dim: int) -> int:
    import torch

    device = next(image_model.parameters()).device
    with torch.no_grad():
        return int(image_model.encode_image(torch.zeros(1, feature_dim, device=device)).shape[-1])


def _preprocess(enc: VisionEncoder, batch: Any, device: torch.device) -> torch.Tensor:
    """uint8 tiles (a (B, H, W, 3) tensor, or a list of arrays of mixed sizes) -> (B, 3, S, S) on ``device``."""
    import torch

    if isinstance(batch, list):
        return torch.cat([enc.preprocess_batch(torch.from_numpy(np.asarray(b))[None].to(device)) for b in batch])
    return enc.preprocess_batch(batch.to(device))


def _weights_to_save(model: TileClassifier) -> dict[str, torch.Tensor]:
    """The classifier's state without the encoder's frozen weights (its LoRA adapters are kept)."""
    from pathvl.models.finetune import trained_state

    return trained_state(model)


def _load_classifier_state(model: TileClassifier, state: Mapping[str, torch.Tensor], file: Path) -> None:
    from pathvl.models.finetune import require_trained_state

    require_trained_state(model, dict(state), file, "finetune.json", FinetuneError)


@dataclass
class FinetunedModel:
    """A fine-tuned tile classifier with its encoder's preprocessing (what :func:`load_finetuned` returns).

    Attributes:
        model: The :class:`~pathvl.models.finetune.TileClassifier` (eval mode): ``encode_image(features)``,
            ``classify(features)``, ``features(x)``.
        vision: The vision encoder (its module is ``model.encoder``, with the LoRA adapters when trained
            with them, so ``vision.encode`` gives the features ``classify`` expects).
        class_names: Name of each output class.
        config: The run's ``finetune.json``.
        source: The run folder.
    """

    model: TileClassifier
    vision: VisionEncoder
    class_names: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``(N, E)`` image embeddings of ``(N, D)`` features of the run's encoder."""
        return self.model.encode_image(features, normalize=normalize)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` logits of ``(N, D)`` features of the run's encoder."""
        return self.model.classify(features)

    def features(self, images: Any) -> torch.Tensor:
        """``(B, D)`` features of uint8 tiles ((B, H, W, 3) tensor or a list of arrays)."""
        import torch

        with torch.no_grad():
            return self.model.features(_preprocess(self.vision, images, self.device))

    def predict_proba(self, images: Any) -> torch.Tensor:
        """``(B, C)`` class probabilities of uint8 tiles, on the CPU."""
        import torch

        with torch.no_grad():
            return torch.softmax(self.classify(self.features(images)), dim=-1).float().cpu()

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"run": self.source, "encoder": c["encoder"]["name"], "head": c["head"]["kind"],
                "lora": c.get("lora"), "source_checkpoint": c["source"]["checkpoint"], "classes": self.class_names}


def load_finetuned(run_dir: str | Path, device: str | torch.device = "cpu",
                   encoder_weights: str | None = None) -> FinetunedModel:
    """Loads a ``pathvl finetune`` run folder: the best epoch, ready to classify tiles.

    Args:
        run_dir: The run folder.
        device: Where to put the model.
        encoder_weights: The encoder's weights file, when the one recorded in the run is elsewhere here.

    Raises:
        FinetuneError: Not a finetune run (another kind of run says which), incomplete, or weights that do
            not fit.
    """
    import torch

    from pathvl.families import config_from_dict, get_family
    from pathvl.models.finetune import TileClassifier

    run = Path(run_dir)
    cfg = _read_run_config(run, CONFIG_FILE, FORMAT, "a fine-tuned tile classifier", "pathvl finetune")
    e = cfg["encoder"]
    enc = build_encoder(e["name"], encoder_weights or e.get("weights_path"), e.get("weights_sha256"),
                        where=f"{run / CONFIG_FILE}: ")
    src = cfg["source"]
    tcfg = config_from_dict(src["config"])
    image_model = get_family(src["family"]).model_from_config(tcfg.model, list(tcfg.active_losses))
    lora = LoRASettings.from_dict(cfg["lora"]) if cfg.get("lora") else None
    if lora is not None:
        lora.apply(enc.model)
    h = cfg["head"]
    model = TileClassifier(image_model, enc.model, int(h["embed_dim"]), len(cfg["classes"]), head=h["kind"],
                           hidden=int(h["hidden"]), dropout=float(h["dropout"]), output=e.get("output", "model"))
    _load_classifier_state(model, load_weights(run / MODEL_FILE, "finetune"), run / MODEL_FILE)
    dev = torch.device(device) if not isinstance(device, str) or device != "auto" else resolve_device("auto")
    model.to(dev).eval()
    return FinetunedModel(model=model, vision=enc, class_names=list(cfg["classes"]), config=cfg, source=str(run))
