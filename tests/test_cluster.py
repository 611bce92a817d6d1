"""Clustering: each algorithm recovers blobs, chunked assignment is exact, runs resume and repeat."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import quadlib.cluster as cluster_module
from cluster_fixtures import blobs, write_corpus_shards, write_embedded_corpus
from quadlib.cluster import (ALGORITHMS, ClusterSettings, ShardAssigner, assign, cluster_corpus, fit_centroids,
                             load_assignments, load_centroids, load_quality, load_sizes, majority_share, purity)
from quadlib.corpus import iter_records
from quadlib.embed import EmbedSettings, embed_corpus
from quadlib.runstore import RunStore

X, TRUTH = blobs(n_per_blob=40, n_blobs=4, dim=16, seed=3)


def settings(**overrides: object) -> ClusterSettings:
    return dataclasses.replace(ClusterSettings(k=4, sample_size=1000, n_iter=10, n_init=3, minibatch_size=64), **overrides)


def test_purity_and_chance() -> None:
    assert purity(np.array([0, 0, 1, 1]), np.array(["a", "a", "a", "b"])) == 0.75
    assert purity(np.array([0, 1, 2, 3]), np.array(["a", "a", "a", "b"])) == 1.0
    assert majority_share(["a", "a", "a", "b"]) == 0.75
    with pytest.raises(ValueError, match="equal length"):
        purity(np.array([0, 1]), np.array(["a"]))


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("spherical", [True, False])
def test_each_algorithm_recovers_blobs(algorithm: str, spherical: bool) -> None:
    config = settings(algorithm=algorithm, spherical=spherical)
    centroids = fit_centroids(X, config)
    assert centroids.shape == (4, 16) and centroids.dtype == np.float32
    if spherical:
        np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    labels, _ = assign(X, centroids, spherical)
    assert purity(labels, TRUTH) >= 0.95
    np.testing.assert_array_equal(centroids, fit_centroids(X, config))  # same seed, same centroids


def test_seed_changes_the_sample_and_init() -> None:
    a = fit_centroids(X, settings(k=12, init="random", seed=0))
    b = fit_centroids(X, settings(k=12, init="random", seed=1))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("spherical", [True, False])
def test_chunked_assignment_equals_unchunked_and_brute_force(spherical: bool) -> None:
    centroids = fit_centroids(X, settings(k=6, spherical=spherical))
    labels, distances = assign(X, centroids, spherical, chunk_size=len(X))
    chunked_labels, chunked_distances = assign(X, centroids, spherical, chunk_size=7)
    np.testing.assert_array_equal(labels, chunked_labels)
    np.testing.assert_allclose(distances, chunked_distances, atol=1e-6)
    if spherical:
        brute = 1.0 - X @ centroids.T  # [n, k] cosine distances (both sides unit norm)
    else:
        brute = ((X[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # [n, k] squared L2
    np.testing.assert_array_equal(labels, brute.argmin(1))
    np.testing.assert_allclose(distances, brute.min(1), atol=1e-5)
    per_shard = ShardAssigner(centroids, spherical, chunk_size=5)
    np.testing.assert_array_equal(np.concatenate([per_shard(X[:50])[0], per_shard(X[50:])[0]]), labels)


def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="k=200 clusters need at least k training vectors, got 160"):
        fit_centroids(X, settings(k=200))
    with pytest.raises(ValueError, match="unknown clustering algorithm 'dbscan'"):
        fit_centroids(X, settings(algorithm="dbscan"))
    with pytest.raises(ValueError, match="unknown init"):
        fit_centroids(X, settings(init="forgy"))
    with pytest.raises(ValueError, match="2-D array"):
        fit_centroids(X[0], settings())
    with pytest.raises(ValueError, match="NaN"):
        fit_centroids(np.where(np.arange(16) == 3, np.nan, X), settings())
    centroids = fit_centroids(X, settings())
    with pytest.raises(ValueError, match="do not match centroids of dimension 16"):
        assign(X[:, :8], centroids, spherical=True)
    capped = dataclasses.replace(ALGORITHMS["agglomerative"], max_train_size=50)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ALGORITHMS, "agglomerative", capped)
        with pytest.raises(ValueError, match="at most 50 training vectors, got 160"):
            fit_centroids(X, settings(algorithm="agglomerative"))


def test_cluster_corpus_writes_artifacts_and_resumes(store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    write_embedded_corpus(store, X, TRUTH, [70, 50, 40])
    quality = cluster_corpus(store, settings(chunk_size=16, silhouette_sample=100))
    assignments = load_assignments(store)
    assert assignments["id"].tolist() == [f"doc-{i}" for i in range(len(X))]
    assert list(assignments.columns) == ["id", "cluster", "distance"]
    sizes = load_sizes(store)
    assert sizes["size"].sum() == len(X) and len(sizes) == 4
    assert load_centroids(store).shape == (4, 16)
    assert quality == load_quality(store)
    assert quality["purity"] >= 0.95 and quality["purity_chance"] == 0.25 and quality["n_sources"] == 4
    assert quality["silhouette"] > 0.5 and quality["silhouette_sample"] == 100
    np.testing.assert_allclose(quality["inertia"], assignments["distance"].sum(), rtol=1e-5)

    def no_refit(sample: np.ndarray, config: ClusterSettings) -> np.ndarray:
        raise AssertionError("centroids were refitted")

    monkeypatch.setattr(cluster_module, "fit_centroids", no_refit)
    assert cluster_corpus(store, settings(chunk_size=16, silhouette_sample=100)) == quality  # finished: reused
    # interrupted after fitting, during assignment: the centroids are reused, the assignment redone
    (store.root / "cluster" / "_done" / "_step.json").unlink()
    (store.root / "cluster" / "assignments.parquet").unlink()
    cluster_corpus(store, settings(chunk_size=16, silhouette_sample=100))
    pd.testing.assert_frame_equal(load_assignments(store), assignments)
    with pytest.raises(AssertionError, match="refitted"):  # a changed setting refits
        cluster_corpus(store, settings(chunk_size=16, silhouette_sample=100, n_iter=11))
    write_embedded_corpus(store, X[:120], TRUTH[:120], [60, 40, 20])  # a changed pool refits too
    with pytest.raises(AssertionError, match="refitted"):
        cluster_corpus(store, settings(chunk_size=16, silhouette_sample=100))


def test_cluster_corpus_is_deterministic_and_caps_agglomerative_sample(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ALGORITHMS, "agglomerative", dataclasses.replace(ALGORITHMS["agglomerative"],
                                                                         max_train_size=60))
    runs = []
    for name in ("a", "b"):
        run = RunStore(tmp_path / name)
        write_embedded_corpus(run, X, TRUTH, [100, 60])
        quality = cluster_corpus(run, settings(algorithm="agglomerative", sample_size=150))
        runs.append((load_assignments(run), quality))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0])
    assert runs[0][1]["train_size"] == 60 and runs[0][1]["purity"] >= 0.95


def test_cluster_corpus_rejects_k_above_pool(store: RunStore) -> None:
    write_embedded_corpus(store, X, TRUTH, [160])
    with pytest.raises(ValueError, match="lower k or raise sample_size"):
        cluster_corpus(store, settings(k=500))
    with pytest.raises(FileNotFoundError, match="run quadlib.cluster.cluster_corpus first"):
        load_assignments(store)


def read_pool_sample(pool: Path, per_source: int) -> pd.DataFrame:
    """The first `per_source` documents of every pool file (reading stops early: cheap on gzip)."""
    records = [rec.data for path in sorted(pool.glob("*.jsonl.gz"))
               for rec in itertools.islice(iter_records(path), per_source)]
    return pd.DataFrame(records)[["id", "text", "source"]]


@pytest.mark.shared_data
def test_real_pool_clusters_follow_sources(shared_data: Path, store: RunStore) -> None:
    pool = read_pool_sample(shared_data / "pool", per_source=40)
    write_corpus_shards(store, pool, [len(pool) // 2, len(pool) - len(pool) // 2])
    embed_corpus(store, EmbedSettings(max_seq_length=128))
    n_sources = pool["source"].nunique()
    quality = cluster_corpus(store, ClusterSettings(k=n_sources, seed=0))
    print(f"real pool: {len(pool)} docs, {n_sources} sources, purity {quality['purity']:.3f}, "
          f"chance {quality['purity_chance']:.3f}, silhouette {quality['silhouette']:.3f}")
    assert quality["purity"] >= 3 * quality["purity_chance"]
