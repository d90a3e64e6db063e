"""Tests of pdl1exp.evaluation.report: one self-contained, escaped HTML file."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from pdl1exp.evaluation.report import ReportFigure, ReportSection, write_report

EVIL = "<script>alert('x')</script>"


@pytest.fixture
def png(tmp_path: Path) -> Path:
    fig = Figure(figsize=(2, 2), dpi=40)
    fig.subplots().plot([0, 1], [0, 1])
    path = tmp_path / "roc_test.png"
    fig.savefig(path)
    return path


def test_report_embeds_tables_and_figures(png: Path, tmp_path: Path) -> None:
    metrics = pd.DataFrame({"Model": ["dlr/svm", "clinical/lr"],
                            "AUC (95% CI)": ["0.85 (0.82–0.88)", "0.71 (0.64–0.78)"],
                            "p": [0.000123, np.nan]})
    sections = [
        ReportSection("Cohort", text="120 patients.\n\n40 in the test split."),
        ReportSection("Performance", table=metrics,
                      figures=[ReportFigure(png, caption="ROC, test split")]),
        ReportSection("Versions", table={"git_commit": "abc123", "data_hash": "9f8e"},
                      figures=[png]),
    ]
    path = write_report(tmp_path / "out" / "report.html", title="PD-L1 model", sections=sections)
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "<p>120 patients.</p>" in html
    assert "<p>40 in the test split.</p>" in html
    assert "<td>0.85 (0.82–0.88)</td>" in html
    assert "<td>0.000123</td>" in html
    assert "<td>git_commit</td><td>abc123</td>" in html
    assert "<figcaption>ROC, test split</figcaption>" in html
    assert "<figcaption>roc_test</figcaption>" in html  # default caption: the file name
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2
    assert base64.b64decode(images[0]) == png.read_bytes()
    # Self-contained: nothing fetched, nothing run.
    assert not re.search(r'(src|href)="(https?:|//|file:)', html)
    assert "<script" not in html
    assert html.count("<section") == 3
    assert '<a href="#s2">Performance</a>' in html


def test_report_escapes_all_text(png: Path, tmp_path: Path) -> None:
    table = pd.DataFrame({EVIL: [EVIL]}, index=pd.Index([EVIL], name="id"))
    section = ReportSection(EVIL, text=EVIL, table=table,
                            figures=[ReportFigure(png, caption=EVIL)])
    html = write_report(tmp_path / "r.html", title=EVIL, sections=[section]).read_text()
    assert "<script" not in html
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    # title, h1, contents, h2, paragraph, index cell, column header, cell, alt, caption
    assert html.count(escaped) == 10
    assert "<th>id</th>" in html  # a named index is shown as a column


def test_report_rejects_a_non_png_figure(tmp_path: Path) -> None:
    fake = tmp_path / "plot.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="not a PNG"):
        write_report(tmp_path / "r.html", title="t", sections=[ReportSection("s", figures=[fake])])
