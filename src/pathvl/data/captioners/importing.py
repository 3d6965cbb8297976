"""The ``import`` captioner: captions produced elsewhere, read from a CSV/TSV or JSONL file."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathvl.data.captioners.base import Captioner, _sha256, register_captioner
from pathvl.data.tables import read_table

SLIDE_COLUMNS = ("slide_id", "slide")
TEXT_COLUMNS = ("caption", "text")
INDEX_COLUMNS = ("index", "patch_index")
MAG_COLUMNS = ("magnification", "mag")
EXPECTED_COLUMNS = ("slide_id, caption (or text), and either index or x, y, magnification "
                    "(JSONL: the same keys)")


@register_captioner("import")
class ImportCaptioner(Captioner):
    """Captions produced elsewhere, read from a CSV/TSV (with a header) or a JSONL file.

    Each row names a slide (``slide_id``) and a patch, either by its row in the slide's patch table
    (``index``) or by its level-0 top-left corner and magnification (``x``, ``y``, ``magnification``),
    and gives the text (``caption`` or ``text``). Patches without a row get an empty caption (counted
    as ``no_row``); rows that match no patch of a captioned slide, or name a slide the dataset lacks,
    are counted as ``unmatched_rows`` at the end. A later duplicate row replaces an earlier one
    (``duplicate_rows``).

    Args:
        path: The CSV, TSV or JSONL file.
        match: ``"auto"`` (index when the file has it, else coordinates), ``"index"`` or ``"coords"``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Wrong columns or unreadable values; the message names the file and what is expected.
    """

    kind = "import"
    needs_pixels = False
    description = "captions imported from a file produced outside pathvl"

    def __init__(self, path: str | Path | None = None, match: str = "auto") -> None:
        super().__init__()
        self.batch_size = 4096
        if path is None:
            raise ValueError("the import captioner needs the caption file: pass it with `--from FILE`")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"caption file not found: {p} (pass it with `--from FILE`)")
        if match not in ("auto", "index", "coords"):
            raise ValueError(f"match must be 'auto', 'index' or 'coords', got {match!r}")
        self.path = p
        table = read_table(p, "caption file")
        cols = table.columns
        rows = [{**r, "_line": line} for r, line in zip(table.rows, table.lines)]
        slide_col = table.column(None, SLIDE_COLUMNS, "slide id", required=False)
        text_col = table.column(None, TEXT_COLUMNS, "caption", required=False)
        index_col = table.column(None, INDEX_COLUMNS, "patch index", required=False)
        mag_col = table.column(None, MAG_COLUMNS, "magnification", required=False)
        x_col, y_col = table.column(None, ("x",), "x", required=False), table.column(None, ("y",), "y", required=False)
        has_coords = x_col is not None and y_col is not None and mag_col is not None
        if match == "auto":
            match = "index" if index_col else "coords"
        ok = slide_col and text_col and ((match == "index" and index_col) or (match == "coords" and has_coords))
        if not ok:
            raise ValueError(f"{p}: columns {list(cols)} do not fit (match={match}); expected {EXPECTED_COLUMNS}")
        self.match = match
        self.table: dict[tuple, str] = {}
        self._line: dict[tuple, int] = {}
        dup = 0
        for r in rows:
            try:
                sid = str(r[slide_col]).strip()
                if match == "index":
                    key = (sid, int(str(r[index_col]).strip()))
                else:
                    key = (sid, round(float(r[x_col])), round(float(r[y_col])),
                           round(float(r[mag_col]), 3))
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"{p}:{r['_line']}: unreadable slide id / patch ({e}); expected "
                                 f"{EXPECTED_COLUMNS}") from e
            text = r.get(text_col)
            if key in self.table:
                dup += 1
            self.table[key] = "" if text is None else str(text)
            self._line[key] = r["_line"]
        self.counts["duplicate_rows"] += dup
        self.n_rows = len(rows)
        self._used: set[tuple] = set()
        self._slides = {k[0] for k in self.table}

    def options(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "match": self.match}

    def identity(self) -> dict[str, str]:
        return {"captioner": self.name, "source_file": str(self.path.resolve())}

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["source_file"] = str(self.path.resolve())
        out["source_sha256"] = _sha256(self.path)
        return out

    def _key(self, m: dict) -> tuple:
        sid = str(m["slide_id"])
        if self.match == "index":
            return sid, int(m["index"])
        x, y = (int(v) for v in m["coords"])
        return sid, x, y, round(float(m["magnification"]), 3)

    def caption(self, patches: Sequence[np.ndarray | None], meta: Sequence[dict]) -> list[str]:
        out = []
        for m in meta:
            key = self._key(m)
            text = self.table.get(key)
            if text is None:
                self.counts["no_row"] += 1
                out.append("")
            else:
                self.counts["matched"] += 1
                self._used.add(key)
                out.append(text)
        return out

    def check_slides(self, slide_ids: Collection[str]) -> set[str]:
        """The slides among ``slide_ids`` (the dataset's) that the file has rows for.

        Raises:
            ValueError: The file names none of them (nothing would be imported; every caption would be
                empty); the message shows a few ids from each side.
        """
        known = set(slide_ids)
        hit = self._slides & known
        if not hit:
            raise ValueError(
                f"{self.path}: matches no slide of the dataset: its {len(self._slides)} slide id(s) "
                f"({_few(self._slides)}) are none of the dataset's {len(known)} ({_few(known)}); check the "
                "slide_id column (ids are file stems, e.g. 'TCGA-XX-1234' for TCGA-XX-1234.svs)"
            )
        return hit

    def has_rows(self, slide_id: str) -> bool:
        """Whether the file has any row for ``slide_id``."""
        return slide_id in self._slides

    def unmatched(self, processed: Collection[str], known: Collection[str]) -> list[str]:
        """Lines naming what in the file matched nothing: slide ids the dataset lacks, and the line numbers
        of rows that name no patch of a captioned slide."""
        processed, known = set(processed), set(known)
        out = []
        unknown = Counter(k[0] for k in self.table if k[0] not in known)
        if unknown:
            out.append(f"{sum(unknown.values())} row(s) of {self.path} name slide(s) the dataset lacks: "
                       f"{_few(unknown)}")
        lines = sorted(self._line[k] for k in self.table if k[0] in processed and k not in self._used)
        if lines:
            more = f" (+{len(lines) - 8} more)" if len(lines) > 8 else ""
            out.append(f"{len(lines)} row(s) of {self.path} match no patch of their slide ({self.match}): line(s) "
                       f"{', '.join(map(str, lines[:8]))}{more}")
        return out

    def finish(self, processed: Collection[str], known: Collection[str]) -> dict[str, int]:
        processed, known = set(processed), set(known)
        unknown_slide = sum(1 for k in self.table if k[0] not in known)
        no_patch = sum(1 for k in self.table if k[0] in processed and k not in self._used)
        return {"unmatched_rows": unknown_slide + no_patch, "rows_unknown_slide": unknown_slide,
                "rows_no_such_patch": no_patch, "rows": self.n_rows}


def _few(ids: Collection[str], k: int = 5) -> str:
    """A few ids for a message: ``a, b, c (+12 more)``."""
    ids = sorted(ids)
    more = f" (+{len(ids) - k} more)" if len(ids) > k else ""
    return ", ".join(repr(i) for i in ids[:k]) + more
