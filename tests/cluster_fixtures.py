"""Synthetic inputs for the embedding and clustering tests: corpus shards and Gaussian blobs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from quadlib.embed import embedding_path
from quadlib.runstore import RunStore


def write_corpus_shards(store: RunStore, frame: pd.DataFrame, shard_sizes: list[int], step: str = "corpus") -> None:
    """Split `frame` (columns id, text, source) into corpus shards of the given sizes, in order, and
    mark the step finished, as `quadlib.corpus.ingest` would (later steps refuse an unfinished one)."""
    assert sum(shard_sizes) == len(frame)
    start = 0
    for i, size in enumerate(shard_sizes):
        part = frame.iloc[start:start + size].reset_index(drop=True)
        part = part.assign(n_chars=part["text"].str.len(), n_tokens=part["text"].str.split().str.len())
        part.to_parquet(store.step_dir(step) / f"shard-{i:05d}.parquet", index=False)
        start += size
    store.mark_done(step, info={"documents": len(frame)})


def blobs(n_per_blob: int, n_blobs: int, dim: int, seed: int, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `n_blobs` random directions `[n, dim]`, and each vector's blob id `[n]`."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(n_blobs), n_per_blob)
    x = centres[truth] + spread * rng.normal(size=(len(truth), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth


def write_embedded_corpus(store: RunStore, vectors: np.ndarray, sources: np.ndarray, shard_sizes: list[int]) -> None:
    """A corpus with precomputed embeddings, as if `embed_corpus` had run (no model needed)."""
    frame = pd.DataFrame({"id": [f"doc-{i}" for i in range(len(vectors))],
                          "text": [f"text {i}" for i in range(len(vectors))],
                          "source": [f"src{s}" for s in sources]})
    write_corpus_shards(store, frame, shard_sizes)
    start = 0
    for shard in store.shards("corpus"):
        n = len(pd.read_parquet(shard, columns=["id"]))
        np.save(embedding_path(store, shard), vectors[start:start + n])
        store.mark_done("embed", shard.stem, {"rows": n})
        start += n
    store.mark_done("embed")
