"""Markdown reports as HTML pages."""

from __future__ import annotations

from pathvl.eval.html import markdown_to_html, write_html


def test_tables_images_links_and_code():
    md = ("# Title\n\nSome **bold** text with `code`.\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\n"
          "![loss](loss.png)\n\nSee [details](zeroshot.md).\n\n```\nx < y\n```\n")
    page = markdown_to_html(md, "T")
    assert "<h1>Title</h1>" in page and "<strong>bold</strong>" in page and "<code>code</code>" in page
    assert "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>&lt;2&gt;</td></tr>" in page
    assert '<img alt="loss" src="loss.png">' in page and '<a href="zeroshot.html">details</a>' in page
    assert "<pre>x &lt; y</pre>" in page and "<title>T</title>" in page


def test_write_html_beside_the_markdown(tmp_path):
    md = tmp_path / "r.md"
    md.write_text("# Report\n\nok\n", encoding="utf-8")
    out = write_html(md)
    assert out == tmp_path / "r.html" and "<title>Report</title>" in out.read_text()
    assert not list(tmp_path.glob("*.tmp"))
