"""A bridge from slide encoders into a causal language model, for instruction following.

Visual tokens of a slide (PathFLIP: its latent tokens plus the patch tokens selected by the instruction;
PathAlign: its Q-Former queries) are projected by a small MLP into the input-embedding space of any
local Hugging Face causal LM and placed before the prompt, as in LLaVA (Liu et al., "Visual Instruction
Tuning", NeurIPS 2023) and PathFLIP (Liu et al., "PathFLIP: Fine-grained Language-Image Pretraining for
Versatile Computational Pathology", 2025)::

    [visual tokens (T)] [pad ...] [bos prompt tokens] [answer tokens eos] [pad ...]

Training runs in two stages (LLaVA's recipe): stage 1 trains the projector only (LM and slide encoder
frozen); stage 2 adds LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
ICLR 2022) to the LM's attention projections. LoRA is implemented here in a few lines (:class:`LoRALinear`,
:func:`apply_lora`), so ``peft`` is not needed.

``forward`` returns ``lm_logits`` and ``lm_labels`` (the prompt, the visual tokens and the padding are
-100) for :class:`pathvl.losses.LMLoss`, which shifts by one position inside. Generation is greedy with
the LM's KV cache; position ids are computed from the attention mask, so left padding is exact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pathvl.models.layers import MLP

__all__ = [
    "BridgeConfig",
    "InstructionDataset",
    "LMBridge",
    "LoRALinear",
    "PathFLIPInstruct",
    "apply_lora",
    "collate_instructions",
    "default_lora_targets",
    "load_causal_lm",
    "lora_parameters",
    "select_patches",
    "tiny_causal_lm",
    "word_level_tokenizer",
]

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------ LoRA
class LoRALinear(nn.Module):
    r"""A frozen linear map plus a trainable low-rank update, :math:`h = W x + \frac{\alpha}{r} B A x`.

    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. ``A`` is initialised like
    a linear layer (Kaiming uniform) and ``B`` at zero, so wrapping does not change the output.

    Args:
        base: ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2; weight stored ``(in, out)``).
        rank: :math:`r`.
        alpha: :math:`\alpha`.
        dropout: Dropout on the input of the low-rank branch.
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            d_in, d_out = base.in_features, base.out_features
        elif hasattr(base, "nf") and hasattr(base, "weight"):  # transformers.pytorch_utils.Conv1D
            d_in, d_out = base.weight.shape[0], base.weight.shape[1]
        else:
            raise TypeError(f"LoRA wraps nn.Linear or Conv1D modules, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.base(x)
        z = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
        return h + (z * self.scaling).to(h.dtype)


_TARGET_SETS = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("qkv_proj",), ("Wqkv",), ("query_key_value",))


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """LoRA targets for common architectures: Llama/Mistral/Qwen/Gemma ``q_proj, v_proj``; BERT
    ``query, value``; GPT-2 ``c_attn``; Phi-3 ``qkv_proj``; MPT ``Wqkv``; Falcon/NeoX ``query_key_value``.

    Raises:
        ValueError: None of these names exist; the message lists the model's linear layers.
    """
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for targets in _TARGET_SETS:
        if all(t in names for t in targets):
            return targets
    raise ValueError(f"cannot guess LoRA targets; linear layers are named {sorted(_linear_names(model))}; "
                     "pass lora_targets=")


def _linear_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "nf")}


def apply_lora(model: nn.Module, targets: Sequence[str] | None = None, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> list[str]:
    """Wrap every linear layer whose name ends with one of ``targets`` in a :class:`LoRALinear` (in place).

    Args:
        model: Any module (e.g. a Hugging Face LM or BERT).
        targets: Last name components (``q_proj``) or dotted suffixes; default :func:`default_lora_targets`.
        rank: LoRA rank.
        alpha: LoRA alpha.
        dropout: LoRA dropout.

    Returns:
        The names of the wrapped modules (already wrapped ones are skipped).

    Raises:
        ValueError: Nothing matched ``targets``.
    """
    targets = tuple(targets) if targets else default_lora_targets(model)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if not (isinstance(module, nn.Linear) or hasattr(module, "nf")):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, LoRALinear):
            continue
        setattr(parent, child, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout))
        wrapped.append(name)
    if not wrapped and not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"LoRA targets {targets} matched no linear layer; linear layers are named "
                         f"{sorted(_linear_names(model))}")
    return wrapped


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every LoRA ``A`` and ``B`` matrix in ``model``."""
    for name, p in model.named_parameters():
        if name.endswith("lora_A") or name.endswith("lora_B"):
            yield name, p


# ------------------------------------------------------------------------------------------ the LMs
def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a local Hugging Face folder (never downloads).

    Raises:
        FileNotFoundError: ``path`` is not a model folder.
    """
    _offline()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a local Hugging Face model folder (no config.json); nothing is "
                                "downloaded")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)
    return lm, tok


def tiny_causal_lm(tokenizer: Any, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0,
                   max_positions: int = 512, init_std: float = 0.02) -> nn.Module:
    """A tiny randomly initialised Llama (tests, demos) sized to ``tokenizer``'s vocabulary.

    ``init_std`` is the weight initialisation; a large one (e.g. 0.3) gives a random LM whose next-token
    distribution can be steered far from uniform, which lets tests learn a task through the projector.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    bos, eos, pad = _special_ids(tokenizer)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                      tie_word_embeddings=True, initializer_range=init_std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def word_level_tokenizer(texts: Sequence[str], extra: Sequence[str] = ()) -> Any:
    """A small lowercase word-level tokenizer built offline from ``texts`` (tests and demos of tiny LMs).

    The vocabulary holds ``<pad> <s> </s> <unk>``, the letters a-z, every word and punctuation mark of
    ``texts`` (split like the tokenizers library's ``Whitespace`` pre-tokenizer) and ``extra``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with pad, bos, eos and unk tokens.
    """
    import re

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for t in texts for w in re.findall(r"\w+|[^\w\s]+", str(t).lower())}
    words |= set("abcdefghijklmnopqrstuvwxyz") | {str(w).lower() for w in extra}
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(words - set(specials)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _special_ids(tokenizer: Any) -> tuple[int | None, int, int]:
    """``(bos, eos, pad)`` ids; BERT-style tokenizers use ``[CLS]``/``[SEP]``."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError("the LM tokenizer has neither an eos nor a sep token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


# ------------------------------------------------------------------------------------------ the bridge
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
        """Stage 1: only the projector trains. Stage 2: projector and LoRA adapters (added on first use)."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage == 2 and not any(isinstance(m, LoRALinear) for m in self.lm.modules()):
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
        tok = self.tokenizer
        c = self.cfg
        p_ids = []
        for p in prompts:
            ids = tok(str(p), add_special_tokens=False)["input_ids"]
            head = [self.bos] if self.bos is not None else []
            p_ids.append(head + ids[: c.max_prompt_tokens - len(head)])
        out = _pad(p_ids, self.pad, left=True, prefix="prompt")
        if answers is not None:
            if len(answers) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
            a_ids = [[*tok(str(a), add_special_tokens=False)["input_ids"][: c.max_answer_tokens - 1], self.eos]
                     for a in answers]
            out.update(_pad(a_ids, self.pad, left=False, prefix="answer"))
        return out

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

    @torch.no_grad()
    def generate(self, visual: Tensor, visual_mask: Tensor | None, prompts: Sequence[str] | Mapping[str, Tensor],
                 max_new_tokens: int = 32) -> list[str]:
        """Greedy answers to ``prompts`` (strings, or the output of :meth:`tokenize`)."""
        tok = prompts if isinstance(prompts, Mapping) else self.tokenize(list(prompts))
        dev = visual.device
        p_ids, p_mask = tok["prompt_ids"].to(dev), tok["prompt_mask"].to(dev)
        embeds, mask, pos, _ = self._inputs(visual, visual_mask, p_ids, p_mask)
        B = embeds.shape[0]
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        gen = []
        last = pos[:, -1:]
        for step in range(max_new_tokens):
            nxt = torch.where(done, torch.full_like(nxt, self.eos), nxt)
            gen.append(nxt)
            done |= nxt == self.eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
            last = last + 1
            out = self.lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, past_key_values=past,
                          use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
        ids = torch.stack(gen, dim=1).tolist()
        texts = []
        for row in ids:
            if self.eos in row:
                row = row[: row.index(self.eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts


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
    similar to the instruction (PathFLIP's text-conditioned patch scores).

    Args:
        slide_model: A trained :class:`pathvl.models.pathflip.PathFLIP` (frozen here).
        lm: The causal LM.
        tokenizer: The LM's tokenizer.
        cfg: Bridge settings.
    """

    def __init__(self, slide_model: nn.Module, lm: nn.Module, tokenizer: Any, cfg: BridgeConfig | None = None) -> None:
        super().__init__()
        self.slide = slide_model
        self.slide.requires_grad_(False)
        self.slide.eval()
        self.bridge = LMBridge(lm, tokenizer, slide_model.width, cfg)

    def train(self, mode: bool = True) -> PathFLIPInstruct:
        super().train(mode)
        self.slide.eval()  # frozen: no dropout
        return self

    def set_stage(self, stage: int) -> None:
        """See :meth:`LMBridge.set_stage`."""
        self.bridge.set_stage(stage)

    @torch.no_grad()
    def visual_tokens(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Latent tokens + instruction-selected patch tokens ``(B, M + k, d)`` and their mask."""
        feats, pmask = batch["features"], batch["patch_mask"].bool()
        P, L = self.slide.encode_patches(feats, pmask, batch.get("coords"))
        tok = {"input_ids": batch["instr_ids"], "attention_mask": batch["instr_attn"]}
        q = self.slide.encode_text_local(tok, normalize=True)  # (B, E)
        scores = self.slide.patch_similarity(P, q[:, None])[:, 0]  # (B, N)
        sel, smask = select_patches(P, scores, pmask, self.bridge.cfg.top_k_patches)
        vis = torch.cat([L, sel], dim=1)
        vmask = torch.cat([torch.ones(L.shape[:2], dtype=torch.bool, device=L.device), smask], dim=1)
        return vis, vmask

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``lm_logits`` and ``lm_labels`` for a batch of :func:`collate_instructions`."""
        vis, vmask = self.visual_tokens(batch)
        return self.bridge(vis, vmask, batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                           batch["answer_mask"])

    @torch.no_grad()
    def generate(self, batch: Mapping[str, Tensor], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers for a batch of :func:`collate_instructions` (answers, if present, are unused)."""
        vis, vmask = self.visual_tokens(batch)
        prompts = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"]}
        return self.bridge.generate(vis, vmask, prompts, max_new_tokens=max_new_tokens)


class InstructionDataset(torch.utils.data.Dataset):
    """Slides paired with instructions and answers (captioning, free-text or multiple-choice VQA).

    Args:
        slides: A :class:`pathvl.data.slidedata.SlideDataset`.
        records: Dicts with ``slide_id``, ``prompt`` (or ``question`` + ``options``, formatted by
            :func:`pathvl.eval.vqa.format_mcq`) and ``answer``.

    Raises:
        KeyError: A record names a slide that is not in ``slides``.
    """

    def __init__(self, slides: Any, records: Sequence[Mapping[str, Any]]) -> None:
        from pathvl.eval.vqa import format_mcq

        self.slides = slides
        pos = {s: i for i, s in enumerate(slides.slide_ids)}
        self.items = []
        for r in records:
            sid = str(r["slide_id"])
            if sid not in pos:
                raise KeyError(f"instruction record names slide {sid!r}, which is not in the slide dataset")
            prompt = r.get("prompt") or format_mcq(r["question"], r["options"])
            self.items.append((pos[sid], str(prompt), str(r.get("answer", ""))))

    @staticmethod
    def captioning(slides: Any, prompt: str = "Describe this slide.") -> InstructionDataset:
        """Stage-1 records: every slide with ``prompt`` and its caption as the answer."""
        return InstructionDataset(slides, [{"slide_id": s, "prompt": prompt, "answer": c}
                                           for s, c in zip(slides.slide_ids, slides.captions)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, prompt, answer = self.items[i]
        item = dict(self.slides[s])
        item.update(prompt=prompt, answer=answer)
        return item


def collate_instructions(items: Sequence[Mapping[str, Any]], slide_tokenizer: Any, bridge: LMBridge,
                         max_tokens: int = 64) -> dict[str, Tensor]:
    """A batch for :class:`PathFLIPInstruct`: :func:`~pathvl.data.slidedata.collate_slides` plus
    ``instr_ids``/``instr_attn`` (the prompt in the slide model's tokenizer, for patch selection) and
    ``prompt_ids``/``prompt_mask``/``answer_ids``/``answer_mask`` (the LM's tokenizer)."""
    from pathvl.data.slidedata import collate_slides
    from pathvl.text.tokenize import tokenize

    batch = collate_slides(items, slide_tokenizer, max_tokens=max_tokens, dedupe_subcaptions=False)
    prompts = [it["prompt"] for it in items]
    instr = tokenize(slide_tokenizer, prompts, max_length=max_tokens)
    batch.update(instr_ids=instr["input_ids"], instr_attn=instr["attention_mask"])
    batch.update(bridge.tokenize(prompts, [it.get("answer", "") for it in items]))
    return batch
