"""Notebook execution (papermill) and offline HTML reports under `reports/`.

The notebooks are the recipes; this module runs them in batch with parameters and renders the
executed notebooks as HTML whose plotly figures work offline (plotly.js embedded, because nbconvert
drops plotly's default JSON-only output): one page per notebook, and `report.html` with every
notebook's figures and tables on one page.
"""

from __future__ import annotations

import copy
import html
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_cluster", "02_score", "03_bandit", "04_ablate", "05_evaluate")
REPORT_RENDERER = "plotly_mimetype+notebook"
PLOTLY_BUNDLE_MARKER = "window.PlotlyConfig"
REPORT_PAGE = "report.html"
WIDGET_MIMETYPE = "application/vnd.jupyter.widget-view+json"
STREAMING_ENGINE = "quad-streaming"
NOTEBOOK_PROFILE_VARIABLE = "QUAD_NOTEBOOK_PROFILE"
NOTEBOOK_PROFILES = ("demo", "test")


def notebook_parameters(name: str) -> list[str]:
    """The names assigned at the top level of notebook `name`'s parameters cell (what papermill may set)."""
    notebook = json.loads((REPO_ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            return list(dict.fromkeys(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\s*,\s*[A-Za-z_][A-Za-z0-9_]*)*\s*=",
                                                 source, flags=re.MULTILINE)))
    return []


def parse_overrides(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`[NOTEBOOK:]NAME=VALUE` overrides (VALUE read as JSON, else as a string) for every notebook of
    `names` (or only NOTEBOOK) whose parameters cell sets NAME: {notebook: {NAME: value}}. A NAME no
    notebook has is an error (a typo never runs silently with the default)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    declared = {name: notebook_parameters(name) for name in names}
    for item in items:
        key, sep, raw = item.partition("=")
        notebook, _, key = key.strip().rpartition(":")
        if not sep or not key.isidentifier() or (notebook and notebook not in names):
            raise ValueError(f"--set {item!r}: write [NOTEBOOK:]NAME=VALUE, e.g. --set PROXY_MODEL=smollm2-135m, "
                             f"--set SEEDS=[0,1] or --set 01_cluster:K=16 (notebooks: {', '.join(names)})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        targets = [name for name in ([notebook] if notebook else names) if key in declared[name]]
        if not targets:
            raise ValueError(f"--set {item.partition('=')[0]}: no notebook of {notebook or ', '.join(names)} has the "
                             f"parameter {key!r}; the parameters are the names in each notebook's first code cell")
        for name in targets:
            out[name][key] = value
    return out


def notebook_profile() -> str:
    """The size the notebooks' parameters cells take: "demo" (their defaults: the demo's settings and
    run folder runs/demo, so a notebook opened after `make demo` reruns on its results), or "test" when
    QUAD_NOTEBOOK_PROFILE=test (`make test` runs them under nbval at test size in runs/nbval)."""
    import os

    profile = os.environ.get(NOTEBOOK_PROFILE_VARIABLE) or "demo"
    if profile not in NOTEBOOK_PROFILES:
        raise ValueError(f"{NOTEBOOK_PROFILE_VARIABLE}={profile!r}: use one of {', '.join(NOTEBOOK_PROFILES)}")
    return profile


def is_test_profile() -> bool:
    """The notebooks' parameters cells ask this (a comparison there would trip papermill's parameter parser)."""
    return notebook_profile() == "test"


def notebook_setup() -> None:
    """Common first step of every notebook: paths relative to the repository root, plotly figures
    that render in JupyterLab *and* survive conversion to HTML, and thread pools no larger than the
    cores the kernel is given (quadlib.device.cap_threads)."""
    import os

    import plotly.io as pio

    from quadlib.device import cap_threads

    os.chdir(REPO_ROOT)  # nbval runs notebooks from notebooks/, papermill from the root
    pio.renderers.default = REPORT_RENDERER
    cap_threads()


# Kernels of batch runs (the demo, the ablation workers, the tests): IPC transport (over TCP, ipykernel
# warns on every start that its traffic is unencrypted), then `batch_kernel_setup`, and each cell's
# stream outputs merged with "\r" applied (a tqdm bar is saved as its last state). A cell's last outputs
# may reach the client seconds after its reply on a loaded machine: nbclient's 4 s wait for them failed
# 01_cluster beside 10 other busy processes ("Timeout waiting for IOPub output"), so wait longer.
BATCH_KERNEL = {"config": {"KernelManager": {"transport": "ipc"}},
                "extra_arguments": ["--IPKernelApp.exec_lines=from quadlib.reports import batch_kernel_setup; "
                                    "batch_kernel_setup()"],
                "coalesce_streams": True, "iopub_timeout": 300}
SHUTDOWN_INTERRUPT_LOG = "KeyboardInterrupt caught in kernel"


def batch_kernel_setup() -> None:
    """Start of a batch kernel: `tqdm.auto` becomes the text tqdm before any module binds it (widgets
    can be neither shown nor saved by a batch run; text bars reach the terminal), and the kernel no
    longer logs the SIGINT that jupyter_client sends before every shutdown request as an error."""
    import logging

    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    for module in (tqdm.auto, tqdm.autonotebook):
        module.tqdm, module.trange = tqdm.std.tqdm, tqdm.std.trange
    logging.getLogger("IPKernelApp").addFilter(lambda record: SHUTDOWN_INTERRUPT_LOG not in record.getMessage())


def cell_title(cells: Sequence[Any], index: int) -> str:
    """What a code cell does, for its progress line: its tag for a parameters cell, else the heading of
    the markdown cell above it, else its first line of code."""
    tags = set(cells[index].metadata.get("tags", []))
    for tag in ("injected-parameters", "parameters"):
        if tag in tags:
            return tag.replace("-", " ")
    for above in reversed(cells[:index]):
        if above.cell_type == "markdown":
            heading = next((line.strip("# ").strip() for line in above.source.splitlines() if line.strip()), "")
            if heading:
                return heading[:70]
        elif above.cell_type == "code":
            break
    lines = [line for line in cells[index].source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return (lines[0].strip()[:70] if lines else "")


def _streaming_engine() -> type:
    """A papermill engine that prints one line as each code cell starts: `[quad] <label> cell 3/9 +12 s: title`."""
    from papermill.engines import NBClientEngine

    class StreamingEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, label: str = "", **kwargs: Any) -> Any:
            cells = nb_man.nb.cells
            code = [i for i, cell in enumerate(cells) if cell.cell_type == "code"]
            start, began = nb_man.cell_start, time.perf_counter()

            def announce(cell: Any, cell_index: int | None = None, **kw: Any) -> Any:
                if cell_index in code:
                    print(f"[quad] {label} cell {code.index(cell_index) + 1}/{len(code)} "
                          f"+{time.perf_counter() - began:.0f} s: {cell_title(cells, cell_index)}", flush=True)
                return start(cell, cell_index, **kw)

            nb_man.cell_start = announce
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    return StreamingEngine


def execute_notebook(notebook: Path, output: Path, parameters: Mapping[str, Any], *,
                     cwd: Path = REPO_ROOT, progress: bool = False) -> float:
    """Run `notebook` with papermill, injecting `parameters`; return the wall time in seconds.

    `progress`: stream to this process's terminal one line per code cell and everything the kernel
    prints (its tqdm bars included) as it runs."""
    import sys
    import tempfile

    import papermill
    from papermill.engines import papermill_engines
    from traitlets.config import Config

    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # the IPC sockets' own folder: kernels started at once (ablation workers) must not share socket names
    with tempfile.TemporaryDirectory(prefix="quad-kernel-") as sockets:
        config = Config(BATCH_KERNEL["config"])
        config.KernelManager.ip = str(Path(sockets) / "kernel")
        kernel = {**BATCH_KERNEL, "config": config}
        if progress:
            papermill_engines.register(STREAMING_ENGINE, _streaming_engine())
            kernel |= {"engine_name": STREAMING_ENGINE, "label": Path(notebook).stem,
                       "stdout_file": sys.stdout, "stderr_file": sys.stderr}
        papermill.execute_notebook(str(notebook), str(output), parameters=dict(parameters),
                                   kernel_name="python3", cwd=str(cwd), progress_bar=False, **kernel)
    return time.perf_counter() - start


def render_html(notebook: Any, target: Path, *, code: bool = True) -> Path:
    """A notebook node as a standalone HTML page (`code=False`: outputs and markdown only)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", exclude_input=not code, exclude_input_prompt=not code,
                            exclude_output_prompt=not code)
    body, _ = exporter.from_notebook_node(notebook)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target


def run_notebooks(names: Sequence[str], parameters: Mapping[str, Mapping[str, Any]], reports: Path,
                  notebooks_dir: Path = REPO_ROOT / "notebooks") -> None:
    """Execute notebooks in order with per-notebook parameters into `reports/<name>.ipynb`."""
    for name in names:
        output = reports / f"{name}.ipynb"
        print(f"[quad] {name}: running", flush=True)
        seconds = execute_notebook(notebooks_dir / f"{name}.ipynb", output, parameters.get(name, {}), progress=True)
        print(f"[quad] {name}: {seconds:.0f} s -> {output}", flush=True)


def _is_plotly_bundle(output: Mapping[str, Any]) -> bool:
    """The output cell through which plotly's notebook renderer embeds plotly.js (about 4.8 MB)."""
    page = output.get("data", {}).get("text/html", "")
    page = "".join(page) if isinstance(page, list) else page
    return PLOTLY_BUNDLE_MARKER in page and len(page) > 1_000_000


def _report_outputs(outputs: list[Any], bundle_seen: bool) -> tuple[list[Any], bool]:
    """Outputs worth a reader's eye: no stderr (warnings), no widgets (progress bars and sliders
    need a live kernel; a static page would show their text stand-ins), plotly.js only once."""
    kept = []
    for output in outputs:
        if output.get("output_type") == "stream" and output.get("name") == "stderr":
            continue
        if WIDGET_MIMETYPE in output.get("data", {}):
            continue
        if _is_plotly_bundle(output):
            if bundle_seen:
                continue
            bundle_seen = True
        kept.append(output)
    return kept, bundle_seen


def _timing(notebook: Any) -> str:
    """" (123 s)" from papermill's metadata, or "" for a notebook it did not time."""
    duration = notebook.metadata.get("papermill", {}).get("duration")
    return f" ({duration:.0f} s)" if isinstance(duration, (int, float)) else ""


def combine_notebooks(executed: Sequence[tuple[str, Any]]) -> Any:
    """One notebook holding every (name, executed notebook) in order, each under a heading with its
    papermill parameters and run time; parameter cells and stderr dropped, plotly.js embedded once.
    The given notebooks are left as they are."""
    import nbformat

    combined = nbformat.v4.new_notebook()
    bundle_seen = False
    for name, nb in executed:
        injected = nb.metadata.get("papermill", {}).get("parameters", {})
        parameters = ", ".join(f"`{k}={v!r}`" for k, v in injected.items())
        combined.cells.append(nbformat.v4.new_markdown_cell(
            f"# {name}{_timing(nb)}\n\n" + (f"Parameters: {parameters}" if parameters else "Notebook defaults.")))
        for original in nb.cells:
            if {"parameters", "injected-parameters"} & set(original.metadata.get("tags", [])):
                continue
            cell = copy.copy(original)
            cell.id = f"{name}-{original.get('id', len(combined.cells))}"  # ids unique across notebooks
            if cell.cell_type == "code":
                cell.outputs, bundle_seen = _report_outputs(original.outputs, bundle_seen)
            combined.cells.append(cell)
    return combined


def build_report(reports: Path, names: Sequence[str] = NOTEBOOKS, title: str = "Quad Workbench report") -> Path:
    """Render `reports/`: one page per executed notebook (with code), `report.html` (every
    notebook's figures and tables on one self-contained page) and `index.html`; return report.html."""
    import nbformat

    executed = [(name, nbformat.read(reports / f"{name}.ipynb", as_version=4))
                for name in names if (reports / f"{name}.ipynb").exists()]
    if not executed:
        raise FileNotFoundError(f"{reports}: no executed notebooks ({', '.join(names)}.ipynb); run `make demo` first")
    for name, nb in executed:
        render_html(nb, reports / f"{name}.html")
    combined = verdict_first(combine_notebooks(executed))
    combined.metadata["title"] = title
    report = render_html(combined, reports / REPORT_PAGE, code=False)
    write_index(reports, executed, title)
    return report


VERDICT_TAG = "verdict"
VERDICT_HEADING = ("# Verdict\n\nThe one-screen summary of 05_evaluate: each method against Random by paired "
                   "differences over items and seeds (95% intervals, Holm-adjusted tests). "
                   "The notebooks follow.")


def verdict_first(combined: Any, tag: str = VERDICT_TAG) -> Any:
    """The combined notebook with the cells tagged `tag` (05_evaluate's summary) moved to the top
    under a "Verdict" heading. plotly.js, embedded once in the first notebook's setup output, moves
    in front of them (a figure drawn before plotly.js is loaded stays blank). No tagged cell: unchanged."""
    import nbformat

    verdict = [c for c in combined.cells if tag in c.metadata.get("tags", [])]
    if not verdict:
        return combined
    rest = [c for c in combined.cells if tag not in c.metadata.get("tags", [])]
    bundle = []
    for cell in rest:
        if cell.cell_type == "code" and any(_is_plotly_bundle(o) for o in cell.outputs):
            bundle = [o for o in cell.outputs if _is_plotly_bundle(o)]
            cell.outputs = [o for o in cell.outputs if not _is_plotly_bundle(o)]
            break
    loader = nbformat.v4.new_code_cell("", outputs=bundle)
    loader.id = "verdict-plotly-bundle"
    heading = nbformat.v4.new_markdown_cell(VERDICT_HEADING)
    heading.id = "verdict-heading"
    combined.cells = ([loader] if bundle else []) + [heading] + verdict + rest
    return combined


def write_index(reports: Path, executed: Sequence[tuple[str, Any]], title: str) -> Path:
    """`reports/index.html`: the one-page report first, then every notebook's page with its run time."""
    rows = [f'<li><a href="{REPORT_PAGE}"><b>the whole report on one page</b></a></li>']
    rows += [f'<li><a href="{html.escape(name)}.html">{html.escape(name)}</a>{_timing(nb)}</li>'
             for name, nb in executed]
    items = "\n".join(rows)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><ul>\n{items}\n</ul></body></html>\n")
    path = reports / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
