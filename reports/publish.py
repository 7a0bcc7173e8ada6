"""Third stage of a report: the files. ``publish(doc, out_dir, csvs=...)`` renders each figure once and writes
report.html (self-contained), report.md with its PNGs, figures.json, and the CSVs of the numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import pandas as pd

from ._io import atomic_write_bytes, atomic_write_text
from .plots import render
from .render import Document, figures_of, to_html, to_markdown


def png_name(slug: str) -> str:
    """The PNG file of a figure: its slug, with anything outside [A-Za-z0-9_.-] replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", slug) + ".png"


def publish(doc: Document, out_dir: str | Path, *, csvs: Mapping[str, tuple[pd.DataFrame, bool]]) -> Path:
    """Write ``doc`` and the tables of ``csvs`` (file name -> (table, whether its index is written)) into
    ``out_dir``; returns the path of report.html. Every file is written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = figures_of(doc)
    slugs = [f.slug for f in figures]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"two figures share a slug: {sorted({s for s in slugs if slugs.count(s) > 1})}")
    pngs, names = {}, {}
    for f in figures:
        pngs[f.slug] = render(f.figure, dpi=f.dpi)
        names[f.slug] = png_name(f.slug)
        atomic_write_bytes(out_dir / names[f.slug], pngs[f.slug])
    atomic_write_text(out_dir / "report.md", to_markdown(doc, image_names=names))
    for name, (table, index) in csvs.items():
        atomic_write_text(out_dir / name, table.to_csv(index=index))
    manifest = [{"slug": f.slug, "file": names[f.slug], "title": f.title, "caption": f.caption, "meta": f.meta}
                for f in figures]
    atomic_write_text(out_dir / "figures.json", json.dumps(manifest, indent=1, default=str) + "\n")
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, to_html(doc, pngs=pngs))
    return html_path
