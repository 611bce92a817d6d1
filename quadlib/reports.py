"""Notebook execution (papermill) and offline HTML reports under `reports/`.

The notebooks are the recipes; this module runs them in batch with parameters and renders each
executed notebook as an HTML page whose plotly figures work offline (plotly.js embedded, because
nbconvert drops plotly's default JSON-only output).
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_cluster", "02_score", "03_bandit", "04_ablate", "05_evaluate")
REPORT_RENDERER = "plotly_mimetype+notebook"


def notebook_setup() -> None:
    """Common first step of every notebook: paths relative to the repository root, and plotly
    figures that render in JupyterLab *and* survive conversion to HTML."""
    import os

    import plotly.io as pio

    os.chdir(REPO_ROOT)  # nbval runs notebooks from notebooks/, papermill from the root
    pio.renderers.default = REPORT_RENDERER


@dataclass
class NotebookRun:
    """One executed notebook: where its output and HTML went and how long it took."""

    name: str
    output: Path
    html: Path
    seconds: float


def execute_notebook(notebook: Path, output: Path, parameters: Mapping[str, Any], *,
                     cwd: Path = REPO_ROOT, progress: bool = False) -> float:
    """Run `notebook` with papermill, injecting `parameters`; return the wall time in seconds."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    papermill.execute_notebook(str(notebook), str(output), parameters=dict(parameters),
                               kernel_name="python3", cwd=str(cwd), progress_bar=progress)
    return time.perf_counter() - start


def render_html(executed: Path, target: Path) -> Path:
    """An executed notebook as a standalone HTML page (input code folded into the page)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target


def run_notebooks(names: list[str], parameters: Mapping[str, Mapping[str, Any]], reports: Path,
                  notebooks_dir: Path = REPO_ROOT / "notebooks") -> list[NotebookRun]:
    """Execute notebooks in order with per-notebook parameters; write `.ipynb` + `.html` pages."""
    runs = []
    for name in names:
        output = reports / f"{name}.ipynb"
        seconds = execute_notebook(notebooks_dir / f"{name}.ipynb", output, parameters.get(name, {}))
        runs.append(NotebookRun(name, output, render_html(output, reports / f"{name}.html"), seconds))
        print(f"[quad] {name}: {seconds:.0f} s -> {runs[-1].html}", flush=True)
    return runs


def write_index(reports: Path, runs: list[NotebookRun], title: str = "Quad Workbench report") -> Path:
    """`reports/index.html`: links to every page with its run time."""
    rows = "\n".join(
        f'<li><a href="{html.escape(r.html.name)}">{html.escape(r.name)}</a> ({r.seconds:.0f} s)</li>' for r in runs
    )
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><ul>\n{rows}\n</ul></body></html>\n")
    path = reports / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
