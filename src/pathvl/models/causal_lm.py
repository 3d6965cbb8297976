"""Local causal language models: checked folders, loading without a hub, tiny random twins for tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvl.models.lm_bridge import _special_ids


class UnsupportedLMError(ValueError):
    """A local LM folder whose architecture is not a decoder-only causal LM transformers can load."""


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
