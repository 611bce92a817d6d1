"""Export: parquet + jsonl.gz + manifest under <run>/select-<method>/, ready for a training run."""

from __future__ import annotations

import gzip
import json

import pytest
from selection_helpers import TableScorer, clustered_pool

from quadlib.runstore import RunStore
from quadlib.selection import BanditSettings, SelectionContext, export_selection, make_selector, read_selection
from quadlib.selection.scoring import Cost


@pytest.fixture
def ctx(tmp_path) -> SelectionContext:
    pool, assignments, truth = clustered_pool([0.02, 0.01, -0.01], docs_per_cluster=30)
    return SelectionContext(pool=pool, assignments=assignments, scorer=TableScorer(truth), seed=1,
                            run_dir=tmp_path / "run")


def test_quad_export_has_rows_manifest_and_round_records(ctx):
    store = RunStore(ctx.run_dir)
    selection = make_selector("quad", {"k": 2, "batch_size": 8, "gamma": 0.25}).select(ctx, 300)
    folder = export_selection(selection, ctx, store)
    assert folder == ctx.run_dir / "select-quad"
    table, manifest = read_selection(store, "quad")
    assert table["id"].tolist() == selection.ids
    assert list(table.columns) == ["id", "text", "source", "cluster", "score", "round", "n_tokens"]
    assert (table["round"] >= 0).all() and table["score"].notna().all()
    with gzip.open(folder / "selection.jsonl.gz", "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r["id"] for r in records] == selection.ids and records[0]["text"] == table["text"].iloc[0]
    assert manifest["method"] == "quad" and manifest["budget_tokens"] == 300
    assert manifest["tokens_selected"] == table["n_tokens"].sum() <= 300
    assert sum(manifest["docs_per_source"].values()) == sum(manifest["docs_per_cluster"].values()) == len(table)
    assert manifest["cost"]["docs_scored"] == len(ctx.scorer.scored) > len(table)
    assert manifest["params"]["alpha"] == BanditSettings().alpha and manifest["seed"] == 1
    assert any((folder / "rounds").glob("docs-*.parquet"))


def test_export_without_clusters_or_scores(ctx, store):
    plain = SelectionContext(pool=ctx.pool, seed=3)
    selection = make_selector("random").select(plain, 200)
    export_selection(selection, plain, store)
    table, manifest = read_selection(store, "random")
    assert table["cluster"].isna().all() and table["score"].isna().all() and (table["round"] == -1).all()
    assert manifest["docs_per_cluster"] == {} and manifest["cost"] == {
        "docs_scored": 0, "forward_passes": 0, "backward_passes": 0, "jvp_passes": 0, "tokens": 0, "flops": 0.0}


def test_export_rejects_ids_outside_the_pool(ctx, store):
    selection = make_selector("random").select(ctx, 100)
    selection.ids[0] = "not-in-pool"
    with pytest.raises(ValueError, match="not in the pool"):
        export_selection(selection, ctx, store)


def test_export_is_byte_reproducible(ctx, store):
    selection = make_selector("random").select(ctx, 200)
    first = (export_selection(selection, ctx, store) / "selection.jsonl.gz").read_bytes()
    second = (export_selection(selection, ctx, store) / "selection.jsonl.gz").read_bytes()
    assert first == second


def test_cost_arithmetic():
    cost = Cost()
    cost.add_forward(2, 100, n_params=10)
    cost.add_backward(2, 100, n_params=10)
    assert cost.flops == 6 * 10 * 100
    assert (cost + cost).flops == 2 * cost.flops and (cost - cost).tokens == 0
    unknown = Cost()
    unknown.add_forward(1, 5, n_params=None)
    assert unknown.flops is None and (cost + unknown).flops is None
    assert (cost.forward_passes, cost.backward_passes, cost.tokens) == (2, 2, 100)
