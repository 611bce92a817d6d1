"""The local executor: per-shard steps, idempotent resumable shards, adapters equal to their modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from executor_steps import SlowStep, assert_exactly_once, make_corpus, run_killed_driver

from quadlib.cluster import assign
from quadlib.embed import EmbedSettings, embed_corpus, embedding_path, load_embeddings
from quadlib.execution import ExecutorSettings, LocalExecutor, ShardStep, make_executor, read_step_output, shard_is_done
from quadlib.execution.doc_scorer import influence_scorer_factory
from quadlib.execution.steps import AssignStep, DsirFeatureStep, EmbedStep, InfluenceStep, PerplexityStep
from quadlib.runstore import RunStore


@pytest.fixture
def corpus(store: RunStore, tmp_path: Path) -> RunStore:
    make_corpus(store, tmp_path, n_docs=40, shard_size=10)
    return store


def test_dsir_step_writes_one_keyed_shard_per_input_with_markers(corpus: RunStore) -> None:
    from data_selection.hashed_ngram_dsir import get_ngram_counts

    step = DsirFeatureStep(num_buckets=256)
    run = LocalExecutor().run(step, corpus)
    assert run.rows == 40 and run.skipped == 0 and len(run.processed) == 4
    assert [p.name for p in corpus.shards("dsir-features")] == [f"shard-0000{i}.parquet" for i in range(4)]
    out = read_step_output(corpus, step)
    texts = pd.read_parquet(corpus.shards("corpus")[0])["text"]
    assert out["id"].tolist() == [f"doc-{i:03d}" for i in range(40)]
    dense = get_ngram_counts(texts.iloc[3], n=2, num_buckets=256)
    assert np.flatnonzero(dense).tolist() == out["buckets"].iloc[3].tolist()
    assert dense[dense > 0].tolist() == out["counts"].iloc[3].tolist()
    assert corpus.is_done("dsir-features") and corpus.done_info("dsir-features", "shard-00002")["rows"] == 10


def test_finished_shards_are_skipped_and_a_changed_config_recomputes(corpus: RunStore) -> None:
    step = DsirFeatureStep(num_buckets=256)
    LocalExecutor().run(step, corpus)
    assert LocalExecutor().run(step, corpus).processed == []  # the whole step is done
    (corpus.root / "dsir-features" / "_done" / "_step.json").unlink()
    (corpus.root / "dsir-features" / "_done" / "shard-00001.json").unlink()
    again = LocalExecutor().run(step, corpus)
    assert [r.shard for r in again.processed] == ["shard-00001"] and again.skipped == 3
    changed = LocalExecutor().run(DsirFeatureStep(num_buckets=128), corpus)
    assert len(changed.processed) == 4
    assert max(max(b) for b in read_step_output(corpus, DsirFeatureStep(num_buckets=128))["buckets"]) < 128


def test_a_reingested_shard_with_other_ids_is_not_reused(corpus: RunStore, tmp_path: Path) -> None:
    step = DsirFeatureStep(num_buckets=64)
    LocalExecutor().run(step, corpus)
    shard = corpus.shards("corpus")[0]
    assert shard_is_done(step, corpus, shard)
    frame = pd.read_parquet(shard)
    frame.assign(id=frame["id"] + "-new").to_parquet(shard, index=False)
    assert not shard_is_done(step, corpus, shard)


class _DropsRows(ShardStep):
    name = "broken"

    def params(self, store: RunStore) -> dict:
        return {}

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch[["id"]].iloc[1:]


def test_a_step_that_loses_rows_fails_naming_the_shard_and_writes_nothing(corpus: RunStore) -> None:
    with pytest.raises(ValueError, match=r"shard-00000.*one row per input"):
        LocalExecutor().run(_DropsRows(), corpus)
    assert not list((corpus.root / "broken").glob("shard-*")) and not corpus.is_done("broken", "shard-00000")


def test_unknown_executor_and_missing_input_are_clear_errors(store: RunStore) -> None:
    with pytest.raises(ValueError, match="unknown executor 'spark'"):
        make_executor(ExecutorSettings(executor="spark"))
    with pytest.raises(FileNotFoundError, match="run the 'corpus' step first"):
        LocalExecutor().run(DsirFeatureStep(), store)


def test_embed_step_is_embed_corpus_and_they_finish_each_others_runs(corpus: RunStore) -> None:
    """Same files, markers and config as quadlib.embed: one resumes what the other started."""
    settings = EmbedSettings(max_seq_length=32)
    embed_corpus(corpus, settings)
    ids, reference = load_embeddings(corpus)
    second = corpus.shards("corpus")[1]
    embedding_path(corpus, second).unlink()  # as if embed_corpus had died before this shard
    (corpus.root / "embed" / "_done" / "_step.json").unlink()
    run = LocalExecutor().run(EmbedStep(settings), corpus)
    assert [r.shard for r in run.processed] == ["shard-00001"] and run.skipped == 3
    ids_after, vectors = load_embeddings(corpus)
    assert ids_after == ids and np.abs(vectors - reference).max() < 1e-5
    assert embed_corpus(corpus, settings) and corpus.is_done("embed")  # embed_corpus sees a finished step


def test_assign_step_matches_quadlib_cluster_assign(corpus: RunStore) -> None:
    rng = np.random.default_rng(0)
    for shard in corpus.shards("corpus"):  # stand-in embeddings: assignment is what is tested here
        np.save(embedding_path(corpus, shard), rng.normal(size=(10, 8)).astype(np.float32))
    centroids = rng.normal(size=(5, 8)).astype(np.float32)
    LocalExecutor().run(AssignStep(centroids, spherical=True), corpus)
    out = read_step_output(corpus, AssignStep(centroids, spherical=True))
    vectors = np.concatenate([np.load(embedding_path(corpus, s)) for s in corpus.shards("corpus")])
    labels, distances = assign(vectors, centroids, spherical=True)
    assert out["cluster"].tolist() == labels.tolist()
    np.testing.assert_allclose(out["distance"], distances, atol=1e-6)


def test_a_killed_driver_resumes_from_finished_shards(store: RunStore, tmp_path: Path) -> None:
    make_corpus(store, tmp_path, n_docs=32, shard_size=4)
    done = run_killed_driver(store, "local", None, at_least=2)
    assert 2 <= done < 8 and not store.is_done("dsir-slow")
    resumed = LocalExecutor().run(SlowStep(seconds=0.0), store)
    assert resumed.skipped == done and len(resumed.processed) == 8 - done
    assert_exactly_once(store, SlowStep())


def test_proxy_steps_equal_the_influence_scorer_and_the_probe(corpus: RunStore, tmp_path: Path) -> None:
    """Perplexity and influence through the executor are the modules' own numbers (no second path)."""
    from quadlib.influence.estimators import make_estimator
    from quadlib.influence.scorer import InfluenceScorer
    from quadlib.proxy.checkpoint import save_model
    from quadlib.proxy.configs import build_model
    from quadlib.proxy.tokenizer import train_bpe_tokenizer
    from quadlib.selection.probes import HFProbeModel

    texts = pd.concat([pd.read_parquet(s) for s in corpus.shards("corpus")])["text"].tolist()
    tokenizer = train_bpe_tokenizer(texts, 300, tmp_path / "tok")
    model = build_model("test-llama", tokenizer=tokenizer, device="cpu").eval()
    save_model(model, tokenizer, tmp_path / "model")
    estimator = make_estimator("kfac_joint_qkv")
    scorer = InfluenceScorer(model, tokenizer, estimator, max_length=32, batch_size=8, device="cpu")
    scorer.fit_texts(texts[:16])
    scorer.set_reference_texts(texts[20:28])
    estimator.save(tmp_path / "estimator.safetensors")

    influence = InfluenceStep(tmp_path / "model", tmp_path / "estimator.safetensors", max_length=32, batch_size=8,
                              device="cpu")
    perplexity = PerplexityStep(tmp_path / "model", max_length=32, batch_size=8, device="cpu")
    for step in (influence, perplexity):
        LocalExecutor().run(step, corpus)
    expected_scores = np.concatenate([scorer.score_texts(texts[i:i + 8]) for i in range(0, 40, 8)])
    np.testing.assert_allclose(read_step_output(corpus, influence)["score"], expected_scores, rtol=1e-4, atol=1e-6)
    probe = HFProbeModel(model, tokenizer, ["unused"], max_length=32, batch_size=8, device="cpu")
    np.testing.assert_allclose(read_step_output(corpus, perplexity)["loss"], probe.doc_losses(texts), rtol=1e-5)
    # the bandit's scoring actors build the same scorer from the same step
    actor_scorer = influence_scorer_factory(InfluenceStep(tmp_path / "model", tmp_path / "estimator.safetensors",
                                                          max_length=32, batch_size=8, device="cpu"))()
    np.testing.assert_allclose(actor_scorer(texts[:8]), expected_scores[:8], rtol=1e-4, atol=1e-6)


def test_ray_chunks_are_the_local_batches_so_scores_are_bit_identical(corpus: RunStore, tmp_path: Path) -> None:
    """What `quad select --executor ray` sends each actor (`influence_partition`: the driver scorer's
    own batches) scored by the actors' scorer (`influence_scorer_factory`: proxy and estimator read
    from disk) gives exactly the local scores, whatever order the chunks are scored in."""
    from quadlib.execution.doc_scorer import influence_partition
    from quadlib.influence.estimators import make_estimator
    from quadlib.influence.scorer import InfluenceScorer
    from quadlib.proxy.checkpoint import save_model
    from quadlib.proxy.configs import build_model
    from quadlib.proxy.tokenizer import load_tokenizer, train_bpe_tokenizer

    texts = pd.concat([pd.read_parquet(s) for s in corpus.shards("corpus")])["text"].tolist()
    # 21 documents of 4 to 24 words: padded batches differ unless the actors get the scorer's own batches
    texts = [" ".join((text + " " + text).split()[:4 + i]) for i, text in enumerate(texts[:21])]
    save_model(build_model("test-llama", tokenizer=train_bpe_tokenizer(texts, 300, tmp_path / "tok"), device="cpu"),
               load_tokenizer(tmp_path / "tok"), tmp_path / "model")
    tokenizer = load_tokenizer(tmp_path / "model")
    model = build_model(str(tmp_path / "model"), tokenizer=tokenizer, device="cpu").eval()  # as load_proxy
    local = InfluenceScorer(model, tokenizer, make_estimator("kfac_joint_qkv"), max_length=32, batch_size=4,
                            device="cpu")
    local.fit_texts(texts[:12])
    local.set_reference_texts(texts[12:18])
    local.estimator.save(tmp_path / "estimator.safetensors")  # a first run scores with the estimator it fitted
    expected = local.score_texts(texts)  # [21]

    chunks = influence_partition(local)(texts)
    assert len(chunks) == 6 and sorted(i for rows in chunks for i in rows) == list(range(21))
    actor = influence_scorer_factory(InfluenceStep(tmp_path / "model", tmp_path / "estimator.safetensors",
                                                   max_length=32, batch_size=4, device="cpu"))()
    got = np.full(len(texts), np.nan)
    for rows in reversed(chunks):  # any actor, any order
        got[rows] = actor([texts[i] for i in rows])
    assert np.array_equal(got, expected), np.abs(got - expected).max()


def test_scaleout_writes_the_clustering_cluster_corpus_writes(corpus: RunStore) -> None:
    """The scale-out's assign step ends in `<run>/cluster/`, the files every reader of the clustering
    uses (notebook 03, `quad select`), equal to what `cluster_corpus` makes from the same embeddings."""
    from quadlib.cluster import ClusterSettings, cluster_corpus, load_assignments, load_centroids, load_sizes
    from quadlib.execution.scaleout import main

    main(["--run", str(corpus.root), "--steps", "embed", "assign", "--cluster-k", "3", "--executor", "local"])
    ours = load_assignments(corpus)  # read from the one path
    cluster_corpus(corpus, ClusterSettings(k=3), out_step="cluster-single")  # the single-machine step
    theirs = load_assignments(corpus, "cluster-single")
    pd.testing.assert_frame_equal(ours, theirs)
    assert ours["cluster"].nunique() > 1 and len(ours) == 40
    assert np.array_equal(load_centroids(corpus), load_centroids(corpus, "cluster-single"))
    pd.testing.assert_frame_equal(load_sizes(corpus), load_sizes(corpus, "cluster-single"))
    # the same parameters: cluster_corpus with the scale-out's settings reuses the published clustering
    before = (corpus.root / "cluster" / "assignments.parquet").stat().st_mtime_ns
    cluster_corpus(corpus, ClusterSettings(k=3))
    assert (corpus.root / "cluster" / "assignments.parquet").stat().st_mtime_ns == before


def test_the_local_executor_never_imports_ray() -> None:
    code = ("import sys, quadlib.execution, quadlib.execution.steps, quadlib.execution.scaleout; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "importing the executors imported ray"
