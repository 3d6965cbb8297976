"""A bridge from slide encoders into a causal language model, for instruction following.

Visual tokens of a slide (PathFLIP: its latent tokens plus the patch tokens selected by the instruction;
PathAlign: its Q-Former queries) are projected by a small MLP into the input-embedding space of any
local Hugging Face causal LM and placed before the prompt, as in LLaVA (Liu et al., "Visual Instruction
Tuning", NeurIPS 2023) and PathFLIP (Liu et al., "PathFLIP: Fine-grained Language-Image Pretraining for
Versatile Computational Pathology", 2025)::

    [visual tokens (T)] [pad ...] [bos prompt tokens] [answer tokens eos] [pad ...]

Training runs in two stages (LLaVA's recipe): stage 1 trains the projector only (LM and slide encoder
frozen); stage 2 adds LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
ICLR 2022) to the LM's attention projections through the ``peft`` library
(:func:`~pathvl.models.lora.apply_lora`, which PathFLIP's text-encoder LoRA uses too).

``forward`` returns ``lm_logits`` and ``lm_labels`` (the prompt, the visual tokens and the padding are
-100) for :class:`pathvl.losses.LMLoss`, which shifts by one position inside. Generation
(:meth:`LMBridge.generate`) is greedy or sampled (temperature, top-k, nucleus top-p) with the LM's KV
cache, or beam search (:func:`pathvl.models.decoding.beam_search`); position ids are computed from the
attention mask, so left padding is exact.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pathvl.losses.lm import IGNORE_INDEX
from pathvl.models.decoding import beam_search
from pathvl.models.layers import MLP
from pathvl.models.lora import apply_lora, default_lora_targets, has_lora, lora_parameters

__all__ = [
    "BridgeConfig",
    "BridgeTokenizer",
    "Decoding",
    "LMBridge",
    "PathFLIPInstruct",
    "apply_lora",
    "default_lora_targets",
    "filter_logits",
    "has_lora",
    "lora_parameters",
    "select_patches",
]


# ------------------------------------------------------------------------------------------ tokens
def _special_ids(tokenizer: Any) -> tuple[int | None, int, int]:
    """``(bos, eos, pad)`` ids; BERT-style tokenizers use ``[CLS]``/``[SEP]``."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError("the LM tokenizer has neither an eos nor a sep token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


@dataclass
class BridgeConfig:
    """The LM bridge.

    Attributes:
        top_k_patches: Patch tokens selected by the instruction (PathFLIP), besides the latent tokens.
        projector_layers: Layers of the visual-to-LM MLP (1 = linear, LLaVA-1.5 uses 2).
        projector_hidden: Hidden width of the projector (0 = the LM's width).
        lora_rank: LoRA rank in stage 2.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_targets: LM modules to adapt (empty: guessed from the architecture).
        max_prompt_tokens: Prompt truncation (tokens, bos included).
        max_answer_tokens: Answer truncation (tokens, eos included).
        stage: 1 = projector only, 2 = projector + LoRA.
    """

    top_k_patches: int = 32
    projector_layers: int = 2
    projector_hidden: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()
    max_prompt_tokens: int = 256
    max_answer_tokens: int = 64
    stage: int = 1


def _tokenize(tok: Any, cfg: BridgeConfig, bos: int | None, eos: int, pad: int, prompts: Sequence[str],
              answers: Sequence[str] | None) -> dict[str, Tensor]:
    p_ids = []
    for p in prompts:
        ids = tok(str(p), add_special_tokens=False)["input_ids"]
        head = [bos] if bos is not None else []
        p_ids.append(head + ids[: cfg.max_prompt_tokens - len(head)])
    out = _pad(p_ids, pad, left=True, prefix="prompt")
    if answers is not None:
        if len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        a_ids = [[*tok(str(a), add_special_tokens=False)["input_ids"][: cfg.max_answer_tokens - 1], eos]
                 for a in answers]
        out.update(_pad(a_ids, pad, left=False, prefix="answer"))
    return out


class BridgeTokenizer:
    """:meth:`LMBridge.tokenize` without the LM (for data loaders): left-padded prompts with bos,
    right-padded answers with eos.

    Args:
        tokenizer: The LM's tokenizer.
        cfg: Bridge settings (truncation lengths).
    """

    def __init__(self, tokenizer: Any, cfg: BridgeConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg or BridgeConfig()
        self.bos, self.eos, self.pad = _special_ids(tokenizer)

    def tokenize(self, prompts: Sequence[str], answers: Sequence[str] | None = None) -> dict[str, Tensor]:
        """See :meth:`LMBridge.tokenize`."""
        return _tokenize(self.tokenizer, self.cfg, self.bos, self.eos, self.pad, prompts, answers)


# ------------------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class Decoding:
    """How an answer is decoded.

    Attributes:
        max_new_tokens: Longest answer (eos excluded).
        num_beams: Beam width (1: greedy or sampling); beam search is deterministic.
        do_sample: Sample the next token instead of taking the most likely one.
        temperature: Sampling temperature (logits divided by it).
        top_k: Sample among the ``top_k`` most likely tokens only (0: all).
        top_p: Nucleus sampling: the smallest set of most likely tokens whose probability reaches ``top_p``
            (Holtzman et al., "The Curious Case of Neural Text Degeneration", ICLR 2020); 1: all.
        length_penalty: Beam search: a hypothesis scores its summed log-probability / length ** this.
        seed: Seed of the sampling generator (None: torch's global generator).
    """

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    length_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be >= 1")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("choose sampling or beam search, not both (num_beams > 1 with do_sample)")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Sampling logits ``(B, V)``: divided by ``temperature``, then all but the ``top_k`` largest and all
    outside the nucleus of probability ``top_p`` set to ``-inf`` (the most likely token always stays)."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = x.sort(dim=-1, descending=True)
        probs = srt.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop = before >= top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return x


# ------------------------------------------------------------------------------------------ the bridge
class LMBridge(nn.Module):
    """Visual tokens projected into a causal LM's input embeddings (see the module docstring).

    Args:
        lm: A Hugging Face causal LM (``forward(inputs_embeds=, attention_mask=, position_ids=)``).
        tokenizer: Its tokenizer.
        visual_dim: Width of the visual tokens.
        cfg: Bridge settings.
    """

    def __init__(self, lm: nn.Module, tokenizer: Any, visual_dim: int, cfg: BridgeConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or BridgeConfig()
        self.lm = lm
        self.tokenizer = tokenizer
        self.bos, self.eos, self.pad = _special_ids(tokenizer)
        emb = lm.get_input_embeddings()
        hidden = emb.embedding_dim
        self.projector = MLP(visual_dim, self.cfg.projector_hidden or hidden, hidden,
                             layers=self.cfg.projector_layers)
        self.stage = 0
        self.set_stage(self.cfg.stage)

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: int) -> None:
        """Stage 1: only the projector trains. Stage 2: projector and LoRA adapters (added on first use,
        through peft: :func:`apply_lora`)."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage == 2 and not has_lora(self.lm):
            c = self.cfg
            apply_lora(self.lm, c.lora_targets or None, rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout)
        self.lm.requires_grad_(False)
        self.projector.requires_grad_(True)
        if stage == 2:
            for _, p in lora_parameters(self.lm):
                p.requires_grad_(True)
        self.stage = stage

    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters that currently require gradients."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ tokenisation (outside forward)
    def tokenize(self, prompts: Sequence[str], answers: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Prompts left-padded (``prompt_ids``/``prompt_mask``) and answers right-padded with eos appended
        (``answer_ids``/``answer_mask``); no special tokens but bos/eos are added."""
        return _tokenize(self.tokenizer, self.cfg, self.bos, self.eos, self.pad, prompts, answers)

    # ------------------------------------------------------------------ forward
    def _inputs(self, visual: Tensor, visual_mask: Tensor | None, prompt_ids: Tensor, prompt_mask: Tensor,
                answer_ids: Tensor | None = None, answer_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        emb = self.lm.get_input_embeddings()
        B, T, _ = visual.shape
        dev = prompt_ids.device
        v = self.projector(visual.to(self.projector.net[0].weight.dtype)).to(emb.weight.dtype)  # (B, T, H)
        vmask = torch.ones(B, T, dtype=torch.long, device=dev) if visual_mask is None else visual_mask.long()
        parts, masks = [v, emb(prompt_ids)], [vmask, prompt_mask.long()]
        labels = None
        if answer_ids is not None:
            parts.append(emb(answer_ids))
            masks.append(answer_mask.long())
            ignore = torch.full((B, T + prompt_ids.shape[1]), IGNORE_INDEX, dtype=torch.long, device=dev)
            labels = torch.cat([ignore, answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)], dim=1)
        embeds = torch.cat(parts, dim=1)  # (B, T + Lp [+ La], H)
        mask = torch.cat(masks, dim=1)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        return embeds, mask, pos, labels

    def forward(self, visual: Tensor, visual_mask: Tensor | None, prompt_ids: Tensor, prompt_mask: Tensor,
                answer_ids: Tensor, answer_mask: Tensor) -> dict[str, Tensor]:
        """Teacher-forced LM outputs.

        Args:
            visual: ``(B, T, visual_dim)`` visual tokens.
            visual_mask: ``(B, T)`` True for real tokens (None: all real).
            prompt_ids: ``(B, Lp)`` left-padded prompt (from :meth:`tokenize`).
            prompt_mask: ``(B, Lp)``.
            answer_ids: ``(B, La)`` right-padded answer with eos.
            answer_mask: ``(B, La)``.

        Returns:
            ``lm_logits (B, L, V)`` and ``lm_labels (B, L)`` (answer tokens only, -100 elsewhere).
        """
        embeds, mask, pos, labels = self._inputs(visual, visual_mask, prompt_ids, prompt_mask, answer_ids, answer_mask)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
        return {"lm_logits": out.logits, "lm_labels": labels}

    # ------------------------------------------------------------------ generation
    def _decode(self, rows: Sequence[Sequence[int]]) -> list[str]:
        texts = []
        for row in rows:
            row = list(row)
            if self.eos in row:
                row = row[: row.index(self.eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    @torch.no_grad()
    def generate(self, visual: Tensor, visual_mask: Tensor | None, prompts: Sequence[str] | Mapping[str, Tensor],
                 max_new_tokens: int = 32, decoding: Decoding | None = None) -> list[str]:
        """Answers to ``prompts`` (strings, or the output of :meth:`tokenize`) after the visual tokens.

        Args:
            visual: ``(B, T, visual_dim)``.
            visual_mask: ``(B, T)`` or None.
            prompts: One prompt per row.
            max_new_tokens: Longest answer (when ``decoding`` is None: greedy).
            decoding: Greedy, sampling or beam search (:class:`Decoding`); its ``max_new_tokens`` wins.
        """
        d = decoding or Decoding(max_new_tokens=max_new_tokens)
        tok = prompts if isinstance(prompts, Mapping) else self.tokenize(list(prompts))
        dev = visual.device
        p_ids, p_mask = tok["prompt_ids"].to(dev), tok["prompt_mask"].to(dev)
        embeds, mask, pos, _ = self._inputs(visual, visual_mask, p_ids, p_mask)
        if d.num_beams > 1:
            return self._beam(embeds, mask, d)
        gen = None
        if d.do_sample and d.seed is not None:
            gen = torch.Generator(device=dev).manual_seed(int(d.seed))

        def pick(logits: Tensor) -> Tensor:
            if not d.do_sample:
                return logits.argmax(-1)
            probs = filter_logits(logits, d.temperature, d.top_k, d.top_p).softmax(-1)
            return torch.multinomial(probs, 1, generator=gen)[:, 0]

        B = embeds.shape[0]
        past_kw = _cache_keyword(self.lm)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        past = _past(out)
        nxt = pick(out.logits[:, -1])
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        ids = []
        last = pos[:, -1:]
        for step in range(d.max_new_tokens):
            nxt = torch.where(done, torch.full_like(nxt, self.eos), nxt)
            ids.append(nxt)
            done |= nxt == self.eos
            if bool(done.all()) or step == d.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
            last = last + 1
            out = self.lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                          **{past_kw: past})
            past = _past(out)
            nxt = pick(out.logits[:, -1])
        return self._decode(torch.stack(ids, dim=1).tolist())

    def _beam(self, prefix: Tensor, pmask: Tensor, d: Decoding) -> list[str]:
        """Beam search over the uncached LM (the prefix embeddings are recomputed with each continuation)."""
        emb = self.lm.get_input_embeddings()

        def step(seqs: Tensor, src: Tensor) -> Tensor:
            e = torch.cat([prefix[src], emb(seqs)], dim=1)
            m = torch.cat([pmask[src], torch.ones_like(seqs)], dim=1)
            pos = (m.cumsum(-1) - 1).clamp_min(0)
            return self.lm(inputs_embeds=e, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1]

        rows = beam_search(step, prefix.shape[0], self.eos, d.num_beams, d.max_new_tokens, d.length_penalty,
                           prefix.device)
        return self._decode(rows)


def _past(out: Any) -> Any:
    """The KV cache of an LM output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = out.get("cache")
    return cache if cache is not None else out.past_key_values


def _cache_keyword(lm: nn.Module) -> str:
    """The keyword a causal LM takes its KV cache by (transformers 5 renamed ``past_key_values`` to ``cache``)."""
    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _pad(seqs: list[list[int]], pad: int, left: bool, prefix: str) -> dict[str, Tensor]:
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        if left:
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return {f"{prefix}_ids": ids, f"{prefix}_mask": mask}


# -------------------------------------------------------------------------- PathFLIP instruction model
def select_patches(tokens: Tensor, scores: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` highest-scoring real patch tokens of each slide.

    Args:
        tokens: ``(B, N, d)`` patch tokens.
        scores: ``(B, N)`` relevance of each patch to the instruction.
        mask: ``(B, N)`` True for real patches.
        k: Patches kept (fewer real patches: the rest is masked).

    Returns:
        ``(selected (B, k', d), selected_mask (B, k'))`` with ``k' = min(k, N)``, best first.
    """
    k = min(k, tokens.shape[1])
    s = scores.float().masked_fill(~mask.bool(), float("-inf"))
    top, idx = s.topk(k, dim=1)  # (B, k)
    sel = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
    return sel, torch.isfinite(top)


class PathFLIPInstruct(nn.Module):
    """PathFLIP instruction following: a frozen PathFLIP slide model, patch selection by the instruction,
    and an :class:`LMBridge` (PathFLIP, Liu et al. 2025, "instruction following" with an LLM).

    The visual tokens of a slide are its latent tokens followed by the ``top_k_patches`` patch tokens most
    similar to the instruction (PathFLIP's text-conditioned patch scores). The model follows the
    :class:`~pathvl.eval.protocols.SlideModel` protocol by delegating ``tokenize``, ``encode_text``,
    ``encode_slide``, ``similarity`` and ``patch_text_scores`` to its slide model, so every slide-level
    evaluation takes it; :meth:`generate` answers questions.

    Args:
        slide_model: A trained :class:`pathvl.models.pathflip.PathFLIP` (frozen here).
        lm: The causal LM.
        tokenizer: The LM's tokenizer.
        cfg: Bridge settings.
        default_prompt: The instruction when :meth:`generate` is given none.
    """

    family = "pathflip-instruct"

    def __init__(self, slide_model: nn.Module, lm: nn.Module, tokenizer: Any, cfg: BridgeConfig | None = None,
                 default_prompt: str = "Describe this slide.") -> None:
        super().__init__()
        self.slide = slide_model
        self.slide.requires_grad_(False)
        self.slide.eval()
        self.bridge = LMBridge(lm, tokenizer, slide_model.width, cfg)
        self.cfg = self.bridge.cfg
        self.default_prompt = default_prompt

    def train(self, mode: bool = True) -> PathFLIPInstruct:
        super().train(mode)
        self.slide.eval()  # frozen: no dropout
        return self

    def set_stage(self, stage: int) -> None:
        """See :meth:`LMBridge.set_stage`."""
        self.bridge.set_stage(stage)

    # ------------------------------------------------------------------ the SlideModel protocol (delegated)
    @property
    def tokenizer(self) -> Any:
        """The slide model's text tokenizer (instructions are scored against patches with it)."""
        return self.slide.tokenizer

    @property
    def logit_scale(self) -> Tensor:
        """The slide model's learned (log) contrastive scale."""
        return self.slide.logit_scale

    @property
    def device(self) -> torch.device:
        return self.slide.logit_scale.device

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return self.slide.tokenize(texts)

    def encode_text(self, tokens: Mapping[str, Tensor] | Sequence[str], normalize: bool = True) -> Tensor:
        return self.slide.encode_text(tokens, normalize)

    def encode_slide(self, features: Tensor, mask: Tensor | None = None, pos: Tensor | None = None,
                     normalize: bool = True) -> Tensor:
        return self.slide.encode_slide(features, mask, pos, normalize)

    def similarity(self, slide_emb: Tensor, text_emb: Tensor) -> Tensor:
        return self.slide.similarity(slide_emb, text_emb)

    def patch_text_scores(self, features: Tensor, mask: Tensor | None, pos: Tensor | None,
                          texts: Mapping[str, Tensor] | Sequence[str | Sequence[str]],
                          mode: str = "similarity") -> Tensor:
        return self.slide.patch_text_scores(features, mask, pos, texts, mode=mode)

    # ------------------------------------------------------------------ instruction following
    @torch.no_grad()
    def visual_tokens(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Latent tokens + instruction-selected patch tokens ``(B, M + k, d)`` and their mask."""
        feats, pmask = batch["features"], batch["patch_mask"].bool()
        P, L = self.slide.encode_patches(feats, pmask, batch.get("pos"))
        tok = {"input_ids": batch["instr_ids"], "attention_mask": batch["instr_attn"]}
        q = self.slide.encode_text_local(tok, normalize=True)  # (B, E)
        scores = self.slide.patch_similarity(P, q[:, None])[:, 0]  # (B, N)
        sel, smask = select_patches(P, scores, pmask, self.bridge.cfg.top_k_patches)
        vis = torch.cat([L, sel], dim=1)
        vmask = torch.cat([torch.ones(L.shape[:2], dtype=torch.bool, device=L.device), smask], dim=1)
        return vis, vmask

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``lm_logits`` and ``lm_labels`` for a batch of :func:`pathvl.data.instructions.collate_instructions`."""
        vis, vmask = self.visual_tokens(batch)
        return self.bridge(vis, vmask, batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                           batch["answer_mask"])

    def instruction_batch(self, features: Tensor, mask: Tensor | None, pos: Tensor | None,
                          prompts: Sequence[str]) -> dict[str, Tensor]:
        """A generation batch: padded slides and the prompts in both tokenizers."""
        dev = self.device
        B, N, _ = features.shape
        m = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
        instr = self.slide.tokenize(list(prompts))
        batch = {"features": features.to(dev), "patch_mask": m.to(dev).bool(),
                 "instr_ids": instr["input_ids"].to(dev), "instr_attn": instr["attention_mask"].to(dev)}
        if pos is not None:
            batch["pos"] = pos.to(dev)
        batch.update({k: v.to(dev) for k, v in self.bridge.tokenize(list(prompts)).items()})
        return batch

    @torch.no_grad()
    def generate(self, features: Tensor | Mapping[str, Tensor], mask: Tensor | None = None, pos: Tensor | None = None,
                 prompts: str | Sequence[str] | None = None, contexts: Any = None, max_new_tokens: int = 64,
                 num_beams: int = 1, length_penalty: float = 1.0, decoding: Decoding | None = None) -> list[str]:
        """Answers for a batch of slides (the argument order of :meth:`pathvl.models.pathalign.PathAlign.generate`).

        Args:
            features: ``(B, N, D)`` patch features, or a whole batch of
                :func:`~pathvl.data.instructions.collate_instructions` (then ``mask``, ``pos`` and ``prompts``
                are taken from it).
            mask: ``(B, N)`` True for real patches.
            pos: ``(B, N, 2)`` patch centres in [0, 1].
            prompts: One instruction, or one per slide (default :attr:`default_prompt`).
            contexts: Clinical context put before each prompt (``"Clinical context: ...\\n"``), or None.
            max_new_tokens: Longest answer (greedy unless ``decoding`` says otherwise).
            num_beams: Beam width.
            length_penalty: Beam-search length normalisation.
            decoding: Full decoding options (:class:`Decoding`, e.g. sampling); overrides the three above.
        """
        d = decoding or Decoding(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty)
        if isinstance(features, Mapping):
            batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in features.items()}
        else:
            B = features.shape[0]
            plist = [prompts] * B if prompts is None or isinstance(prompts, str) else list(prompts)
            clist = [contexts] * B if contexts is None or isinstance(contexts, str) else list(contexts)
            if len(plist) != B or len(clist) != B:
                raise ValueError(f"{B} slides but {len(plist)} prompts and {len(clist)} contexts")
            texts = [self.prompt_text(p, c) for p, c in zip(plist, clist)]
            batch = self.instruction_batch(features.float(), mask, pos, texts)
        vis, vmask = self.visual_tokens(batch)
        prompt = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"]}
        return self.bridge.generate(vis, vmask, prompt, decoding=d)

    def prompt_text(self, prompt: str | None = None, context: str | None = None) -> str:
        """The instruction given to the LM: the clinical context (if any), then ``prompt`` (or the default)."""
        base = self.default_prompt if prompt is None else str(prompt)
        if context is not None and str(context).strip():
            return f"Clinical context: {str(context).strip()}\n{base}"
        return base
