"""Markdown reports as self-contained HTML pages (the subset pathvl's reports use, no dependency).

Handles headings, paragraphs, pipe tables, images, links, inline code, bold and fenced code blocks; the
images stay files beside the page (relative links), so the folder opens in any browser.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

__all__ = ["markdown_to_html", "write_html"]

_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}
th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}pre{background:#f6f6f6;
padding:.6rem;overflow:auto}"""


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", lambda m: f'<img alt="{m[1]}" src="{m[2]}">', t)
    t = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", lambda m: f'<a href="{re.sub(r"[.]md$", ".html", m[2])}">{m[1]}</a>', t)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


def markdown_to_html(md: str, title: str = "pathvl report") -> str:
    """An HTML page for Markdown text (links to ``*.md`` pages point to their ``*.html`` twins)."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>")
            i = j + 1
            continue
        m = re.match(r"(#{1,6}) (.*)", line)
        if m:
            flush()
            n = len(m[1])
            out.append(f"<h{n}>{_inline(m[2])}</h{n}>")
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1].strip()):
            flush()
            rows = [line]
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(lines[j])
                j += 1
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            i = j
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_html(md_path: str | Path) -> Path:
    """Writes ``<name>.html`` beside a Markdown report (temporary name, then rename); returns its path."""
    md_path = Path(md_path)
    text = md_path.read_text(encoding="utf-8")
    first = next((ln[2:] for ln in text.splitlines() if ln.startswith("# ")), md_path.stem)
    out = md_path.with_suffix(".html")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(markdown_to_html(text, first), encoding="utf-8")
    tmp.replace(out)
    return out
