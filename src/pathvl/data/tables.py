"""One reader for every table a user hands pathvl: slide texts, reports, labels, captions, tile lists.

CSV (``.csv``, ``.txt``), TSV (``.tsv``), JSON Lines (``.jsonl``, ``.ndjson``, or ``.json`` holding one object
per line or one list of objects) and XLSX (first worksheet, cell values) all come back as a :class:`Table`:
the column names, one dict per row and the source line of each row, so that every error can name the
file and the line. Columns are found with :meth:`Table.column`: an exact name, else the same name in any
case, else the first of a list of usual names.
"""

from __future__ import annotations

import csv
import json
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from pathvl.errors import UserError

__all__ = ["TABLE_SUFFIXES", "Table", "TableError", "read_labels", "read_table"]

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".ndjson", ".json", ".xlsx")


class TableError(UserError, ValueError):
    """A table that cannot be read or lacks a needed column (the message names the file)."""


@dataclass
class Table:
    """The rows of a table file.

    Attributes:
        path: The file.
        columns: Column names in file order (JSON: in order of first appearance).
        rows: One ``{column: value}`` per data row; values are strings for CSV/TSV/XLSX and JSON values
            for JSON Lines. Rows that are entirely empty are dropped.
        lines: The 1-based line (CSV/JSONL) or worksheet row (XLSX) of each row.
    """

    path: Path
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, wanted: str | None, candidates: Sequence[str] = (), what: str = "value",
               required: bool = True) -> str | None:
        """The column to read ``what`` from.

        Args:
            wanted: A name the user gave (exact, else case-insensitive); an error when absent.
            candidates: Usual names, tried in order (case-insensitive) when ``wanted`` is None.
            what: What the column holds, for the message (``slide id``, ``label``...).
            required: Raise when nothing fits (else return None).

        Raises:
            TableError: Naming the file, the column looked for and the columns present.
        """
        lower = {c.lower().strip(): c for c in self.columns}
        if wanted is not None:
            if wanted in self.columns:
                return wanted
            if wanted.lower().strip() in lower:
                return lower[wanted.lower().strip()]
            raise TableError(f"{self.path}: no {what} column {wanted!r}; columns are {self.columns}")
        for c in candidates:
            if c.lower() in lower:
                return lower[c.lower()]
        if required:
            raise TableError(f"{self.path}: cannot find the {what} column (tried {list(candidates)}); "
                             f"columns are {self.columns}")
        return None

    def values(self, column: str) -> list[Any]:
        """The column's value in every row (None where a JSON row lacks it)."""
        return [r.get(column) for r in self.rows]


def read_table(path: str | os.PathLike[str], what: str = "table") -> Table:
    """Reads a CSV, TSV, JSON Lines or XLSX file.

    Args:
        path: The file.
        what: What the file is, for messages (``slide texts``, ``labels``...).

    Raises:
        FileNotFoundError: No such file (the message names it and ``what``).
        TableError: Unknown suffix, no header, malformed JSON line, or not UTF-8.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            return _read_json(path)
        if suffix == ".xlsx":
            return _from_grid(path, _read_xlsx(path))
        if suffix in (".csv", ".tsv", ".txt"):
            with open(path, newline="", encoding="utf-8-sig") as fh:
                grid = list(csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ","))
            return _from_grid(path, grid)
    except UnicodeDecodeError as e:
        raise TableError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise TableError(f"{path}: not a readable CSV ({e})") from None
    except (zipfile.BadZipFile, ElementTree.ParseError, KeyError) as e:
        raise TableError(f"{path}: not a readable XLSX workbook ({e})") from None
    raise TableError(f"{path}: unknown table format {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")


def read_labels(path: str | os.PathLike[str], what: str = "slide labels") -> dict[str, str]:
    """``{slide_id: label}`` from a table with a slide id column (``slide_id``/``slide``) and ``label``.

    Raises:
        TableError: Columns missing (the message says ``expected columns slide_id,label``) or a slide
            listed twice with different labels.
    """
    table = read_table(path, what)
    sid = table.column(None, ("slide_id", "slide"), "slide id", required=False)
    lab = table.column(None, ("label",), "label", required=False)
    if sid is None or lab is None:
        raise TableError(f"{table.path}: columns {table.columns}; expected columns slide_id,label (one row per slide)")
    out: dict[str, str] = {}
    for r, line in zip(table.rows, table.lines):
        key, value = str(r[sid] or "").strip(), str(r[lab] or "").strip()
        if not key:
            continue
        if key in out and out[key] != value:
            raise TableError(f"{table.path}:{line}: slide {key!r} is labelled both {out[key]!r} and {value!r}")
        out[key] = value
    return out


def _from_grid(path: Path, grid: list[list[str]]) -> Table:
    numbered = [(i + 1, r) for i, r in enumerate(grid) if any(str(c).strip() for c in r)]
    if not numbered:
        raise TableError(f"{path}: the table is empty (no header row)")
    header = [str(h).strip() for h in numbered[0][1]]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise TableError(f"{path}: the header repeats the column(s) {dup}")
    rows, lines = [], []
    for line, r in numbered[1:]:
        rows.append({h: (r[i] if i < len(r) else "") for i, h in enumerate(header)})
        lines.append(line)
    return Table(path, header, rows, lines)


def _read_json(path: Path) -> Table:
    text = path.read_text(encoding="utf-8-sig")
    objs: list[tuple[int, Any]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON list of objects
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TableError(f"{path}: not valid JSON ({e})") from None
        objs = [(i + 1, o) for i, o in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                objs.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TableError(f"{path}:{n}: not a JSON object ({e}); JSON Lines holds one object per line") from None
    rows, lines = [], []
    for n, o in objs:
        if not isinstance(o, dict):
            raise TableError(f"{path}:{n}: expected a JSON object, got {type(o).__name__}")
        rows.append({str(k).strip(): v for k, v in o.items()})
        lines.append(n)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return Table(path, columns, rows, lines)


_NS = {
    "m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main",
    "r": "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
    "p": "http://schemas.openxmlformats.org/package/2006/relationships",
}


def _column_index(ref: str) -> int:
    letters = re.match(r"[A-Z]+", ref)
    if letters is None:
        raise KeyError(f"bad cell reference {ref!r}")
    n = 0
    for ch in letters.group(0):
        n = n * 26 + ord(ch) - ord("A") + 1
    return n - 1


def _read_xlsx(path: Path) -> list[list[str]]:
    """Cell text of the first worksheet of an .xlsx file (values, not formulas)."""
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        shared: list[str] = []
        if "xl/sharedStrings.xml" in names:
            root = ElementTree.fromstring(z.read("xl/sharedStrings.xml"))
            shared = ["".join(t.text or "" for t in si.iter(f"{{{_NS['m']}}}t")) for si in root.findall("m:si", _NS)]
        sheet = "xl/worksheets/sheet1.xml"
        if "xl/workbook.xml" in names and "xl/_rels/workbook.xml.rels" in names:
            wb = ElementTree.fromstring(z.read("xl/workbook.xml"))
            first = wb.find("m:sheets/m:sheet", _NS)
            rels = ElementTree.fromstring(z.read("xl/_rels/workbook.xml.rels"))
            if first is not None:
                rid = first.get(f"{{{_NS['r']}}}id")
                for rel in rels.findall("p:Relationship", _NS):
                    if rel.get("Id") == rid:
                        target = rel.get("Target", "")
                        sheet = target.lstrip("/") if target.startswith("/") else f"xl/{target}"
        root = ElementTree.fromstring(z.read(sheet))
    rows: list[list[str]] = []
    for row in root.iter(f"{{{_NS['m']}}}row"):
        cells: dict[int, str] = {}
        for pos, c in enumerate(row.findall("m:c", _NS)):
            col = _column_index(c.get("r", "")) if c.get("r") else pos
            kind = c.get("t", "n")
            if kind == "inlineStr":
                text = "".join(t.text or "" for t in c.iter(f"{{{_NS['m']}}}t"))
            else:
                v = c.find("m:v", _NS)
                text = "" if v is None or v.text is None else v.text
                if kind == "s" and text:
                    text = shared[int(text)]
            cells[col] = text
        if cells:
            rows.append([cells.get(i, "") for i in range(max(cells) + 1)])
    return rows
