"""Where a run's time went: the whole-pipeline profile behind `docs/scale.md`'s projection.

Two records, both written by every run, are read back (nothing is timed again):

- each code cell's wall time, which papermill stores in the executed notebooks (`<reports>/<nb>.ipynb`,
  cell metadata `papermill.duration`), named as `quad demo` names it in its progress lines;
- what the run folder records inside those cells: each selection's wall time (`select-<m>/manifest.json`,
  made in 03_bandit, and `selection-seeds/seed-<s>/...` for the other seeds, made in 05_evaluate) and each trained model's training and
  evaluation seconds (`eval/<m>/seed-<s>/metrics.json`; the ablation grids' models are `eval/ablate-*`).

Cell times add up to the run's wall time. Selection seconds are wall time inside those cells (in
the order the methods ran, so a method that read another's cached scores is cheap here; the cost
record has each method's standalone cost). Training and evaluation seconds are per worker: with two
workers they add up to about twice the wall time of their cell.

CLI: `quad profile --run runs/demo --reports reports`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from quadlib.evaluation.stats import collect_costs
from quadlib.experiment import ABLATION_PREFIX
from quadlib.reports import NOTEBOOKS, cell_title
from quadlib.selection.export import SEED_SELECTIONS


def cell_times(reports: str | Path, names: Sequence[str] = NOTEBOOKS) -> pd.DataFrame:
    """One row per executed code cell: notebook, cell (1-based among code cells), title, seconds.

    Notebooks absent from `reports` are skipped (a run may leave some out); none found is an error."""
    import nbformat

    rows = []
    for name in names:
        path = Path(reports) / f"{name}.ipynb"
        if not path.is_file():
            continue
        cells = nbformat.read(path, as_version=4).cells
        code = [i for i, cell in enumerate(cells) if cell.cell_type == "code"]
        for number, index in enumerate(code, start=1):
            duration = cells[index].metadata.get("papermill", {}).get("duration")
            if duration is None:
                raise ValueError(f"{path}: code cell {number} has no papermill duration; profile a notebook "
                                 "executed by `quad demo` (or papermill) to its end")
            rows.append({"notebook": name, "cell": number, "title": cell_title(cells, index),
                         "seconds": float(duration)})
    if not rows:
        raise FileNotFoundError(f"{reports}: no executed notebook ({', '.join(names)}.ipynb); "
                                "pass the --reports folder that `quad demo` wrote")
    return pd.DataFrame(rows, columns=["notebook", "cell", "title", "seconds"])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); rerun the step that writes it") from None


def selection_times(run: str | Path) -> pd.DataFrame:
    """One row per finished selection: method, seed, seconds (its manifest's wall time, read by
    `collect_costs` from the run for seed 0 and from `selection-seeds/seed-<s>/` for the others)."""
    folders = [(0, Path(run))] + [(int(path.name.removeprefix("seed-")), path)
                                  for path in Path(run).glob(f"{SEED_SELECTIONS}/seed-*")]
    frames = [collect_costs(folder).assign(seed=seed) for seed, folder in folders]
    rows = pd.concat([f for f in frames if not f.empty] or [pd.DataFrame(columns=["method", "seed", "wall_time_s"])])
    rows = rows.assign(seconds=rows["wall_time_s"].astype(float).fillna(0.0))[["method", "seed", "seconds"]]
    return rows.sort_values(["seed", "method"], ignore_index=True)


def model_times(run: str | Path) -> pd.DataFrame:
    """One row per evaluated model: method, seed, train_seconds, eval_seconds (worker seconds)."""
    rows = []
    for path in sorted(Path(run).glob("eval/*/seed-*/metrics.json")):
        record = _read_json(path)
        rows.append({"method": path.parent.parent.name, "seed": int(path.parent.name.removeprefix("seed-")),
                     "train_seconds": float((record.get("train") or {}).get("seconds") or 0.0),
                     "eval_seconds": float(record.get("eval_seconds") or 0.0)})
    return pd.DataFrame(rows, columns=["method", "seed", "train_seconds", "eval_seconds"])


def profile(run: str | Path, reports: str | Path) -> dict[str, pd.DataFrame]:
    """The profile of one run: `cells` (every code cell, its seconds and share of the run's wall time),
    `notebooks` (per notebook), `selections` (per method, summed over seeds) and `models` (training and
    evaluation worker seconds per method, the ablation grids' models as one row)."""
    cells = cell_times(reports)
    total = cells["seconds"].sum()
    cells = cells.assign(share=cells["seconds"] / total if total > 0 else 0.0)
    notebooks = cells.groupby("notebook", sort=False)[["seconds", "share"]].sum().reset_index()
    selections = selection_times(run)
    selections = (selections.groupby("method")
                  .agg(seeds=("seed", "nunique"), seconds=("seconds", "sum"))
                  .sort_values("seconds", ascending=False).reset_index())
    models = model_times(run)
    models = models.assign(method=models["method"].where(~models["method"].str.startswith(ABLATION_PREFIX),
                                                         "ablation grids"))
    models = (models.groupby("method")
              .agg(models=("seed", "size"), train_seconds=("train_seconds", "sum"),
                   eval_seconds=("eval_seconds", "sum"))
              .sort_values("eval_seconds", ascending=False).reset_index())
    return {"cells": cells, "notebooks": notebooks, "selections": selections, "models": models}


def format_profile(parts: dict[str, pd.DataFrame]) -> str:
    """The profile as plain-text tables (seconds to 0.1 s, shares in percent)."""
    cells, notebooks = parts["cells"], parts["notebooks"]
    total = cells["seconds"].sum()
    out = [f"wall time of the executed notebooks: {total:,.1f} s ({total / 60:.1f} min)", "",
           "per notebook:", notebooks.to_string(index=False, formatters={"seconds": "{:,.1f}".format,
                                                                          "share": "{:.1%}".format}), "",
           "cells of 1% or more:",
           cells[cells["share"] >= 0.01].to_string(index=False, formatters={"seconds": "{:,.1f}".format,
                                                                             "share": "{:.1%}".format})]
    if len(parts["selections"]):
        out += ["", "selections (wall seconds: seed 0 in 03_bandit, other seeds in 05_evaluate; a score another "
                "method cached is not timed again):",
                parts["selections"].to_string(index=False, formatters={"seconds": "{:,.1f}".format})]
    if len(parts["models"]):
        out += ["", "training and evaluation (worker seconds; parallel workers overlap in wall time):",
                parts["models"].to_string(index=False, formatters={"train_seconds": "{:,.1f}".format,
                                                                   "eval_seconds": "{:,.1f}".format})]
    return "\n".join(out)
