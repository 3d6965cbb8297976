"""Multiple-choice prompts: a question and its lettered options as one prompt text."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEFAULT_INSTRUCTION", "LETTERS", "format_mcq"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_INSTRUCTION = "Answer with the letter of the correct option."


def format_mcq(question: str, options: Sequence[str], instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The prompt of a multiple-choice question::

        Question: Which tissue is in the upper left?
        A. tumor
        B. adipose tissue
        Answer with the letter of the correct option.

    Raises:
        ValueError: Fewer than two or more than 26 options.
    """
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [f"Question: {str(question).strip()}"]
    lines += [f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options)]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)
