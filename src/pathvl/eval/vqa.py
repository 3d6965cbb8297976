"""Multiple-choice visual question answering: prompts, answer-letter parsing and exact-match accuracy.

Slide-level VQA benchmarks (SlideBench-VQA, Chen et al., "SlideChat", CVPR 2025; the BCNB VQA of
PathFLIP, Liu et al. 2025) ask a question with lettered options and score the exact match of the
predicted letter. A generative model's reply is free text, so the letter is parsed from it
(:func:`parse_choice`): a leading letter ("B", "(B)", "B. adipose"), an explicit "answer is C", the
text of exactly one option, or a lone capital letter; replies with none of these count as wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathvl.text.mcq import LETTERS, format_mcq

__all__ = [
    "LETTERS",
    "MCQItem",
    "evaluate_mcq",
    "exact_match",
    "format_mcq",
    "parse_choice",
    "read_mcq",
]





def parse_choice(text: str | None, n_options: int = 4, options: Sequence[str] | None = None) -> str | None:
    """The option letter a free-text reply chooses, or None.

    Tried in order: a leading letter followed by punctuation or the end ("B", "(b)", "C. stroma",
    "d)"); "answer/option/choice is X"; the text of exactly one option (case-insensitive, whole words);
    a single capital letter standing alone ("I think B."), not followed by a lowercase word.

    Args:
        text: The reply.
        n_options: Valid letters are the first ``n_options`` of A-Z.
        options: The option texts (enables matching by text).

    Returns:
        An upper-case letter, or None.
    """
    if text is None:
        return None
    t = str(text).strip()
    if not t:
        return None
    n = len(options) if options is not None else n_options
    valid = LETTERS[:n]
    m = re.match(r"^\W*\(?([A-Za-z])\)?(?=$|[\s.):,;\]])", t)
    if m and m.group(1).upper() in valid:
        rest = t[m.end():]
        if not re.match(r"^\s+[a-z]", rest) or m.group(0).endswith(")") or m.group(0).startswith("("):
            return m.group(1).upper()
    m = re.search(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Za-z])\)?(?![A-Za-z])", t, re.IGNORECASE)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    if options:
        low = t.lower()
        hits = [i for i, o in enumerate(options)
                if str(o).strip() and re.search(rf"(?<!\w){re.escape(str(o).strip().lower())}(?!\w)", low)]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    lone = {c for c in re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])(?!\s+[a-z])", t) if c in valid}
    if len(lone) == 1:
        return lone.pop()
    return None


def _answer_letter(answer: Any, options: Sequence[str] | None) -> str:
    """An answer given as a 0-based index, an option's text or a letter, as a letter."""
    n = len(options) if options is not None else len(LETTERS)
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < n:
            return LETTERS[answer]
    else:
        a = str(answer).strip()
        if options is not None:
            for i, o in enumerate(options):
                if a.lower() == str(o).strip().lower():
                    return LETTERS[i]
        if len(a) == 1 and a.upper() in LETTERS[:n]:
            return a.upper()
    raise ValueError(f"answer {answer!r} is neither a letter, an index nor one of the options {options}")


def exact_match(predictions: Sequence[str | None], answers: Sequence[str], n_options: int = 4,
                options: Sequence[Sequence[str]] | None = None) -> float:
    """Fraction of replies whose parsed letter equals the answer letter (unparsable replies are wrong).

    Args:
        predictions: Free-text replies (or letters).
        answers: Answer letters (or option texts when ``options`` is given).
        n_options: Options per question when ``options`` is None.
        options: The options of each question.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        raise ValueError("no answers to score")
    hits = 0
    for i, (p, a) in enumerate(zip(predictions, answers)):
        opts = options[i] if options is not None else None
        hits += parse_choice(p, n_options, opts) == _answer_letter(a, opts)
    return hits / len(answers)


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question about a slide.

    Attributes:
        slide_id: The slide.
        question: The question.
        options: Option texts (A, B, ...).
        answer: The correct letter.
    """

    slide_id: str
    question: str
    options: tuple[str, ...]
    answer: str

    @property
    def prompt(self) -> str:
        return format_mcq(self.question, self.options)

    def record(self) -> dict[str, Any]:
        """As a record for :class:`pathvl.models.lm_bridge.InstructionDataset`."""
        return {"slide_id": self.slide_id, "prompt": self.prompt, "answer": self.answer}


def read_mcq(path: str | Path) -> list[MCQItem]:
    """Questions from JSON Lines: ``slide_id``, ``question``, ``options`` (list) and ``answer`` (a letter,
    a 0-based index or the option text).

    Raises:
        ValueError: A line misses a field or its answer matches no option.
    """
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        missing = {"slide_id", "question", "options", "answer"} - set(r)
        if missing:
            raise ValueError(f"{path}:{n}: missing {sorted(missing)}")
        opts = tuple(str(o) for o in r["options"])
        items.append(MCQItem(str(r["slide_id"]), str(r["question"]), opts, _answer_letter(r["answer"], opts)))
    return items


def evaluate_mcq(generate: Callable[[list[MCQItem]], list[str]], items: Sequence[MCQItem],
                 batch_size: int = 8) -> dict[str, Any]:
    """Run a generator over the questions and score exact match of the letter.

    Args:
        generate: Maps a batch of items to free-text replies.
        items: The questions.
        batch_size: Items per call.

    Returns:
        ``accuracy``, ``parsed`` (fraction of replies with a letter), ``n``, ``replies`` and ``letters``.
    """
    replies: list[str] = []
    for i in range(0, len(items), batch_size):
        batch = list(items[i:i + batch_size])
        out = generate(batch)
        if len(out) != len(batch):
            raise ValueError(f"generate returned {len(out)} replies for {len(batch)} questions")
        replies += list(out)
    letters = [parse_choice(r, options=it.options) for r, it in zip(replies, items)]
    acc = exact_match(replies, [it.answer for it in items], options=[it.options for it in items])
    return {"accuracy": acc, "parsed": sum(x is not None for x in letters) / max(1, len(items)), "n": len(items),
            "replies": replies, "letters": letters}
