"""The pipeline's per-shard work as `ShardStep`s: thin adapters over the modules that own the science.

Each adapter only moves rows in and out of the owning module's function (`quadlib.embed`,
`quadlib.cluster`, DSIR's hashed n-gram features ...), so the local and Ray executors run exactly
the code the notebooks run. `STEPS` names them for configs and the CLI.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from quadlib.execution.step import Resources, ShardStep
from quadlib.runstore import RunStore

if TYPE_CHECKING:  # quadlib.embed imports torch: a worker imports it only for the steps that use it
    from quadlib.embed import EmbedSettings, ShardEmbedder


def upstream_params(store: RunStore, step: str) -> Any:
    """The stored parameters of an upstream step (None when it has no config), for provenance."""
    config = store.read_config(step)
    return config.get("params") if config else None


class EmbedStep(ShardStep):
    """Document embeddings (Quad Sec. 3.2) with `quadlib.embed.ShardEmbedder`, one model per worker.

    Writes `quadlib.embed`'s own artifacts (`<run>/embed/shard-XXXXX.npy` with its markers and
    config), so `embed_corpus` and this step resume each other and `quadlib.cluster` reads either.
    """

    holds_model = True
    output_format = "npy"

    def __init__(self, settings: EmbedSettings | None = None, *, corpus_step: str = "corpus", name: str = "embed",
                 resources: Resources = Resources()) -> None:
        from quadlib.embed import ENCODE_WINDOW_BATCHES, EmbedSettings

        self.settings = settings or EmbedSettings()
        self.input_step, self.name, self.resources = corpus_step, name, resources
        # the same texts per encode call as embed_corpus, so both pad and sort alike
        self.batch_size = self.settings.batch_size * ENCODE_WINDOW_BATCHES
        self.embedder: ShardEmbedder | None = None

    def params(self, store: RunStore) -> dict[str, Any]:
        # the same config embed_corpus writes, so either can finish a run the other started
        return {"embed": self.settings.result_params(), "corpus_step": self.input_step,
                "corpus_params": upstream_params(store, self.input_step)}

    def setup(self) -> None:
        from quadlib.embed import ShardEmbedder

        if self.embedder is None:
            self.embedder = ShardEmbedder(self.settings)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        assert self.embedder is not None, "setup() loads the embedder"
        vectors = self.embedder(batch["text"].tolist())  # [B, d]
        return pd.DataFrame({"id": batch["id"], "vector": list(vectors)})


class AssignStep(ShardStep):
    """Nearest-centroid assignment of every document (Quad Sec. 3.2) with `quadlib.cluster.ShardAssigner`.

    The fitted centroids travel with the step (Ray puts them in the object store once) and each
    worker builds its search index once; memory per worker is one embedding shard plus the index.
    """

    holds_model = True
    input_columns = ("id",)

    def __init__(self, centroids: np.ndarray, *, spherical: bool = True, chunk_size: int = 65_536,
                 device: str | None = None, embed_step: str = "embed", corpus_step: str = "corpus",
                 name: str = "cluster-assign", resources: Resources = Resources()) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)  # [k, d]
        self.spherical, self.chunk_size, self.device = spherical, chunk_size, device
        self.embed_step, self.input_step, self.name, self.resources = embed_step, corpus_step, name, resources
        self.assigner: Any = None  # quadlib.cluster.ShardAssigner, built by setup()

    def params(self, store: RunStore) -> dict[str, Any]:
        return {"centroids_sha256": hashlib.sha256(self.centroids.tobytes()).hexdigest(),
                "k": int(self.centroids.shape[0]), "spherical": self.spherical, "embed_step": self.embed_step,
                "embed_params": upstream_params(store, self.embed_step)}

    def read_input(self, store: RunStore, shard: Path) -> pd.DataFrame:
        from quadlib.embed import embedding_path

        frame = super().read_input(store, shard)
        vectors = np.load(embedding_path(store, shard, self.embed_step), mmap_mode="r")  # [n, d]
        if len(vectors) != len(frame):
            raise ValueError(f"{embedding_path(store, shard, self.embed_step)} has {len(vectors)} rows for "
                             f"{len(frame)} documents in {shard}; re-run the embed step")
        return frame.assign(vector=list(np.asarray(vectors)))

    def setup(self) -> None:
        from quadlib.cluster import ShardAssigner

        if self.assigner is None:
            self.assigner = ShardAssigner(self.centroids, self.spherical, self.chunk_size, self.device)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        labels, distances = self.assigner(np.stack(batch["vector"].to_list()))  # [B], [B]
        return pd.DataFrame({"id": batch["id"], "cluster": labels, "distance": distances})


class DsirFeatureStep(ShardStep):
    """DSIR's hashed n-gram counts per document (Xie et al. 2023), via the `data-selection` package.

    Stored sparse (`buckets`, `counts`), since a document touches a few hundred of the buckets;
    importance weights are a dot product of these counts with log(p_target / p_raw).
    """

    def __init__(self, *, ngrams: int = 2, num_buckets: int = 10_000, corpus_step: str = "corpus",
                 name: str = "dsir-features", resources: Resources = Resources()) -> None:
        if ngrams < 1 or num_buckets < 1:
            raise ValueError(f"ngrams and num_buckets must be >= 1, got {ngrams}, {num_buckets}")
        self.ngrams, self.num_buckets = ngrams, num_buckets
        self.input_step, self.name, self.resources = corpus_step, name, resources

    def params(self, store: RunStore) -> dict[str, Any]:
        return {"ngrams": self.ngrams, "num_buckets": self.num_buckets, "tokenizer": "wordpunct",
                "corpus_params": upstream_params(store, self.input_step)}

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        from data_selection.hashed_ngram_dsir import get_ngram_counts

        buckets, counts = [], []
        for text in batch["text"]:
            dense = get_ngram_counts(text, n=self.ngrams, num_buckets=self.num_buckets)  # [num_buckets]
            nonzero = np.flatnonzero(dense)
            buckets.append(nonzero.astype(np.int32))
            counts.append(dense[nonzero].astype(np.int32))
        return pd.DataFrame({"id": batch["id"], "buckets": buckets, "counts": counts})
