"""The figure report: notebooks executed by papermill, then one page per notebook and one page for all."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from quadlib.reports import PLOTLY_BUNDLE_MARKER, REPO_ROOT, REPORT_PAGE, WIDGET_MIMETYPE, build_report, execute_notebook

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


STREAMED = [
    ("STEPS = 3", ["parameters"]),
    ("# Warm-up\nimport time\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(STEPS), desc='bar-marker'):\n"
     "    time.sleep(0.05)\nprint('stdout-marker')", []),
    ("import logging\nlogging.getLogger('IPKernelApp').error('KeyboardInterrupt caught in kernel')\n"
     "logging.getLogger('IPKernelApp').error('other-kernel-error')", []),
]


def test_a_streamed_run_prints_each_cell_and_the_kernels_output(tmp_path: Path) -> None:
    """`make demo` printed nothing until a notebook ended, its bars were widgets inside the notebook, and every
    kernel start logged ipykernel's unencrypted-TCP warning. Run in a subprocess to see the kernel's own stderr."""
    recipe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Title")] + [
        nbformat.v4.new_code_cell(src, metadata={"tags": tags}) for src, tags in STREAMED])
    recipe.cells.insert(2, nbformat.v4.new_markdown_cell("## Loop section"))
    recipe.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(recipe, tmp_path / "streamed.ipynb")
    script = ("from pathlib import Path\nfrom quadlib.reports import execute_notebook\n"
              f"execute_notebook(Path({str(tmp_path / 'streamed.ipynb')!r}), Path({str(tmp_path / 'out.ipynb')!r}), "
              "{'STEPS': 4}, progress=True)")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[quad] streamed cell")]
    assert [line.split(": ", 1)[1] for line in lines] == ["parameters", "injected parameters", "Loop section",
                                                          "import logging"]
    assert [line.split()[3] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert "stdout-marker" in done.stdout
    assert "bar-marker: 100%" in done.stderr and "4/4" in done.stderr  # the text bar, streamed to the terminal
    assert "without encryption" not in done.stderr
    assert "KeyboardInterrupt caught in kernel" not in done.stderr and "other-kernel-error" in done.stderr
    saved = next(c for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells if "bar-marker" in c.source).outputs
    bars = [o["text"] for o in saved if o.get("name") == "stderr"]
    assert len(bars) == 1 and "\r" not in bars[0] and bars[0].count("bar-marker") == 1  # the bar's last state only
    assert not any(WIDGET_MIMETYPE in o.get("data", {}) for o in saved)


def test_the_verdict_opens_the_report_after_plotly_js() -> None:
    """05's cells tagged "verdict" move to the top; plotly.js moves in front of them, since a figure
    drawn before plotly.js is loaded stays blank; every other cell keeps its order."""
    from quadlib.reports import verdict_first

    bundle = {"output_type": "display_data", "metadata": {},
              "data": {"text/html": PLOTLY_BUNDLE_MARKER + "x" * 1_000_001}}
    figure = {"output_type": "display_data", "metadata": {}, "data": {"text/html": "<div>figure</div>"}}
    cells = [nbformat.v4.new_markdown_cell("# 01_cluster"),
             nbformat.v4.new_code_cell("setup", outputs=[nbformat.from_dict(bundle)]),
             nbformat.v4.new_code_cell("plot", outputs=[nbformat.from_dict(figure)]),
             nbformat.v4.new_markdown_cell("# 05_evaluate"),
             nbformat.v4.new_code_cell("summary", metadata={"tags": ["verdict"]}, outputs=[nbformat.from_dict(figure)]),
             nbformat.v4.new_code_cell("table")]
    combined = verdict_first(nbformat.v4.new_notebook(cells=list(cells)))
    sources = [c.source for c in combined.cells]
    assert sources[0] == "" and PLOTLY_BUNDLE_MARKER in combined.cells[0].outputs[0]["data"]["text/html"]
    assert sources[1].startswith("# Verdict") and sources[2] == "summary"
    assert sources[3:] == ["# 01_cluster", "setup", "plot", "# 05_evaluate", "table"]
    assert combined.cells[4].outputs == []  # plotly.js is on the page once
    plain = [nbformat.v4.new_markdown_cell("# 01_cluster"), nbformat.v4.new_code_cell("plot")]
    assert [c.source for c in verdict_first(nbformat.v4.new_notebook(cells=plain)).cells] == ["# 01_cluster", "plot"]
