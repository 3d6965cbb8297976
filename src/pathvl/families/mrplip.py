"""The MR-PLIP training family: bags of a 5x parent and its descendants with captions and keywords.

See :mod:`pathvl.models.mrplip` for the network and :mod:`pathvl.losses` for its objectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from pathvl.config import DataConfig, TrainConfig
from pathvl.data.bagdata import BagDataset, BagSource, collate_bags
from pathvl.data.loader import StepLoader
from pathvl.dist import DistInfo
from pathvl.families.registry import Family, register_family
from pathvl.losses import CVTALoss, ITCLoss, ITMLoss, LMLoss, MLMLoss, MRTVALoss
from pathvl.models.mrplip import LOSS_NAMES, MRPLIP, MRPLIPConfig
from pathvl.models.text_backbone import text_tokenizer

__all__ = ["MRPLIPDataConfig", "MRPLIPFamily"]


@dataclass
class MRPLIPDataConfig(DataConfig):
    """The ``data:`` section of an MR-PLIP config.

    Attributes:
        captions: Captioner whose captions and keywords are used (from ``pathvl caption``).
    """

    captions: str = "template"


@register_family
class MRPLIPFamily(Family):
    """MR-PLIP (tile level): ITC, ITM, MLM, prefix LM, CVTA and MRTVA on bags of frozen patch features."""

    name = "mrplip"
    model_config = MRPLIPConfig
    data_config = MRPLIPDataConfig
    loss_names = LOSS_NAMES
    kind = "tile"

    def build_data(self, cfg: TrainConfig, dist: DistInfo) -> StepLoader:
        """Resumable, rank-sharded batches of bags."""
        d = cfg.data
        bags = BagDataset(d.dataset, BagSource(d.features, d.captions, tuple(float(m) for m in d.mags)))
        collate = partial(collate_bags, tokenizer=text_tokenizer(cfg.model.text_encoder),
                          max_caption_tokens=cfg.model.max_caption_tokens,
                          max_keyword_tokens=cfg.model.max_keyword_tokens)
        return StepLoader.from_config(bags, cfg, dist, collate_fn=collate)

    def build_losses(self, cfg: TrainConfig, dist: DistInfo) -> dict[str, nn.Module]:
        """One module per MR-PLIP objective."""
        return {"itc": ITCLoss(), "itm": ITMLoss(), "mlm": MLMLoss(), "plm": LMLoss(),
                "cvta": CVTALoss(top_k=cfg.model.top_k), "mrtva": MRTVALoss()}

    def model_from_config(self, model_cfg: Any, losses: Sequence[str] | None = None) -> MRPLIP:
        return MRPLIP(model_cfg, active=tuple(LOSS_NAMES if losses is None else losses))
