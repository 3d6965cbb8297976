"""PathAlign: a BLIP-2 Q-Former on whole slides, aligned with report text, and a report writer.

Ahmed et al., "PathAlign: A vision-language model for whole slide images in histopathology" (2024)
trains BLIP-2 (Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders
and Large Language Models", ICML 2023) on whole slides paired with curated report text. Here a slide is
the bag of its cached patch features (``pathvl embed``), padded with a mask.

**The Q-Former** (:class:`QFormer`) is a BERT whose layers are shared by two streams: ``num_queries``
learned query tokens and the report's tokens. Both streams use the same self-attention layers (so
queries and text can attend to each other when the mask allows); only the queries cross-attend to the
slide's patch tokens, in every ``cross_every``-th layer (BLIP-2: every other layer), and each stream has
its own feed-forward block (the query one starts as a copy of the text one). It is initialised from a
registry text encoder (``tiny-text`` for tests, ``minilm``, ``bert:<dir>``); the cross-attention layers
are new.

**Stage 1** has three losses, each its own class, meeting the model through names (``forward``):

- ITC (:class:`~pathvl.losses.QFormerITCLoss`): the projected query outputs against the projected [CLS]
  state of the report; the similarity of a slide and a report is the best query,
  ``S_ij = max_q <z_iq, t_j>`` (:func:`query_text_similarity`); gathered across ranks in the loss.
  Queries and text do not see each other (unimodal masks).
- ITM (:class:`~pathvl.losses.ITMLoss`): queries and text attend to each other (bidirectional mask);
  a linear head on every query output, averaged over queries, says match / no match. Each slide gets a
  hard-negative report and each report a hard-negative slide, drawn from the ITC similarities with
  :func:`~pathvl.losses.sample_hard_negatives` (never the positive, never an identical report text).
  Negatives come from this rank's batch.
- ITG (:class:`~pathvl.losses.LMLoss`): the report is generated from the queries with the multimodal
  causal mask (:func:`multimodal_causal_mask`): queries see only queries, text token ``t`` sees every
  query and the text tokens ``<= t``. As in BLIP-2, the queries' keys and values are cached from the
  query pass and reused by the text pass; the first text token is a learned [DEC] embedding in place of
  [CLS]. Vocabulary logits are computed only at positions that predict a token, packed into one row.

**Stage 2** projects the query outputs into a frozen causal LM through the shared LM bridge
(:class:`~pathvl.models.lm_bridge.LMBridge`: a projector, optional LoRA adapters added through peft) and
trains the bridge (and, unless ``freeze_qformer``, the Q-Former's query path) with the LM loss on the report after a
prompt, which can carry clinical context. Decoding is greedy (the bridge's KV-cached loop) or beam
search (:func:`beam_search`); a stage-1 model generates with its own ITG decoder.

**Uses** (functions at the bottom): :func:`generate_reports`, :func:`write_slide_report`,
:func:`embed_slides` with :func:`retrieval_metrics` (slide <-> report Recall@K), :func:`zeroshot_slides`
with :func:`topk_accuracy` (prompt ensembles), :func:`evaluate_reports` (BLEU, ROUGE-L, METEOR where it
runs offline, from :mod:`pathvl.eval.captioning`).

Inputs are checked: reports that are empty, enormous or not valid UTF-8 (or that look mis-decoded) raise
:class:`ReportError`; slides without features raise (the dataset names ``pathvl embed``); a local LM
folder that is missing raises :class:`FileNotFoundError`, one holding an architecture that is not a
decoder-only causal LM raises :class:`UnsupportedLMError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathvl.config import ConfigError
from pathvl.losses.lm import IGNORE_INDEX, pack_next_token
from pathvl.losses.matching import itm_pairs
from pathvl.models.causal_lm import _DTYPES, check_lm_dir
from pathvl.models.decoding import beam_search
from pathvl.models.layers import ModelInputError
from pathvl.models.lm_bridge import BridgeConfig, LMBridge
from pathvl.models.qformer import QFormer, _LMHead, check_bert_layout, query_text_similarity
from pathvl.models.text_backbone import text_backbone, text_tokenizer
from pathvl.text.reports import check_report

#: Loss names of the family: stage 1 uses ``itc``, ``itm``, ``itg``; stage 2 uses ``lm``.
LOSS_NAMES = ("itc", "itm", "itg", "lm")

_STAGE_LOSSES = {1: frozenset({"itc", "itm", "itg"}), 2: frozenset({"lm"})}


@dataclass
class PathAlignConfig:
    """Architecture and stage of a PathAlign model (the ``model:`` section of a config file).

    Attributes:
        feature_dim: Width of the cached patch features; 0 = read it from the dataset.
        text_encoder: Registry text encoder the Q-Former starts from: ``tiny-text``, ``minilm`` or
            ``bert:<dir>`` (a BERT-layout encoder with absolute positions).
        num_queries: Learned query tokens (BLIP-2: 32).
        cross_every: Cross-attention to the patches in every ``cross_every``-th layer (BLIP-2: 2).
        embed_dim: Width of the ITC space (BLIP-2: 256).
        dropout: Dropout in the Q-Former.
        pos_frequencies: Octaves of Fourier features of the patch centre added to the patch tokens (0: none,
            PathAlign's setting; the projection starts at zero).
        max_text_tokens: Truncation of reports (tokens, special tokens included); also the longest
            generated report of a stage-1 model and the answer truncation in stage 2.
        max_report_chars: A report longer than this many characters is an error (a wrong column or file).
        itm_max: At most this many slides of a batch get ITM pairs (0: all).
        text_max: At most this many slides of a batch go through ITG (0: all).
        init_temperature: Initial ITC temperature (learned; BLIP-2 0.07).
        itc_label_smoothing: Label smoothing of ITC, in both directions (LAVIS's ``blip2_qformer.py``: 0.1).
        itg_label_smoothing: Label smoothing of ITG (BLIP-2: 0.1).
        stage: 1 = Q-Former pre-training (ITC/ITM/ITG), 2 = generation through a causal LM.
        init_from: Stage 2: a stage-1 run folder or checkpoint whose Q-Former weights are loaded.
        lm: Stage 2: ``tiny`` (a tiny random Llama on the Q-Former's tokenizer, for tests) or a local
            Hugging Face causal LM folder (never downloaded).
        lm_dtype: dtype the LM is loaded in (``auto``: as transformers decides).
        tiny_lm_width: Hidden width of the ``tiny`` LM.
        tiny_lm_layers: Layers of the ``tiny`` LM.
        freeze_qformer: Stage 2: keep the Q-Former frozen (only the projector, and LoRA, train).
        lora: Stage 2: add LoRA adapters to the LM's attention (through peft:
            :func:`pathvl.models.lm_bridge.apply_lora`).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_targets: LM modules given LoRA (empty: guessed from the architecture).
        projector_layers: Layers of the query-to-LM projector (BLIP-2: 1, a linear map).
        projector_hidden: Hidden width of a deeper projector (0: the LM's width).
        max_prompt_tokens: Prompt truncation in stage 2.
        prompt: The instruction given to the LM.
        context_template: How clinical context is put before the prompt (must contain ``{context}``).
    """

    feature_dim: int = 0
    text_encoder: str = field(default="tiny-text", metadata={"path_prefix": "bert:"})
    num_queries: int = 32
    cross_every: int = 2
    embed_dim: int = 256
    dropout: float = 0.1
    pos_frequencies: int = 0
    max_text_tokens: int = 64
    max_report_chars: int = 50_000
    itm_max: int = 0
    text_max: int = 0
    init_temperature: float = 0.07
    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    stage: int = 1
    init_from: str = field(default="", metadata={"path": True})
    lm: str = field(default="tiny", metadata={"path": True, "not_paths": ("tiny",)})
    lm_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tiny_lm_width: int = 64
    tiny_lm_layers: int = 2
    freeze_qformer: bool = False
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    projector_layers: int = 1
    projector_hidden: int = 0
    max_prompt_tokens: int = 128
    prompt: str = "Write the pathology report for this slide."
    context_template: str = "Clinical context: {context}\n"

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.num_queries < 1 or self.cross_every < 1:
            raise ValueError("num_queries and cross_every must be >= 1")
        if self.max_text_tokens < 4:
            raise ValueError(f"max_text_tokens must be >= 4, got {self.max_text_tokens}")
        if self.max_report_chars < 1:
            raise ValueError("max_report_chars must be >= 1")
        if "{context}" not in self.context_template:
            raise ValueError("context_template must contain '{context}'")
        self.lora_targets = tuple(self.lora_targets)


def bridge_config(cfg: PathAlignConfig) -> BridgeConfig:
    """The LM bridge settings of a stage-2 config."""
    return BridgeConfig(projector_layers=cfg.projector_layers, projector_hidden=cfg.projector_hidden,
                        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_targets=tuple(cfg.lora_targets),
                        max_prompt_tokens=cfg.max_prompt_tokens, max_answer_tokens=cfg.max_text_tokens,
                        stage=2 if cfg.lora else 1)


def build_prompt(cfg: PathAlignConfig, context: str | None = None, prompt: str | None = None) -> str:
    """The stage-2 prompt: ``context_template`` with the clinical context (if any), then the instruction."""
    base = cfg.prompt if prompt is None else prompt
    if context is not None and str(context).strip():
        ctx = check_report(context, "?", cfg.max_report_chars, "clinical context")
        return cfg.context_template.format(context=ctx) + base
    return base


def load_lm(cfg: PathAlignConfig, qformer_tok: Any | None = None) -> tuple[nn.Module, Any]:
    """The stage-2 causal LM and its tokenizer: ``tiny`` (random, on the Q-Former's tokenizer) or a folder.

    Raises:
        FileNotFoundError: A missing folder, or files the folder lacks.
        UnsupportedLMError: Not a decoder-only causal LM.
    """
    from pathvl.models.causal_lm import load_causal_lm, tiny_causal_lm

    if cfg.lm == "tiny":
        tok = qformer_tok if qformer_tok is not None else text_tokenizer(cfg.text_encoder)
        lm = tiny_causal_lm(tok, hidden=cfg.tiny_lm_width, layers=cfg.tiny_lm_layers, heads=2,
                            max_positions=max(512, cfg.num_queries + cfg.max_prompt_tokens + cfg.max_text_tokens + 8))
        return lm, tok
    folder = check_lm_dir(cfg.lm)
    try:
        return load_causal_lm(folder, _DTYPES.get(cfg.lm_dtype))
    except OSError as e:
        raise FileNotFoundError(f"model.lm: cannot load the LM from {folder}: {e}") from None


def lm_tokenizer(cfg: PathAlignConfig) -> Any:
    """The stage-2 LM's tokenizer without loading the LM."""
    if cfg.lm == "tiny":
        return text_tokenizer(cfg.text_encoder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_lm_dir(cfg.lm), local_files_only=True)


class PathAlign(nn.Module):
    """The PathAlign model (Ahmed et al., "PathAlign", 2024): a BLIP-2 Q-Former (Li et al., ICML 2023) on a
    slide's patch features, stage-1 heads for ITC/ITM/ITG and, in stage 2, an LM bridge (see the module
    docstring).

    Args:
        cfg: Architecture and stage (``feature_dim`` must be set).
        active: Loss names in use (default: all of the stage's); parts of other losses are skipped.
        lm: Stage 2: an already built ``(causal LM, tokenizer)`` instead of ``cfg.lm``.

    Raises:
        ValueError: ``feature_dim`` unset, or losses that do not belong to the stage.
    """

    family = "pathalign"

    def __init__(self, cfg: PathAlignConfig, active: Sequence[str] | None = None,
                 lm: tuple[nn.Module, Any] | None = None) -> None:
        super().__init__()
        if cfg.feature_dim <= 0:
            raise ValueError("PathAlignConfig.feature_dim must be set (the width of the cached patch features)")
        allowed = _STAGE_LOSSES[cfg.stage]
        active = set(allowed if active is None else active)
        if not active <= allowed:
            raise ConfigError(f"losses {sorted(active - allowed)} do not belong to stage {cfg.stage} (stage 1: itc, "
                             "itm, itg; stage 2: lm); set their weights to 0 or change model.stage")
        self.cfg = cfg
        self.active = active
        bert, self.tokenizer, _ = text_backbone(cfg.text_encoder, "full")
        check_bert_layout(bert, cfg.text_encoder)
        self.qformer = QFormer(bert, cfg.feature_dim, cfg.num_queries, cfg.cross_every, cfg.dropout,
                               cfg.pos_frequencies)
        if cfg.max_text_tokens > self.qformer.max_positions:
            raise ConfigError(f"max_text_tokens={cfg.max_text_tokens} exceeds the {self.qformer.max_positions} "
                             f"positions of {cfg.text_encoder!r}")
        d, E = self.qformer.width, cfg.embed_dim
        self.width = d
        self.vision_proj = nn.Linear(d, E)
        self.text_proj = nn.Linear(d, E)
        self.itm_head = nn.Linear(d, 2)
        self.lm_head = _LMHead(self.qformer.word_embeddings)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        tok = self.tokenizer
        self.eos_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.bridge: LMBridge | None = None
        if cfg.stage == 2:
            model, lm_tok = lm if lm is not None else load_lm(cfg, self.tokenizer)
            self.bridge = LMBridge(model, lm_tok, d, bridge_config(cfg))
        self._set_trainable()

    # ---------------------------------------------------------------- stages
    def _set_trainable(self) -> None:
        if self.bridge is None:
            self.requires_grad_(True)
            return
        self.requires_grad_(False)
        self.bridge.set_stage(2 if self.cfg.lora else 1)  # projector (+ LoRA) trainable, the LM frozen
        if not self.cfg.freeze_qformer:
            for p in self.qformer.query_parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> PathAlign:
        super().train(mode)
        if self.bridge is not None:
            if not self.cfg.lora:
                self.bridge.lm.eval()
            if self.cfg.freeze_qformer:
                self.qformer.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay."""
        return {"logit_scale", "qformer.query_tokens", "qformer.dec_embed"}

    def load_stage1(self, state: Mapping[str, Tensor], path: str | Path = "model.init_from") -> None:
        """Loads the Q-Former (everything but the LM bridge) from the weights of a stage-1 model.

        Args:
            state: The stage-1 state dict.
            path: Where it came from (for messages).

        Raises:
            ValueError: The weights do not hold this Q-Former (other sizes, text encoder or features).
        """
        own = [k for k in self.state_dict() if not k.startswith("bridge.")]
        missing = [k for k in own if k not in state]
        if missing:
            raise ConfigError(f"model.init_from: {path} lacks {len(missing)} Q-Former weights (e.g. {missing[:3]}); "
                             "give a stage-1 PathAlign run of the same model settings")
        sub = {k: state[k] for k in own}
        try:
            self.load_state_dict(sub, strict=False)
        except RuntimeError as e:
            raise ConfigError(f"model.init_from: {path} does not fit this Q-Former: {e}") from None

    # ---------------------------------------------------------------- inputs
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def _patches(self, features: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if features.dim() != 3:
            raise ModelInputError(f"features must be (B, N, D), got shape {tuple(features.shape)}")
        B, N, width = features.shape
        if width != self.cfg.feature_dim:
            raise ModelInputError(f"features have width {width} but the model takes {self.cfg.feature_dim}-d features "
                             "(model.feature_dim): use the encoder the model was trained on")
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=features.device)
        mask = mask.bool()
        if N == 0 or not bool(mask.any(1).all()):
            empty = list(range(B)) if N == 0 else torch.nonzero(~mask.any(1)).flatten().tolist()
            raise ModelInputError(f"slide(s) {empty[:8]} of the batch have no patch features (patch_mask all False); "
                             "a slide without features cannot be encoded (run `pathvl embed`)")
        if not bool(torch.isfinite(features[mask]).all()):
            raise ModelInputError("patch features contain NaN or inf")
        return features, mask

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask`` of texts for :meth:`encode_text`."""
        from pathvl.text.tokenize import tokenize

        return tokenize(self.tokenizer, [str(t) for t in texts], max_length=self.cfg.max_text_tokens)

    # ---------------------------------------------------------------- encoders (retrieval, zero-shot)
    def query_states(self, features: Tensor, mask: Tensor | None = None, pos: Tensor | None = None
                     ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor, Tensor]:
        """``(query states (B, Q, d), per-layer query keys/values, patch tokens, patch mask)``."""
        features, mask = self._patches(features, mask)
        image = self.qformer.image_tokens(features, pos)
        q, cache = self.qformer.encode_queries(image, mask)
        return q, cache, image, mask

    def encode_slide(self, features: Tensor, mask: Tensor | None = None, pos: Tensor | None = None,
                     normalize: bool = True, pool: Literal["none", "mean"] = "none") -> Tensor:
        """Slide embedding: the projected query outputs ``(B, Q, E)``.

        Compare them to texts with :func:`query_text_similarity` (the best query, as trained). ``pool=
        "mean"`` returns the normalised mean of the normalised queries ``(B, E)``, a single vector for tools
        that need one (an approximation of the max-over-queries similarity).
        """
        q, _, _, _ = self.query_states(features.to(self.device), None if mask is None else mask.to(self.device),
                                       None if pos is None else pos.to(self.device))
        z = self.vision_proj(q)
        if normalize or pool == "mean":
            z = F.normalize(z, dim=-1)
        if pool == "mean":
            z = F.normalize(z.mean(1), dim=-1)
        return z

    def encode_text(self, tokens: Mapping[str, Tensor] | Sequence[str], normalize: bool = True) -> Tensor:
        """Report embedding ``(B, E)``: the projected [CLS] state of the text-only pass."""
        if not isinstance(tokens, Mapping):
            tokens = self.tokenize(list(tokens))
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        e = self.text_proj(self.qformer.encode_text(ids, mask)[:, 0])
        return F.normalize(e, dim=-1) if normalize else e

    def similarity(self, slide_emb: Tensor, text_emb: Tensor) -> Tensor:
        """``(S, T)`` max-over-queries similarity of :meth:`encode_slide` and :meth:`encode_text` outputs."""
        return query_text_similarity(slide_emb, text_emb)

    @torch.no_grad()
    def patch_text_scores(self, features: Tensor, mask: Tensor | None, pos: Tensor | None,
                          texts: Mapping[str, Tensor] | Sequence[str]) -> Tensor:
        """Where each text lies on each slide: the cross-attention over the patches of the query that
        matches the text best (BLIP-2's ITC similarity picks the query), averaged over heads and cross-
        attention layers.

        Returns:
            ``(B, T, N)`` float32 weights summing to 1 over a slide's patches; NaN at padding.
        """
        dev = self.device
        features, mask = self._patches(features.to(dev), None if mask is None else mask.to(dev))
        image = self.qformer.image_tokens(features, None if pos is None else pos.to(dev))
        maps: list[Tensor] = []
        q, _ = self.qformer.encode_queries(image, mask, maps=maps)
        att = torch.stack(maps).mean(0)  # (B, Q, N)
        z = F.normalize(self.vision_proj(q).float(), dim=-1)  # (B, Q, E)
        t = self.encode_text(texts).float()  # (T, E)
        best = torch.einsum("bqe,te->btq", z, t).argmax(-1)  # (B, T)
        s = att.gather(1, best[:, :, None].expand(-1, -1, att.shape[-1]))  # (B, T, N)
        return s.masked_fill(~mask[:, None, :], float("nan"))

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Named outputs for the active losses.

        Args:
            batch: From :func:`collate_pathalign`: ``features (B, N, Dv)``, ``patch_mask (B, N)``, ``pos``,
                ``caption_ids``/``caption_mask (B, L)`` and, in stage 2, ``prompt_ids``/``prompt_mask`` and
                ``answer_ids``/``answer_mask``.

        Returns:
            Stage 1: ``query_emb (B, Q, E)``, ``text_emb (B, E)``, ``logit_scale`` (ITC); ``itm_logits (M, 2)``,
            ``itm_labels (M,)`` plus ``itm_image_index``/``itm_text_index`` (ITM); ``lm_logits (1, T + 1, V)``
            and ``lm_labels (1, T + 1)`` (ITG, the ``T`` predicted tokens of the batch packed in one row).
            Stage 2: ``lm_logits (B, La + 1, V)`` and ``lm_labels (B, La + 1)``.
        """
        q, cache, image, pmask = self.query_states(batch["features"], batch.get("patch_mask"), batch.get("pos"))
        if self.bridge is not None:
            return self._lm_outputs(q, batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                                    batch["answer_mask"])
        act = self.active
        out: dict[str, Tensor] = {}
        ids, tmask = batch["caption_ids"], batch["caption_mask"]
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        if act & {"itc", "itm"}:
            query_emb = self.vision_proj(q)  # (B, Q, E)
            text_emb = self.text_proj(self.qformer.encode_text(ids, tmask)[:, 0])  # (B, E)
            out.update(query_emb=query_emb, text_emb=text_emb, logit_scale=scale)
            if "itm" in act:
                out.update(self._itm(image, pmask, ids, tmask, query_emb, text_emb, scale))
        if "itg" in act:
            out.update(self._itg(ids, tmask, cache))
        return out

    def _subset(self, n: int, cap: int, device: torch.device) -> Tensor:
        rows = torch.arange(n, device=device)
        if cap and n > cap:
            rows = rows[torch.linspace(0, n - 1, cap, device=device).round().long()]
        return rows

    def _itm(self, image: Tensor, pmask: Tensor, ids: Tensor, tmask: Tensor, query_emb: Tensor, text_emb: Tensor,
             scale: Tensor) -> dict[str, Tensor]:
        rows = self._subset(ids.shape[0], self.cfg.itm_max, ids.device)
        with torch.no_grad():
            sub = ids[rows].masked_fill(tmask[rows] == 0, -1)
            same = (sub[:, None, :] == sub[None, :, :]).all(-1)  # identical report texts
            sim = scale * query_text_similarity(F.normalize(query_emb[rows].float(), dim=-1),
                                                F.normalize(text_emb[rows].float(), dim=-1))
            img, txt, labels = itm_pairs(sim, same)
        img_idx, txt_idx = rows[img], rows[txt]  # (3m,)
        hq = self.qformer.encode_joint(image[img_idx], pmask[img_idx], ids[txt_idx], tmask[txt_idx])  # (3m, Q, d)
        logits = self.itm_head(hq).mean(1)  # (3m, 2), averaged over queries
        return {"itm_logits": logits, "itm_labels": labels, "itm_image_index": img_idx, "itm_text_index": txt_idx}

    def _itg(self, ids: Tensor, tmask: Tensor, cache: Sequence[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        rows = self._subset(ids.shape[0], self.cfg.text_max, ids.device)
        ids, tmask = ids[rows], tmask[rows]
        h = self.qformer.decode_text(ids, tmask, [(k[rows], v[rows]) for k, v in cache])  # (n, L, d)
        return pack_next_token(h, ids, tmask, self.lm_head)  # the vocabulary only where a token is predicted

    # ---------------------------------------------------------------- stage 2: the LM
    def _lm_prefix(self, q: Tensor, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``[projected queries; prompt]`` embeddings and mask, the layout of :class:`LMBridge`."""
        br = self.bridge
        assert br is not None
        emb = br.lm.get_input_embeddings()
        v = br.projector(q.to(br.projector.net[0].weight.dtype)).to(emb.weight.dtype)  # (B, Q, H)
        ones = torch.ones(q.shape[:2], dtype=torch.long, device=q.device)
        return (torch.cat([v, emb(prompt_ids.to(q.device))], dim=1),
                torch.cat([ones, prompt_mask.to(q.device).long()], dim=1))

    def _lm_call(self, embeds: Tensor, mask: Tensor, keep: int) -> Tensor:
        """Logits of the last ``keep`` positions (``logits_to_keep`` where the LM supports it)."""
        lm = self.bridge.lm
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        try:
            out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False,
                     logits_to_keep=keep)
        except TypeError:  # an LM without logits_to_keep
            out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.logits[:, -keep:]

    def _lm_outputs(self, q: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, answer_ids: Tensor,
                    answer_mask: Tensor) -> dict[str, Tensor]:
        """Teacher-forced LM logits at the answer positions only (plus the last prompt position)."""
        emb = self.bridge.lm.get_input_embeddings()
        prefix, pmask = self._lm_prefix(q, prompt_ids, prompt_mask)
        embeds = torch.cat([prefix, emb(answer_ids)], dim=1)
        mask = torch.cat([pmask, answer_mask.long()], dim=1)
        keep = answer_ids.shape[1] + 1
        logits = self._lm_call(embeds, mask, keep)  # (B, La + 1, V)
        head = torch.full((answer_ids.shape[0], 1), IGNORE_INDEX, dtype=torch.long, device=answer_ids.device)
        labels = torch.cat([head, answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)], dim=1)
        return {"lm_logits": logits, "lm_labels": labels}

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, features: Tensor, mask: Tensor | None = None, pos: Tensor | None = None,
                 prompts: str | Sequence[str] | None = None, contexts: str | Sequence[str | None] | None = None,
                 max_new_tokens: int = 64, num_beams: int = 1, length_penalty: float = 1.0) -> list[str]:
        """Reports for a batch of slides; see :func:`generate_reports`."""
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        dev = self.device
        q, cache, _, _ = self.query_states(features.to(dev), None if mask is None else mask.to(dev),
                                           None if pos is None else pos.to(dev))
        B = q.shape[0]
        if self.bridge is None:
            if prompts is not None or contexts is not None:
                warnings.warn("a stage-1 PathAlign model writes reports with its Q-Former decoder and ignores "
                              "prompts and clinical context (train stage 2 to use them)", stacklevel=3)
            return self._generate_itg(q, cache, max_new_tokens, num_beams, length_penalty)
        plist = [prompts] * B if prompts is None or isinstance(prompts, str) else list(prompts)
        clist = [contexts] * B if contexts is None or isinstance(contexts, str) else list(contexts)
        if len(plist) != B or len(clist) != B:
            raise ValueError(f"{B} slides but {len(plist)} prompts and {len(clist)} contexts")
        texts = [build_prompt(self.cfg, c, p) for p, c in zip(plist, clist)]
        tok = self.bridge.tokenize(texts)
        if num_beams == 1:
            return self.bridge.generate(q, None, tok, max_new_tokens=max_new_tokens)
        prefix, pmask = self._lm_prefix(q, tok["prompt_ids"], tok["prompt_mask"])
        emb = self.bridge.lm.get_input_embeddings()

        def step(seqs: Tensor, src: Tensor) -> Tensor:
            e = torch.cat([prefix[src], emb(seqs)], dim=1)
            m = torch.cat([pmask[src], torch.ones_like(seqs)], dim=1)
            return self._lm_call(e, m, 1)[:, -1]

        out = beam_search(step, B, self.bridge.eos, num_beams, max_new_tokens, length_penalty, dev)
        return [self.bridge.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]

    def _generate_itg(self, q: Tensor, cache: Sequence[tuple[Tensor, Tensor]], max_new_tokens: int, num_beams: int,
                      length_penalty: float) -> list[str]:
        B = q.shape[0]
        max_new = min(max_new_tokens, self.cfg.max_text_tokens - 1)
        placeholder = self.tokenizer.cls_token_id or 0  # replaced by the [DEC] embedding

        def step(seqs: Tensor, src: Tensor) -> Tensor:
            ids = torch.cat([torch.full((seqs.shape[0], 1), placeholder, dtype=torch.long, device=seqs.device),
                             seqs], dim=1)
            h = self.qformer.decode_text(ids, torch.ones_like(ids), [(k[src], v[src]) for k, v in cache])
            return self.lm_head(h[:, -1])

        out = beam_search(step, B, self.eos_id, num_beams, max_new, length_penalty, q.device)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]
