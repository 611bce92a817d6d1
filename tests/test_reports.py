"""The figure report: notebooks executed by papermill, then one page per notebook and one page for all."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from quadlib.reports import PLOTLY_BUNDLE_MARKER, REPORT_PAGE, build_report, execute_notebook

# A miniature recipe: parameters cell, the notebooks' common setup, a plotly figure, a print, a warning.
CELLS = [
    ("TITLE = 'default'", ["parameters"]),
    ("from quadlib.reports import notebook_setup\nnotebook_setup()", []),
    ("import plotly.graph_objects as go\ngo.Figure(go.Bar(x=['a', 'b'], y=[1, 2]), layout_title_text=TITLE).show()", []),
    ("print('table of', TITLE)", []),
    ("import ipywidgets\nipywidgets.IntSlider(description='slider-marker')", []),
    ("import sys  # code-marker\nprint('noisy' + ' progress', file=sys.stderr)", []),
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nb")
    recipe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src, metadata={"tags": tags})
                                             for src, tags in CELLS])
    recipe.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = folder / "recipe.ipynb"
    nbformat.write(recipe, source)
    out = folder / "reports"
    for name, title in (("01_cluster", "first figure"), ("03_bandit", "second figure")):
        execute_notebook(source, out / f"{name}.ipynb", {"TITLE": title})
    return out


def test_report_page_holds_every_notebook_with_plotly_embedded_once(reports: Path) -> None:
    report = build_report(reports)
    assert report == reports / REPORT_PAGE
    page = report.read_text(encoding="utf-8")
    assert page.count(PLOTLY_BUNDLE_MARKER) == 1  # one copy of plotly.js serves every figure
    assert '<script src="https://cdn.plot.ly' not in page  # offline: plotly.js is inline, not fetched
    for title in ("first figure", "second figure"):
        assert f"table of {title}" in page  # printed output kept
        assert re.search(rf'"text":\s*"{title}"', page), f"figure titled {title!r} missing"
    assert "01_cluster" in page and "03_bandit" in page and "TITLE=" in page  # headings with parameters
    assert "noisy progress" not in page  # stderr dropped from the report
    assert "slider-marker" not in page  # widgets need a live kernel: dropped from the static page
    assert "code-marker" not in page  # code folded out of the one-page report


def test_per_notebook_pages_and_index(reports: Path) -> None:
    build_report(reports)
    for name in ("01_cluster", "03_bandit"):
        page = (reports / f"{name}.html").read_text(encoding="utf-8")
        assert page.count(PLOTLY_BUNDLE_MARKER) == 1 and "code-marker" in page  # code kept on its own page
    index = (reports / "index.html").read_text(encoding="utf-8")
    assert f'href="{REPORT_PAGE}"' in index and 'href="01_cluster.html"' in index and 'href="03_bandit.html"' in index
    assert "02_score" not in index  # only notebooks that ran


def test_report_without_executed_notebooks_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make demo"):
        build_report(tmp_path)
