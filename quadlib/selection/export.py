"""Write a selection where a training run can read it: `<run>/select-<method>/`.

- `selection.parquet` and `selection.jsonl.gz` (byte-reproducible gzip): id, text, source, cluster,
  score, round, n_tokens, one row per document in selection order;
- `manifest.json`: method, params, seed, budget, tokens selected, counts and tokens per source and
  per cluster, cost, wall time, and the files' names.
The step is marked done (RunStore) after the manifest, so a half-written export is never "done".
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pandas as pd

from quadlib.runstore import RunStore, atomic_path, to_jsonable, write_json_atomic
from quadlib.selection.context import Selection, SelectionContext

EXPORT_COLUMNS = ("id", "text", "source", "cluster", "score", "round", "n_tokens")
SEED_SELECTIONS = "selection-seeds"  # <run>/selection-seeds/seed-<s>/select-<method>/: the same plan, another seed


def selection_table(selection: Selection, ctx: SelectionContext) -> pd.DataFrame:
    """The selected documents with their text, source, cluster (None without assignments), score and round."""
    table = selection.frame().merge(ctx.pool[["id", "text", "source", "n_tokens"]], on="id", how="left",
                                    validate="one_to_one")
    if table["text"].isna().any():
        absent = table["id"][table["text"].isna()].tolist()
        raise ValueError(f"selection {selection.method!r} has {len(absent)} id(s) not in the pool, e.g. {absent[:3]}")
    if ctx.assignments is not None:
        table["cluster"] = table["id"].map(ctx.assignments.set_index("id")["cluster"])
    else:
        table["cluster"] = None
    return table[list(EXPORT_COLUMNS)]


def _manifest(selection: Selection, table: pd.DataFrame, seed: int) -> dict[str, Any]:
    by_source = table.groupby("source")["n_tokens"]
    by_cluster = table.dropna(subset=["cluster"]).groupby("cluster")["n_tokens"]
    return {
        "method": selection.method, "params": selection.params, "seed": seed,
        "budget_tokens": selection.budget_tokens, "tokens_selected": selection.tokens_selected,
        "n_docs": len(table), "docs_per_source": by_source.size().to_dict(), "tokens_per_source": by_source.sum().to_dict(),
        "docs_per_cluster": by_cluster.size().to_dict(), "tokens_per_cluster": by_cluster.sum().to_dict(),
        "cost": selection.cost, "computed_cost": selection.computed_cost, "wall_time_s": selection.wall_time_s,
        "extra": selection.extra,
        "files": ["selection.parquet", "selection.jsonl.gz"],
    }


def _write_jsonl_gz(table: pd.DataFrame, path: Path) -> None:
    """JSON lines, gzip-compressed with an empty file name and mtime 0 in the header, so identical
    tables give identical bytes (GzipFile would otherwise store the temporary file's name)."""
    with (atomic_path(path) as tmp, open(tmp, "wb") as raw,
          gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz):
        for record in table.to_dict(orient="records"):
            gz.write((json.dumps(to_jsonable(record), ensure_ascii=False) + "\n").encode("utf-8"))


def export_selection(selection: Selection, ctx: SelectionContext, store: RunStore) -> Path:
    """Write the selection's files and manifest under `<run>/select-<method>/`; return that folder.

    Runs under the step's run-folder lock, so two runs exporting one method (say with two α) write
    one after the other and leave one run's files and manifest, never a mix. (The folder is not
    swapped whole: it also holds the bandit's resumable `rounds/`.)
    """
    step = f"select-{selection.method}"
    table = selection_table(selection, ctx)
    with store.lock(step):
        store.begin(step, {"method": selection.method, "params": selection.params, "budget": selection.budget_tokens},
                    seed=ctx.seed, recompute=True)
        folder = store.step_dir(step)
        with atomic_path(folder / "selection.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        _write_jsonl_gz(table, folder / "selection.jsonl.gz")
        write_json_atomic(folder / "manifest.json", _manifest(selection, table, ctx.seed))
        store.mark_done(step, info={"n_docs": len(table), "tokens_selected": selection.tokens_selected})
    return folder


def read_selection(store: RunStore, method: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """An exported selection's table and manifest."""
    folder = store.root / f"select-{method}"
    if not store.is_done(f"select-{method}"):
        raise FileNotFoundError(f"{folder}: no finished export; run export_selection for method {method!r}")
    return pd.read_parquet(folder / "selection.parquet"), json.loads((folder / "manifest.json").read_text("utf-8"))


def selection_store(store: RunStore, method: str, seed: int) -> RunStore:
    """The run folder holding `method`'s selection made with `seed`.

    The run itself when its `select-<method>/` was made with that seed (notebook 03's SEED), else
    `<run>/selection-seeds/seed-<s>/`, where `quadlib.pipeline.select_for_seeds` re-makes the
    same plan with another seed (its own `select-<method>/`, bandit rounds included).
    """
    manifest = store.root / f"select-{method}" / "manifest.json"
    if store.is_done(f"select-{method}") and json.loads(manifest.read_text("utf-8")).get("seed") == seed:
        return store
    return RunStore(store.root / SEED_SELECTIONS / f"seed-{seed}")
