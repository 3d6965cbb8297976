"""The PathAlign training family: data config, data, losses, the model from its config, stage-2 init.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import Tensor, nn

from pathvl.config import DataConfig, TrainConfig
from pathvl.data.checkpoint import load_model_weights
from pathvl.data.loader import StepLoader
from pathvl.data.reports import ReportDataset, build_report_dataset
from pathvl.dist import DistInfo
from pathvl.errors import UserError
from pathvl.families.registry import Family, register_family
from pathvl.losses.contrastive import QFormerITCLoss
from pathvl.losses.lm import LMLoss
from pathvl.losses.matching import ITMLoss
from pathvl.models.lm_bridge import BridgeConfig, LMBridge, _special_ids
from pathvl.models.pathalign import LOSS_NAMES, PathAlign, PathAlignConfig, bridge_config, build_prompt, lm_tokenizer
from pathvl.models.text_backbone import text_tokenizer


@dataclass
class PathAlignDataConfig(DataConfig):
    """The ``data:`` section of a PathAlign config.

    Attributes:
        reports: CSV/JSONL of slide id and report text (UTF-8; see
            :func:`pathvl.data.slidedata.read_slide_texts` for the accepted column names).
        contexts: Optional CSV/JSONL of slide id and ``context`` (clinical context for stage-2 prompts).
        max_patches: Patches per slide (random without replacement when training; 0 keeps all).
    """

    reports: str = field(default="", metadata={"path": True})
    contexts: str = field(default="", metadata={"path": True})
    max_patches: int = 1024


def _report_dataset(cfg: Any, train: bool = True) -> ReportDataset:
    d = cfg.data
    if not d.dataset:
        raise _ConfigValueError("data.dataset: give the dataset folder (pathvl tile + pathvl embed)")
    if not d.reports:
        raise _ConfigValueError("data.reports: give the CSV/JSONL of slide reports (slide id and report columns)")
    return build_report_dataset(d.dataset, d.reports, d.features, contexts=d.contexts or None,
                                max_patches=d.max_patches, mags=tuple(float(m) for m in d.mags), train=train,
                                seed=cfg.run.seed, max_report_chars=cfg.model.max_report_chars)


class PromptTokenizer:
    """The LM bridge's prompt/answer tokenisation (:meth:`LMBridge.tokenize`) without loading the LM, for
    the data loader: left-padded prompts with bos, right-padded answers with eos.

    Args:
        tokenizer: The LM's tokenizer.
        cfg: Bridge settings (truncation lengths).
    """

    tokenize = LMBridge.tokenize

    def __init__(self, tokenizer: Any, cfg: BridgeConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.bos, self.eos, self.pad = _special_ids(tokenizer)


def collate_pathalign(items: Sequence[Mapping[str, Any]], tokenizer: Any, max_text_tokens: int = 64,
                      prompt_tokenizer: PromptTokenizer | None = None, cfg: PathAlignConfig | None = None
                      ) -> dict[str, Tensor]:
    """A PathAlign batch: padded patch bags and tokenised reports; in stage 2 also prompts and answers.

    Args:
        items: From :class:`ReportDataset` (or :class:`~pathvl.data.slidedata.SlideDataset`).
        tokenizer: The Q-Former's tokenizer.
        max_text_tokens: Report truncation.
        prompt_tokenizer: Stage 2: the LM-side tokenisation (:class:`PromptTokenizer`).
        cfg: Stage 2: the model config (prompt template).

    Returns:
        ``features``, ``patch_mask``, ``coords``, ``rows``, ``caption_ids``, ``caption_mask``, ``index``
        (:func:`~pathvl.data.slidedata.collate_slides`), and in stage 2 ``prompt_ids``, ``prompt_mask``,
        ``answer_ids``, ``answer_mask``.
    """
    from pathvl.data.slidedata import collate_slides

    batch = collate_slides(items, tokenizer, max_tokens=max_text_tokens)
    for key in ("subcap_ids", "subcap_attn", "subcap_mask"):
        batch.pop(key, None)
    if prompt_tokenizer is not None:
        c = cfg if cfg is not None else PathAlignConfig()
        prompts = [build_prompt(c, it.get("context")) for it in items]
        batch.update(prompt_tokenizer.tokenize(prompts, [it["caption"] for it in items]))
    return batch


class _ConfigValueError(UserError, ValueError):
    pass


@register_family
class PathAlignFamily(Family):
    """PathAlign: stage 1 (Q-Former ITC/ITM/ITG) and stage 2 (report generation through a causal LM)."""

    name = "pathalign"
    model_config = PathAlignConfig
    data_config = PathAlignDataConfig
    loss_names = LOSS_NAMES
    kind = "slide"

    def build_data(self, cfg: TrainConfig, dist: DistInfo) -> StepLoader:
        """Resumable, rank-sharded batches of slides with reports (and prompts), re-sampled every epoch."""
        prompt_tok = None
        if cfg.model.stage == 2:
            prompt_tok = PromptTokenizer(lm_tokenizer(cfg.model), bridge_config(cfg.model))
        collate = partial(collate_pathalign, tokenizer=text_tokenizer(cfg.model.text_encoder),
                          max_text_tokens=cfg.model.max_text_tokens, prompt_tokenizer=prompt_tok, cfg=cfg.model)
        return StepLoader.from_config(_report_dataset(cfg), cfg, dist, collate_fn=collate)

    def build_losses(self, cfg: TrainConfig, dist: DistInfo) -> dict[str, nn.Module]:
        """ITC and ITG with LAVIS's label smoothing, ITM (stage 1); LM (stage 2)."""
        m = cfg.model
        return {"itc": QFormerITCLoss(label_smoothing=m.itc_label_smoothing), "itm": ITMLoss(),
                "itg": LMLoss(label_smoothing=m.itg_label_smoothing), "lm": LMLoss()}

    def model_from_config(self, model_cfg: Any, losses: Sequence[str] | None = None) -> PathAlign:
        """The model; ``init_from`` is not read here (a checkpoint holds the stage-1 weights already)."""
        return PathAlign(model_cfg, active=None if losses is None else tuple(losses))

    def init_for_training(self, model: nn.Module, cfg: TrainConfig, data: Any) -> None:
        """Stage 2: the Q-Former from the stage-1 run ``model.init_from``."""
        if cfg.model.stage == 2 and cfg.model.init_from:
            state, _ = load_model_weights(cfg.model.init_from, family=self.name)
            model.load_stage1(state, cfg.model.init_from)
