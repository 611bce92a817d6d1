"""The main job end to end on a slice of the default corpus: ingest, embed, cluster, warm-up,
influence, selection. Checks the issue's claim on the default data: Quad covers more of the
reference-relevant domains than Random, and more clusters than top-k influence."""

from __future__ import annotations

from pathlib import Path

import pytest

from quadlib.cluster import ClusterSettings, cluster_corpus
from quadlib.corpus import CorpusSettings, ingest
from quadlib.embed import EmbedSettings, embed_corpus
from quadlib.pipeline import (ProxySettings, ScoreSettings, SelectionPlan, load_proxy, load_scorer, prepare_proxy,
                              prepare_scorer, run_selections, selection_context)
from quadlib.proxy import TrainSettings
from quadlib.runstore import RunStore
from quadlib.selection import read_selection
from quadlib.synthetic import REFERENCE_DOMAINS

DATA = Path(__file__).resolve().parents[1] / "data" / "synthetic"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> RunStore:
    store = RunStore(tmp_path_factory.mktemp("pipeline") / "run")
    ingest(store, DATA / "pool.jsonl.gz", settings=CorpusSettings(limit=400))
    ingest(store, DATA / "reference.jsonl.gz", step="reference",
           settings=CorpusSettings(id_field=None, source_field=None, limit=64))
    embed_corpus(store, EmbedSettings(max_seq_length=64))
    cluster_corpus(store, ClusterSettings(k=8, seed=0))
    model, tokenizer = prepare_proxy(store, ProxySettings(
        model="test-llama", tokenizer_vocab=512, warmup_docs=200,
        train=TrainSettings(total_steps=30, batch_size=8, block_size=64, warmup_steps=3)))
    prepare_scorer(store, model, tokenizer, ScoreSettings(fit_docs=48, reference_docs=48, max_length=64))
    return store


def _plan(ctx) -> SelectionPlan:
    budget = int(0.08 * ctx.pool["n_tokens"].sum())
    return SelectionPlan(methods=["random", "topk_influence", "quad"], budget_tokens=budget, method_settings={
        "quad": {"gamma": 0.25, "k": 2, "batch_size": 8}, "topk_influence": {"sample_size": None}})


def _context(run: RunStore):
    model, tokenizer = load_proxy(run)
    _, scorer = load_scorer(run, model, tokenizer, "kfac_joint_qkv")
    return selection_context(run, scorer, seed=0), scorer


def test_quad_covers_reference_domains_and_clusters(run: RunStore) -> None:
    ctx, _ = _context(run)
    plan = _plan(ctx)
    summary = run_selections(run, ctx, plan).set_index("method")
    assert (summary["tokens_selected"] <= plan.budget_tokens).all()

    def relevant_share(method: str) -> float:
        table, _ = read_selection(run, method)
        return table.loc[table["source"].isin(REFERENCE_DOMAINS), "n_tokens"].sum() / table["n_tokens"].sum()

    def clusters(method: str) -> int:
        return read_selection(run, method)[0]["cluster"].nunique()

    assert relevant_share("quad") > relevant_share("random") + 0.15
    assert clusters("quad") > clusters("topk_influence")


def test_rerun_reuses_every_artifact(run: RunStore) -> None:
    ctx, _ = _context(run)
    run_selections(run, ctx, _plan(ctx))
    ctx, scorer = _context(run)  # a fresh process's view: everything comes from the run folder
    run_selections(run, ctx, _plan(ctx))
    assert scorer.calls == 0


def test_estimator_settings_key_the_score_cache(run: RunStore) -> None:
    model, tokenizer = load_proxy(run)
    base = ScoreSettings(fit_docs=48, reference_docs=48, max_length=64)
    _, default = prepare_scorer(run, model, tokenizer, base)
    _, light = prepare_scorer(run, model, tokenizer, ScoreSettings(**{**base.__dict__, "preset": "light_damping"}))
    assert default.cache.path != light.cache.path


def test_ablation_clusters_reuse_the_base_run_only_when_k_and_algorithm_match(run: RunStore) -> None:
    from quadlib.cluster import load_assignments
    from quadlib.experiment import ExperimentSettings, ablation_clusters

    base = load_assignments(run, "cluster")
    assert ablation_clusters(run, ExperimentSettings()).equals(base)
    other = ablation_clusters(run, ExperimentSettings(cluster_algorithm="minibatch_kmeans"))  # Fig. 5c: same k
    assert other["cluster"].nunique() == base["cluster"].nunique() == 8
    assert run.is_done("cluster-minibatch_kmeans-k8")
    assert ablation_clusters(run, ExperimentSettings(n_clusters=4))["cluster"].nunique() == 4  # Fig. 5d


def test_an_ablation_experiment_trains_and_evaluates_with_its_settings(run: RunStore, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """04 trained SmolLM2 at TrainSettings' default 1e-3 and evaluated every reference-eval passage."""
    import quadlib.experiment as experiment

    seen = {}

    def record(store, name, texts, model_dir, tokenizer, train, seeds, evaluation):
        seen.update(name=name, texts=texts, train=train, seeds=seeds, evaluation=evaluation)
        return [{"metrics": {"ref_loss": 1.0}}]

    monkeypatch.setattr(experiment, "train_and_evaluate", record)
    settings = experiment.ExperimentSettings(method="random", budget_fraction=0.05, train_tokens=640, lr=3e-4,
                                             max_reference_docs=7, max_heldout_docs=5, seed=2)
    result = experiment.run_experiment(run.root, tmp_path / "single", settings, name="single")
    assert seen["name"] == "ablate-single" and seen["seeds"] == [2]
    assert (seen["train"].lr, seen["train"].token_budget) == (3e-4, 640)
    assert (seen["evaluation"].max_reference_docs, seen["evaluation"].max_heldout_docs) == (7, 5)
    assert result["ref_loss"] == 1.0 and result["lr"] == 3e-4 and len(seen["texts"]) == result["n_docs"] > 0
