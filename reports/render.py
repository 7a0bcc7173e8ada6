"""Report documents: one self-contained HTML file (images inlined as base64) and a
Markdown file that links PNGs written beside it. Both come from the same content."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pandas as pd

from .plots import FigureOut


@dataclass(slots=True)
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    """(caption, table of display strings)."""
    figures: list[FigureOut] = field(default_factory=list)
    anchor: str = ""
    lead: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    """Tables shown first, right under the title (the verdict table: the report's first screen)."""
    lead_figures: list[FigureOut] = field(default_factory=list)
    """Figures shown right after the lead tables (the verdicts' forest plot), before the section's text."""


@dataclass(slots=True)
class Document:
    title: str
    intro: list[str]
    sections: list[Section]


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:12px auto;max-width:1400px;color:#222;
line-height:1.4;padding:0 16px}
h1{font-size:1.5em;margin:.3em 0 .2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.2em}
table{border-collapse:collapse;font-size:13px;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right;white-space:nowrap}th{background:#f0f0f0;white-space:normal;vertical-align:bottom}
td:first-child,th:first-child{text-align:left}td.text{white-space:normal;text-align:left;min-width:14em}
td,th{line-height:1.25}
.caption{font-size:13px;color:#555;margin:.2em 0 .4em}figure{margin:0 0 1.6em}figure img{max-width:100%;
border:1px solid #eee}figcaption{font-size:13px;color:#555}.scroll{overflow-x:auto}nav a{margin-right:1em}
li{margin:.25em 0}.intro{color:#444}
"""


WRAP_AT = 40
"""A column with a cell longer than this many characters is prose (a claim, a reason): its cells wrap, so that a
table fits the page; shorter cells (numbers, intervals) stay on one line."""


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    wraps = [len(df) > 0 and int(df.iloc[:, i].astype(str).str.len().max()) > WRAP_AT for i in range(df.shape[1])]
    body = "".join("<tr>" + "".join(f'<td class="text">{html.escape(str(v))}</td>' if w
                                    else f"<td>{html.escape(str(v))}</td>" for v, w in zip(row, wraps)) + "</tr>"
                   for row in df.itertuples(index=False))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_figure(f: FigureOut, png: bytes) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{html.escape(f.slug)}"><img alt="{html.escape(f.title)}" '
            f'src="data:image/png;base64,{b64}"><figcaption><b>{html.escape(f.title)}.</b> '
            f"{html.escape(f.caption)}</figcaption></figure>")


def to_html(doc: Document, *, pngs: Mapping[str, bytes]) -> str:
    """``pngs``: figure slug -> its rendered PNG (inlined as base64)."""
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in doc.sections if s.anchor)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(doc.title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(doc.title)}</h1>"]
    parts += [f'<p class="intro">{html.escape(p)}</p>' for p in doc.intro]
    parts.append(f"<nav>{nav}</nav>")
    for s in doc.sections:
        parts.append(f'<h2 id="{html.escape(s.anchor)}">{html.escape(s.title)}</h2>')
        for caption, table in s.lead:
            if caption:
                parts.append(f'<p class="caption">{html.escape(caption)}</p>')
            parts.append(_html_table(table))
        parts += [_html_figure(f, pngs[f.slug]) for f in s.lead_figures]
        parts += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        if s.bullets:
            parts.append("<ul>" + "".join(f"<li>{html.escape(b)}</li>" for b in s.bullets) + "</ul>")
        for caption, table in s.tables:
            if caption:
                parts.append(f'<p class="caption">{html.escape(caption)}</p>')
            parts.append(_html_table(table))
        parts += [_html_figure(f, pngs[f.slug]) for f in s.figures]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame) -> str:
    cols = [_md_cell(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(doc: Document, *, image_names: Mapping[str, str]) -> str:
    """``image_names``: figure slug -> PNG file name beside the Markdown file."""
    out = [f"# {doc.title}", ""]
    out += [p + "\n" for p in doc.intro]
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for caption, table in s.lead:
            if caption:
                out += [f"*{caption}*", ""]
            out += [_md_table(table), ""]
        for f in s.lead_figures:
            out += _md_figure(f, image_names)
        out += [p + "\n" for p in s.paragraphs]
        if s.bullets:
            out += [f"- {b}" for b in s.bullets] + [""]
        for caption, table in s.tables:
            if caption:
                out += [f"*{caption}*", ""]
            out += [_md_table(table), ""]
        for f in s.figures:
            out += _md_figure(f, image_names)
    return "\n".join(out).rstrip() + "\n"


def _md_figure(f: FigureOut, image_names: Mapping[str, str]) -> list[str]:
    return [f"![{f.title}]({image_names[f.slug]})", "", f"**{f.title}.** {f.caption}", ""]


def figures_of(doc: Document) -> Sequence[FigureOut]:
    """Every figure of the document, in reading order."""
    return [f for s in doc.sections for f in (*s.lead_figures, *s.figures)]
