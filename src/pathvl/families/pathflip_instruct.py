"""The PathFLIP instruction-tuning family: a trained PathFLIP slide encoder, an LM bridge, a causal LM.

PathFLIP (Liu et al., "PathFLIP: Fine-grained Language-Image Pretraining for Versatile Computational
Pathology", 2025) follows clinical instructions about a slide through an LLM; the recipe is LLaVA's (Liu
et al., "Visual Instruction Tuning", NeurIPS 2023):

- **stage 1** (``model.stage=1``): the projector alone learns to put the slide's visual tokens (latent
  tokens plus the patches that match the instruction, :class:`~pathvl.models.lm_bridge.PathFLIPInstruct`)
  into the LM's input space; slide encoder and LM are frozen. ``model.init_from`` names the PathFLIP run.
- **stage 2** (``model.stage=2``): LoRA adapters on the LM's attention (through peft) train with the
  projector. ``model.init_from`` names the stage-1 run (its slide encoder and projector are loaded).

Data (``data.instructions``): JSON/JSONL conversations (SlideInstruction's layout) and SlideBench-style
multiple-choice tables, plus optionally ``data.captions`` (slide captions as answers to "Describe this
slide."); see :mod:`pathvl.data.instructions`. Batches come from a :class:`~pathvl.data.loader.StepLoader`,
so a run resumes exactly.

The architecture of the slide encoder is copied from the ``init_from`` run into ``model.slide`` when the
run starts (:meth:`PathFLIPInstructFamily.complete_config`), so the saved config describes the model
completely and :meth:`~PathFLIPInstructFamily.model_from_config` reads no file but the LM's own folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from torch import nn

from pathvl.config import ConfigError, DataConfig, TrainConfig
from pathvl.data.checkpoint import load_into, load_model_weights, read_meta
from pathvl.data.instructions import build_instruction_dataset, collate_instructions
from pathvl.data.loader import StepLoader
from pathvl.dist import DistInfo
from pathvl.families.registry import Family, config_from_dict, register_family
from pathvl.losses.lm import LMLoss
from pathvl.models.lm_bridge import BridgeConfig, BridgeTokenizer, PathFLIPInstruct
from pathvl.models.pathflip import PathFLIP, PathFLIPConfig
from pathvl.models.text_backbone import text_tokenizer

__all__ = ["PathFLIPInstructConfig", "PathFLIPInstructDataConfig", "PathFLIPInstructFamily"]

LOSS_NAMES = ("lm",)


@dataclass
class PathFLIPInstructConfig:
    """The ``model:`` section of a PathFLIP-instruct config.

    Attributes:
        init_from: Stage 1: a PathFLIP run (the slide encoder); stage 2: a PathFLIP-instruct stage-1 run
            (slide encoder and projector). Read when a fresh run starts, never by evaluation.
        slide: The slide encoder's architecture; copied from ``init_from`` when empty.
        stage: 1 = projector only, 2 = projector and LoRA on the LM.
        lm: ``tiny`` (a small random Llama on the slide model's tokenizer, for tests and demos) or a local
            Hugging Face causal LM folder (never downloaded).
        lm_dtype: dtype the LM is loaded in (``auto``: as transformers decides).
        tiny_lm_width: Hidden width of the ``tiny`` LM.
        tiny_lm_layers: Layers of the ``tiny`` LM.
        tiny_lm_init_std: Weight initialisation of the ``tiny`` LM (a large one, e.g. 0.3, gives a random LM
            whose next-token distribution a projector can steer).
        top_k_patches: Patch tokens chosen by the instruction, after the latent tokens.
        projector_layers: Layers of the visual-to-LM MLP (LLaVA-1.5: 2).
        projector_hidden: Hidden width of the projector (0: the LM's width).
        lora_rank: LoRA rank (stage 2).
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_targets: LM modules given LoRA (empty: guessed from the architecture).
        max_prompt_tokens: Prompt truncation (LM tokens).
        max_answer_tokens: Answer truncation (LM tokens, eos included).
        default_prompt: The instruction when none is given (``pathvl report`` with this model).
    """

    init_from: str = ""
    slide: PathFLIPConfig | None = None
    stage: int = 1
    lm: str = "tiny"
    lm_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tiny_lm_width: int = 64
    tiny_lm_layers: int = 2
    tiny_lm_init_std: float = 0.02
    top_k_patches: int = 32
    projector_layers: int = 2
    projector_hidden: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()
    max_prompt_tokens: int = 256
    max_answer_tokens: int = 64
    default_prompt: str = "Describe this slide."

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.top_k_patches < 0 or self.max_prompt_tokens < 2 or self.max_answer_tokens < 2:
            raise ValueError("top_k_patches must be >= 0, max_prompt_tokens and max_answer_tokens >= 2")
        self.lora_targets = tuple(self.lora_targets)

    def bridge(self) -> BridgeConfig:
        """The LM bridge settings."""
        return BridgeConfig(top_k_patches=self.top_k_patches, projector_layers=self.projector_layers,
                            projector_hidden=self.projector_hidden, lora_rank=self.lora_rank,
                            lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            lora_targets=self.lora_targets, max_prompt_tokens=self.max_prompt_tokens,
                            max_answer_tokens=self.max_answer_tokens, stage=self.stage)


@dataclass
class PathFLIPInstructDataConfig(DataConfig):
    """The ``data:`` section of a PathFLIP-instruct config.

    Attributes:
        instructions: Instruction files (one path or a list): JSON/JSONL conversations or SlideBench-style
            multiple-choice tables (:mod:`pathvl.data.instructions`).
        captions: Optional CSV/JSONL of slide id and caption: captioning instructions (stage 1).
        caption_prompt: The captioning instruction.
        max_patches: Patches sampled per slide and epoch (0: all); evaluation spaces as many evenly.
    """

    instructions: str | list[str] = ""
    captions: str = ""
    caption_prompt: str = "Describe this slide."
    max_patches: int = 4096


class _ConfigValueError(ConfigError):
    pass


def _lm_tokenizer(m: PathFLIPInstructConfig) -> Any:
    """The LM's tokenizer without loading the LM (``tiny``: the slide model's text tokenizer)."""
    if m.lm == "tiny":
        return text_tokenizer(m.slide.text_encoder if m.slide is not None else "tiny-text")
    from transformers import AutoTokenizer

    from pathvl.models.causal_lm import check_lm_dir

    return AutoTokenizer.from_pretrained(check_lm_dir(m.lm), local_files_only=True)


def _load_lm(m: PathFLIPInstructConfig, tok: Any) -> tuple[nn.Module, Any]:
    from pathvl.models.causal_lm import _DTYPES, check_lm_dir, load_causal_lm, tiny_causal_lm

    if m.lm == "tiny":
        positions = max(512, m.max_prompt_tokens + m.max_answer_tokens + m.top_k_patches + 64)
        return tiny_causal_lm(tok, hidden=m.tiny_lm_width, layers=m.tiny_lm_layers, heads=2, seed=0,
                              max_positions=positions, init_std=m.tiny_lm_init_std), tok
    folder = check_lm_dir(m.lm)
    try:
        return load_causal_lm(folder, _DTYPES.get(m.lm_dtype))
    except OSError as e:
        raise FileNotFoundError(f"model.lm: cannot load the LM from {folder}: {e}") from None


def _init_run_config(path: str) -> tuple[str, TrainConfig]:
    """Family and resolved config of the ``init_from`` run."""
    try:
        meta = read_meta(path)
    except (FileNotFoundError, ValueError) as e:
        raise _ConfigValueError(f"model.init_from: {path} is not a pathvl run ({e})") from None
    fam = str(meta.get("family", ""))
    if fam not in ("pathflip", PathFLIPInstructFamily.name):
        raise _ConfigValueError(f"model.init_from: {path} is a {fam} run; stage 1 starts from a pathflip run, stage 2 "
                                f"from a {PathFLIPInstructFamily.name} stage-1 run")
    return fam, config_from_dict(meta["config"])


@register_family
class PathFLIPInstructFamily(Family):
    """PathFLIP instruction tuning (slide level): the LM loss on answers, stage 1 or 2."""

    name = "pathflip-instruct"
    model_config = PathFLIPInstructConfig
    data_config = PathFLIPInstructDataConfig
    loss_names = LOSS_NAMES
    kind = "slide"

    def _settle_slide(self, cfg: TrainConfig) -> None:
        """Copies the slide encoder's architecture (and checks the features) from ``init_from``."""
        m = cfg.model
        if not cfg.run.save_frozen:
            raise _ConfigValueError(
                "run.save_frozen=false would leave the frozen slide encoder out of the checkpoints, and evaluation "
                "could not rebuild it (model_from_config reads no run); keep run.save_frozen=true")
        if m.slide is not None:  # given, or copied when the run started (a resume needs no init_from)
            return
        if not m.init_from:
            raise _ConfigValueError("model.init_from: give the trained PathFLIP run whose slide encoder answers "
                                    "the instructions (stage 2: the stage-1 run)")
        fam, icfg = _init_run_config(m.init_from)
        slide = icfg.model if fam == "pathflip" else icfg.model.slide
        cfg.model = dataclasses.replace(m, slide=slide)
        if icfg.data.features != cfg.data.features:
            raise _ConfigValueError(f"data.features={cfg.data.features!r}, but the slide encoder of {m.init_from} "
                                    f"reads {icfg.data.features!r} features; set data.features={icfg.data.features}")

    def build_data(self, cfg: TrainConfig, dist: DistInfo) -> StepLoader:
        """Resumable, rank-sharded batches of (slide, instruction, answer), patches re-sampled every epoch."""
        self._settle_slide(cfg)
        d, m = cfg.data, cfg.model
        if not d.dataset:
            raise _ConfigValueError("data.dataset: give the dataset folder (pathvl tile + pathvl embed)")
        files = [d.instructions] if isinstance(d.instructions, str) else list(d.instructions)
        ds = build_instruction_dataset(d.dataset, files, d.features, captions=d.captions or None,
                                       caption_prompt=d.caption_prompt, max_patches=d.max_patches,
                                       mags=tuple(float(x) for x in d.mags), train=True, seed=cfg.run.seed)
        collate = partial(collate_instructions, slide_tokenizer=text_tokenizer(m.slide.text_encoder),
                          bridge=BridgeTokenizer(_lm_tokenizer(m), m.bridge()), max_tokens=m.slide.max_text_tokens)
        return StepLoader.from_config(ds, cfg, dist, collate_fn=collate)

    def complete_config(self, cfg: TrainConfig, data: Any) -> None:
        """``model.slide`` from ``init_from`` (with the dataset's feature width if still unset)."""
        self._settle_slide(cfg)
        m = cfg.model
        if m.slide.feature_dim <= 0:
            dataset = getattr(data, "dataset", data)
            cfg.model = dataclasses.replace(m, slide=dataclasses.replace(m.slide, feature_dim=int(dataset.feature_dim)))

    def build_losses(self, cfg: TrainConfig, dist: DistInfo) -> dict[str, nn.Module]:
        return {"lm": LMLoss()}

    def model_from_config(self, model_cfg: Any, losses: Sequence[str] | None = None) -> PathFLIPInstruct:
        """The model from its config (pure: reads only the LM's folder; every trained weight is in the
        checkpoint, LoRA layers are created for a stage-2 config)."""
        if model_cfg.slide is None or model_cfg.slide.feature_dim <= 0:
            raise _ConfigValueError("model.slide: the slide encoder's architecture is not in the config (it is "
                                    "copied from model.init_from when a run starts)")
        slide = PathFLIP(model_cfg.slide, active=("itc",))
        lm, tok = _load_lm(model_cfg, _lm_tokenizer(model_cfg))
        return PathFLIPInstruct(slide, lm, tok, model_cfg.bridge(), default_prompt=model_cfg.default_prompt)

    def init_for_training(self, model: nn.Module, cfg: TrainConfig, data: Any) -> None:
        """The slide encoder (and, from a stage-1 run, the projector) from ``model.init_from``."""
        path = cfg.model.init_from
        if not path:
            return
        fam, _ = _init_run_config(path)
        state, meta = load_model_weights(path, family=fam)
        omitted = meta["omitted"]
        if fam == "pathflip":
            load_into(model.slide, state, omitted)
            return
        for prefix, module in (("slide.", model.slide), ("bridge.projector.", model.bridge.projector)):
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            load_into(module, part, [k[len(prefix):] for k in omitted if k.startswith(prefix)])
