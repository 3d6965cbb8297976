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

import torch

from pathvl.data.instructions import answer_letter, read_instructions
from pathvl.text.mcq import LETTERS, format_mcq

__all__ = [
    "LETTERS",
    "MCQItem",
    "answer_questions",
    "decoding_from",
    "evaluate_mcq",
    "exact_match",
    "format_mcq",
    "generate_answers",
    "parse_choice",
    "read_mcq",
    "run_vqa",
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
    """An answer given as a 0-based index, an option's text or a letter, as a letter
    (:func:`pathvl.data.instructions.answer_letter`)."""
    return answer_letter(answer, options)


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
    """Multiple-choice questions from JSON Lines (``slide_id``, ``question``, ``options`` (list) and
    ``answer``: a letter, a 0-based index or the option text) or from a SlideBench-style table (``Slide``,
    ``Question``, ``A``-``D``, ``Answer``; :func:`pathvl.data.instructions.read_instructions`).

    Raises:
        ValueError: A line misses a field or its answer matches no option.
    """
    if Path(path).suffix.lower() not in (".jsonl", ".ndjson"):
        return [MCQItem(str(r["slide"]), r["question"], tuple(r["options"]), r["answer"])
                for r in read_instructions(path) if r.get("options")]
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


# ------------------------------------------------------------------------------- any generative slide model
def decoding_from(max_new_tokens: int = 64, num_beams: int = 1, sample: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                  length_penalty: float = 1.0) -> Any:
    """A :class:`pathvl.models.lm_bridge.Decoding` from command-line style options."""
    from pathvl.models.lm_bridge import Decoding

    return Decoding(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=sample, temperature=temperature,
                    top_k=top_k, top_p=top_p, length_penalty=length_penalty, seed=seed)


@torch.no_grad()
def generate_answers(model: Any, features: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None,
                     prompts: Sequence[str], decoding: Any = None, contexts: Sequence[str | None] | None = None
                     ) -> list[str]:
    """Answers of a generative slide model to one prompt per slide.

    PathFLIP-instruct answers through its instruction-selected visual tokens; a stage-2 PathAlign model
    through its Q-Former queries and LM bridge (the prompt goes through its ``context_template``). Both
    decode with the bridge's greedy / sampling / beam-search loop (``decoding``).

    Raises:
        EvalError: A model that cannot follow instructions (a stage-1 PathAlign, a contrastive model).
    """
    from pathvl.eval.loading import EvalError
    from pathvl.models.lm_bridge import Decoding, PathFLIPInstruct

    d = decoding or Decoding()
    model.eval()
    if isinstance(model, PathFLIPInstruct):
        return model.generate(features, mask, pos, list(prompts), None if contexts is None else list(contexts),
                              decoding=d)
    bridge = getattr(model, "bridge", None)
    if bridge is None or not hasattr(model, "query_states"):
        what = type(model).__name__
        raise EvalError(f"a {what} model does not follow instructions; train pathflip-instruct, or PathAlign "
                        "stage 2 (model.stage=2)")
    from pathvl.models.pathalign import build_prompt

    dev = model.device
    q = model.query_states(features.to(dev), None if mask is None else mask.to(dev),
                           None if pos is None else pos.to(dev))[0]
    ctx = list(contexts) if contexts is not None else [None] * len(prompts)
    tok = bridge.tokenize([build_prompt(model.cfg, c, p) for p, c in zip(prompts, ctx)])
    return bridge.generate(q, None, tok, decoding=d)


def _slides_for(ev: Any, dataset: str | Path, slide_ids: Sequence[str]) -> Any:
    from pathvl.data.slidedata import SlideDataset

    return SlideDataset(dataset, None, ev.features, slide_ids=sorted(set(slide_ids)), max_patches=ev.max_patches,
                        n_subcaptions=1, decomposer=lambda c: [c], mags=ev.mags, train=False)


def answer_questions(ev: Any, dataset: str | Path, records: Sequence[dict[str, Any]], decoding: Any = None,
                     batch_size: int = 8) -> list[str]:
    """The model's answer to every record (``slide_id``/``slide`` and ``prompt``) over an embedded dataset.

    Slides are read as the model was trained (its features, magnifications and patch budget, evenly spaced).
    """
    from pathvl.data.dataset import Dataset
    from pathvl.data.instructions import resolve_slide_ids
    from pathvl.data.slidedata import pad_slides

    sids = resolve_slide_ids(records, Dataset(dataset).slide_ids())
    slides = _slides_for(ev, dataset, sids)
    where = {s: i for i, s in enumerate(slides.slide_ids)}
    replies: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = range(start, min(len(records), start + batch_size))
        b = pad_slides([slides[where[sids[i]]] for i in chunk])
        replies += generate_answers(ev.model, b["features"], b["patch_mask"], b["pos"],
                                    [str(records[i]["prompt"]) for i in chunk], decoding)
    return replies


def run_vqa(ev: Any, dataset: str | Path, questions: str | Path, decoding: Any = None, batch_size: int = 8,
            out_csv: str | Path | None = None) -> dict[str, Any]:
    """``pathvl vqa``: answers every question of a file and scores the multiple-choice ones.

    Multiple-choice accuracy is the exact match of the option letter parsed from the reply
    (:func:`parse_choice`) with the answer letter, as SlideBench-VQA and BCNB report it; unparsable replies
    are wrong. Open-ended questions are answered and written, not scored.

    Args:
        ev: A loaded model (:func:`pathvl.eval.loading.load_for_eval`).
        dataset: Embedded dataset folder.
        questions: SlideBench-style table or JSON/JSONL instructions (:func:`read_instructions`).
        decoding: :class:`pathvl.models.lm_bridge.Decoding` (default greedy, 64 tokens).
        batch_size: Questions per generation batch.
        out_csv: Where the answers go (default ``<questions>.answers.csv`` beside the questions).

    Returns:
        ``{"accuracy", "n_mcq", "parsed", "per_category": {category: {"accuracy", "n"}}, "n_open", "n",
        "answers": path, "decoding": {...}}``; ``accuracy`` is None without multiple-choice questions.
    """
    import csv
    import dataclasses

    from pathvl.eval.report import atomic_path

    records = read_instructions(questions)
    replies = answer_questions(ev, dataset, records, decoding, batch_size)
    rows, hits, parsed, cats = [], 0, 0, {}
    n_mcq = 0
    for r, reply in zip(records, replies):
        opts = r.get("options")
        row = {"id": r.get("id", ""), "slide": r["slide"], "category": r.get("category", ""),
               "question": r.get("question", r["prompt"]), "options": " | ".join(opts) if opts else "",
               "answer": r.get("answer", ""), "prediction": reply, "predicted_letter": "", "correct": ""}
        if opts:
            n_mcq += 1
            letter = parse_choice(reply, options=opts)
            ok = letter == r["answer"]
            hits += ok
            parsed += letter is not None
            row.update(predicted_letter=letter or "", correct=int(ok))
            c = cats.setdefault(r.get("category", "all"), [0, 0])
            c[0] += ok
            c[1] += 1
        rows.append(row)
    q = Path(questions)
    path = Path(out_csv) if out_csv else q.with_name(f"{q.stem}.answers.csv")
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    dec = dataclasses.asdict(decoding) if dataclasses.is_dataclass(decoding) else {}
    return {"accuracy": hits / n_mcq if n_mcq else None, "n_mcq": n_mcq, "parsed": parsed / n_mcq if n_mcq else None,
            "per_category": {k: {"accuracy": v[0] / v[1], "n": v[1]} for k, v in sorted(cats.items())},
            "n_open": len(records) - n_mcq, "n": len(records), "answers": str(path), "decoding": dec,
            "protocol": "exact match of the option letter parsed from the reply (SlideBench-VQA / BCNB); "
                        "unparsable replies count as wrong"}
