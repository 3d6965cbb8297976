"""The PathFLIP training family: slides (all tissue patches) with captions split into region sub-captions.

See :mod:`pathvl.models.pathflip` for the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from pathvl.config import DataConfig, TrainConfig
from pathvl.data.loader import StepLoader
from pathvl.data.slidedata import SlideDataset, collate_slides
from pathvl.dist import DistInfo
from pathvl.errors import UserError
from pathvl.families.registry import Family, register_family
from pathvl.losses import ITCLoss, RegionAlignLoss, SigLIPLoss
from pathvl.models.pathflip import LOSS_NAMES, PathFLIP, PathFLIPConfig
from pathvl.models.text_backbone import text_tokenizer

__all__ = ["PathFLIPDataConfig", "PathFLIPFamily", "build_pathflip_losses"]


class _ConfigValueError(UserError, ValueError):
    pass


@dataclass
class PathFLIPDataConfig(DataConfig):
    """The ``data:`` section of a PathFLIP config.

    Attributes:
        texts: CSV/JSONL of slide texts (:func:`pathvl.data.slidedata.read_slide_texts`).
        max_patches: Patches sampled per slide and epoch (0 = all).
        n_subcaptions: Sub-captions per slide (sampled or padded).
        decomposer: ``rules`` or ``lm:<dir>``.
        standardize: Standardise the features with the training slides' statistics.
    """

    texts: str = field(default="", metadata={"path": True})
    max_patches: int = 4096
    n_subcaptions: int = 8
    decomposer: str = "rules"
    standardize: bool = True


#: Loss names of the family and their default weights.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"itc": 1.0, "region": 1.0}


def build_pathflip_losses(cfg: PathFLIPConfig, weights: Mapping[str, float] | None = None,
                          gather: bool = True) -> dict[str, nn.Module]:
    """The loss modules of the family: ``itc`` (InfoNCE with label smoothing), ``siglip`` and ``region``.

    Args:
        cfg: Model config (label smoothing, same-slide policy).
        weights: Only names with a positive weight are built (default :data:`DEFAULT_LOSS_WEIGHTS`).
        gather: Gather across ranks.
    """
    weights = dict(DEFAULT_LOSS_WEIGHTS if weights is None else weights)
    bad = set(weights) - set(LOSS_NAMES)
    if bad:
        raise ValueError(f"unknown PathFLIP losses {sorted(bad)}; known: {LOSS_NAMES}")
    make = {
        "itc": lambda: ITCLoss(label_smoothing=cfg.label_smoothing, gather=gather),
        "siglip": lambda: SigLIPLoss(gather=gather),
        "region": lambda: RegionAlignLoss(same_slide=cfg.region_same_slide, gather=gather),
    }
    return {n: make[n]() for n, w in weights.items() if w > 0}


@register_family
class PathFLIPFamily(Family):
    """PathFLIP (slide level): global contrastive and region-alignment losses."""

    name = "pathflip"
    model_config = PathFLIPConfig
    data_config = PathFLIPDataConfig
    loss_names = LOSS_NAMES
    kind = "slide"

    def build_data(self, cfg: TrainConfig, dist: DistInfo) -> StepLoader:
        """Resumable, rank-sharded batches of slides, re-sampled every epoch (:class:`StepLoader`)."""
        d = cfg.data
        if not d.texts:
            raise _ConfigValueError("data.texts: give the CSV/JSONL of slide texts (slide id and caption per row)")
        ds = SlideDataset(d.dataset, d.texts, d.features, max_patches=d.max_patches, n_subcaptions=d.n_subcaptions,
                          decomposer=d.decomposer, mags=tuple(float(m) for m in d.mags), train=True,
                          seed=cfg.run.seed)
        collate = partial(collate_slides, tokenizer=text_tokenizer(cfg.model.text_encoder),
                          max_tokens=cfg.model.max_text_tokens)
        return StepLoader.from_config(ds, cfg, dist, collate_fn=collate)

    def build_losses(self, cfg: TrainConfig, dist: DistInfo) -> dict[str, nn.Module]:
        return build_pathflip_losses(cfg.model, {n: 1.0 for n in LOSS_NAMES})

    def model_from_config(self, model_cfg: Any, losses: Sequence[str] | None = None) -> PathFLIP:
        return PathFLIP(model_cfg, active=tuple(("itc", "region") if losses is None else losses))

    def init_for_training(self, model: nn.Module, cfg: TrainConfig, data: Any) -> None:
        """Feature standardisation from the training slides (stored as buffers in the checkpoint)."""
        if cfg.data.standardize:
            model.set_feature_stats(*(torch.from_numpy(a) for a in data.dataset.feature_stats()))
