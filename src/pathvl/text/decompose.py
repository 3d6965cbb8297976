"""Caption decomposition: a slide-level caption or report split into region sub-captions.

PathFLIP (Liu et al., "PathFLIP: Fine-grained Language-Image Pretraining for Versatile Computational
Pathology", 2025) aligns each *sub-caption* (one finding, e.g. "focal atelectasis") with a region
embedding of the slide pooled under that text. This module makes the sub-captions:

- :class:`RuleDecomposer` (``"rules"``, the default): offline and deterministic. It splits on clause
  boundaries only: sentence ends, semicolons, colons, dashes and the commas of a list, and a coordinating
  ``and`` / ``&`` / ``plus`` / ``but`` only where it joins two clauses (a verb on each side: "the tumor
  invades the muscle and the margins are free") or two bare findings of a note-style list ("mild
  fibrosis and congestion": each side is a finding with its qualifiers, nothing else). It never splits a
  noun phrase: not at ``with`` ("Tumor cells with strong nuclear atypia proliferate invasively" stays
  whole) and not inside coordinated modifiers ("ductal and lobular elements"). It drops pieces that only
  give sizes and counts ("2 ~9x5mm pieces") and leading sizes, re-attaches pieces made of qualifiers only
  ("well preserved") to their neighbour, and never invents words: every word of a piece is a word of
  the caption.
- :class:`LMDecomposer` (``"lm:<dir>"``): a local instruction-tuned causal LM (any Hugging Face folder;
  nothing is downloaded) asked to list one finding per line; outputs that are empty or not grounded in
  the caption fall back to the rules.

:func:`select_subcaptions` samples or pads a slide's sub-captions to a fixed ``K`` with a mask.

Example:
    >>> decompose_caption("2 pieces ~7.5x7.5mm. Mild fibrosis and congestion; tumor cells with nuclear atypia")
    ['Mild fibrosis', 'congestion', 'tumor cells with nuclear atypia']
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from pathvl.text import lexicon as lx

__all__ = [
    "DecomposeError",
    "Decomposer",
    "LMDecomposer",
    "RuleDecomposer",
    "build_decomposer",
    "decompose_caption",
    "select_subcaptions",
]


class DecomposeError(ValueError):
    """A caption that cannot be decomposed (empty text) or an empty list of sub-captions."""


class Decomposer(Protocol):
    """Anything that maps a caption to its sub-captions (a non-empty list of non-empty strings)."""

    def __call__(self, text: str) -> list[str]: ...


# ---------------------------------------------------------------------------------------------- rules
_TRANSLATE = str.maketrans({
    "\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": " - ", "\u2014": " - ",
    "\u00d7": "x", "\u00a0": " ",
})
#: Words after which a period does not end a sentence.
_ABBREVIATIONS = frozenset({"vs", "e.g", "eg", "i.e", "ie", "approx", "ca", "cf", "etc", "dr", "fig", "no", "st",
                            "mr", "ms", "resp", "incl", "max", "min", "avg", "appr"})
_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
_SPLIT_WORDS = re.compile(r"\s+(and|&|plus|but)\s+", re.IGNORECASE)
#: Words that make a phrase carry no finding by themselves (function words, qualifiers, specimen
#: handling, units, auxiliaries).
_ADMIN = frozenset({
    "piece", "aliquot", "specimen", "sample", "section", "slide", "image", "review", "analysis", "quality",
    "case", "one", "rest", "remainder", "number", "amount", "percent", "size", "thickness", "fragment", "edge",
    "side", "end", "time", "score", "view", "glass", "block", "cassette", "lid", "base", "dome", "note",
    "comment", "patient", "subject", "donor", "autopsy", "dimension", "diameter", "length", "width", "height",
    "depth", "total", "maximum", "minimum", "average", "nubbin",
})
_NON_CONTENT = (lx.STOPWORDS | lx.QUALIFIERS | _ADMIN | lx.UNITS | lx.VERBS
                | frozenset({"each", "both", "approximately", "about", "well", "poorly", "remarkably",
                             "surprisingly", "good", "ok", "okay", "completely", "totally", "unusually",
                             "reasonably", "partially", "slightly", "probably", "centrally", "there"}))
_LEADING_CONJ = re.compile(r"^(?:and|with|but|plus|&)\s+", re.IGNORECASE)
_NUMBER_WORDS = frozenset({"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"})
_SIZE = re.compile(r"\d\s*[xX]\s*\d|\d\s*(?:mm|cm|um)\b", re.IGNORECASE)
#: Single-word findings of the lexicon (processes and diagnoses), e.g. "fibrosis", "congestion".
_FINDINGS = (frozenset(t for t in lx.DIAGNOSES if " " not in t and "-" not in t)
             | frozenset(lx.ADJ_TO_TERM.values())) - {"hyaline", "amyloid"}
#: Words that never start a split-off phrase (``micro and macrovesicular``, ``both X and Y``).
_NO_SPLIT_BEFORE = frozenset({"both", "between", "micro", "macro", "either"})


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_TRANSLATE)
    return re.sub(r"\s+", " ", text).strip()


def _content_words(piece: str) -> list[str]:
    """Words of a piece that can name a finding (alphabetic, >= 3 letters, not function/size words)."""
    out = []
    for w in _WORD.findall(piece):
        lw = w.lower()
        if len(lw) < 3 or lw in _NON_CONTENT:
            continue
        if lw.endswith("s") and lw[:-1] in _NON_CONTENT:
            continue
        out.append(lw)
    return out


def _split_top_level(text: str, is_sep: Callable[[str, int], int]) -> list[str]:
    """Split ``text`` at separators found by ``is_sep(text, i) -> length`` outside parentheses."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            n = is_sep(text, i)
            if n:
                parts.append(text[start:i])
                start = i + n
                i += n
                continue
        i += 1
    parts.append(text[start:])
    return parts


def _sentence_sep(text: str, i: int) -> int:
    c = text[i]
    if c in ";\n!?":
        return 1
    if c == "." :
        nxt = text[i + 1] if i + 1 < len(text) else " "
        prv = text[i - 1] if i > 0 else " "
        if nxt.isdigit() and (prv.isdigit() or prv == " "):
            return 0  # a decimal: 7.5, 9 .5
        if not (nxt == " " or i + 1 == len(text) or nxt in "\"')"):
            return 0
        m = re.search(r"([A-Za-z.]+)$", text[:i])
        if m and m.group(1).lower().rstrip(".") in _ABBREVIATIONS:
            return 0
        return 1
    if text.startswith(" - ", i):
        return 3
    return 0


def _comma_sep(text: str, i: int) -> int:
    if text[i] == ":":
        return 1
    if text[i] != ",":
        return 0
    prv = text[i - 1] if i > 0 else " "
    nxt = text[i + 1] if i + 1 < len(text) else " "
    return 0 if (prv.isdigit() and nxt.isdigit()) else 1  # 1,000


def _clean(piece: str) -> str:
    piece = piece.strip(" \t,.;:-")
    piece = _strip_size_prefix(_LEADING_CONJ.sub("", piece).strip(" \t,.;:-"))
    return _LEADING_CONJ.sub("", piece).strip(" \t,.;:-")


def _strip_size_prefix(piece: str) -> str:
    """Drop a leading run of sizes and counts ("2 pieces ~12x6mm Gynecomastia" -> "Gynecomastia").

    Only numbers, sizes, ``~``/``&`` and specimen nouns (pieces, aliquots) are dropped, and only when the
    run holds a size or a specimen noun; qualifiers and negations ("Possible", "without") stay.
    """
    toks = piece.split(" ")
    n, sized = 0, False
    while n < len(toks):
        t = toks[n].strip(",;:()")
        low = t.lower()
        if _SIZE.search(t) or low.rstrip("s") in ("piece", "aliquot", "fragment", "section"):
            sized = True
        elif not (re.fullmatch(r"[~<>\d.,&x+-]*", low) or low in _NUMBER_WORDS or low in ("mm", "cm", "sq", "each")):
            break
        n += 1
    if sized and 0 < n < len(toks):
        return " ".join(toks[n:])
    return piece


def _has_finding(piece: str) -> bool:
    """Whether a piece names a finding of the lexicon (a process or diagnosis: "fibrosis", "edema")."""
    return any(w.lower() in _FINDINGS for w in _WORD.findall(piece))


def _bare_finding(piece: str) -> bool:
    """A finding with its qualifiers and modifiers only ("Mild fibrosis", "diffuse cystic glandular atrophy"):
    every content word is a finding or a modifier, and one is a finding."""
    words = _content_words(piece)
    return bool(words) and any(w in _FINDINGS for w in words) and all(
        w in _FINDINGS or w in lx.MODIFIERS or w in lx.ADJ_TO_TERM for w in words)


def _has_verb(piece: str) -> bool:
    return any(w.lower() in lx.VERBS for w in _WORD.findall(piece))


def _split_conjunctions(clause: str) -> list[str]:
    """Split at a coordinating ``and`` / ``&`` / ``plus`` / ``but`` that joins two clauses (a verb on each
    side) or two bare findings ("fibrosis and congestion"); never inside a noun phrase ("ductal and
    lobular elements", "micro and macrovesicular", "cirrhosis with steatosis and hepatitis")."""
    pieces: list[str] = []
    rest = clause
    while True:
        best = None
        for m in _SPLIT_WORDS.finditer(rest):
            left, right = rest[: m.start()], rest[m.end():]
            lw = left.split()
            rw = right.split()
            if not lw or not rw:
                continue
            if lw[-1].lower() in _NO_SPLIT_BEFORE or any(w.lower() in _NO_SPLIT_BEFORE for w in lw[-2:]):
                continue
            if lw[-1].lower().strip(",") in lx.MODIFIERS:  # "ductal and lobular elements"
                continue
            findings = _bare_finding(left) and _bare_finding(right)
            clauses = _has_verb(left) and _has_verb(right) and len(_content_words(right)) >= 1
            if not (findings or clauses):
                continue
            best = m
            break
        if best is None:
            pieces.append(rest)
            return pieces
        pieces.append(rest[: best.start()])
        rest = rest[best.end():]


def decompose_caption(text: str, *, drop_non_findings: bool = True, split_conjunctions: bool = True,
                      max_pieces: int | None = None) -> list[str]:
    """Rule-based decomposition of one caption into sub-captions (one finding each).

    Args:
        text: A slide caption, pathologist note or report.
        drop_non_findings: Drop pieces without a finding word (sizes, counts: "2 ~9x5mm pieces").
            When every piece would be dropped, the whole caption is returned as one sub-caption.
        split_conjunctions: Also split at ``and`` / ``&`` / ``plus`` / ``but`` joining two clauses or two
            bare findings.
        max_pieces: Keep at most this many (the first ones).

    Returns:
        Non-empty, stripped sub-captions, in caption order; at least one.

    Raises:
        DecomposeError: ``text`` is empty or only whitespace/punctuation.
    """
    if text is None or not _clean(_normalise(str(text))):
        raise DecomposeError("cannot decompose an empty caption")
    norm = _normalise(str(text))
    pieces: list[tuple[int, str]] = []  # (sentence index, piece)
    for s, sentence in enumerate(_split_top_level(norm, _sentence_sep)):
        sent_pieces: list[str] = []
        for clause in _split_top_level(sentence, _comma_sep):
            subs = _split_conjunctions(clause) if split_conjunctions else [clause]
            for sub in subs:
                sub = _clean(sub)
                if sub:
                    sent_pieces.append(sub)
        # qualifier-only pieces ("well preserved", "atrophic" is kept) join their neighbour in the sentence
        merged: list[str] = []
        pending = ""
        for p in sent_pieces:
            if not _content_words(p) and _has_words(p) and not _is_measure(p):
                if merged:
                    merged[-1] = f"{merged[-1]}, {p}"
                else:
                    pending = f"{pending}, {p}" if pending else p
                continue
            if pending:
                p, pending = f"{pending}, {p}", ""
            merged.append(p)
        if pending:
            merged.append(pending)
        pieces += [(s, p) for p in merged]
    out = [p for _, p in pieces]
    if drop_non_findings:
        kept = [p for p in out if _content_words(p)]
        out = kept if kept else [_clean(norm)]
    if max_pieces is not None:
        out = out[: max(1, max_pieces)]
    return out


def _has_words(piece: str) -> bool:
    return any(len(w) >= 2 for w in _WORD.findall(piece))


def _is_measure(piece: str) -> bool:
    words = [w.lower() for w in _WORD.findall(piece)]
    return bool(re.search(r"\d", piece)) and all(w in _NON_CONTENT or w.rstrip("s") in _NON_CONTENT
                                                  or re.fullmatch(r"x?(mm|cm|um)?", w) for w in words)


class RuleDecomposer:
    """Offline rule-based decomposer (see :func:`decompose_caption`).

    Args:
        drop_non_findings: Drop size/count pieces.
        split_conjunctions: Split at a conjunction joining two clauses or two bare findings.
        max_pieces: Keep at most this many pieces.
    """

    name = "rules"

    def __init__(self, drop_non_findings: bool = True, split_conjunctions: bool = True,
                 max_pieces: int | None = None) -> None:
        self.drop_non_findings = drop_non_findings
        self.split_conjunctions = split_conjunctions
        self.max_pieces = max_pieces

    def __call__(self, text: str) -> list[str]:
        return decompose_caption(text, drop_non_findings=self.drop_non_findings,
                                 split_conjunctions=self.split_conjunctions, max_pieces=self.max_pieces)

    def many(self, texts: Sequence[str]) -> list[list[str]]:
        """Decompose several captions."""
        return [self(t) for t in texts]


# ------------------------------------------------------------------------------------------------- LM
_PROMPT = (
    "Split the following pathology slide description into short region-level findings. "
    "Write one finding per line, each starting with '- ', using only words from the description. "
    "Leave out sizes and piece counts.\n\nDescription: {text}\n\nFindings:\n"
)


class LMDecomposer:
    """Decomposition by a local instruction-tuned causal language model, with a rule-based fallback.

    The model is loaded from a local Hugging Face folder with networking off (``local_files_only``);
    remote code is never trusted. The prompt asks for one finding per line; the reply is parsed into
    lines, bullets are stripped, and each line must be *grounded* (at least half of its content words
    occur in the caption), which guards against hallucinated findings. When nothing grounded is left,
    the caption goes to ``fallback``. Greedy decoding, so the output is deterministic.

    Args:
        model: A local model folder, or an already built ``(model, tokenizer)`` pair.
        max_new_tokens: Length of the reply.
        device: Torch device of the model.
        fallback: Decomposer used when the reply is unusable (default :class:`RuleDecomposer`).
        prompt: Template with ``{text}``.
    """

    name = "lm"

    def __init__(self, model: str | Path | tuple, max_new_tokens: int = 128, device: str = "cpu",
                 fallback: Decomposer | None = None, prompt: str = _PROMPT) -> None:
        if isinstance(model, tuple):
            self.model, self.tokenizer = model
        else:
            folder = Path(model).expanduser()
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"LM decomposer: {folder} is not a local Hugging Face model folder (no config.json); "
                    "nothing is downloaded")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        self.model.eval().to(device)
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.fallback = fallback or RuleDecomposer()
        self.prompt = prompt
        self.fallbacks = 0  # how many captions went to the fallback

    def _prompt_ids(self, text: str):
        tok = self.tokenizer
        content = self.prompt.format(text=text)
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
        return tok(content, return_tensors="pt")["input_ids"]

    def generate(self, text: str) -> str:
        """The model's raw reply for one caption."""
        import torch

        ids = self._prompt_ids(text).to(self.device)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    @staticmethod
    def parse(reply: str, caption: str) -> list[str]:
        """Grounded, de-duplicated findings of a reply (one per line; bullets and numbering stripped)."""
        source = {w.lower() for w in _WORD.findall(caption)}
        out: list[str] = []
        for line in reply.splitlines():
            line = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line).strip()
            line = _clean(line)
            words = _content_words(line)
            if not words:
                continue
            grounded = sum(w in source for w in words) / len(words)
            if grounded >= 0.5 and line not in out:
                out.append(line)
        return out

    def __call__(self, text: str) -> list[str]:
        if text is None or not _clean(_normalise(str(text))):
            raise DecomposeError("cannot decompose an empty caption")
        pieces = self.parse(self.generate(_normalise(text)), text)
        if not pieces:
            self.fallbacks += 1
            return self.fallback(text)
        return pieces


def build_decomposer(name: str = "rules", **kwargs) -> Decomposer:
    """A decomposer by name: ``"rules"`` or ``"lm:<model folder>"``.

    Raises:
        ValueError: Unknown name.
    """
    if name in ("rules", "rule", "rule-based"):
        return RuleDecomposer(**kwargs)
    if name.startswith("lm:"):
        return LMDecomposer(name[3:], **kwargs)
    raise ValueError(f"unknown decomposer {name!r}; use 'rules' or 'lm:/path/to/local/model'")


# ------------------------------------------------------------------------------------ K per slide
def select_subcaptions(subcaptions: Sequence[str], k: int, rng: np.random.Generator | None = None,
                       pad: str = "") -> tuple[list[str], list[bool]]:
    """Sample or pad a slide's sub-captions to exactly ``k`` entries.

    Args:
        subcaptions: The slide's sub-captions (at least one).
        k: Sub-captions per slide.
        rng: With more than ``k`` sub-captions, ``k`` are drawn without replacement (kept in caption
            order); ``None`` keeps the first ``k``.
        pad: Text of padding entries.

    Returns:
        ``(texts, mask)`` of length ``k``; ``mask`` is False at padding.

    Raises:
        DecomposeError: No sub-captions, or an empty one.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    subs = list(subcaptions)
    if not subs:
        raise DecomposeError("empty list of sub-captions: every slide needs at least one")
    if any(not str(s).strip() for s in subs):
        raise DecomposeError(f"empty sub-caption in {subs!r}")
    if len(subs) > k:
        idx = np.arange(k) if rng is None else np.sort(rng.choice(len(subs), k, replace=False))
        subs = [subs[i] for i in idx]
    n = len(subs)
    return subs + [pad] * (k - n), [True] * n + [False] * (k - n)
