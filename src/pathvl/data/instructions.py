"""Slides paired with instructions and answers (captioning, free-text or multiple-choice VQA), read from
instruction files, and their batches for the LM bridge.

Two kinds of files are read (:func:`read_instructions` picks by content):

- **Instruction files** (JSON list or JSON Lines), one record per slide and conversation, in LLaVA's and
  SlideInstruction's layout (SlideChat, Chen et al., CVPR 2025)::

      {"id": "train::0", "image": ["TCGA-A7-A0CJ-01Z-00-DX2.csv"],
       "conversations": [{"from": "human", "value": "What type of carcinoma is shown?\\n<image>"},
                         {"from": "gpt", "value": "Infiltrating ductal carcinoma ..."}]}

  The slide is ``slide_id``, ``slide``, ``image`` (a name or a list of names; the file stem is the slide id)
  or ``id``; the turns are ``conversations``/``messages``/``turns`` with ``from``/``role`` (``human``/
  ``user`` then ``gpt``/``assistant``) and ``value``/``content``. Every assistant turn becomes one record
  whose prompt is the question, after the earlier turns of the conversation (``User: ...`` /
  ``Assistant: ...`` lines); ``<image>`` placeholders are removed. Flat records (``slide_id``, ``prompt``
  or ``question`` with ``options``, ``answer``) are read as they are.
- **Multiple-choice tables** in SlideBench's layout (CSV/TSV/XLSX/JSONL; SlideBench-VQA (TCGA) and
  (BCNB)): columns ``ID``, ``Slide``, ``Question``, ``A``, ``B``, ``C``, ``D`` (more letters allowed, empty
  ones skipped) and ``Answer`` (the letter, the option text or a 0-based index), optionally a category
  (``Broad Category``, ``Task``, ``category``). The prompt is :func:`pathvl.text.mcq.format_mcq` and the
  answer the letter, so training and exact-match scoring use the same text.

Slide names are matched to a dataset's slide ids exactly, else by their file stem
(``TCGA-XX.csv`` -> ``TCGA-XX``): :func:`resolve_slide_ids`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pathvl.data.dataset import DatasetError
from pathvl.data.tables import Table, TableError, read_table
from pathvl.text.mcq import LETTERS, format_mcq

__all__ = [
    "InstructionDataset",
    "answer_letter",
    "build_instruction_dataset",
    "collate_instructions",
    "read_instructions",
    "resolve_slide_ids",
]

_HUMAN = frozenset({"human", "user"})
_ASSISTANT = frozenset({"gpt", "assistant", "model", "bot"})
_TURN_KEYS = ("conversations", "conversation", "messages", "turns")
_SLIDE_KEYS = ("slide_id", "slide", "image", "wsi", "id")
_CATEGORY_COLUMNS = ("broad category", "category", "task", "narrow category")


class InstructionError(TableError):
    """An instruction file that cannot be used (the message names the file and the line)."""


def answer_letter(answer: Any, options: Sequence[str] | None) -> str:
    """An answer given as a 0-based index, an option's text or a letter, as the option letter.

    Raises:
        ValueError: It is none of these.
    """
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
        m = re.fullmatch(r"\(?([A-Za-z])\)?[.):]?(?:\s.*)?", a)  # "B", "(b)", "B.", "B. adipose"
        if m and m.group(1).upper() in LETTERS[:n]:
            return m.group(1).upper()
        if a.isdigit() and 0 <= int(a) < n:
            return LETTERS[int(a)]
    raise ValueError(f"answer {answer!r} is neither a letter, an index nor one of the options {options}")


def _clean_turn(text: Any) -> str:
    s = str(text or "").replace("<image>", " ")
    return re.sub(r"[ \t]+", " ", re.sub(r"\s*\n\s*", "\n", s)).strip()


def _slide_of(rec: Mapping[str, Any]) -> str:
    for key in _SLIDE_KEYS:
        v = rec.get(key)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None and str(v).strip():
            return str(v).strip()
    return ""


def _conversation_records(rec: Mapping[str, Any], turns: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list):
        raise InstructionError(f"{where}: the conversation must be a list of turns, got {type(turns).__name__}")
    out, history, question = [], [], None
    for t in turns:
        if not isinstance(t, Mapping):
            raise InstructionError(f"{where}: a turn must be an object with from/value, got {t!r:.60}")
        role = str(t.get("from", t.get("role", ""))).strip().lower()
        text = _clean_turn(t.get("value", t.get("content", "")))
        if role in _HUMAN:
            question = text
        elif role in _ASSISTANT:
            if question is None:
                raise InstructionError(f"{where}: an assistant turn without a question before it")
            prompt = "\n".join([*history, question]) if history else question
            out.append({"prompt": prompt, "answer": text})
            history += [f"User: {question}", f"Assistant: {text}"]
            question = None
        elif role in ("system",):
            continue
        else:
            raise InstructionError(f"{where}: unknown speaker {role!r} (use human/user and gpt/assistant)")
    if not out:
        raise InstructionError(f"{where}: the conversation holds no question followed by an answer")
    return out


def _mcq_columns(table: Table) -> tuple[str, list[str], str] | None:
    q = table.column(None, ("question",), "question", required=False)
    a = table.column(None, ("answer",), "answer", required=False)
    letters = []
    for letter in LETTERS:
        c = table.column(None, (letter,), letter, required=False)
        if c is None:
            break
        letters.append(c)
    if q is None or a is None or len(letters) < 2:
        return None
    return q, letters, a


def read_instructions(path: str | Path) -> list[dict[str, Any]]:
    """Instruction records of one file (see the module docstring for the layouts).

    Returns:
        One dict per question: ``slide`` (the name in the file), ``prompt``, ``answer``, and for
        multiple-choice questions ``question``, ``options`` (tuple) and the answer letter as ``answer``;
        ``category`` and ``id`` when the file has them; ``line`` (where it came from).

    Raises:
        FileNotFoundError: No such file.
        InstructionError: A record without slide, question or answer, or an answer that is no option.
    """
    table = read_table(path, "instructions")
    mcq = _mcq_columns(table)
    cat_col = table.column(None, _CATEGORY_COLUMNS, "category", required=False)
    id_col = table.column(None, ("id",), "id", required=False)
    out: list[dict[str, Any]] = []
    for row, line in zip(table.rows, table.lines):
        where = f"{table.path}:{line}"
        slide = _slide_of({k.lower(): v for k, v in row.items()})
        if not slide:
            raise InstructionError(f"{where}: no slide (give slide_id, slide or image)")
        base: dict[str, Any] = {"slide": slide, "line": line}
        if id_col is not None and row.get(id_col) not in (None, ""):
            base["id"] = str(row[id_col])
        if cat_col is not None and str(row.get(cat_col) or "").strip():
            base["category"] = str(row[cat_col]).strip()
        turns = next((row[k] for k in row if k.lower() in _TURN_KEYS), None)
        if turns is not None:
            out += [{**base, **r} for r in _conversation_records(row, turns, where)]
            continue
        lower = {k.lower(): v for k, v in row.items()}
        if mcq is not None or isinstance(lower.get("options"), (list, tuple)):
            question = str(row[mcq[0]] if mcq else lower.get("question", "")).strip()
            if mcq is not None:
                options = tuple(str(row[c]).strip() for c in mcq[1] if str(row.get(c) or "").strip())
            else:
                options = tuple(str(o).strip() for o in lower["options"])
            raw = row[mcq[2]] if mcq else lower.get("answer")
            if not question or raw is None or str(raw).strip() == "":
                raise InstructionError(f"{where}: a multiple-choice row needs a question and an answer")
            try:
                letter = answer_letter(raw, options)
                prompt = format_mcq(question, options)
            except ValueError as e:
                raise InstructionError(f"{where}: {e}") from None
            out.append({**base, "question": question, "options": options, "answer": letter, "prompt": prompt})
            continue
        prompt = _clean_turn(lower.get("prompt") or lower.get("question") or lower.get("instruction") or "")
        answer = lower.get("answer", lower.get("response", lower.get("output")))
        if not prompt or answer is None:
            raise InstructionError(f"{where}: a record needs a prompt (or question, or conversations) and an "
                                   "answer")
        out.append({**base, "prompt": prompt, "answer": _clean_turn(answer)})
    if not out:
        raise InstructionError(f"{table.path}: no instructions in the file")
    return out


def resolve_slide_ids(records: Sequence[Mapping[str, Any]], known: Sequence[str]) -> list[str]:
    """The dataset slide id of every record: its ``slide`` (or ``slide_id``) itself, else its file stem.

    Raises:
        DatasetError: Records whose slide is not in the dataset (the first few are named).
    """
    ids = set(known)
    out, missing = [], []
    for r in records:
        name = str(r.get("slide_id", r.get("slide", "")))
        cands = [name, Path(name).stem, Path(name).name.split(".")[0]]
        hit = next((c for c in cands if c in ids), None)
        if hit is None:
            missing.append(name)
        out.append(hit or "")
    if missing:
        raise DatasetError(f"{len(missing)} instruction(s) name slides that are not in the dataset "
                           f"(e.g. {sorted(set(missing))[:3]}); tile and embed them or remove the rows")
    return out


class InstructionDataset(torch.utils.data.Dataset):
    """Slides paired with instructions and answers (captioning, free-text or multiple-choice VQA).

    Args:
        slides: A :class:`pathvl.data.slidedata.SlideDataset` (texts are not needed).
        records: Dicts with ``slide_id`` (or ``slide``), ``prompt`` (or ``question`` + ``options``,
            formatted by :func:`pathvl.text.mcq.format_mcq`) and ``answer``.

    Raises:
        KeyError: A record names a slide that is not in ``slides``.
    """

    def __init__(self, slides: Any, records: Sequence[Mapping[str, Any]]) -> None:
        self.slides = slides
        pos = {s: i for i, s in enumerate(slides.slide_ids)}
        self.items = []
        self.records = [dict(r) for r in records]
        for r in self.records:
            sid = str(r.get("slide_id", r.get("slide", "")))
            if sid not in pos:
                sid = Path(sid).stem if Path(sid).stem in pos else sid
            if sid not in pos:
                raise KeyError(f"instruction record names slide {sid!r}, which is not in the slide dataset")
            r["slide_id"] = sid
            prompt = r.get("prompt") or format_mcq(r["question"], r["options"])
            self.items.append((pos[sid], str(prompt), str(r.get("answer", ""))))

    @staticmethod
    def captioning(slides: Any, prompt: str = "Describe this slide.") -> InstructionDataset:
        """Stage-1 records: every slide with ``prompt`` and its caption as the answer."""
        return InstructionDataset(slides, [{"slide_id": s, "prompt": prompt, "answer": c}
                                           for s, c in zip(slides.slide_ids, slides.captions)])

    @property
    def feature_dim(self) -> int:
        return int(self.slides.feature_dim)

    def set_epoch(self, epoch: int) -> None:
        """Re-draws the slides' patch samples (see :meth:`SlideDataset.set_epoch`)."""
        set_epoch = getattr(self.slides, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, prompt, answer = self.items[i]
        item = dict(self.slides[s])
        item.update(prompt=prompt, answer=answer, record=i)
        return item


def collate_instructions(items: Sequence[Mapping[str, Any]], slide_tokenizer: Any, bridge: Any,
                         max_tokens: int = 64) -> dict[str, Tensor]:
    """A batch for :class:`~pathvl.models.lm_bridge.PathFLIPInstruct`.

    Returns:
        :func:`~pathvl.data.slidedata.pad_slides`' ``features``, ``patch_mask``, ``pos``, ``rows``, ``index``;
        ``instr_ids``/``instr_attn`` (the prompt in the slide model's tokenizer, for patch selection) and
        ``prompt_ids``/``prompt_mask``/``answer_ids``/``answer_mask`` (the LM's tokenizer, through
        ``bridge.tokenize``: an :class:`~pathvl.models.lm_bridge.LMBridge` or ``BridgeTokenizer``).
    """
    from pathvl.data.slidedata import pad_slides
    from pathvl.text.tokenize import tokenize

    batch = pad_slides(items)
    prompts = [it["prompt"] for it in items]
    instr = tokenize(slide_tokenizer, prompts, max_length=max_tokens)
    batch.update(instr_ids=instr["input_ids"], instr_attn=instr["attention_mask"])
    batch.update(bridge.tokenize(prompts, [it.get("answer", "") for it in items]))
    return batch


def build_instruction_dataset(root: str | Path, sources: str | Path | Sequence[str | Path], features: str, *,
                              captions: str | Path | None = None, caption_prompt: str = "Describe this slide.",
                              max_patches: int = 4096, mags: Sequence[float] = (), train: bool = True,
                              seed: int = 0) -> InstructionDataset:
    """Instructions of one or more files (:func:`read_instructions`) over a tiled and embedded dataset.

    Args:
        root: Dataset folder.
        sources: Instruction files (JSON/JSONL conversations, SlideBench-style tables).
        features: Encoder name of the cached features.
        captions: Optional slide texts (CSV/JSONL of slide id and caption): each slide's caption becomes the
            answer to ``caption_prompt`` (the captioning task of stage 1).
        caption_prompt: The captioning instruction.
        max_patches: Patches per slide (0: all).
        mags: Keep only these magnifications.
        train: Random patch sampling (re-drawn every epoch).
        seed: Sampling seed.

    Raises:
        DatasetError: No records, or records naming slides the dataset lacks.
    """
    from pathvl.data.dataset import Dataset
    from pathvl.data.slidedata import SlideDataset, read_slide_texts

    files = [sources] if isinstance(sources, (str, Path)) else list(sources)
    records: list[dict[str, Any]] = []
    for f in files:
        if str(f).strip():
            records += read_instructions(f)
    if captions:
        for sid, t in read_slide_texts(captions).items():
            if t.caption.strip():
                records.append({"slide": sid, "prompt": caption_prompt, "answer": t.caption.strip()})
    if not records:
        raise DatasetError("no instructions: give data.instructions (JSON/JSONL/CSV files) or data.captions")
    known = Dataset(root).slide_ids()
    for r, sid in zip(records, resolve_slide_ids(records, known)):
        r["slide_id"] = sid
    needed = sorted({r["slide_id"] for r in records})
    slides = SlideDataset(root, None, features, slide_ids=needed, max_patches=max_patches, n_subcaptions=1,
                          decomposer=lambda c: [c], mags=tuple(float(m) for m in mags), train=train, seed=seed)
    return InstructionDataset(slides, records)
