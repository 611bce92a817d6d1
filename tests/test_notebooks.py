"""The notebooks' contract: a parameters cell, no committed outputs, and every parameter the demo
or the ablation driver injects exists there (papermill would otherwise add it silently)."""

from __future__ import annotations

import ast
import json

import pytest

from quadlib.ablate import GRIDS, RESULT_DIR_PARAM
from quadlib.cli import demo_parameters
from quadlib.reports import NOTEBOOKS, REPO_ROOT


def _notebook(name: str) -> dict:
    return json.loads((REPO_ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))


def _parameters(name: str) -> set[str]:
    cells = [c for c in _notebook(name)["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters', found {len(cells)}"
    tree = ast.parse("".join(cells[0]["source"]))
    return {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
            if isinstance(target, ast.Name)}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name: str) -> None:
    code = [c for c in _notebook(name)["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_demo_parameters_exist_in_notebooks() -> None:
    for name, params in demo_parameters("runs/x", "pool.jsonl", "ref.jsonl", 0).items():
        unknown = set(params) - _parameters(name)
        assert not unknown, f"{name} has no parameter(s) {sorted(unknown)}"


def test_ablation_grids_match_notebook_04() -> None:
    known = _parameters("04_ablate")
    assert RESULT_DIR_PARAM in known
    for grid_name, grid in GRIDS.items():
        assert set(grid.axes) <= known, f"grid {grid_name} sweeps {sorted(set(grid.axes) - known)}, unknown to 04"
    fixed = demo_parameters("runs/x", "p", "r", 0)["05_evaluate"]["ABLATE_FIXED"]
    assert set(fixed) <= known
