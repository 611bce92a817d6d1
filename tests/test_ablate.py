"""Ablation driver: grid expansion and naming, papermill runs in parallel, skip on rerun, failures recorded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from quadlib.ablate import (
    FAILED_FILE, GRIDS, OUTPUT_NOTEBOOK, RESULT_DIR_PARAM, RUNS_FOLDER, collect_results, expand_grid, load_grid, main,
    params_hash, run_grid,
)


def _notebook(path: Path) -> Path:
    """A throwaway notebook: writes {"y": 2 X, "threads": its OMP_NUM_THREADS} to RESULT_DIR/result.json,
    or raises when FAIL."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(f"X = 1\nFAIL = False\n{RESULT_DIR_PARAM} = '.'")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json, os, pathlib\n"
        "if FAIL:\n    raise ValueError('boom')\n"
        f"pathlib.Path({RESULT_DIR_PARAM}, 'result.json').write_text(json.dumps({{'y': 2 * X, 'threads': os.environ['OMP_NUM_THREADS']}}))")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_expand_grid_names_are_deterministic_and_unique() -> None:
    runs = expand_grid({"ALPHA": [0.0, 0.002], "K": [8]}, {"RUN_DIR": "runs/x"})
    assert [r.params for r in runs] == [{"RUN_DIR": "runs/x", "ALPHA": 0.0, "K": 8},
                                        {"RUN_DIR": "runs/x", "ALPHA": 0.002, "K": 8}]
    assert runs[0].name == f"ALPHA=0.0_K=8-{params_hash(runs[0].params)}"
    assert [r.name for r in expand_grid({"K": [8], "ALPHA": [0.0, 0.002]}, {"RUN_DIR": "runs/x"})] == [r.name for r in runs]
    other = expand_grid({"ALPHA": [0.0]}, {"RUN_DIR": "runs/y"})[0]
    assert other.name.startswith("ALPHA=0.0-") and other.name != runs[0].name
    with pytest.raises(ValueError, match="both swept and fixed"):
        expand_grid({"ALPHA": [1]}, {"ALPHA": 2})


def test_load_grid_from_names_and_json(tmp_path: Path) -> None:
    assert len(load_grid("influence_variant")) == 4
    spec = tmp_path / "grid.json"
    spec.write_text(json.dumps([{"grid": "tau"}, {"grid": "threshold_time"},
                                {"grid": "alpha", "axes": {"ALPHA": [0.1]}, "fixed": {"SEED": 1}}]))
    runs = load_grid(spec, {"RUN_DIR": "r"})
    assert len(runs) == len(GRIDS["tau"].axes["TAU"]) + 1  # tau and threshold_time share their runs
    assert runs[-1].params == {"RUN_DIR": "r", "SEED": 1, "ALPHA": 0.1}
    spec.write_text(json.dumps({"grid": "nope"}))
    with pytest.raises(ValueError, match="unknown grid 'nope'"):
        load_grid(spec)
    with pytest.raises(ValueError, match="neither a named grid"):
        load_grid("missing.json")


def test_grid_runs_in_parallel_skips_done_and_records_failures(tmp_path: Path) -> None:
    notebook = _notebook(tmp_path / "ablate.ipynb")
    out = tmp_path / "out"
    runs = expand_grid({"X": [1, 2]}) + expand_grid({"X": [3]}, {"FAIL": True})
    first = run_grid(notebook, runs, out, workers=2, progress=False).set_index("name")
    assert first["status"].tolist() == ["done", "done", "failed"]
    assert "boom" in first["error"].iloc[2]
    for run in runs:
        assert (out / RUNS_FOLDER / run.name / OUTPUT_NOTEBOOK).exists()  # kept for failures too
    assert json.loads((out / RUNS_FOLDER / runs[2].name / FAILED_FILE).read_text())["params"] == {"FAIL": True, "X": 3}

    spec = tmp_path / "grid.json"
    spec.write_text(json.dumps([{"axes": {"X": [1, 2]}}, {"axes": {"X": [3]}, "fixed": {"FAIL": True}}]))
    assert main(["--notebook", str(notebook), "--grid", str(spec), "--out", str(out), "--workers", "1"]) == 1
    results = collect_results(out).set_index("X")
    assert results.loc[1, "y"] == 2 and results.loc[2, "y"] == 4
    assert results.loc[1, "threads"] == str(max(1, (os.cpu_count() or 1) // 2))  # 2 workers share the cores
    assert results.loc[1, "status"] == "done" and results.loc[3, "status"] == "failed"
    rerun = run_grid(notebook, runs[:2], out, workers=2, progress=False)
    assert rerun["status"].tolist() == ["skipped", "skipped"]
