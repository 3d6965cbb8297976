"""Training objectives, one ``nn.Module`` per loss.

A model's ``forward`` returns a dict of named tensors; each loss's ``forward`` takes the names it needs
as keyword arguments (extra keys are ignored), so a training step can call ``loss(**outputs)`` and sum the
configured terms with their weights. Contrastive losses gather across ranks with gradients and fall back
to one process transparently.
"""

from pathvl.losses.contrastive import ITCLoss, QFormerITCLoss, SigLIPLoss
from pathvl.losses.cvta import CVTALoss, select_positive_keywords
from pathvl.losses.lm import IGNORE_INDEX, LMLoss, MLMLoss, mask_tokens
from pathvl.losses.matching import ITMLoss, itm_pairs, sample_hard_negatives
from pathvl.losses.mrtva import MRTVALoss
from pathvl.losses.region import RegionAlignLoss

__all__ = [
    "IGNORE_INDEX",
    "CVTALoss",
    "ITCLoss",
    "ITMLoss",
    "LMLoss",
    "MLMLoss",
    "MRTVALoss",
    "QFormerITCLoss",
    "RegionAlignLoss",
    "SigLIPLoss",
    "itm_pairs",
    "mask_tokens",
    "sample_hard_negatives",
    "select_positive_keywords",
]
