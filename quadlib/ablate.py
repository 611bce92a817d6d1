"""Ablation driver: run one notebook (`notebooks/04_ablate.ipynb`) over a parameter grid with papermill.

Each named grid of `GRIDS` is one of the paper's ablations; a new ablation is an entry. A grid is
the cartesian product of its axes, plus fixed parameters shared by every run. Every run gets::

    <out>/runs/<name>/config.json     its parameters (RunStore), name = readable axes + params hash
    <out>/runs/<name>/output.ipynb    the executed notebook (kept on failure, to read the error)
    <out>/runs/<name>/result.json     what the notebook writes into RESULT_DIR (a flat dict of results)
    <out>/runs/<name>/_done/_step.json  completion marker: params hash, seconds
    <out>/runs/<name>/failed.json     the error of a failed run (retried on the next call)

The notebook receives its grid parameters plus `RESULT_DIR` (that run's folder). Runs execute in
parallel worker processes (each starts its own python3 kernel, with cores / workers threads, so
parallel runs share the cores instead of oversubscribing them); a finished run is skipped, so a
rerun of a grid only does what is missing, and a failing run is recorded without stopping the others.
The run name depends on the parameters only, so grids that share a parameter combination (the tau
sweep and the threshold time cost) share its run.

CLI: `python -m quadlib.ablate --notebook notebooks/04_ablate.ipynb --grid alpha --out runs/ablate --workers 2`
(`--grid` is a name of GRIDS or a JSON file; see `load_grid`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from quadlib.runstore import RunStore, to_jsonable, write_json_atomic
from quadlib.selection.bandit import BanditSettings

RESULT_DIR_PARAM = "RESULT_DIR"
RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
OUTPUT_NOTEBOOK = "output.ipynb"
RUNS_FOLDER = "runs"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Grid:
    """A named ablation: the notebook parameters it sweeps and the paper figure or table it feeds."""

    axes: dict[str, list[Any]]
    paper: str
    description: str


# alpha and tau grids in the bandit's default units (score_scale); each holds 0 and the default.
ALPHA_GRID = sorted({0.0, 0.03, BanditSettings.alpha, 0.3, 1.0, 3.0})
TAU_GRID = sorted({0.0, BanditSettings.tau, 0.25, 0.5, 1.0})

GRIDS: dict[str, Grid] = {
    "alpha": Grid({"ALPHA": ALPHA_GRID}, "alpha figure",
                  "UCB exploration weight alpha of CS_i = mean_i + alpha sqrt(2 ln sum_j T_j / (T_i + 1)), in standard "
                  f"deviations of the scores seen (UNITS='score_scale'); default {BanditSettings.alpha}, paper 0.002 "
                  "in its proxy's absolute units"),
    "tau": Grid({"TAU": TAU_GRID}, "tau figure",
                "influence threshold tau a sampled document must exceed to be kept, in standard deviations of the "
                f"scores seen (UNITS='score_scale'); default {BanditSettings.tau}, paper 0.0025 absolute"),
    "n_clusters": Grid({"N_CLUSTERS": [8, 16, 32, 64]}, "Fig. 5d", "number of clusters (arms of the bandit)"),
    "cluster_algorithm": Grid({"CLUSTER_ALGORITHM": ["faiss_kmeans", "minibatch_kmeans", "agglomerative"]}, "Fig. 5c",
                              "clustering algorithm (keys of quadlib.cluster.ALGORITHMS)"),
    "mab_vs_topk": Grid({"METHOD": ["quad", "quad_released", "topk_clusters"]}, "Fig. 4a",
                        "multi-armed bandit over clusters (the paper's equation and the released code's variant) "
                        "against taking the top-k clusters by influence"),
    "influence_variant": Grid({"ESTIMATOR": ["dot", "kfac_mlp", "kfac_attn_indep", "kfac_joint_qkv"]}, "Figs. 4b/4c",
                              "influence: no Hessian, K-FAC on MLP, MLP + attention (Q, K, V independent), joint QKV"),
    "budget": Grid({"BUDGET_FRACTION": [0.05, 0.1, 0.2, 0.4]}, "Table 5",
                   "selection budget as a fraction of the pool's tokens"),
    "threshold_time": Grid({"TAU": TAU_GRID}, "Table 11",
                           "selection time cost as a function of the threshold tau (runs shared with 'tau')"),
}


@dataclass(frozen=True)
class AblationRun:
    """One notebook execution: a deterministic name and every parameter it is given."""

    name: str
    params: dict[str, Any] = field(hash=False)


def params_hash(params: Mapping[str, Any]) -> str:
    """A short stable hash of the parameters (canonical JSON, sorted keys)."""
    canonical = json.dumps(to_jsonable(dict(params)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:10]


def run_name(axes_values: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """`KEY=value_KEY=value-<hash of all params>`: readable, filesystem-safe and unique per params."""
    readable = "_".join(f"{key}={value}" for key, value in sorted(axes_values.items()))
    readable = re.sub(r"[^A-Za-z0-9=._-]+", "-", readable)[:80]
    return f"{readable}-{params_hash(params)}" if readable else params_hash(params)


def expand_grid(axes: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any] | None = None) -> list[AblationRun]:
    """The cartesian product of `axes`, each combination with the `fixed` parameters added."""
    fixed = dict(fixed or {})
    clash = sorted(set(axes) & set(fixed))
    if clash:
        raise ValueError(f"parameter(s) {clash} are both swept and fixed; keep each in one place")
    empty = sorted(key for key, values in axes.items() if len(values) == 0)
    if empty:
        raise ValueError(f"axis {empty} has no values")
    keys = sorted(axes)
    runs = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        swept = dict(zip(keys, combo))
        params = fixed | swept
        runs.append(AblationRun(run_name(swept, params), params))
    return runs


def load_grid(spec: str | Path, fixed: Mapping[str, Any] | None = None) -> list[AblationRun]:
    """Runs from a GRIDS name or a JSON file.

    The JSON is an object (or a list of objects) with "grid" (a GRIDS name) and/or "axes"
    ({param: [values]}, overriding the named grid's), and optional "fixed" ({param: value}).
    `fixed` here is added to every object's own fixed parameters. Duplicate runs are merged.
    """
    text = str(spec)
    entries: list[dict[str, Any]]
    if text in GRIDS:
        entries = [{"grid": text}]
    elif Path(text).is_file():
        loaded = json.loads(Path(text).read_text(encoding="utf-8"))
        entries = loaded if isinstance(loaded, list) else [loaded]
    else:
        raise ValueError(f"{text!r} is neither a named grid ({sorted(GRIDS)}) nor a JSON file")
    runs: dict[str, AblationRun] = {}
    for n, entry in enumerate(entries):
        unknown = sorted(set(entry) - {"grid", "axes", "fixed"})
        if unknown:
            raise ValueError(f"{text} entry {n}: unknown key(s) {unknown}; use 'grid', 'axes', 'fixed'")
        name = entry.get("grid")
        if name is not None and name not in GRIDS:
            raise ValueError(f"{text} entry {n}: unknown grid {name!r}; named grids: {sorted(GRIDS)}")
        axes = {**(GRIDS[name].axes if name else {}), **entry.get("axes", {})}
        if not axes:
            raise ValueError(f"{text} entry {n}: give a 'grid' name or 'axes'")
        for run in expand_grid(axes, {**entry.get("fixed", {}), **(fixed or {})}):
            runs.setdefault(run.name, run)
    return list(runs.values())


def _execute(notebook: str, folder: str, params: dict[str, Any], cwd: str | None,
             threads: int) -> tuple[float, str | None]:
    """Worker: run one notebook with papermill; return (seconds, error text or None)."""
    from quadlib.reports import REPO_ROOT, execute_notebook

    for variable in THREAD_VARIABLES:  # inherited by the kernel: parallel runs share the cores, not oversubscribe
        os.environ[variable] = str(threads)

    start = time.perf_counter()
    try:
        execute_notebook(Path(notebook), Path(folder) / OUTPUT_NOTEBOOK, params, cwd=Path(cwd) if cwd else REPO_ROOT)
    except Exception as err:  # noqa: BLE001 - any failure of one run is recorded, never fatal to the grid
        # papermill's error names the notebook's own exception (ename, evalue); others speak for themselves
        headline = (f"{err.ename}: {err.evalue}" if hasattr(err, "ename") else f"{type(err).__name__}: {err}").strip()
        return time.perf_counter() - start, f"{headline}\n{traceback.format_exc()[-4000:]}"
    return time.perf_counter() - start, None


def run_grid(notebook: str | Path, runs: Sequence[AblationRun], out_dir: str | Path, *, workers: int = 2,
             cwd: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Execute every run not done yet, `workers` at a time; return one row per run with its status.

    status: "skipped" (done before with these params), "done" (ran now) or "failed" (error recorded
    in failed.json; retried by the next call).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    notebook = Path(notebook).resolve()
    if not notebook.exists():
        raise FileNotFoundError(f"{notebook}: no such notebook")
    store = RunStore(out_dir)
    rows: dict[str, dict[str, Any]] = {}
    pending: list[tuple[AblationRun, Path]] = []
    for run in runs:
        step = f"{RUNS_FOLDER}/{run.name}"
        if store.begin(step, run.params):
            rows[run.name] = {"name": run.name, "status": "skipped", **store.done_info(step)}
            continue
        folder = store.step_dir(step)
        (folder / FAILED_FILE).unlink(missing_ok=True)
        pending.append((run, folder))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no forked copies of a parent holding torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_execute, str(notebook), str(folder.resolve()),
                               {**run.params, RESULT_DIR_PARAM: str(folder.resolve())},
                               str(cwd) if cwd else None, threads): (run, folder) for run, folder in pending}
        for future in tqdm(as_completed(futures), total=len(futures), desc="ablation runs", disable=not progress):
            run, folder = futures[future]
            seconds, error = future.result()
            info = {"params_hash": params_hash(run.params), "seconds": seconds}
            if error is None:
                store.mark_done(f"{RUNS_FOLDER}/{run.name}", info=info)
                rows[run.name] = {"name": run.name, "status": "done", **info}
            else:
                write_json_atomic(folder / FAILED_FILE, {**info, "params": run.params, "error": error})
                rows[run.name] = {"name": run.name, "status": "failed", **info, "error": error.splitlines()[0]}
    return pd.DataFrame([rows[run.name] for run in runs])


def collect_results(out_dir: str | Path) -> pd.DataFrame:
    """One row per run folder: name, status, seconds, its parameters and its result.json values."""
    rows = []
    for config in sorted(Path(out_dir, RUNS_FOLDER).glob("*/config.json")):
        folder = config.parent
        row: dict[str, Any] = {"name": folder.name, **json.loads(config.read_text(encoding="utf-8"))["params"]}
        marker = folder / "_done" / "_step.json"
        if marker.exists():
            row |= {"status": "done", "seconds": json.loads(marker.read_text(encoding="utf-8"))["seconds"]}
        elif (folder / FAILED_FILE).exists():
            failed = json.loads((folder / FAILED_FILE).read_text(encoding="utf-8"))
            row |= {"status": "failed", "seconds": failed["seconds"], "error": failed["error"].splitlines()[0]}
        else:
            row["status"] = "pending"
        if (folder / RESULT_FILE).exists():
            row |= json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        rows.append(row)
    return pd.DataFrame(rows)


def _parse_fixed(pairs: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; VALUE is read as JSON when it parses (numbers, null, lists), else as a string."""
    fixed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            fixed[key] = json.loads(value)
        except json.JSONDecodeError:
            fixed[key] = value
    return fixed


def build_parser() -> argparse.ArgumentParser:
    grids = ", ".join(f"{name} ({grid.paper})" for name, grid in GRIDS.items())
    parser = argparse.ArgumentParser(prog="python -m quadlib.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebook", default="notebooks/04_ablate.ipynb", help="the notebook defining one run")
    parser.add_argument("--grid", required=True, action="append",
                        help=f"a named grid or a JSON grid file; repeatable. Named grids: {grids}")
    parser.add_argument("--out", required=True, help="folder of the runs (reused: finished runs are skipped)")
    parser.add_argument("--workers", type=int, default=2, help="notebooks executed in parallel")
    parser.add_argument("--set", dest="fixed", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter given to every run (e.g. RUN_DIR=runs/demo); repeatable")
    parser.add_argument("--cwd", default=None, help="working directory of the notebooks (default: the repository)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grids; exit status 1 when any run failed."""
    args = build_parser().parse_args(argv)
    fixed = _parse_fixed(args.fixed)
    runs = {run.name: run for spec in args.grid for run in load_grid(spec, fixed)}
    table = run_grid(args.notebook, list(runs.values()), args.out, workers=args.workers, cwd=args.cwd)
    print(table.drop(columns=[c for c in ("error",) if c in table.columns]).to_string(index=False))
    failed = table[table["status"] == "failed"]
    for row in failed.itertuples():
        print(f"FAILED {row.name}: {row.error} (see {Path(args.out) / RUNS_FOLDER / row.name / FAILED_FILE})")
    return 1 if len(failed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
