"""Rule-based keyword extraction for pathology captions and notes (no NLP models, no downloads).

:func:`extract_keywords` returns pathology terms and short noun phrases, normalised and in order of
first appearance:

1. Text is lowercased, Unicode-normalised and split into clauses at punctuation; hyphenated words
   are split (``well-preserved`` -> ``well preserved``), possessives dropped (``Hashimoto's``).
2. Each word is singularised (``nuclei`` -> ``nucleus``, ``cells`` -> ``cell``, ``corpora albicantia``
   -> ``corpus albicans``, ``metastases`` -> ``metastasis``; ``pancreas`` and ``necrosis`` stay).
3. Terms of the curated lexicon (:mod:`pathvl.text.lexicon`) are matched greedily, longest first,
   on the words as written and as singularised; British spellings and abbreviations map to the
   canonical term (``tumour`` -> ``tumor``, ``TDLU`` -> ``terminal duct lobular unit``).
4. A chunker splits each clause at stopwords, verbs, numbers and units; in each chunk the last
   noun-like word is a head, and the phrase of up to three words ending at it (pathology adjectives,
   nouns and lexicon terms, leading severity/extent qualifiers like ``mild`` or ``focal`` dropped) is
   kept if its head is a lexicon term or a specific noun; a generic head (``change``, ``element``)
   needs a pathology modifier (``fibrocystic change``); specimen-handling nouns (``piece``,
   ``aliquot``, ``specimen``, ``thickness``...) are never keywords.
5. Phrases come with the lexicon terms inside them and each term with the more general term that
   ends it (``micronodular cirrhosis`` also yields ``cirrhosis``), so keyword bags match at both levels;
   adjectives naming a process also yield the process (``atrophic`` -> ``atrophy``, ``congested`` ->
   ``congestion``).

Negation is not handled: "no medulla" yields ``medulla`` (keywords are mentions, not findings).
Keywords never contain the separator :data:`pathvl._const.KEYWORD_SEP`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from pathvl._const import KEYWORD_SEP
from pathvl.text import lexicon as lx

#: Texts longer than this are truncated before extraction (keeps work bounded on huge inputs).
MAX_CHARS = 100_000
MAX_PHRASE_WORDS = 3
MAX_WORD_CHARS = 40  # longer "words" (sequences, garbage) are never keywords

_WORD = re.compile(r"[a-z0-9]+(?:['&-][a-z0-9]+)*|\S")
_DIGIT = re.compile(r"\d")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'", "\u201c": '"', "\u201d": '"'})
_ADJ_SUFFIXES = ("al", "ic", "ous", "ive", "oid", "ful", "less", "able", "ible", "ish", "atory", "etory",
                 "ular", "iar", "ary")
_EXTRA_SIS = frozenset({
    "diagnosis", "prognosis", "analysis", "anastomosis", "hypothesis", "synthesis", "basis", "crisis",
    "emphasis", "stasis", "synopsis", "paralysis", "dialysis", "lysis", "neurosis", "psychosis",
    "osteoporosis", "thrombosis", "sclerosis", "stenosis", "ptosis", "mitosis", "necrosis",
    "apoptosis", "fibrosis", "metastasis", "micrometastasis", "hemostasis", "homeostasis", "prosthesis",
})


@dataclass(frozen=True)
class _Lexicon:
    keys: dict[str, str]  # surface key (words joined by spaces) -> canonical term
    max_words: int
    categories: dict[str, str]  # canonical term -> category
    heads: dict[str, tuple[str, ...]]  # canonical term -> more general terms that end it
    sis: frozenset[str]


def _key(term: str) -> str:
    return " ".join(term.replace("-", " ").split())


@lru_cache(maxsize=1)
def _lexicon() -> _Lexicon:
    categories = lx.all_terms()
    keys: dict[str, str] = {}
    for term in categories:
        keys.setdefault(_key(term), term)
    for alias, term in lx.ALIASES.items():
        keys.setdefault(_key(alias), term)
    heads: dict[str, tuple[str, ...]] = {}
    for term in categories:
        words = _key(term).split()
        chain = []
        for i in range(1, len(words)):
            sub = keys.get(" ".join(words[i:]))
            if sub is not None and sub != term and categories.get(sub) != "grade" and sub not in chain:
                chain.append(sub)
        heads[term] = tuple(chain)
    sis = frozenset(w for t in categories for w in _key(t).split() if w.endswith("sis")) | _EXTRA_SIS
    return _Lexicon(
        keys=keys, max_words=max(len(k.split()) for k in keys), categories=categories, heads=heads, sis=sis
    )


def singularize(word: str) -> str:
    """Singular form of one lowercase word, keeping Latin and Greek plurals right.

    Args:
        word: A lowercase word.

    Returns:
        ``nuclei`` -> ``nucleus``, ``cells`` -> ``cell``, ``glands`` -> ``gland``, ``arteries`` ->
        ``artery``, ``metastases`` -> ``metastasis``, ``ova`` -> ``ovum``; words that are already
        singular (``pancreas``, ``necrosis``, ``villus``, ``mucinous``) are returned unchanged.
    """
    if word in lx.IRREGULAR_PLURALS:
        return lx.IRREGULAR_PLURALS[word]
    if word in lx.INVARIANT or len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("ses"):
        sis = word[:-3] + "sis"
        if sis in _lexicon().sis:
            return sis
    if word.endswith("es"):
        stem = word[:-2]
        if stem in lx.INVARIANT or stem.endswith(("ss", "sh", "ch", "x", "zz", "us")):
            return stem
        return word[:-1]
    if word.endswith("ae") and len(word) > 4:
        return word[:-1]
    if word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("s"):
        return word[:-1]
    return word


# --------------------------------------------------------------------------------------------------
# tokens and units


@dataclass
class _Unit:
    text: str  # canonical term or singular word
    kind: str  # lex | mod | adj | noun | generic | admin | qual | stop
    pos: int  # index of the first word in the clause
    nwords: int
    category: str = ""


@lru_cache(maxsize=1)
def _known_words() -> frozenset[str]:
    """Single words that a hyphenated spelling may join into (``macro-vesicular``)."""
    keys = _lexicon().keys
    return frozenset(k for k in keys if " " not in k) | lx.MODIFIERS


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()


def _clauses(text: str) -> list[list[str]]:
    """Split text into clauses (lists of words); punctuation ends a clause, hyphens join."""
    clauses: list[list[str]] = []
    current: list[str] = []
    for m in _WORD.finditer(_normalise(text)):
        tok = m.group(0)
        if tok[0].isalnum():
            tok = tok.replace("'s", "").replace("'", "")
            if "-" in tok:
                joined = tok.replace("-", "")
                if joined in _known_words():  # "post-menopausal" -> "postmenopausal"
                    current.append(joined)
                    continue
            for part in tok.split("-"):
                if part:
                    current.append(lx.SPELLING.get(part, part))
        elif tok == "&":
            current.append("&")
        elif current:
            clauses.append(current)
            current = []
    if current:
        clauses.append(current)
    return clauses


def _classify(raw: str, sing: str) -> str:
    if _DIGIT.search(raw) or len(raw) < 3 or len(raw) > MAX_WORD_CHARS:
        return "stop"
    if raw in lx.STOPWORDS or raw in lx.VERBS or raw in lx.UNITS or sing in lx.UNITS:
        return "stop"
    if raw in lx.QUALIFIERS or sing in lx.QUALIFIERS:
        return "qual"
    if raw in lx.MODIFIERS:
        return "mod"
    if sing in lx.ADMIN_NOUNS:
        return "admin"
    if sing in lx.GENERIC_NOUNS:
        return "generic"
    if raw in lx.NOUN_EXCEPTIONS or sing in lx.NOUN_EXCEPTIONS:
        return "noun"
    if raw.endswith("ly") and len(raw) > 4:
        return "stop"  # adverb
    if raw.endswith(_ADJ_SUFFIXES) or (raw.endswith("ed") and len(raw) > 4):
        return "adj"
    return "noun"


def _units(words: list[str]) -> list[_Unit]:
    lex = _lexicon()
    sing = [singularize(w) for w in words]
    units: list[_Unit] = []
    i, n = 0, len(words)
    while i < n:
        hit = None
        for k in range(min(lex.max_words, n - i), 0, -1):
            term = lex.keys.get(" ".join(words[i : i + k])) or lex.keys.get(" ".join(sing[i : i + k]))
            if term is not None:
                hit = (term, k)
                break
        if hit is not None:
            term, k = hit
            units.append(_Unit(term, "lex", i, k, lex.categories.get(term, "")))
            i += k
            continue
        units.append(_Unit(sing[i], _classify(words[i], sing[i]), i, 1))
        i += 1
    return units


def _chunks(units: list[_Unit]) -> Iterable[list[_Unit]]:
    chunk: list[_Unit] = []
    for u in units:
        if u.kind == "stop":
            if chunk:
                yield chunk
            chunk = []
        else:
            chunk.append(u)
    if chunk:
        yield chunk


def _is_head(u: _Unit) -> bool:
    return u.kind in ("noun", "generic") or (u.kind == "lex" and u.category != "grade")


def _chunk_keywords(chunk: list[_Unit]) -> list[str]:
    lex = _lexicon()
    found: list[tuple[int, int, str]] = []  # (position, -words, keyword)
    head_i = next((i for i in range(len(chunk) - 1, -1, -1) if _is_head(chunk[i])), None)
    if head_i is not None:
        head = chunk[head_i]
        start, words = head_i, head.nwords
        while start > 0:
            prev = chunk[start - 1]
            if prev.kind not in ("lex", "mod", "adj", "noun") or words + prev.nwords > MAX_PHRASE_WORDS:
                break
            start -= 1
            words += prev.nwords
        phrase = chunk[start : head_i + 1]
        informative = head.kind in ("noun", "lex") or any(u.kind == "mod" for u in phrase[:-1])
        texts = [u.text for u in phrase]
        if informative and len(set(texts)) == len(texts) and not (len(phrase) == 1 and head.kind == "lex"):
            found.append((phrase[0].pos, -words, " ".join(texts)))
    for u in chunk:
        if u.kind in ("mod", "adj") and u.text in lx.ADJ_TO_TERM:
            found.append((u.pos, 0, lx.ADJ_TO_TERM[u.text]))
        if u.kind != "lex":
            continue
        found.append((u.pos, -len(_key(u.text).split()), u.text))
        for general in lex.heads.get(u.text, ()):
            nw = len(_key(general).split())
            found.append((u.pos + max(0, u.nwords - nw), -nw, general))
    found.sort(key=lambda t: (t[0], t[1]))
    return [kw for _, _, kw in found]


# --------------------------------------------------------------------------------------------------
# public API


def extract_keywords(text: str | None, *, max_keywords: int | None = None) -> list[str]:
    """Pathology terms and noun phrases of a text, normalised, de-duplicated, in order of appearance.

    Args:
        text: A caption, note or report. Texts longer than :data:`MAX_CHARS` are truncated.
        max_keywords: Stop after this many keywords (None: all).

    Returns:
        Lowercase keywords without punctuation other than hyphens and ``&`` inside lexicon terms
        (``ki-67``, ``h&e``), e.g. ``"Patchy glandular hyperplasia; nuclei enlarged"`` ->
        ``["glandular hyperplasia", "hyperplasia", "nucleus"]``.

    Example:
        >>> extract_keywords("Established micronodular cirrhosis with macrovesicular steatosis")
        ['micronodular cirrhosis', 'cirrhosis', 'macrovesicular steatosis', 'steatosis']
    """
    if not text or (max_keywords is not None and max_keywords <= 0):
        return []
    out: list[str] = []
    seen: set[str] = set()
    if len(text) > MAX_CHARS:  # cut at a space so that no word is truncated into another word
        cut = text.rfind(" ", 0, MAX_CHARS + 1)
        text = text[: cut if cut > 0 else MAX_CHARS]
    for words in _clauses(text):
        for chunk in _chunks(_units(words)):
            for kw in _chunk_keywords(chunk):
                kw = kw.replace(KEYWORD_SEP, " ").strip()
                if kw and kw not in seen:
                    seen.add(kw)
                    out.append(kw)
                    if max_keywords is not None and len(out) >= max_keywords:
                        return out
    return out


def keyword_bag(captions: Iterable[str | None], *, max_keywords: int | None = None) -> list[str]:
    """Ordered union of the keywords of several captions (first appearance wins).

    Args:
        captions: Texts, e.g. the captions of the patches of one slide.
        max_keywords: Cap on the size of the bag (None: no cap).

    Returns:
        De-duplicated keywords in order of first appearance across the captions.
    """
    out: list[str] = []
    seen: set[str] = set()
    for caption in captions:
        for kw in extract_keywords(caption):
            if kw not in seen:
                seen.add(kw)
                out.append(kw)
                if max_keywords is not None and len(out) >= max_keywords:
                    return out
    return out


def join_keywords(keywords: Iterable[str]) -> str:
    """Join keywords with :data:`pathvl._const.KEYWORD_SEP` for storage in one HDF5 string.

    Raises:
        ValueError: A keyword contains the separator.
    """
    items = []
    for kw in keywords:
        kw = kw.strip()
        if KEYWORD_SEP in kw:
            raise ValueError(f"keyword {kw!r} contains the separator {KEYWORD_SEP!r}")
        if kw:
            items.append(kw)
    return KEYWORD_SEP.join(items)


def split_keywords(joined: str | bytes | None) -> list[str]:
    """Inverse of :func:`join_keywords`; empty or None gives ``[]`` (bytes are UTF-8 decoded)."""
    if not joined:
        return []
    if isinstance(joined, bytes):
        joined = joined.decode("utf-8")
    return [kw.strip() for kw in joined.split(KEYWORD_SEP) if kw.strip()]
