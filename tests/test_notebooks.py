"""The notebooks' contract: a parameters cell, no committed outputs, every parameter the demo or the
ablation driver injects exists there (papermill would otherwise add it silently), and the defaults are
the demo's (a notebook opened after `make demo` reruns on runs/demo) while `make test` runs them small."""

from __future__ import annotations

import ast
import json
from typing import Any

import pytest

from quadlib.ablate import GRIDS, RESULT_DIR_PARAM
from quadlib.cli import DEFAULT_POOL, DEFAULT_REFERENCE, demo_parameters
from quadlib.reports import NOTEBOOK_PROFILE_VARIABLE, NOTEBOOKS, REPO_ROOT, notebook_profile


def _notebook(name: str) -> dict:
    return json.loads((REPO_ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))


def _parameters_source(name: str) -> str:
    cells = [c for c in _notebook(name)["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters', found {len(cells)}"
    return "".join(cells[0]["source"])


def _parameters(name: str) -> set[str]:
    tree = ast.parse(_parameters_source(name))
    return {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
            if isinstance(target, ast.Name)}


def _defaults(name: str, profile: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What Run All gives each parameter: the parameters cell run under `profile` (our own notebook's code)."""
    monkeypatch.setenv(NOTEBOOK_PROFILE_VARIABLE, profile)
    namespace: dict[str, Any] = {}
    exec(compile(_parameters_source(name), f"{name}:parameters", "exec"), namespace)  # noqa: S102
    return {key: namespace[key] for key in _parameters(name)}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name: str) -> None:
    code = [c for c in _notebook(name)["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_demo_parameters_exist_in_notebooks() -> None:
    given = demo_parameters("runs/x", "pool.jsonl", "ref.jsonl", 0, eval_dir="e", lambada=True, ablations=False,
                            budget_fraction=0.2, seeds=[1], task_limit=5, train_tokens=10)
    for name, params in given.items():
        unknown = set(params) - _parameters(name)
        assert not unknown, f"{name} has no parameter(s) {sorted(unknown)}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_default_to_what_the_demo_runs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run All after `make demo` failed at cell 2: the defaults were test-sized, on runs/nbval."""
    defaults = _defaults(name, "demo", monkeypatch)
    assert defaults["RUN_DIR"] == "runs/demo"
    injected = demo_parameters("runs/demo", DEFAULT_POOL, DEFAULT_REFERENCE, 0)[name]
    differ = {key: (value, defaults[key]) for key, value in injected.items() if defaults[key] != value}
    assert not differ, f"{name}: `make demo` injects (value, notebook default) {differ}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_make_test_runs_the_notebooks_small_in_their_own_folder(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, test = _defaults(name, "demo", monkeypatch), _defaults(name, "test", monkeypatch)
    assert test["RUN_DIR"] == "runs/nbval"
    overridden = {key for key in demo if demo[key] != test[key]}
    tree = ast.parse(_parameters_source(name))
    branch = [node for node in tree.body if isinstance(node, ast.If)]
    assigned = {n.id for node in branch for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    assert assigned <= _parameters(name), f"{name}: the test profile sets unknown {sorted(assigned - _parameters(name))}"
    assert overridden == assigned  # every test-profile value differs from the demo's, and nothing else does
    for profile in (demo, test):  # the ablation folders follow the run folder in both profiles
        if "ABLATE_DIR" in profile:
            assert profile["ABLATE_DIR"] == f"{profile['RUN_DIR']}-ablate"
        if RESULT_DIR_PARAM in profile:
            assert profile[RESULT_DIR_PARAM] == f"{profile['RUN_DIR']}-ablate/single"


def test_nbval_is_still_test_sized(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make test`'s notebooks keep the sizes they had (test-llama, 300 documents, no ablation grids)."""
    assert _defaults("01_cluster", "test", monkeypatch)["LIMIT"] == 300
    assert _defaults("02_score", "test", monkeypatch)["PROXY_MODEL"] == "test-llama"
    assert _defaults("05_evaluate", "test", monkeypatch)["ABLATIONS"] == []
    assert _defaults("01_cluster", "demo", monkeypatch)["LIMIT"] is None


def test_demo_options_reach_their_notebooks() -> None:
    given = demo_parameters("runs/x", "p", "r", 3, eval_dir="tasks", lambada=True, ablations=False,
                            budget_fraction=0.2, seeds=[5, 6], task_limit=7, train_tokens=900)
    assert given["03_bandit"] == {"RUN_DIR": "runs/x", "SEED": 3, "BUDGET_FRACTION": 0.2}
    assert given["04_ablate"] == {"RUN_DIR": "runs/x", "SEED": 3, "RESULT_DIR": "runs/x-ablate/single",
                                  "BUDGET_FRACTION": 0.2, "TRAIN_TOKENS": 900}  # its one experiment: same budget
    assert given["05_evaluate"] == {"RUN_DIR": "runs/x", "SEED": 3, "ABLATE_DIR": "runs/x-ablate", "SEEDS": [5, 6],
                                    "TRAIN_TOKENS": 900, "TASK_LIMIT": 7, "EVAL_DIR": "tasks", "LAMBADA": True,
                                    "ABLATIONS": []}
    assert "ABLATIONS" not in demo_parameters("runs/x", "p", "r", 0)["05_evaluate"]  # the notebook's grids


def test_notebook_profile_is_demo_or_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NOTEBOOK_PROFILE_VARIABLE, raising=False)
    assert notebook_profile() == "demo"
    monkeypatch.setenv(NOTEBOOK_PROFILE_VARIABLE, "tset")
    with pytest.raises(ValueError, match="QUAD_NOTEBOOK_PROFILE='tset': use one of demo, test"):
        notebook_profile()


def test_ablation_grids_match_notebook_04(monkeypatch: pytest.MonkeyPatch) -> None:
    known = _parameters("04_ablate")
    assert RESULT_DIR_PARAM in known
    for grid_name, grid in GRIDS.items():
        assert set(grid.axes) <= known, f"grid {grid_name} sweeps {sorted(set(grid.axes) - known)}, unknown to 04"
    evaluate = _defaults("05_evaluate", "demo", monkeypatch)
    assert set(evaluate["ABLATE_FIXED"]) <= known
    for entry in evaluate["ABLATIONS"]:
        assert entry["grid"] in GRIDS and set(entry.get("axes", {})) <= set(GRIDS[entry["grid"]].axes)
    bandit = _defaults("03_bandit", "demo", monkeypatch)  # the ablations run 03's bandit
    assert {k: v for k, v in evaluate["ABLATE_FIXED"].items() if k in bandit} == \
        {k: bandit[k] for k in evaluate["ABLATE_FIXED"] if k in bandit}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_reads_every_parameter_without_a_warning(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A comparison in the parameters cell made papermill warn "Unable to parse line" on every demo run."""
    import papermill

    with caplog.at_level("WARNING", logger="papermill"):
        inferred = papermill.inspect_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"))
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert set(inferred) == _parameters(name)


def test_04_sets_every_experiment_setting_and_trains_as_05_does() -> None:
    """04 ran SmolLM2 at the default 1e-3 on all 2,574 evaluation passages: it had no LR nor evaluation sizes."""
    from dataclasses import fields

    from quadlib.experiment import ExperimentSettings

    source = "".join(_notebook("04_ablate")["cells"][2]["source"])
    for field in fields(ExperimentSettings):
        assert f"{field.name}={field.name.upper()}" in source, f"04 does not pass {field.name}"
    assert {"LR", "MAX_REFERENCE_DOCS", "MAX_HELDOUT_DOCS"} <= _parameters("04_ablate") & _parameters("05_evaluate")
    grid_cell = next("".join(c["source"]) for c in _notebook("05_evaluate")["cells"] if "load_grid(" in "".join(c["source"]))
    for name in ("LR", "MAX_REFERENCE_DOCS", "MAX_HELDOUT_DOCS"):  # each grid run gets 05's value
        assert f'"{name}": {name}' in grid_cell


@pytest.mark.parametrize("variable", ["REAL_ARGS", "REAL_GPU_ARGS"])
def test_the_makefiles_real_runs_parse_and_set_only_known_parameters(variable: str) -> None:
    """`make real` / `make real-gpu` pass long option lists; a typo there would fail an hour into a run."""
    import re
    import shlex

    from quadlib.cli import build_parser
    from quadlib.reports import parse_overrides

    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    value = re.search(rf"^{variable} \?= (.*)$", makefile, flags=re.MULTILINE).group(1)
    args = build_parser().parse_args(["demo", *shlex.split(value)])
    overrides = parse_overrides(args.set, NOTEBOOKS)  # raises on a name no notebook declares
    assert overrides["02_score"]["FIT_DOCS"] > 0 and overrides["05_evaluate"]["MAX_REFERENCE_DOCS"] > 0
    if variable == "REAL_ARGS":
        assert overrides["02_score"]["PROXY_MODEL"] == "smollm2-135m" and args.no_ablations and args.lambada
        assert overrides["04_ablate"]["LR"] == overrides["05_evaluate"]["LR"] == 1e-4  # 04 trains as 05 does
