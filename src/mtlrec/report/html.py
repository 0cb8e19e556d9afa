"""A self-contained HTML page: inline CSS, images as base64 data URIs, no script, nothing fetched."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

CSS = """
:root { --fg: #1d2430; --muted: #5b6573; --line: #d9dee5; --bad: #fde2e1; --bad-fg: #a11b16;
        --good: #e3f4e4; --good-fg: #1e6b25; --accent: #1f77b4; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg);
       margin: 0; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 6px; padding-top: 8px; border-top: 1px solid var(--line); }
p.sub, p.how, p.note { color: var(--muted); margin: 4px 0 10px; }
p.how { max-width: 900px; }
nav { margin: 12px 0 0; font-size: 13px; display: flex; flex-wrap: wrap; gap: 2px 16px; }
nav a { color: var(--accent); text-decoration: none; white-space: nowrap; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: #f0f2f5; font-weight: 600; }
td.text, th.text { text-align: left; }
td.bad { background: var(--bad); color: var(--bad-fg); font-weight: 600; }
td.good { background: var(--good); color: var(--good-fg); }
span.badge { display: inline-block; font-size: 10px; font-weight: 700; padding: 0 4px; margin-left: 4px;
             border-radius: 3px; background: var(--bad-fg); color: #fff; }
ul.findings li { margin: 3px 0; }
figure { margin: 8px 0 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--accent); }
.scroll { overflow-x: auto; }
"""


@dataclass(frozen=True)
class Cell:
    """A table cell: text and an optional CSS class (`text`, `good`, `bad`) and badge."""

    text: str
    cls: str = ""
    badge: str = ""

    def render(self, tag: str = "td") -> str:
        cls = f' class="{self.cls}"' if self.cls else ""
        badge = f'<span class="badge">{escape(self.badge)}</span>' if self.badge else ""
        return f"<{tag}{cls}>{escape(self.text)}{badge}</{tag}>"


def table(headers: Sequence[str | Cell], rows: Sequence[Sequence[str | Cell]]) -> str:
    """An HTML table; plain strings in the first column are left-aligned, others right-aligned."""
    def cell(value: str | Cell, first: bool) -> Cell:
        return value if isinstance(value, Cell) else Cell(value, "text" if first else "")

    head = "".join(cell(h, i == 0).render("th") for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell(v, i == 0).render() for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{escape(alt)}"></figure>'


@dataclass(frozen=True)
class Section:
    """One part of the page: an anchor id, a heading, an explanation and HTML content."""

    anchor: str
    title: str
    how: str
    content: str


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    nav = "".join(f'<a href="#{escape(s.anchor)}">{escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{escape(s.anchor)}"><h2>{escape(s.title)}</h2>'
        + (f'<p class="how">{escape(s.how)}</p>' if s.how else "") + s.content + "</section>"
        for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main><h1>{escape(title)}</h1><p class=\"sub\">{escape(subtitle)}</p>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")
