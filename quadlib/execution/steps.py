"""The pipeline's per-shard work as `ShardStep`s: thin adapters over the modules that own the science.

Each adapter only moves rows in and out of the owning module's function (`quadlib.embed`,
`quadlib.cluster`, DSIR's hashed n-gram features ...), so the local and Ray executors run exactly
the code the notebooks run. Heavy, step-specific packages (faiss, the proxy, nltk) are imported
by the step that needs them, in its worker.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quadlib.embed import ENCODE_WINDOW_BATCHES, EmbedSettings, ShardEmbedder, embedding_path
from quadlib.execution.step import Resources, ShardStep
from quadlib.runstore import RunStore


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
    worker_state = ("embedder",)

    def __init__(self, settings: EmbedSettings | None = None, *, corpus_step: str = "corpus", name: str = "embed",
                 resources: Resources = Resources()) -> None:
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
        if self.embedder is None:
            self.embedder = ShardEmbedder(self.settings)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        assert self.embedder is not None, "setup() loads the embedder"
        vectors = self.embedder(batch["text"].tolist())  # [B, d]
        return pd.DataFrame({"id": batch["id"], "vector": list(vectors)})


class EmbeddingShardStep(ShardStep):
    """A step over each corpus shard's ids joined with its embedding rows (`vector`), read from
    `quadlib.embed`'s aligned `.npy`; memory per worker is one embedding shard."""

    input_columns = ("id",)
    embed_step: str = "embed"

    def read_input(self, store: RunStore, shard: Path) -> pd.DataFrame:
        frame = super().read_input(store, shard)
        path = embedding_path(store, shard, self.embed_step)
        vectors = np.load(path, mmap_mode="r")  # [n, d]
        if len(vectors) != len(frame):
            raise ValueError(f"{path} has {len(vectors)} rows for {len(frame)} documents in {shard}; "
                             "re-run the embed step")
        return frame.assign(vector=list(np.asarray(vectors)))

    @staticmethod
    def vectors(batch: pd.DataFrame) -> np.ndarray:
        return np.stack(batch["vector"].to_list())  # [B, d]


class AssignStep(EmbeddingShardStep):
    """Nearest-centroid assignment of every document (Quad Sec. 3.2) with `quadlib.cluster.ShardAssigner`.

    The fitted centroids travel with the step (Ray puts them in the object store once) and each
    worker builds its search index once.
    """

    holds_model = True
    worker_state = ("assigner",)

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

    def setup(self) -> None:
        from quadlib.cluster import ShardAssigner

        if self.assigner is None:
            self.assigner = ShardAssigner(self.centroids, self.spherical, self.chunk_size, self.device)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        labels, distances = self.assigner(self.vectors(batch))  # [B], [B]
        return pd.DataFrame({"id": batch["id"], "cluster": labels, "distance": distances})


class ProxyModelStep(ShardStep):
    """A step holding the warmed-up proxy (`<run>/proxy/model`, `quadlib.proxy`), loaded once per worker."""

    holds_model = True

    def __init__(self, model_dir: str | Path, *, max_length: int, batch_size: int, device: str | None,
                 corpus_step: str, name: str, resources: Resources) -> None:
        self.model_dir, self.max_length, self.device = str(model_dir), max_length, device
        self.batch_size, self.input_step, self.name, self.resources = batch_size, corpus_step, name, resources

    def proxy_params(self, store: RunStore) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "proxy_params": upstream_params(store, "proxy"),
                "max_length": self.max_length}

    def load_proxy(self) -> tuple[Any, Any]:
        """(model in eval mode on the step's device, tokenizer with a pad token)."""
        from quadlib.proxy.configs import build_model
        from quadlib.proxy.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.model_dir)
        return build_model(self.model_dir, device=self.device, tokenizer=tokenizer).eval(), tokenizer


class PerplexityStep(ProxyModelStep):
    """Mean token loss of every document under the proxy (the PPL baseline's score): the one framing
    and loss of `quadlib.proxy` (`document_batches`, `document_losses`), as the PPL selector's
    `HFProbeModel.doc_losses` computes it."""

    worker_state = ("model", "tokenizer")

    def __init__(self, model_dir: str | Path, *, max_length: int = 256, batch_size: int = 16,
                 device: str | None = None, corpus_step: str = "corpus", name: str = "perplexity",
                 resources: Resources = Resources()) -> None:
        super().__init__(model_dir, max_length=max_length, batch_size=batch_size, device=device,
                         corpus_step=corpus_step, name=name, resources=resources)
        self.model: Any = None
        self.tokenizer: Any = None

    def params(self, store: RunStore) -> dict[str, Any]:
        return self.proxy_params(store)

    def setup(self) -> None:
        if self.model is None:
            self.model, self.tokenizer = self.load_proxy()

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        from quadlib.proxy import document_batches, document_losses

        device = next(self.model.parameters()).device
        losses = []
        with torch.no_grad():
            for docs in document_batches(self.tokenizer, batch["text"].tolist(), self.max_length, self.batch_size):
                docs = {k: v.to(device) for k, v in docs.items()}
                losses.append(document_losses(self.model, docs).float().cpu().numpy())  # [B]
        return pd.DataFrame({"id": batch["id"], "loss": np.concatenate(losses).astype(np.float64)})


class InfluenceStep(ProxyModelStep):
    """Influence of every document on the reference (Quad Sec. 3.1) with
    `quadlib.influence.scorer.InfluenceScorer`; each worker loads the proxy and the fitted
    estimator (curvature + preconditioned reference direction, safetensors) once."""

    worker_state = ("scorer",)

    def __init__(self, model_dir: str | Path, estimator_state: str | Path, *, estimator: str = "kfac_joint_qkv",
                 preset: str = "default", max_length: int = 128, batch_size: int = 16, device: str | None = None,
                 corpus_step: str = "corpus", name: str = "influence-scores",
                 resources: Resources = Resources()) -> None:
        super().__init__(model_dir, max_length=max_length, batch_size=batch_size, device=device,
                         corpus_step=corpus_step, name=name, resources=resources)
        self.estimator_state, self.estimator, self.preset = str(estimator_state), estimator, preset
        self.scorer: Any = None

    def params(self, store: RunStore) -> dict[str, Any]:
        state = hashlib.sha256(Path(self.estimator_state).read_bytes()).hexdigest()
        return self.proxy_params(store) | {"estimator": self.estimator, "preset": self.preset, "state_sha256": state}

    def setup(self) -> None:
        from quadlib.influence.estimators import PRESETS, make_estimator
        from quadlib.influence.scorer import InfluenceScorer

        if self.scorer is None:
            model, tokenizer = self.load_proxy()
            estimator = make_estimator(self.estimator, PRESETS[self.preset])
            self.scorer = InfluenceScorer(model, tokenizer, estimator, max_length=self.max_length,
                                          batch_size=self.batch_size, device=self.device)
            estimator.load(model, self.estimator_state)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"id": batch["id"], "score": self.scorer.score_texts(batch["text"].tolist())})


class DsirFeatureStep(ShardStep):
    """DSIR's hashed n-gram counts per document (Xie et al. 2023), via the `data-selection` package.

    Stored sparse (`buckets`, `counts`), since a document touches a few hundred of the buckets;
    importance weights are a dot product of these counts with log(p_target / p_raw).
    """

    worker_state = ("count_ngrams",)

    def __init__(self, *, ngrams: int = 2, num_buckets: int = 10_000, corpus_step: str = "corpus",
                 name: str = "dsir-features", resources: Resources = Resources()) -> None:
        if ngrams < 1 or num_buckets < 1:
            raise ValueError(f"ngrams and num_buckets must be >= 1, got {ngrams}, {num_buckets}")
        self.ngrams, self.num_buckets = ngrams, num_buckets
        self.input_step, self.name, self.resources = corpus_step, name, resources
        self.count_ngrams: Any = None  # data_selection's get_ngram_counts (nltk), imported by setup()

    def setup(self) -> None:
        from data_selection.hashed_ngram_dsir import get_ngram_counts

        self.count_ngrams = get_ngram_counts

    def params(self, store: RunStore) -> dict[str, Any]:
        return {"ngrams": self.ngrams, "num_buckets": self.num_buckets, "tokenizer": "wordpunct",
                "corpus_params": upstream_params(store, self.input_step)}

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        buckets, counts = [], []
        for text in batch["text"]:
            dense = self.count_ngrams(text, n=self.ngrams, num_buckets=self.num_buckets)  # [num_buckets]
            nonzero = np.flatnonzero(dense)
            buckets.append(nonzero.astype(np.int32))
            counts.append(dense[nonzero].astype(np.int32))
        return pd.DataFrame({"id": batch["id"], "buckets": buckets, "counts": counts})

