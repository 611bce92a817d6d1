"""Clustering of the candidate pool (Quad, Sec. 3: the pool is split into clusters that the
multi-armed bandit treats as arms; the paper uses k-means with k = 10,000 on BGE embeddings).

Every algorithm fits centroids on a seeded sample of the pool, then the whole pool is assigned to
its nearest centroid in chunks, so memory is bounded by one chunk (and one memory-mapped embedding
shard), not by the pool. A new algorithm is one `ALGORITHMS` entry; the Fig. 5c ablation compares
`faiss_kmeans`, `minibatch_kmeans` and `agglomerative`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from quadlib.embed import EmbeddingShard, embedding_shards, ids_digest
from quadlib.runstore import RunStore, atomic_path, write_json_atomic
from quadlib.settings import setting

INITS = ("k-means++", "random")


@dataclass
class ClusterSettings:
    k: int = setting(10_000, "number of clusters (the Quad paper uses 10,000)")
    algorithm: str = setting("faiss_kmeans", "a key of quadlib.cluster.ALGORITHMS: faiss_kmeans, "
                             "minibatch_kmeans, agglomerative")
    spherical: bool = setting(True, "cosine geometry: unit-norm centroids, nearest = highest cosine "
                              "(the embeddings are L2-normalised); False uses squared Euclidean distance")
    sample_size: int = setting(100_000, "vectors drawn (seeded) to fit the centroids; the whole pool is "
                               "then assigned. Agglomerative caps it at its own limit (O(n^2) memory)")
    chunk_size: int = setting(65_536, "vectors assigned per step; bounds assignment memory")
    n_iter: int = setting(20, "k-means iterations (MiniBatchKMeans: passes over the sample)")
    init: str = setting("k-means++", "centroid initialisation for the k-means algorithms: 'k-means++' or 'random'")
    n_init: int = setting(1, "k-means restarts from different seeds; the run with the best objective is kept "
                          "(k-means finds local optima: two centroids can share one true cluster)")
    minibatch_size: int = setting(4096, "MiniBatchKMeans batch size")
    linkage: str = setting("ward", "agglomerative linkage: ward, average, complete or single")
    silhouette_sample: int = setting(5_000, "documents (seeded sample) scored by the silhouette coefficient")
    seed: int = setting(0, "seed of the samples and of the algorithms; same seed, same clusters")
    device: str | None = setting(None, "'cpu' keeps faiss on the cpu; None uses a faiss GPU index when "
                                 "faiss has GPU support and cuda is present")


# -- algorithms ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterAlgorithm:
    """How to fit centroids `[k, d]` on a training sample `[n, d]`."""

    fit: Callable[[np.ndarray, ClusterSettings], np.ndarray]
    max_train_size: int | None  # a cap for methods whose cost grows faster than n
    description: str


def faiss_gpu_available(device: str | None = None) -> bool:
    """True when faiss was built with GPU support, a GPU is visible and `device` does not say cpu."""
    if device is not None and not device.startswith("cuda"):
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


def _fit_faiss_kmeans(sample: np.ndarray, settings: ClusterSettings) -> np.ndarray:
    n, d = sample.shape
    init = {"k-means++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
            "random": faiss.ClusteringInitMethod_RANDOM}[settings.init]
    kmeans = faiss.Kmeans(d, settings.k, niter=settings.n_iter, nredo=settings.n_init, seed=settings.seed,
                          spherical=settings.spherical,
                          init_method=init, gpu=faiss_gpu_available(settings.device), verbose=False,
                          # our sample_size is the one knob: faiss must neither subsample nor warn
                          max_points_per_centroid=max(256, math.ceil(n / settings.k)), min_points_per_centroid=1)
    kmeans.train(sample)
    return kmeans.centroids  # [k, d]


def _fit_minibatch_kmeans(sample: np.ndarray, settings: ClusterSettings) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(n_clusters=settings.k, init=settings.init, n_init=settings.n_init, max_iter=settings.n_iter,
                            batch_size=settings.minibatch_size, random_state=settings.seed, compute_labels=False)
    model.fit(_unit_rows(sample) if settings.spherical else sample)
    return model.cluster_centers_  # [k, d]


def _fit_agglomerative(sample: np.ndarray, settings: ClusterSettings) -> np.ndarray:
    """Centroids are the member means of each agglomerative cluster (Ward merges minimise variance)."""
    from sklearn.cluster import AgglomerativeClustering

    metric = "euclidean" if settings.linkage == "ward" or not settings.spherical else "cosine"
    points = _unit_rows(sample) if settings.spherical else sample
    labels = AgglomerativeClustering(n_clusters=settings.k, linkage=settings.linkage, metric=metric).fit_predict(points)
    return member_means(points, labels, settings.k)


ALGORITHMS: dict[str, ClusterAlgorithm] = {
    "faiss_kmeans": ClusterAlgorithm(_fit_faiss_kmeans, None, "faiss k-means (GPU index when available)"),
    "minibatch_kmeans": ClusterAlgorithm(_fit_minibatch_kmeans, None, "scikit-learn MiniBatchKMeans"),
    "agglomerative": ClusterAlgorithm(_fit_agglomerative, 20_000,
                                      "scikit-learn agglomerative clustering on a sample, centroids = member means"),
}


def member_means(points: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean vector of each label's members `[k, d]`; a label without members gets a zero row."""
    sums = np.zeros((k, points.shape[1]), dtype=np.float64)  # [k, d]
    np.add.at(sums, labels, points)
    counts = np.bincount(labels, minlength=k)[:, None]  # [k, 1]
    return (sums / np.maximum(counts, 1)).astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [n, 1]
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _check_vectors(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{what} must be a 2-D array [n, d] with d > 0, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{what} must be numeric, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values; re-embed the affected shard")
    return x


def check_settings(settings: ClusterSettings) -> ClusterAlgorithm:
    """The settings' algorithm, after checking the values no algorithm could use."""
    if settings.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown clustering algorithm {settings.algorithm!r}; known: {sorted(ALGORITHMS)}")
    if settings.init not in INITS:
        raise ValueError(f"unknown init {settings.init!r}; use one of {INITS}")
    for name in ("k", "sample_size", "chunk_size", "n_iter", "n_init", "minibatch_size", "silhouette_sample"):
        if getattr(settings, name) < 1:
            raise ValueError(f"ClusterSettings.{name} must be >= 1, got {getattr(settings, name)}")
    return ALGORITHMS[settings.algorithm]


def fit_centroids(sample: np.ndarray, settings: ClusterSettings) -> np.ndarray:
    """Centroids `[k, d]` (float32, unit-norm when spherical) fitted on `sample` `[n, d]`."""
    algorithm = check_settings(settings)
    sample = _check_vectors(sample, "training sample")
    n = sample.shape[0]
    if settings.k > n:
        raise ValueError(f"k={settings.k} clusters need at least k training vectors, got {n}; "
                         "lower k or raise sample_size")
    if algorithm.max_train_size is not None and n > algorithm.max_train_size:
        raise ValueError(f"{settings.algorithm} accepts at most {algorithm.max_train_size} training vectors, "
                         f"got {n}; lower sample_size")
    centroids = np.asarray(algorithm.fit(sample, settings), dtype=np.float32)  # [k, d]
    return _unit_rows(centroids) if settings.spherical else centroids


# -- assignment ------------------------------------------------------------------------------------
class ShardAssigner:
    """Nearest-centroid assignment with the centroids held once (broadcast to each executor worker).

    Distances are cosine distances (1 - cos) when spherical, else squared Euclidean; summed over
    the pool they are the clustering's inertia.
    """

    def __init__(self, centroids: np.ndarray, spherical: bool, chunk_size: int = 65_536,
                 device: str | None = None) -> None:
        centroids = _check_vectors(centroids, "centroids")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.spherical = spherical
        self.chunk_size = chunk_size
        self.dim = centroids.shape[1]
        index = faiss.IndexFlatIP(self.dim) if spherical else faiss.IndexFlatL2(self.dim)
        index.add(_unit_rows(centroids) if spherical else centroids)
        self.index = faiss.index_cpu_to_all_gpus(index) if faiss_gpu_available(device) else index

    def __call__(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 `[n]`, distances float32 `[n]`) for `vectors` `[n, d]`, one chunk at a time."""
        if np.ndim(vectors) != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {np.shape(vectors)} do not match centroids of dimension {self.dim}; "
                             "embed and cluster with the same model")
        n = vectors.shape[0]
        labels = np.empty(n, dtype=np.int64)
        distances = np.empty(n, dtype=np.float32)
        for start in range(0, n, self.chunk_size):
            chunk = _check_vectors(vectors[start:start + self.chunk_size], "vectors")  # [c, d]
            if self.spherical:
                chunk = _unit_rows(chunk)
            scores, nearest = self.index.search(chunk, 1)  # [c, 1] each
            labels[start:start + len(chunk)] = nearest[:, 0]
            distances[start:start + len(chunk)] = 1.0 - scores[:, 0] if self.spherical else scores[:, 0]
        return labels, distances


def assign(vectors: np.ndarray, centroids: np.ndarray, spherical: bool,
           chunk_size: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and its distance for every row of `vectors` `[n, d]`."""
    return ShardAssigner(centroids, spherical, chunk_size)(vectors)


# -- quality ----------------------------------------------------------------------------------------
def purity(labels: np.ndarray, sources: np.ndarray | list[str]) -> float:
    """Share of documents whose cluster's majority source is their own source (1 = pure clusters)."""
    labels = np.asarray(labels)
    sources = np.asarray(sources)
    if labels.shape != sources.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and sources {sources.shape} must be 1-D and of equal length")
    if labels.size == 0:
        raise ValueError("purity of an empty clustering is undefined")
    counts = pd.crosstab(labels, sources)  # [clusters, sources]
    return float(counts.max(axis=1).sum() / labels.size)


def majority_share(sources: np.ndarray | list[str]) -> float:
    """Purity of putting everything in one cluster: the share of the largest source (chance level)."""
    return float(pd.Series(np.asarray(sources)).value_counts(normalize=True).iloc[0])


def _silhouette(vectors: np.ndarray, labels: np.ndarray, spherical: bool) -> float | None:
    """Silhouette coefficient, or None when it is undefined (fewer than 2 or n clusters present)."""
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        return None
    return float(silhouette_score(vectors, labels, metric="cosine" if spherical else "euclidean"))


# -- the run step -----------------------------------------------------------------------------------
def _sample_indices(n_total: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample without replacement (all positions when size >= n_total)."""
    if size >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=size, replace=False))


def _gather_rows(shards: list[EmbeddingShard], positions: np.ndarray) -> np.ndarray:
    """Rows at global `positions` (sorted) across memory-mapped shards, as one array `[m, d]`."""
    parts, offset = [], 0
    for shard in shards:
        vectors = shard.vectors()  # [n_shard, d], memory-mapped
        local = positions[(positions >= offset) & (positions < offset + len(vectors))] - offset
        parts.append(np.asarray(vectors[local], dtype=np.float32))
        offset += len(vectors)
    return np.concatenate(parts)


def _corpus_sources(store: RunStore, corpus_step: str) -> np.ndarray | None:
    """The `source` column of the corpus in shard order, or None when the corpus has none."""
    shards = store.shards(corpus_step)
    if not all("source" in pq.read_schema(shard).names for shard in shards):
        return None
    return np.concatenate([pd.read_parquet(shard, columns=["source"])["source"].astype(str).to_numpy()
                           for shard in shards])


def cluster_corpus(store: RunStore, settings: ClusterSettings, embed_step: str = "embed", out_step: str = "cluster",
                   recompute: bool = False, corpus_step: str = "corpus") -> dict[str, Any]:
    """Fit centroids on a sample, assign every document, write the step's artifacts; returns quality.

    Artifacts: `assignments.parquet` (id, cluster, distance), `centroids.npy` `[k, d]`,
    `sizes.parquet` (cluster, size), `quality.json`. Fitted centroids carry their own marker, so a
    run interrupted during assignment does not refit. The step's parameters include a digest of the
    pool's ids, so a changed pool is re-clustered instead of reusing stale assignments.
    """
    check_settings(settings)
    shards = embedding_shards(store, embed_step, corpus_step)
    params = clustering_params(store, settings, shards, embed_step)
    if store.begin(out_step, params, seed=settings.seed, recompute=recompute):
        return load_quality(store, out_step)
    out = store.step_dir(out_step)
    if not store.is_done(out_step, "centroids"):
        centroids, fit_info = fit_sample_centroids(shards, settings)  # [k, d]
        save_centroids(store, out_step, centroids, fit_info)
    centroids = np.load(out / "centroids.npy")

    assigner = ShardAssigner(centroids, settings.spherical, settings.chunk_size, settings.device)
    start = perf_counter()
    labels, distances = [], []
    for shard in tqdm(shards, desc="assign", unit="shard"):
        shard_labels, shard_distances = assigner(shard.vectors())
        labels.append(shard_labels)
        distances.append(shard_distances)
    assign_seconds = perf_counter() - start
    labels_all, distances_all = np.concatenate(labels), np.concatenate(distances)  # [n] each
    return write_clustering(store, settings, shards, labels_all, distances_all, assign_seconds, out_step, corpus_step)


def clustering_params(store: RunStore, settings: ClusterSettings, shards: list[EmbeddingShard],
                      embed_step: str = "embed") -> dict[str, Any]:
    """The clustering step's parameters: settings, embeddings' provenance and a digest of the pool's ids,
    so a changed pool is re-clustered instead of reusing stale assignments."""
    embed_config = store.read_config(embed_step)
    return {"cluster": settings, "embed_step": embed_step,
            "embed_params": embed_config.get("params") if embed_config else None,
            "ids_sha256": ids_digest([doc_id for shard in shards for doc_id in shard.ids])}


def fit_sample_centroids(shards: list[EmbeddingShard], settings: ClusterSettings) -> tuple[np.ndarray, dict[str, Any]]:
    """Centroids `[k, d]` fitted on the seeded sample of the embeddings (capped by the algorithm's
    limit), and the fit's facts (train_size, fit_seconds). Never holds more than the sample."""
    algorithm = check_settings(settings)
    n_total = sum(len(shard.ids) for shard in shards)
    train_size = min(settings.sample_size, n_total, algorithm.max_train_size or n_total)
    sample = _gather_rows(shards, _sample_indices(n_total, train_size, settings.seed))  # [m, d]
    start = perf_counter()
    centroids = fit_centroids(sample, settings)  # [k, d]
    return centroids, {"train_size": train_size, "fit_seconds": perf_counter() - start}


def save_centroids(store: RunStore, out_step: str, centroids: np.ndarray, fit_info: dict[str, Any]) -> None:
    """Write `<run>/<out_step>/centroids.npy` `[k, d]` and its own marker (a rerun does not refit)."""
    with atomic_path(store.step_dir(out_step) / "centroids.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, centroids)
    store.mark_done(out_step, "centroids", fit_info)


def write_clustering(store: RunStore, settings: ClusterSettings, shards: list[EmbeddingShard], labels_all: np.ndarray,
                     distances_all: np.ndarray, assign_seconds: float, out_step: str = "cluster",
                     corpus_step: str = "corpus") -> dict[str, Any]:
    """Write the clustering's artifacts from every document's label and distance (`[n]` each, in shard
    order) and mark the step done; the centroids must be saved already. Whoever assigned the documents
    (`cluster_corpus` in one process, or the scale-out's per-shard assign step on an executor), the
    readers (`load_assignments` ...) find the same files. Returns the quality figures."""
    out = store.step_dir(out_step)
    n_total = len(labels_all)
    fit_info = store.done_info(out_step, "centroids")
    assignments = pd.DataFrame({"id": [doc_id for shard in shards for doc_id in shard.ids],
                                "cluster": labels_all, "distance": distances_all})
    if len(assignments) != n_total:
        raise ValueError(f"{out}: {n_total} labels for {len(assignments)} embedded documents; re-run the assignment")
    sizes = np.bincount(labels_all, minlength=settings.k)  # [k]
    with atomic_path(out / "assignments.parquet") as tmp:
        assignments.to_parquet(tmp, index=False)
    with atomic_path(out / "sizes.parquet") as tmp:
        pd.DataFrame({"cluster": np.arange(settings.k), "size": sizes}).to_parquet(tmp, index=False)

    silhouette_positions = _sample_indices(n_total, settings.silhouette_sample, settings.seed + 1)
    quality: dict[str, Any] = {
        "algorithm": settings.algorithm, "k": settings.k, "n_docs": n_total,
        "train_size": fit_info["train_size"], "fit_seconds": fit_info["fit_seconds"],
        "assign_seconds": assign_seconds,
        "distance": "cosine distance (1 - cos)" if settings.spherical else "squared euclidean",
        "inertia": float(distances_all.sum(dtype=np.float64)),
        "mean_distance": float(distances_all.mean(dtype=np.float64)),
        "silhouette": _silhouette(_gather_rows(shards, silhouette_positions), labels_all[silhouette_positions],
                                  settings.spherical),
        "silhouette_sample": len(silhouette_positions),
        "n_empty_clusters": int((sizes == 0).sum()), "largest_cluster": int(sizes.max()),
    }
    sources = _corpus_sources(store, corpus_step)
    if sources is not None:
        quality.update(purity=purity(labels_all, sources), purity_chance=majority_share(sources),
                       n_sources=int(len(np.unique(sources))))
    write_json_atomic(out / "quality.json", quality)
    store.mark_done(out_step, info={"n_docs": n_total})
    return quality


# -- loaders ----------------------------------------------------------------------------------------
def _finished_artifact(store: RunStore, step: str, name: str) -> Path:
    path = store.root / step / name
    if not (store.is_done(step) and path.exists()):
        raise FileNotFoundError(f"{path} is missing or unfinished; run quadlib.cluster.cluster_corpus first")
    return path


def load_assignments(store: RunStore, step: str = "cluster") -> pd.DataFrame:
    """Columns id, cluster, distance: one row per document of the pool."""
    return pd.read_parquet(_finished_artifact(store, step, "assignments.parquet"))


def load_centroids(store: RunStore, step: str = "cluster") -> np.ndarray:
    """The fitted centroids `[k, d]`."""
    return np.load(_finished_artifact(store, step, "centroids.npy"))


def load_sizes(store: RunStore, step: str = "cluster") -> pd.DataFrame:
    """Columns cluster, size (empty clusters included)."""
    return pd.read_parquet(_finished_artifact(store, step, "sizes.parquet"))


def load_quality(store: RunStore, step: str = "cluster") -> dict[str, Any]:
    """The quality figures written by `cluster_corpus`."""
    return json.loads(_finished_artifact(store, step, "quality.json").read_text(encoding="utf-8"))
