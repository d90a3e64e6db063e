"""A single self-contained HTML report: text, tables and embedded PNG figures."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["ReportFigure", "ReportSection", "write_report"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CSS = """
body { font-family: Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #2c7bb6; padding-bottom: .3em; }
h2 { margin-top: 2em; color: #2c7bb6; }
nav ol { columns: 2; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border-bottom: 1px solid #ddd; padding: .35em .7em; text-align: left;
         vertical-align: top; }
th { background: #f2f6fa; border-bottom: 2px solid #999; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
""".strip()


@dataclass(frozen=True)
class ReportFigure:
    """A PNG and its caption.

    Args:
        path: the PNG file.
        caption: text under the figure.
    """

    path: str | Path
    caption: str = ""


@dataclass(frozen=True)
class ReportSection:
    """One titled section of the report; every part is optional.

    Args:
        title: section heading.
        text: paragraphs, separated by blank lines.
        table: a DataFrame, or a mapping shown as a two-column table (e.g. versions).
        figures: PNG paths or :class:`ReportFigure` (path with a caption).
    """

    title: str
    text: str | None = None
    table: pd.DataFrame | Mapping[str, object] | None = None
    figures: Sequence[str | Path | ReportFigure] = ()


def _cell(value: object) -> str:
    """Numbers to 3 significant digits, missing as empty; everything escaped by the caller."""
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.3g}"
    if value is None or value is pd.NA:
        return ""
    return str(value)


def _table_html(table: pd.DataFrame | Mapping[str, object]) -> str:
    if isinstance(table, Mapping):
        table = pd.DataFrame({"Item": list(table), "Value": [str(v) for v in table.values()]})
    show_index = not isinstance(table.index, pd.RangeIndex)
    frame = table.reset_index() if show_index else table
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False, name=None)
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _figure_html(figure: str | Path | ReportFigure) -> str:
    item = figure if isinstance(figure, ReportFigure) else ReportFigure(figure)
    path = Path(item.path)
    data = path.read_bytes()
    if not data.startswith(_PNG_MAGIC):
        msg = f"report figure {path} is not a PNG file"
        raise ValueError(msg)
    caption = html.escape(item.caption or path.stem)
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _section_html(number: int, section: ReportSection) -> str:
    parts = [f'<section id="s{number}"><h2>{html.escape(section.title)}</h2>']
    if section.text:
        parts += [f"<p>{html.escape(p.strip())}</p>" for p in section.text.split("\n\n")
                  if p.strip()]
    if section.table is not None:
        parts.append(_table_html(section.table))
    parts += [_figure_html(f) for f in section.figures]
    parts.append("</section>")
    return "\n".join(parts)


def write_report(path: str | Path, *, title: str, sections: Sequence[ReportSection]) -> Path:
    """Write one HTML file with no external resource: inline CSS, base64 PNGs, no script.

    All text (titles, paragraphs, table cells, captions) is HTML-escaped.

    Args:
        path: the HTML file to write (parent folders are created).
        title: document title and top heading.
        sections: the sections, in order; a table of contents links to them.
    """
    contents = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>'
                       for i, s in enumerate(sections, start=1))
    body = "\n".join(_section_html(i, s) for i, s in enumerate(sections, start=1))
    document = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<nav><ol>{contents}</ol></nav>\n{body}\n"
        "</body>\n</html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
