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
(:class:`~pathvl.models.lm_bridge.LMBridge`: a projector, optional LoRA adapters) and trains the bridge
(and, unless ``freeze_qformer``, the Q-Former's query path) with the LM loss on the report after a
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

import codecs
import copy
import json
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset

from pathvl.models.layers import causal_mask
from pathvl.models.lm_bridge import BridgeConfig, LMBridge, _special_ids
from pathvl.train.config import DataConfig, register_family

__all__ = [
    "LOSS_NAMES",
    "PathAlign",
    "PathAlignConfig",
    "PathAlignDataConfig",
    "PromptTokenizer",
    "QFormer",
    "ReportDataset",
    "ReportError",
    "UnsupportedLMError",
    "beam_search",
    "build_prompt",
    "build_report_dataset",
    "check_lm_dir",
    "check_report",
    "collate_pathalign",
    "embed_slides",
    "evaluate_reports",
    "generate_reports",
    "itm_negatives",
    "load_lm",
    "load_pathalign",
    "multimodal_causal_mask",
    "query_text_similarity",
    "read_reports",
    "retrieval_metrics",
    "topk_accuracy",
    "write_slide_report",
    "zeroshot_slides",
]

#: Loss names of the family: stage 1 uses ``itc``, ``itm``, ``itg``; stage 2 uses ``lm``.
LOSS_NAMES = ("itc", "itm", "itg", "lm")
_STAGE_LOSSES = {1: frozenset({"itc", "itm", "itg"}), 2: frozenset({"lm"})}
IGNORE_INDEX = -100


class ReportError(ValueError):
    """A report (or clinical context) that cannot be used: empty, enormous, or in an unexpected encoding."""


class UnsupportedLMError(ValueError):
    """A local LM folder whose architecture is not a decoder-only causal LM transformers can load."""


# ----------------------------------------------------------------------------------------------- configs
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
        itc_label_smoothing: Label smoothing of ITC.
        itg_label_smoothing: Label smoothing of ITG (BLIP-2: 0.1).
        stage: 1 = Q-Former pre-training (ITC/ITM/ITG), 2 = generation through a causal LM.
        init_from: Stage 2: a stage-1 run folder or checkpoint whose Q-Former weights are loaded.
        lm: Stage 2: ``tiny`` (a tiny random Llama on the Q-Former's tokenizer, for tests) or a local
            Hugging Face causal LM folder (never downloaded).
        lm_dtype: dtype the LM is loaded in (``auto``: as transformers decides).
        tiny_lm_width: Hidden width of the ``tiny`` LM.
        tiny_lm_layers: Layers of the ``tiny`` LM.
        freeze_qformer: Stage 2: keep the Q-Former frozen (only the projector, and LoRA, train).
        lora: Stage 2: add LoRA adapters to the LM's attention.
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
    text_encoder: str = "tiny-text"
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
    itc_label_smoothing: float = 0.0
    itg_label_smoothing: float = 0.1
    stage: int = 1
    init_from: str = ""
    lm: str = "tiny"
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


@dataclass
class PathAlignDataConfig(DataConfig):
    """The ``data:`` section of a PathAlign config.

    Attributes:
        features: Encoder whose cached features are used (``features/<name>`` from ``pathvl embed``).
        reports: CSV/JSONL of slide id and report text (UTF-8; see
            :func:`pathvl.data.slidedata.read_slide_texts` for the accepted column names).
        contexts: Optional CSV/JSONL of slide id and ``context`` (clinical context for stage-2 prompts).
        max_patches: Patches per slide (random without replacement when training; 0 keeps all).
        mags: Keep only these magnifications (empty: every patch of the slide file).
    """

    features: str = "colour-texture"
    reports: str = ""
    contexts: str = ""
    max_patches: int = 1024
    mags: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------ report checks
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MOJIBAKE = re.compile("[\u00c2\u00c3][\u0080-\u00bf]")


def check_report(text: Any, slide_id: str = "?", max_chars: int = 50_000, what: str = "report") -> str:
    """Checks one report and returns it stripped.

    Args:
        text: The report (``str``; ``bytes`` are decoded as strict UTF-8).
        slide_id: Named in the error message.
        max_chars: Longest accepted report.
        what: ``report`` or ``clinical context`` (for the message).

    Raises:
        ReportError: Empty, longer than ``max_chars``, not UTF-8, containing U+FFFD replacement or control
            characters (text decoded with errors upstream), or looking like UTF-8 read as Latin-1.
        TypeError: Neither ``str`` nor ``bytes``.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ReportError(f"slide {slide_id}: the {what} is not UTF-8 ({e.reason} at byte {e.start}); "
                              "decode it with the right codec or re-save the file as UTF-8") from None
    if not isinstance(text, str):
        raise TypeError(f"slide {slide_id}: the {what} must be a string, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise ReportError(f"slide {slide_id}: empty {what}; every slide needs a non-empty report")
    if len(s) > max_chars:
        raise ReportError(
            f"slide {slide_id}: {what} of {len(s):,} characters, more than max_report_chars={max_chars:,}; is "
            "the right column or file given? (raise model.max_report_chars to accept it; it is truncated to "
            "model.max_text_tokens tokens anyway)"
        )
    if "\ufffd" in s:
        raise ReportError(f"slide {slide_id}: the {what} contains U+FFFD replacement characters: it was decoded "
                          "from a non-UTF-8 file with errors replaced; re-save the source as UTF-8")
    m = _CONTROL.search(s)
    if m:
        raise ReportError(f"slide {slide_id}: the {what} contains the control character {m.group()!r} at "
                          f"{m.start()}: binary data or a wrong encoding (UTF-16?)")
    m = _MOJIBAKE.search(s)
    if m:
        raise ReportError(f"slide {slide_id}: the {what} contains {m.group()!r}, UTF-8 text decoded as Latin-1 "
                          "(mojibake, e.g. 'Ã©' for 'é'); fix the encoding of the source")
    return s


def _check_file_encoding(path: Path) -> None:
    raw = path.read_bytes()
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if raw.startswith(bom):
            raise ReportError(f"{path}: the file is {name}-encoded; save it as UTF-8 "
                              f"(e.g. iconv -f {name} -t UTF-8)")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ReportError(
            f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} on line {line}: {e.reason}); reports must be UTF-8 "
            "text; convert the file, e.g. iconv -f latin1 -t UTF-8"
        ) from None
    if b"\x00" in raw:
        raise ReportError(f"{path}: contains NUL bytes: not a text file (or UTF-16 without a byte-order mark)")


def read_reports(path: str | Path, max_chars: int = 50_000, text_column: str | None = None) -> dict[str, Any]:
    """Slide reports from a UTF-8 CSV/JSONL (:func:`~pathvl.data.slidedata.read_slide_texts`), checked.

    Returns:
        ``{slide_id: SlideText}``.

    Raises:
        FileNotFoundError: No such file.
        ReportError: The file is not UTF-8, or a report fails :func:`check_report`.
    """
    from pathvl.data.slidedata import SlideText, read_slide_texts

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reports: no such file {p}")
    _check_file_encoding(p)
    texts = read_slide_texts(p, text_column=text_column)
    return {sid: SlideText(check_report(t.caption, sid, max_chars), t.subcaptions) for sid, t in texts.items()}


def _read_contexts(path: str | Path, max_chars: int) -> dict[str, str]:
    from pathvl.data.slidedata import read_slide_texts

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.contexts: no such file {p}")
    _check_file_encoding(p)
    texts = read_slide_texts(p, text_column="context")
    return {sid: check_report(t.caption, sid, max_chars, "clinical context") for sid, t in texts.items()
            if t.caption.strip()}


# --------------------------------------------------------------------------------------- the Q-Former
def multimodal_causal_mask(n_query: int, text_mask: Tensor) -> Tensor:
    """BLIP-2's ITG mask over ``[queries; text]``, True where attention is allowed.

    Queries see all queries and no text; text token ``t`` sees every query and the real text tokens
    ``<= t`` (never a later token).

    Args:
        n_query: Number of query tokens ``Q``.
        text_mask: ``(B, L)`` True/1 for real text tokens.

    Returns:
        ``(B, Q + L, Q + L)`` bool.
    """
    B, L = text_mask.shape
    S = n_query + L
    allowed = torch.zeros(B, S, S, dtype=torch.bool, device=text_mask.device)
    allowed[:, :, :n_query] = True
    lower = ~causal_mask(L, text_mask.device)  # (L, L) True on and below the diagonal
    allowed[:, n_query:, n_query:] = lower[None] & text_mask.bool()[:, None, :]
    return allowed


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, heads: int, dropout: float) -> Tensor:
    """Multi-head attention of ``q (B, Sq, d)`` over ``k, v (B, Sk, d)``; ``allowed (B, Sq, Sk)``."""
    B, Sq, d = q.shape

    def split(x: Tensor) -> Tensor:  # (B, S, d) -> (B, h, S, d/h)
        return x.view(B, x.shape[1], heads, d // heads).transpose(1, 2)

    mask = None if allowed is None else allowed[:, None]
    o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, dropout_p=dropout)
    return o.transpose(1, 2).reshape(B, Sq, d)


class _FFN(nn.Module):
    """BERT's post-norm feed-forward sub-block: ``LN(x + drop(W2 act(W1 x)))``."""

    def __init__(self, fc1: nn.Linear, act: Any, fc2: nn.Linear, norm: nn.LayerNorm, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = fc1, fc2, norm
        self.act = act if isinstance(act, nn.Module) else _Fn(act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.fc2(self.act(self.fc1(x)))))


class _Fn(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class _CrossAttention(nn.Module):
    """BERT-style (post-norm) cross-attention of the queries to the patch tokens (new in the Q-Former)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.heads = heads
        self.p = dropout

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None) -> Tensor:
        allowed = None
        if memory_mask is not None:
            allowed = memory_mask.bool()[:, None, :].expand(-1, x.shape[1], -1)
        a = _attend(self.q(x), self.k(memory), self.v(memory), allowed, self.heads, self.p if self.training else 0.0)
        return self.norm(x + self.drop(self.out(a)))


class QFormerLayer(nn.Module):
    """One Q-Former layer built around a pretrained BERT layer (BLIP-2, Li et al. 2023).

    The BERT layer's self-attention is shared by queries and text, its feed-forward block serves the text,
    a copy of it serves the queries, and (when ``cross``) a new cross-attention lets the queries read the
    patch tokens. The input is ``[queries (n_query); text]``; either part may be empty.

    Args:
        bert_layer: A ``BertLayer`` (or one with the same sub-module names).
        heads: Attention heads.
        cross: Add the cross-attention sub-block.
        dropout: Dropout.
    """

    def __init__(self, bert_layer: nn.Module, heads: int, cross: bool, dropout: float) -> None:
        super().__init__()
        sa = bert_layer.attention.self
        self.q_proj, self.k_proj, self.v_proj = sa.query, sa.key, sa.value
        self.attn_out = bert_layer.attention.output.dense
        self.attn_norm = bert_layer.attention.output.LayerNorm
        self.text_ffn = _FFN(bert_layer.intermediate.dense, bert_layer.intermediate.intermediate_act_fn,
                             bert_layer.output.dense, bert_layer.output.LayerNorm, dropout)
        self.query_ffn = copy.deepcopy(self.text_ffn)  # BLIP-2 initialises it from the text FFN
        d = self.q_proj.in_features
        self.cross = _CrossAttention(d, heads, dropout) if cross else None
        self.drop = nn.Dropout(dropout)
        self.heads = heads
        self.p = dropout

    def forward(self, x: Tensor, n_query: int, allowed: Tensor | None, image: Tensor | None = None,
                image_mask: Tensor | None = None, past: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Args:
            x: ``(B, S, d)``: ``n_query`` query tokens then text tokens.
            n_query: Query tokens at the start of ``x``.
            allowed: ``(B, S, P + S)`` True where attention is allowed (None: everything), ``P`` the length
                of ``past``.
            image: ``(B, N, d)`` patch tokens (for the cross-attention of the queries).
            image_mask: ``(B, N)`` True for real patches.
            past: Cached ``(keys, values)`` ``(B, P, d)`` placed before this call's own (ITG's query cache).

        Returns:
            ``(out (B, S, d), (keys, values) of x)``.
        """
        k, v = self.k_proj(x), self.v_proj(x)
        kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        a = _attend(self.q_proj(x), k, v, allowed, self.heads, self.p if self.training else 0.0)
        h = self.attn_norm(x + self.drop(self.attn_out(a)))
        hq, ht = h[:, :n_query], h[:, n_query:]
        parts = []
        if n_query:
            if self.cross is not None:
                if image is None:
                    raise ValueError("the queries need the patch tokens (image) in a cross-attention layer")
                hq = self.cross(hq, image, image_mask)
            parts.append(self.query_ffn(hq))
        if ht.shape[1]:
            parts.append(self.text_ffn(ht))
        return torch.cat(parts, dim=1), kv


def _fourier(coords: Tensor, octaves: int) -> Tensor:
    freqs = (2.0 ** torch.arange(octaves, device=coords.device, dtype=torch.float32)) * math.pi
    x = coords.float()[..., None] * freqs  # (..., 2, F)
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2)


def _check_bert_layout(model: nn.Module, name: str) -> None:
    try:
        emb = model.embeddings
        _ = emb.word_embeddings, emb.position_embeddings, emb.LayerNorm
        for layer in model.encoder.layer:
            _ = layer.attention.self.query, layer.attention.self.key, layer.attention.self.value
            _ = layer.attention.output.dense, layer.attention.output.LayerNorm
            _ = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
            _ = layer.output.dense, layer.output.LayerNorm
    except AttributeError as e:
        raise ValueError(
            f"text encoder {name!r} ({type(model).__name__}) does not have BERT's layer layout ({e}); the Q-Former "
            "is initialised from BERT-layout encoders: tiny-text, minilm, or bert:<dir> of a BERT/RoBERTa model"
        ) from None
    pet = getattr(model.config, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise ValueError(f"text encoder {name!r} uses {pet!r} position embeddings; the Q-Former needs absolute ones")


class QFormer(nn.Module):
    """The Querying Transformer of BLIP-2 (Li et al., ICML 2023) over a slide's patch features, as PathAlign
    (Ahmed et al. 2024) uses it; see the module docstring.

    Args:
        bert: A BERT-layout ``transformers`` encoder (its embeddings and layers are taken over).
        feature_dim: Width of the patch features.
        num_queries: Learned queries.
        cross_every: Cross-attention in layers ``0, cross_every, 2 * cross_every, ...``.
        dropout: Dropout.
        pos_frequencies: Octaves of Fourier position features of the patches (0: none).
    """

    def __init__(self, bert: nn.Module, feature_dim: int, num_queries: int = 32, cross_every: int = 2,
                 dropout: float = 0.1, pos_frequencies: int = 0) -> None:
        super().__init__()
        _check_bert_layout(bert, type(bert).__name__)
        d = int(bert.config.hidden_size)
        heads = int(bert.config.num_attention_heads)
        emb = bert.embeddings
        self.width = d
        self.word_embeddings = emb.word_embeddings
        self.position_embeddings = emb.position_embeddings
        self.token_type_embeddings = getattr(emb, "token_type_embeddings", None)
        self.emb_norm = emb.LayerNorm
        pad = getattr(emb, "padding_idx", None)  # RoBERTa counts positions from padding_idx + 1
        self.pos_offset = int(pad) + 1 if isinstance(pad, int) else 0
        self.max_positions = self.position_embeddings.num_embeddings - self.pos_offset
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(layer, heads, cross=(i % cross_every == 0), dropout=dropout)
            for i, layer in enumerate(bert.encoder.layer)
        )
        self.num_queries = num_queries
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, d) * 0.02)
        self.dec_embed = nn.Parameter(emb.word_embeddings.weight.detach().mean(0).clone())  # the [DEC] token
        self.patch_in = nn.Sequential(nn.Linear(feature_dim, d), nn.GELU(), nn.Linear(d, d))
        self.pos = nn.Linear(4 * pos_frequencies, d) if pos_frequencies else None
        if self.pos is not None:  # start position-blind
            nn.init.zeros_(self.pos.weight)
            nn.init.zeros_(self.pos.bias)
        self.pos_frequencies = pos_frequencies
        self.patch_norm = nn.LayerNorm(d)

    # ---------------------------------------------------------------- embeddings
    def image_tokens(self, features: Tensor, coords: Tensor | None = None) -> Tensor:
        """``(B, N, Dv)`` patch features -> ``(B, N, d)`` tokens the queries cross-attend to."""
        p = self.patch_in(features.float())
        if self.pos is not None:
            c = coords if coords is not None else features.new_zeros(*features.shape[:2], 2)
            p = p + self.pos(_fourier(c, self.pos_frequencies))
        return self.patch_norm(p)

    def embed_queries(self, batch: int) -> Tensor:
        """``(B, Q, d)`` query embeddings (LayerNorm and dropout of the BERT embeddings, as in LAVIS)."""
        return self.drop(self.emb_norm(self.query_tokens.expand(batch, -1, -1)))

    def embed_text(self, ids: Tensor, dec: bool = False) -> Tensor:
        """``(B, L)`` token ids -> ``(B, L, d)``; with ``dec`` the first token is the learned [DEC] token."""
        B, n_tok = ids.shape
        if n_tok > self.max_positions:
            raise ValueError(f"{n_tok} text tokens but the text encoder has {self.max_positions} positions")
        w = self.word_embeddings(ids)
        if dec:
            w = torch.cat([self.dec_embed.to(w.dtype).expand(B, 1, -1), w[:, 1:]], dim=1)
        pos = torch.arange(self.pos_offset, self.pos_offset + n_tok, device=ids.device)
        e = w + self.position_embeddings(pos)[None]
        if self.token_type_embeddings is not None:
            e = e + self.token_type_embeddings.weight[0]
        return self.drop(self.emb_norm(e))

    # ---------------------------------------------------------------- streams
    def encode_queries(self, image: Tensor, image_mask: Tensor | None) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Queries alone (no text): ``(query states (B, Q, d), per-layer (keys, values) of the queries)``."""
        x = self.embed_queries(image.shape[0])
        cache = []
        for layer in self.layers:
            x, kv = layer(x, self.num_queries, None, image, image_mask)
            cache.append(kv)
        return x, cache

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Text alone, bidirectional (ITC): ``(B, L, d)``."""
        x = self.embed_text(ids)
        allowed = mask.bool()[:, None, :].expand(-1, ids.shape[1], -1)
        for layer in self.layers:
            x, _ = layer(x, 0, allowed)
        return x

    def encode_joint(self, image: Tensor, image_mask: Tensor | None, ids: Tensor, mask: Tensor) -> Tensor:
        """Queries and text attending to each other (ITM): the query states ``(B, Q, d)``."""
        B, Q = ids.shape[0], self.num_queries
        x = torch.cat([self.embed_queries(B), self.embed_text(ids)], dim=1)
        valid = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=ids.device), mask.bool()], dim=1)
        allowed = valid[:, None, :].expand(-1, x.shape[1], -1)
        for layer in self.layers:
            x, _ = layer(x, Q, allowed, image, image_mask)
        return x[:, :Q]

    def decode_text(self, ids: Tensor, mask: Tensor, cache: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Text under the multimodal causal mask, reading the queries' cached keys/values (ITG): ``(B, L, d)``.

        Equal to the text part of :meth:`decode_joint` (the queries never see the text, so their states do
        not depend on it), without recomputing the queries.
        """
        x = self.embed_text(ids, dec=True)
        allowed = multimodal_causal_mask(self.num_queries, mask)[:, self.num_queries:]  # (B, L, Q + L)
        for layer, past in zip(self.layers, cache):
            x, _ = layer(x, 0, allowed, past=past)
        return x

    def decode_joint(self, image: Tensor, image_mask: Tensor | None, ids: Tensor, mask: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """Reference ITG pass over ``[queries; text]`` with :func:`multimodal_causal_mask` (no cache)."""
        B, Q = ids.shape[0], self.num_queries
        x = torch.cat([self.embed_queries(B), self.embed_text(ids, dec=True)], dim=1)
        allowed = multimodal_causal_mask(Q, mask)
        for layer in self.layers:
            x, _ = layer(x, Q, allowed, image, image_mask)
        return x[:, :Q], x[:, Q:]

    def query_parameters(self) -> list[nn.Parameter]:
        """Parameters on the path from the patches to the query outputs (what stage 2 can train)."""
        params = [self.query_tokens, *self.emb_norm.parameters(), *self.patch_in.parameters(),
                  *self.patch_norm.parameters()]
        if self.pos is not None:
            params += list(self.pos.parameters())
        for layer in self.layers:
            for m in (layer.q_proj, layer.k_proj, layer.v_proj, layer.attn_out, layer.attn_norm, layer.query_ffn,
                      layer.cross):
                if m is not None:
                    params += list(m.parameters())
        return params


def query_text_similarity(query_emb: Tensor, text_emb: Tensor, chunk: int | None = None) -> Tensor:
    r"""Slide-text similarity of BLIP-2's ITC: the best query, :math:`S_{ij} = \max_q \langle z_{iq}, t_j\rangle`.

    Args:
        query_emb: ``(S, Q, E)`` query embeddings (normalise them first for cosine similarity).
        text_emb: ``(T, E)`` text embeddings.
        chunk: Slides per block (memory ``chunk * T * Q``; default: blocks of about 16M similarities).

    Returns:
        ``(S, T)``.
    """
    if query_emb.dim() != 3 or text_emb.dim() != 2:
        raise ValueError(f"expected query_emb (S, Q, E) and text_emb (T, E), got {tuple(query_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    if chunk is None:
        chunk = max(1, (1 << 24) // max(1, text_emb.shape[0] * query_emb.shape[1]))
    rows = [torch.einsum("sqe,te->stq", query_emb[i : i + chunk], text_emb).amax(-1)
            for i in range(0, query_emb.shape[0], chunk)]
    return torch.cat(rows) if rows else query_emb.new_zeros(0, text_emb.shape[0])


@torch.no_grad()
def itm_negatives(sim: Tensor, same: Tensor | None = None, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Hard negatives for ITM from ITC logits (BLIP-2): a report for each slide, a slide for each report.

    Args:
        sim: ``(n, n)`` scaled slide-report similarities; the diagonal holds the positives.
        same: ``(n, n)`` True where two slides have identical report text (never drawn as negatives).
        generator: Random generator.

    Returns:
        ``(negative report of each slide (n,), negative slide of each report (n,))``.
    """
    n = sim.shape[0]
    pos = torch.arange(n, device=sim.device)
    from pathvl.losses import sample_hard_negatives

    neg_txt = sample_hard_negatives(sim, pos, generator=generator, exclude=same)
    neg_img = sample_hard_negatives(sim.t(), pos, generator=generator, exclude=None if same is None else same.t())
    return neg_txt, neg_img


class _LMHead(nn.Module):
    """BERT's LM head (dense, GELU, LayerNorm) with the decoder tied to the word embeddings."""

    def __init__(self, embeddings: nn.Embedding) -> None:
        super().__init__()
        d = embeddings.embedding_dim
        self.transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=1e-12))
        self.embeddings = embeddings  # shared (tied) with the Q-Former's word embeddings
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(self.transform(h), self.embeddings.weight, self.bias)


# ------------------------------------------------------------------------------------------ the model
def build_qformer_backbone(name: str) -> tuple[nn.Module, Any]:
    """The registry text encoder the Q-Former starts from (made trainable) and its tokenizer."""
    from pathvl.encoders import build_text

    te = build_text(name)
    model = te.model
    model.train()
    model.requires_grad_(True)
    _check_bert_layout(model, name)
    return model, te.tokenizer


def qformer_tokenizer(cfg: PathAlignConfig) -> Any:
    """The Q-Former's tokenizer, without building the encoder."""
    from transformers import AutoTokenizer

    from pathvl.encoders.text import minilm_path

    if cfg.text_encoder.startswith("bert:"):
        folder = Path(cfg.text_encoder[5:]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"model.text_encoder: no such folder {folder}")
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


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
            raise ValueError(f"losses {sorted(active - allowed)} do not belong to stage {cfg.stage} (stage 1: itc, "
                             "itm, itg; stage 2: lm); set their weights to 0 or change model.stage")
        self.cfg = cfg
        self.active = active
        bert, self.tokenizer = build_qformer_backbone(cfg.text_encoder)
        self.qformer = QFormer(bert, cfg.feature_dim, cfg.num_queries, cfg.cross_every, cfg.dropout,
                               cfg.pos_frequencies)
        if cfg.max_text_tokens > self.qformer.max_positions:
            raise ValueError(f"max_text_tokens={cfg.max_text_tokens} exceeds the {self.qformer.max_positions} "
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

    def load_stage1(self, path: str | Path) -> None:
        """Loads the Q-Former (everything but the LM bridge) from a stage-1 run or checkpoint.

        Raises:
            ValueError: The checkpoint does not hold this Q-Former (other sizes, text encoder or features).
        """
        from pathvl.train.checkpoint import load_model_weights

        state, _ = load_model_weights(path, family=self.family)
        own = [k for k in self.state_dict() if not k.startswith("bridge.")]
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"model.init_from: {path} lacks {len(missing)} Q-Former weights (e.g. {missing[:3]}); "
                             "give a stage-1 PathAlign run of the same model settings")
        sub = {k: state[k] for k in own}
        try:
            self.load_state_dict(sub, strict=False)
        except RuntimeError as e:
            raise ValueError(f"model.init_from: {path} does not fit this Q-Former: {e}") from None

    # ---------------------------------------------------------------- inputs
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def _patches(self, features: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if features.dim() != 3:
            raise ValueError(f"features must be (B, N, D), got shape {tuple(features.shape)}")
        B, N, width = features.shape
        if width != self.cfg.feature_dim:
            raise ValueError(f"features have width {width} but the model takes {self.cfg.feature_dim}-d features "
                             "(model.feature_dim): use the encoder the model was trained on")
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=features.device)
        mask = mask.bool()
        if N == 0 or not bool(mask.any(1).all()):
            empty = list(range(B)) if N == 0 else torch.nonzero(~mask.any(1)).flatten().tolist()
            raise ValueError(f"slide(s) {empty[:8]} of the batch have no patch features (patch_mask all False); "
                             "a slide without features cannot be encoded (run `pathvl embed`)")
        if not bool(torch.isfinite(features[mask]).all()):
            raise ValueError("patch features contain NaN or inf")
        return features, mask

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask`` of texts for :meth:`encode_text`."""
        from pathvl.text.tokenize import tokenize

        return tokenize(self.tokenizer, [str(t) for t in texts], max_length=self.cfg.max_text_tokens)

    # ---------------------------------------------------------------- encoders (retrieval, zero-shot)
    def query_states(self, features: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
                     ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor, Tensor]:
        """``(query states (B, Q, d), per-layer query keys/values, patch tokens, patch mask)``."""
        features, mask = self._patches(features, mask)
        image = self.qformer.image_tokens(features, coords)
        q, cache = self.qformer.encode_queries(image, mask)
        return q, cache, image, mask

    def encode_slide(self, features: Tensor, mask: Tensor | None = None, coords: Tensor | None = None,
                     normalize: bool = True, pool: Literal["none", "mean"] = "none") -> Tensor:
        """Slide embedding: the projected query outputs ``(B, Q, E)``.

        Compare them to texts with :func:`query_text_similarity` (the best query, as trained). ``pool=
        "mean"`` returns the normalised mean of the normalised queries ``(B, E)``, a single vector for tools
        that need one (an approximation of the max-over-queries similarity).
        """
        q, _, _, _ = self.query_states(features.to(self.device), None if mask is None else mask.to(self.device),
                                       None if coords is None else coords.to(self.device))
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

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Named outputs for the active losses.

        Args:
            batch: From :func:`collate_pathalign`: ``features (B, N, Dv)``, ``patch_mask (B, N)``, ``coords``,
                ``caption_ids``/``caption_mask (B, L)`` and, in stage 2, ``prompt_ids``/``prompt_mask`` and
                ``answer_ids``/``answer_mask``.

        Returns:
            Stage 1: ``query_emb (B, Q, E)``, ``text_emb (B, E)``, ``logit_scale`` (ITC); ``itm_logits (M, 2)``,
            ``itm_labels (M,)`` plus ``itm_image_index``/``itm_text_index`` (ITM); ``lm_logits (1, T + 1, V)``
            and ``lm_labels (1, T + 1)`` (ITG, the ``T`` predicted tokens of the batch packed in one row).
            Stage 2: ``lm_logits (B, La + 1, V)`` and ``lm_labels (B, La + 1)``.
        """
        q, cache, image, pmask = self.query_states(batch["features"], batch.get("patch_mask"), batch.get("coords"))
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
            ok = (~same).any(1)
            rows, same = rows[ok], same[ok][:, ok]
        if len(rows) < 2:  # no admissible negative in this batch: a zero term without gradient
            z = self.itm_head.bias.sum() * 0.0
            logits = (torch.tensor([[-30.0, 30.0]], device=ids.device) + z)
            empty = torch.zeros(0, dtype=torch.long, device=ids.device)
            return {"itm_logits": logits, "itm_labels": torch.ones(1, dtype=torch.long, device=ids.device),
                    "itm_image_index": empty, "itm_text_index": empty}
        with torch.no_grad():
            sim = scale * query_text_similarity(F.normalize(query_emb[rows].float(), dim=-1),
                                                F.normalize(text_emb[rows].float(), dim=-1))
            neg_txt, neg_img = itm_negatives(sim, same)
        n = len(rows)
        img_idx = torch.cat([rows, rows, rows[neg_img]])  # (3n,)
        txt_idx = torch.cat([rows, rows[neg_txt], rows])
        hq = self.qformer.encode_joint(image[img_idx], pmask[img_idx], ids[txt_idx], tmask[txt_idx])  # (3n, Q, d)
        logits = self.itm_head(hq).mean(1)  # (3n, 2), averaged over queries
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(ids.device)
        return {"itm_logits": logits, "itm_labels": labels, "itm_image_index": img_idx, "itm_text_index": txt_idx}

    def _itg(self, ids: Tensor, tmask: Tensor, cache: Sequence[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        rows = self._subset(ids.shape[0], self.cfg.text_max, ids.device)
        ids, tmask = ids[rows], tmask[rows]
        h = self.qformer.decode_text(ids, tmask, [(k[rows], v[rows]) for k, v in cache])  # (n, L, d)
        target = ids[:, 1:].masked_fill(tmask[:, 1:] == 0, IGNORE_INDEX)  # token t + 1, predicted at t
        keep = target != IGNORE_INDEX  # (n, L - 1)
        logits = self.lm_head(h[:, :-1][keep])  # (T, V): the vocabulary only where a token is predicted
        # Packed for LMLoss (which shifts by one): row position m predicts label m + 1.
        lm_logits = torch.cat([logits, logits.new_zeros(1, logits.shape[-1])])[None]  # (1, T + 1, V)
        head = torch.full((1,), IGNORE_INDEX, dtype=torch.long, device=ids.device)
        lm_labels = torch.cat([head, target[keep]])[None]  # (1, T + 1)
        return {"lm_logits": lm_logits, "lm_labels": lm_labels}

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
    def generate(self, features: Tensor, mask: Tensor | None = None, coords: Tensor | None = None,
                 prompts: str | Sequence[str] | None = None, contexts: str | Sequence[str | None] | None = None,
                 max_new_tokens: int = 64, num_beams: int = 1, length_penalty: float = 1.0) -> list[str]:
        """Reports for a batch of slides; see :func:`generate_reports`."""
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        dev = self.device
        q, cache, _, _ = self.query_states(features.to(dev), None if mask is None else mask.to(dev),
                                           None if coords is None else coords.to(dev))
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


# ------------------------------------------------------------------------------------------ decoding
@torch.no_grad()
def beam_search(step: Callable[[Tensor, Tensor], Tensor], batch_size: int, eos_id: int, num_beams: int = 1,
                max_new_tokens: int = 64, length_penalty: float = 1.0,
                device: torch.device | str | None = None) -> list[list[int]]:
    """Beam search over any next-token model; ``num_beams=1`` is greedy decoding.

    Hypotheses that emit ``eos_id`` are finished and scored by their summed log-probability divided by
    ``length ** length_penalty`` (length in generated tokens, eos included); a batch row stops once it has
    ``num_beams`` finished hypotheses (``early_stopping=True`` in Hugging Face terms). Rows still open at
    ``max_new_tokens`` finish with their live beams.

    Args:
        step: ``step(seqs (n, t) long, source (n,) long) -> logits (n, V)`` for the next token of each
            hypothesis; ``source`` is the batch row a hypothesis belongs to, ``t`` may be 0.
        batch_size: Rows.
        eos_id: End token (not returned).
        num_beams: Beam width.
        max_new_tokens: Longest continuation.
        length_penalty: Exponent of the length normalisation.
        device: Device of the tensors handed to ``step``.

    Returns:
        The best continuation of each row, as token ids without eos.
    """
    K, B = int(num_beams), int(batch_size)
    src = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,)
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(max_new_tokens):
        logp = torch.log_softmax(step(seqs, src).float(), dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores.reshape(B * K, 1) + logp).view(B, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)
        next_rows, next_tok, next_scores = [], [], []
        for b in range(B):
            beams: list[tuple[float, int, int]] = []
            if not done[b]:
                for s, i in zip(top_s[b].tolist(), top_i[b].tolist()):
                    if s == float("-inf"):
                        break
                    k, tok = divmod(i, V)
                    if tok == eos_id:
                        finished[b].append((s / (t + 1) ** length_penalty, seqs[b * K + k].tolist()))
                    else:
                        beams.append((s, k, tok))
                    if len(beams) == K:
                        break
                if len(finished[b]) >= K:
                    done[b] = True
            while len(beams) < K:  # finished or exhausted rows keep dummy beams
                beams.append((float("-inf"), 0, eos_id))
            for s, k, tok in beams:
                next_rows.append(b * K + k)
                next_tok.append(tok)
                next_scores.append(s if not done[b] else float("-inf"))
        if all(done):
            break
        rows = torch.tensor(next_rows, device=device)
        seqs = torch.cat([seqs[rows], torch.tensor(next_tok, device=device)[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device).view(B, K)
    out = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:
            n = seqs.shape[1]
            for k in range(K):
                s = float(scores[b, k])
                if s != float("-inf"):
                    hyps.append((s / max(n, 1) ** length_penalty, seqs[b * K + k].tolist()))
        out.append(max(hyps, key=lambda h: h[0])[1] if hyps else [])
    return out


# ------------------------------------------------------------------------------------------ the LM
_ENCODER_ONLY = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "distilbert", "electra", "albert", "mpnet",
    "deberta", "deberta-v2", "modernbert", "ernie", "megatron-bert", "bert-generation", "rembert",
    "roberta-prelayernorm", "xmod", "data2vec-text", "big_bird", "nezha", "qdqbert", "roc_bert", "xlm",
})
_ENCODER_DECODER = frozenset({
    "bart", "mbart", "marian", "pegasus", "pegasus_x", "blenderbot", "blenderbot-small", "plbart", "t5", "mt5",
    "umt5", "prophetnet", "xlm-prophetnet", "bigbird_pegasus", "whisper", "trocr",
})


def check_lm_dir(path: str | Path) -> Path:
    """Checks that ``path`` is a local folder holding a decoder-only causal LM transformers can load.

    Raises:
        FileNotFoundError: The folder or its ``config.json`` is missing.
        UnsupportedLMError: The architecture is an encoder, an encoder-decoder, or unknown to transformers.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model.lm: the local LM folder {folder} does not exist; give a folder with a "
                                "Hugging Face causal LM (config.json, tokenizer, weights) or 'tiny'; nothing is "
                                "downloaded")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.lm: {folder} is not a Hugging Face model folder (no config.json)")
    try:
        conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedLMError(f"model.lm: {folder}/config.json is not valid JSON ({e})") from None
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = conf.get("model_type") if isinstance(conf, dict) else None
    archs = conf.get("architectures") if isinstance(conf, dict) else None
    kind = None
    if not mt:
        kind = "a model without model_type"
    elif mt in _ENCODER_ONLY:
        kind = f"an encoder-only {mt!r} model"
    elif mt in _ENCODER_DECODER:
        kind = f"an encoder-decoder {mt!r} model"
    elif mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = f"a {mt!r} model, which transformers {transformers.__version__} cannot load as a causal LM"
    if kind is not None:
        raise UnsupportedLMError(
            f"model.lm: {folder} holds {kind} (architectures {archs}); PathAlign needs a decoder-only causal LM "
            "(e.g. llama, mistral, qwen2, gemma, phi3, gpt2)"
        )
    return folder


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_lm(cfg: PathAlignConfig, qformer_tok: Any | None = None) -> tuple[nn.Module, Any]:
    """The stage-2 causal LM and its tokenizer: ``tiny`` (random, on the Q-Former's tokenizer) or a folder.

    Raises:
        FileNotFoundError: A missing folder, or files the folder lacks.
        UnsupportedLMError: Not a decoder-only causal LM.
    """
    from pathvl.models.lm_bridge import load_causal_lm, tiny_causal_lm

    if cfg.lm == "tiny":
        tok = qformer_tok if qformer_tok is not None else qformer_tokenizer(cfg)
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
        return qformer_tokenizer(cfg)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_lm_dir(cfg.lm), local_files_only=True)


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


# ------------------------------------------------------------------------------------------ data
def _whole_report(caption: str) -> list[str]:
    return [caption]


class ReportDataset(TorchDataset):
    """Slides with their reports (checked) and optional clinical context: what PathAlign trains on.

    Args:
        slides: A :class:`~pathvl.data.slidedata.SlideDataset`.
        contexts: ``{slide_id: clinical context}`` for stage-2 prompts (missing slides: none).
        max_report_chars: See :func:`check_report`.

    Raises:
        ReportError: A report or context fails :func:`check_report`.
    """

    def __init__(self, slides: Any, contexts: Mapping[str, str] | None = None, max_report_chars: int = 50_000) -> None:
        for sid, cap in zip(slides.slide_ids, slides.captions):
            check_report(cap, sid, max_report_chars)
        self.slides = slides
        self.contexts = {str(k): check_report(v, str(k), max_report_chars, "clinical context")
                         for k, v in (contexts or {}).items() if v is not None and str(v).strip()}

    @property
    def slide_ids(self) -> list[str]:
        return list(self.slides.slide_ids)

    @property
    def captions(self) -> list[str]:
        return list(self.slides.captions)

    @property
    def feature_dim(self) -> int:
        return int(self.slides.feature_dim)

    def set_epoch(self, epoch: int) -> None:
        """See :meth:`SlideDataset.set_epoch`."""
        self.slides.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.slides[i])
        item["context"] = self.contexts.get(item["slide_id"], "")
        return item


def build_report_dataset(root: str | Path, reports: str | Path | Mapping[str, str], features: str, *,
                         contexts: str | Path | Mapping[str, str] | None = None, slide_ids: Sequence[str] | None = None,
                         max_patches: int = 1024, mags: Sequence[float] = (), train: bool = True, seed: int = 0,
                         max_report_chars: int = 50_000) -> ReportDataset:
    """A :class:`ReportDataset` over a tiled and embedded dataset folder.

    Args:
        root: Dataset folder (``pathvl tile`` then ``pathvl embed``).
        reports: CSV/JSONL of slide id and report (UTF-8), or ``{slide_id: report}``.
        features: Encoder name of the cached features.
        contexts: CSV/JSONL with a ``context`` column, or ``{slide_id: context}``.
        slide_ids: Restrict to these slides (a split).
        max_patches: Patches per slide (0: all).
        mags: Keep only these magnifications.
        train: Random patch sampling.
        seed: Sampling seed.
        max_report_chars: Longest accepted report.

    Raises:
        ReportError: Bad reports (empty, enormous, not UTF-8).
        DatasetError: Slides without reports, reports without slides, slides without features.
    """
    from pathvl.data.slidedata import SlideDataset, SlideText

    if isinstance(reports, Mapping):
        texts = {str(k): SlideText(check_report(v, str(k), max_report_chars)) for k, v in reports.items()}
    else:
        texts = read_reports(reports, max_report_chars)
    if contexts is None or isinstance(contexts, Mapping):
        ctx = dict(contexts or {})
    else:
        ctx = _read_contexts(contexts, max_report_chars)
    slides = SlideDataset(root, texts, features, slide_ids=slide_ids, max_patches=max_patches, n_subcaptions=1,
                          decomposer=_whole_report, mags=mags, train=train, seed=seed)
    return ReportDataset(slides, ctx, max_report_chars)


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


# ------------------------------------------------------------------------------------------ uses
def _batches(dataset: Any, batch_size: int) -> Iterator[tuple[list[dict[str, Any]], dict[str, Tensor]]]:
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        yield items, _pad_items(items)


def _pad_items(items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Features, mask and coords of items, padded (no tokenisation)."""
    import numpy as np

    lens = [len(it["features"]) for it in items]
    if min(lens) == 0:
        raise ValueError(f"slide {items[lens.index(0)].get('slide_id', '?')} has no patch features")
    B, N, D = len(items), max(lens), int(np.asarray(items[0]["features"]).shape[1])
    feats, coords = torch.zeros(B, N, D), torch.zeros(B, N, 2)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, it in enumerate(items):
        feats[b, : lens[b]] = torch.as_tensor(np.asarray(it["features"], dtype=np.float32))
        if "coords" in it:
            coords[b, : lens[b]] = torch.as_tensor(np.asarray(it["coords"], dtype=np.float32))
        mask[b, : lens[b]] = True
    return {"features": feats, "patch_mask": mask, "coords": coords}


@torch.no_grad()
def embed_slides(model: PathAlign, dataset: Any, batch_size: int = 8) -> dict[str, Any]:
    """Slide and report embeddings of every slide of a dataset.

    Returns:
        ``slide_emb (S, Q, E)`` and ``text_emb (S, E)`` (normalised, CPU), ``slide_ids``, ``captions``.
    """
    was = model.training
    model.eval()
    se, te = [], []
    try:
        for items, b in _batches(dataset, batch_size):
            se.append(model.encode_slide(b["features"], b["patch_mask"], b["coords"]).cpu())
            te.append(model.encode_text([it["caption"] for it in items]).cpu())
    finally:
        model.train(was)
    return {"slide_emb": torch.cat(se), "text_emb": torch.cat(te), "slide_ids": list(dataset.slide_ids),
            "captions": [str(c) for c in dataset.captions]}


def retrieval_metrics(slide_emb: Tensor, text_emb: Tensor, ks: Sequence[int] = (1, 5, 10),
                      text_to_slide: Sequence[int] | None = None) -> dict[str, Any]:
    """Slide -> report and report -> slide Recall@K with the max-over-queries similarity.

    Ranks count the candidates scoring strictly higher than the best positive (ties in the query's favour,
    so slides with identical reports do not count against each other), as
    :mod:`pathvl.eval.retrieval` does.

    Args:
        slide_emb: ``(S, Q, E)`` from :func:`embed_slides`.
        text_emb: ``(T, E)``.
        ks: Values of K.
        text_to_slide: Slide index of each report (default: report ``t`` belongs to slide ``t``).

    Returns:
        ``{"slide_to_report": {"R@1", ..., "median_rank", "mean_rank"}, "report_to_slide": {...}, "n_slides",
        "n_reports", "chance_R@1"}``.
    """
    from pathvl.eval.retrieval import recall_at_k

    S, T = slide_emb.shape[0], text_emb.shape[0]
    owner = torch.arange(T) if text_to_slide is None else torch.as_tensor(list(text_to_slide), dtype=torch.long)
    if text_to_slide is None and S != T:
        raise ValueError(f"{S} slides but {T} reports: pass text_to_slide")
    sim = query_text_similarity(slide_emb.float(), text_emb.float())  # (S, T)
    best = torch.full((S,), float("-inf"))
    best.scatter_reduce_(0, owner, sim[owner, torch.arange(T)], reduce="amax")
    has = torch.zeros(S, dtype=torch.bool)
    has[owner] = True
    i2t = torch.where(has, (sim > best[:, None]).sum(1), torch.full((S,), -1)).numpy()
    t2i = (sim.t() > sim[owner, torch.arange(T)][:, None]).sum(1).numpy()
    return {"slide_to_report": recall_at_k(i2t, ks), "report_to_slide": recall_at_k(t2i, ks), "n_slides": S,
            "n_reports": T, "chance_R@1": 1.0 / max(T, 1)}


@torch.no_grad()
def zeroshot_slides(model: PathAlign, slide_emb: Tensor, prompts: Any) -> tuple[Tensor, Tensor]:
    """Zero-shot slide classification with text prompts (BLIP-2 ITC similarity, prompt ensembles).

    Args:
        model: The trained model.
        slide_emb: ``(S, Q, E)`` from :func:`embed_slides`.
        prompts: A :class:`pathvl.eval.zeroshot.PromptSet` or ``{class: [prompts...]}``.

    Returns:
        ``(pred (S,), scores (S, C))``: the best query's cosine to each class's ensemble embedding.
    """
    from pathvl.eval.zeroshot import build_class_weights

    was = model.training
    model.eval()
    try:
        if isinstance(prompts, Mapping):
            classes = list(prompts)
            if any(not list(prompts[c]) for c in classes):
                raise ValueError("an empty prompt ensemble was given")
            w = torch.stack([F.normalize(model.encode_text(list(prompts[c])).cpu().mean(0), dim=0) for c in classes])
        else:
            w = build_class_weights(lambda t: model.encode_text(list(t)).cpu(), prompts)
    finally:
        model.train(was)
    scores = query_text_similarity(F.normalize(slide_emb.float(), dim=-1), w.float())
    return scores.argmax(1), scores


def topk_accuracy(scores: Tensor, labels: Sequence[int] | Tensor, ks: Sequence[int] = (1, 3)) -> dict[str, float]:
    """Top-k accuracy (``top1``, ``top3``, ...) of ``scores (S, C)`` against class indices."""
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if scores.shape[0] != len(y):
        raise ValueError(f"{scores.shape[0]} score rows but {len(y)} labels")
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"top{k}"] = float((top == y[:, None]).any(1).float().mean())
    return out


@torch.no_grad()
def generate_reports(model: PathAlign, features: Tensor, mask: Tensor | None = None,
                     prompt: str | Sequence[str] | None = None, max_new_tokens: int = 64, num_beams: int = 1, *,
                     context: str | Sequence[str | None] | None = None, coords: Tensor | None = None,
                     length_penalty: float = 1.0) -> list[str]:
    """Generated reports for a batch of slides.

    A stage-2 model writes through its LM after the prompt (``prompt`` or ``cfg.prompt``, with the
    clinical ``context`` put first through ``cfg.context_template``); a stage-1 model writes with its
    Q-Former ITG decoder and ignores prompt and context.

    Args:
        model: A PathAlign model.
        features: ``(B, N, D)`` patch features.
        mask: ``(B, N)`` True for real patches.
        prompt: One prompt, or one per slide.
        max_new_tokens: Longest report in tokens.
        num_beams: 1 = greedy, more = beam search.
        context: Clinical context, one string or one per slide.
        coords: ``(B, N, 2)`` patch centres in [0, 1] (models with position features).
        length_penalty: Beam-search length normalisation exponent.

    Returns:
        One report per slide.
    """
    was = model.training
    model.eval()
    try:
        return model.generate(features, mask, coords, prompt, context, max_new_tokens, num_beams, length_penalty)
    finally:
        model.train(was)


def write_slide_report(model: PathAlign, dataset: Any, slide: int | str, out_dir: str | Path, *,
                       prompt: str | None = None, context: str | None = None, max_new_tokens: int = 64,
                       num_beams: int = 1) -> Path:
    """Writes the generated report of one slide of a dataset to ``out_dir/<slide_id>.report.json``
    (and the text alone to ``<slide_id>.report.txt``).

    Args:
        model: A PathAlign model.
        dataset: A :class:`ReportDataset` or :class:`~pathvl.data.slidedata.SlideDataset`.
        slide: Index or slide id.
        out_dir: Output folder (created).
        prompt: Stage 2: the instruction (default ``cfg.prompt``).
        context: Stage 2: clinical context (default: the dataset's, if any).
        max_new_tokens: Longest report.
        num_beams: Beam width.

    Returns:
        The JSON path. It holds ``slide_id``, ``report``, ``reference`` (the dataset's report), ``prompt``
        (stage 2), the decoding settings and the model stage.

    Raises:
        KeyError: No such slide.
    """
    from pathvl.eval.report import atomic_path, write_json

    ids = list(dataset.slide_ids)
    if isinstance(slide, str):
        if slide not in ids:
            raise KeyError(f"slide {slide!r} is not in the dataset ({len(ids)} slides)")
        index = ids.index(slide)
    else:
        index = int(slide)
        if not 0 <= index < len(ids):
            raise KeyError(f"slide index {index} out of range (0..{len(ids) - 1})")
    item = dataset[index]
    b = _pad_items([item])
    ctx = context if context is not None else (item.get("context") or None)
    report = generate_reports(model, b["features"], b["patch_mask"], prompt, max_new_tokens, num_beams,
                              context=None if model.cfg.stage == 1 else ctx, coords=b["coords"])[0]
    sid = str(item.get("slide_id", ids[index]))
    rec = {
        "slide_id": sid, "report": report, "reference": item.get("caption"),
        "prompt": build_prompt(model.cfg, ctx, prompt) if model.cfg.stage == 2 else None,
        "stage": model.cfg.stage, "decoding": {"num_beams": num_beams, "max_new_tokens": max_new_tokens},
    }
    out = Path(out_dir)
    path = write_json(out / f"{sid}.report.json", rec)
    with atomic_path(out / f"{sid}.report.txt") as tmp:
        tmp.write_text(report + "\n", encoding="utf-8")
    return path


def evaluate_reports(model: PathAlign, dataset: Any, batch_size: int = 8, max_new_tokens: int = 64,
                     num_beams: int = 1, meteor: bool | None = None) -> dict[str, Any]:
    """Generates a report for every slide and scores it against the dataset's report.

    Returns:
        ``{"metrics": caption_metrics(...), "reports": [{"slide_id", "report", "reference"}, ...]}``.
    """
    from pathvl.eval.captioning import caption_metrics

    rows = []
    for items, b in _batches(dataset, batch_size):
        ctx = [it.get("context") or None for it in items] if model.cfg.stage == 2 else None
        texts = generate_reports(model, b["features"], b["patch_mask"], None, max_new_tokens, num_beams,
                                 context=ctx, coords=b["coords"])
        rows += [{"slide_id": it["slide_id"], "report": t, "reference": it["caption"]} for it, t in zip(items, texts)]
    metrics = caption_metrics([r["report"] for r in rows], [r["reference"] for r in rows], meteor=meteor)
    return {"metrics": metrics, "reports": rows}


def load_pathalign(path: str | Path, device: str | torch.device = "cpu") -> tuple[PathAlign, dict[str, Any]]:
    """A trained PathAlign model (eval mode) from a run folder or checkpoint, without re-reading
    ``model.init_from`` (the checkpoint holds the stage-1 weights already).

    Raises:
        CheckpointError: Not a PathAlign checkpoint, or one that does not fit.
    """
    from pathvl.train.checkpoint import load_into, load_model_weights
    from pathvl.train.config import config_from_dict

    state, meta = load_model_weights(path, family="pathalign", device=device)
    cfg = config_from_dict(meta["config"])
    mcfg = replace(cfg.model, init_from="")
    active = [k for k, w in cfg.losses.items() if w > 0]
    model = PathAlign(mcfg, active=active)
    model.to(device)
    load_into(model, state, meta["omitted"])
    return model.eval(), meta


# ------------------------------------------------------------------------------------------ training family
def _report_dataset(cfg: Any, train: bool = True) -> ReportDataset:
    d = cfg.data
    if not d.dataset:
        raise ValueError("data.dataset: give the dataset folder (pathvl tile + pathvl embed)")
    if not d.reports:
        raise ValueError("data.reports: give the CSV/JSONL of slide reports (slide id and report columns)")
    return build_report_dataset(d.dataset, d.reports, d.features, contexts=d.contexts or None,
                                max_patches=d.max_patches, mags=tuple(float(m) for m in d.mags), train=train,
                                seed=cfg.run.seed, max_report_chars=cfg.model.max_report_chars)


def build_model(cfg: Any, dist: Any) -> PathAlign:
    """``build_model`` of the engine: the feature width is read from the dataset when not given; in stage 2
    the Q-Former is loaded from ``model.init_from``."""
    if cfg.model.feature_dim <= 0:
        cfg.model = replace(cfg.model, feature_dim=_report_dataset(cfg).feature_dim)
    active = tuple(k for k, w in cfg.losses.items() if w > 0)
    model = PathAlign(cfg.model, active=active)
    if cfg.model.stage == 2 and cfg.model.init_from:
        model.load_stage1(cfg.model.init_from)
    return model


def build_data(cfg: Any, dist: Any) -> Any:
    """``build_data`` of the engine: resumable, rank-sharded batches of slides with reports (and prompts)."""
    from pathvl.train.engine import StepLoader

    prompt_tok = None
    if cfg.model.stage == 2:
        prompt_tok = PromptTokenizer(lm_tokenizer(cfg.model), bridge_config(cfg.model))
    collate = partial(collate_pathalign, tokenizer=qformer_tokenizer(cfg.model),
                      max_text_tokens=cfg.model.max_text_tokens, prompt_tokenizer=prompt_tok, cfg=cfg.model)
    return StepLoader.from_config(_report_dataset(cfg), cfg, dist, collate_fn=collate)


def build_losses(cfg: Any, dist: Any) -> dict[str, nn.Module]:
    """``build_losses`` of the engine: ITC, ITM, ITG (stage 1) and LM (stage 2)."""
    from pathvl.losses import ITMLoss, LMLoss, QFormerITCLoss

    m = cfg.model
    return {"itc": QFormerITCLoss(label_smoothing=m.itc_label_smoothing), "itm": ITMLoss(),
            "itg": LMLoss(label_smoothing=m.itg_label_smoothing), "lm": LMLoss()}


register_family("pathalign", PathAlignConfig, build_model, build_data, build_losses,
                data_config_cls=PathAlignDataConfig, loss_names=LOSS_NAMES)
