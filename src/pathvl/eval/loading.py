"""Loading a trained model for evaluation: one function for every family, never touching training data.

:func:`load_for_eval` reads a run folder (its latest checkpoint), a checkpoint folder or a file inside
one, rebuilds the network with the family's pure ``model_from_config`` from the config saved in the
checkpoint (feature width, feature statistics and stage-1 weights are all in the checkpoint), loads the
weights strictly and returns an :class:`EvalModel`. The dataset, texts, reports and ``init_from`` run
the model was trained with need not exist on this machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvl.config import TrainConfig
from pathvl.data.checkpoint import CheckpointError, find_checkpoint, load_into, load_model_weights, read_meta
from pathvl.errors import UserError
from pathvl.eval.protocols import is_slide_model
from pathvl.families import config_from_dict, families_of_kind, get_family

__all__ = ["EvalError", "EvalModel", "load_for_eval"]


class EvalError(UserError, ValueError):
    """A checkpoint or data set that cannot be evaluated as asked; the message says why."""


@dataclass
class EvalModel:
    """A trained model ready for evaluation.

    Build one around a model trained in-process with ``EvalModel(model, "pathflip", features="uni")``.

    Attributes:
        model: The network, in eval mode (a :class:`~pathvl.eval.protocols.TileModel` or
            :class:`~pathvl.eval.protocols.SlideModel`).
        family: Its family name.
        features: Encoder name of the cached features the model reads (``features/<name>``).
        mags: Magnifications the model was trained on (empty: all).
        max_patches: Patches per slide the model saw in training (0: all); evaluation samples the same way.
        meta: The checkpoint's ``trainer.json`` (step, versions, config).
        config: The resolved training config (None for an in-process model).
        source: The path it was loaded from.
    """

    model: nn.Module
    family: str
    features: str
    mags: tuple[float, ...] = ()
    max_patches: int = 0
    meta: dict = field(default_factory=dict)
    config: TrainConfig | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        """``slide`` for slide models, else ``tile``."""
        return "slide" if is_slide_model(self.model) else "tile"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float | None:
        """The model's learned contrastive scale as it multiplies cosines in training (``exp`` of its
        ``logit_scale`` parameter, clamped at 100 like the families clamp it), or None when it has none.

        Zero-shot scores are softmax(logit_scale * cosine) over the classes (CONCH's protocol)."""
        raw = getattr(self.model, "logit_scale", None)
        if not isinstance(raw, torch.Tensor) or raw.numel() != 1:
            return None
        return float(raw.detach().float().clamp(max=math.log(100.0)).exp())

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """``(T, E)`` L2-normalised text embeddings, on the CPU."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.model.tokenize(list(texts[i : i + batch_size]))
            tok = {k: v.to(self.device) for k, v in tok.items()}
            out.append(self.model.encode_text(tok).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def describe(self) -> dict[str, Any]:
        """What a report says about the model."""
        return {"checkpoint": self.source, "family": self.family, "step": self.meta.get("step"),
                "vision_encoder": self.features}


def load_for_eval(path: str | Path, device: str | torch.device = "cpu", kind: str | None = None) -> EvalModel:
    """Loads a trained model from a run folder, checkpoint folder or a file inside one.

    Args:
        path: Where the checkpoint is.
        device: Where to put the model.
        kind: ``tile`` or ``slide`` when the command needs one kind of model.

    Raises:
        EvalError: Not a pathvl checkpoint, or a model of the wrong kind.
        CheckpointError: The weights do not fit the saved config.

    A published VLM (an OpenCLIP folder or ``openclip:<model>:<weights>``, a Hugging Face CLIP folder such as
    PLIP's) loads as a tile model too: :func:`pathvl.eval.baselines.load_baseline`.
    """
    from pathvl.eval.baselines import baseline_kind, load_baseline

    if baseline_kind(path) is not None:
        return load_baseline(path, device=device, kind=kind)
    try:
        ckpt = find_checkpoint(path)
        meta = read_meta(ckpt)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise EvalError(f"{path}: not a pathvl checkpoint ({e}); give a run folder from `pathvl pretrain`") from e
    family_name = str(meta.get("family", ""))
    family = get_family(family_name)
    if kind is not None and family.kind != kind:
        raise EvalError(f"{path}: checkpoint is a {family_name} model, this command needs a {kind}-level model "
                        f"({' or '.join(families_of_kind(kind))})")
    cfg = config_from_dict(meta["config"])
    state, meta = load_model_weights(ckpt, family=family_name, device=device)
    model = family.model_from_config(cfg.model, list(cfg.active_losses))
    model.to(device)
    load_into(model, state, meta["omitted"])
    d = cfg.data
    return EvalModel(model=model.eval(), family=family_name, features=d.features,
                     mags=tuple(float(m) for m in d.mags), max_patches=int(getattr(d, "max_patches", 0)),
                     meta=meta, config=cfg, source=str(path))
