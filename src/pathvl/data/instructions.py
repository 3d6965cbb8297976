"""Slides paired with instructions and answers (captioning, free-text or multiple-choice VQA) and their
batches for the LM bridge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pathvl.text.mcq import format_mcq


class InstructionDataset(torch.utils.data.Dataset):
    """Slides paired with instructions and answers (captioning, free-text or multiple-choice VQA).

    Args:
        slides: A :class:`pathvl.data.slidedata.SlideDataset`.
        records: Dicts with ``slide_id``, ``prompt`` (or ``question`` + ``options``, formatted by
            :func:`pathvl.text.mcq.format_mcq`) and ``answer``.

    Raises:
        KeyError: A record names a slide that is not in ``slides``.
    """

    def __init__(self, slides: Any, records: Sequence[Mapping[str, Any]]) -> None:
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


def collate_instructions(items: Sequence[Mapping[str, Any]], slide_tokenizer: Any, bridge: Any,
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
