"""Checks of report and clinical-context text: non-empty, bounded, UTF-8, not mis-decoded.

Reports come from hospital systems in every encoding; a wrong one turns into mojibake or control characters
that a model would happily learn. :func:`check_report` refuses such text with a message naming the slide.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Any


class ReportError(ValueError):
    """A report (or clinical context) that cannot be used: empty, enormous, or in an unexpected encoding."""


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
