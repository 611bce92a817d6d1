"""Embeddings: normalisation, row alignment with corpus shards, resume after an interruption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import quadlib.embed as embed_module
from cluster_fixtures import write_corpus_shards
from quadlib.embed import (EmbedSettings, ShardEmbedder, embed_corpus, embedding_path, load_embeddings,
                           resolve_model)
from quadlib.runstore import RunStore

SETTINGS = EmbedSettings(max_seq_length=32, batch_size=4)
TEXTS = ["The cat sat on the mat.", "A kitten sleeps on a rug.", "Stock markets fell sharply on Monday.",
         "def add(a, b): return a + b", "Shares dropped as investors sold.", "The dog chased the ball.",
         "Rain is expected tomorrow.", "Parliament passed the budget bill."]


@pytest.fixture(scope="module")
def embedder() -> ShardEmbedder:
    return ShardEmbedder(SETTINGS)


def corpus_frame() -> pd.DataFrame:
    return pd.DataFrame({"id": [f"d{i}" for i in range(len(TEXTS))], "text": TEXTS, "source": ["s"] * len(TEXTS)})


def test_default_model_resolves_to_bundled_copy() -> None:
    assert (Path(resolve_model("all-MiniLM-L6-v2")) / "modules.json").exists()
    assert resolve_model("BAAI/bge-large-en-v1.5") == "BAAI/bge-large-en-v1.5"


def test_vectors_are_unit_norm_float32_and_semantic(embedder: ShardEmbedder) -> None:
    x = embedder(TEXTS[:3])
    assert x.dtype == np.float32 and x.shape == (3, embedder.dim) == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    cos = x @ x.T
    assert cos[0, 1] > cos[0, 2]  # cat ~ kitten, not stock markets
    assert embedder([]).shape == (0, 384)


def test_shards_are_row_aligned(store: RunStore, embedder: ShardEmbedder) -> None:
    write_corpus_shards(store, corpus_frame(), [5, 3])
    paths = embed_corpus(store, SETTINGS)
    assert [p.name for p in paths] == ["shard-00000.npy", "shard-00001.npy"]
    assert [len(np.load(p)) for p in paths] == [5, 3]
    ids, x = load_embeddings(store)
    assert ids == [f"d{i}" for i in range(len(TEXTS))]
    one_by_one = np.concatenate([embedder([t]) for t in TEXTS])
    np.testing.assert_allclose(x, one_by_one, atol=1e-4)


def test_resume_recomputes_only_the_unfinished_shard(store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    write_corpus_shards(store, corpus_frame(), [3, 3, 2])
    embed_corpus(store, SETTINGS)
    first = embedding_path(store, store.shards("corpus")[0])
    first_mtime = first.stat().st_mtime_ns
    # simulate a run killed while embedding the last shard: its marker and file never got written
    (store.root / "embed" / "_done" / "shard-00002.json").unlink()
    (store.root / "embed" / "_done" / "_step.json").unlink()
    embedding_path(store, store.shards("corpus")[2]).unlink()
    embedded: list[str] = []
    original = ShardEmbedder.__call__
    monkeypatch.setattr(ShardEmbedder, "__call__", lambda self, texts: embedded.extend(texts) or original(self, texts))
    embed_corpus(store, SETTINGS)
    assert embedded == TEXTS[6:]
    assert first.stat().st_mtime_ns == first_mtime
    assert len(load_embeddings(store)[0]) == len(TEXTS)
    # a finished step does not even load the model
    monkeypatch.setattr(embed_module, "load_embedder", lambda s: pytest.fail("model loaded for a finished step"))
    embed_corpus(store, SETTINGS)


def test_changed_shard_ids_are_reembedded(store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    write_corpus_shards(store, corpus_frame(), [4, 4])
    embed_corpus(store, SETTINGS)
    changed = corpus_frame()
    changed.loc[0, "id"] = "renamed"
    write_corpus_shards(store, changed, [4, 4])  # re-ingested with the same settings, different rows
    embedded: list[str] = []
    original = ShardEmbedder.__call__
    monkeypatch.setattr(ShardEmbedder, "__call__", lambda self, texts: embedded.extend(texts) or original(self, texts))
    embed_corpus(store, SETTINGS)
    assert embedded == TEXTS[:4]
    assert load_embeddings(store)[0][0] == "renamed"
    embedded.clear()
    embed_corpus(store, SETTINGS, recompute=True)
    assert embedded == TEXTS


def test_bad_inputs_give_clear_errors(store: RunStore) -> None:
    with pytest.raises(FileNotFoundError, match="ingest the corpus"):
        embed_corpus(store, SETTINGS)
    frame = corpus_frame()
    frame["text"] = frame["text"].astype(object)
    frame.loc[2, "text"] = None
    write_corpus_shards(store, frame.assign(text=frame["text"].fillna("")), [8])
    with pytest.raises(FileNotFoundError, match="run quadlib.embed.embed_corpus"):
        load_embeddings(store)
    pd.DataFrame({"id": frame["id"], "text": frame["text"]}).to_parquet(store.shards("corpus")[0])
    with pytest.raises(ValueError, match=r"shard-00000.parquet: 1 row\(s\) without a text.*'d2'"):
        embed_corpus(store, SETTINGS)
    with pytest.raises(ValueError, match="max_seq_length"):
        ShardEmbedder(EmbedSettings(max_seq_length=0))


def test_misaligned_embedding_shard_is_rejected(store: RunStore) -> None:
    write_corpus_shards(store, corpus_frame(), [8])
    np.save(embedding_path(store, store.shards("corpus")[0]), np.zeros((7, 4), np.float32))
    store.mark_done("embed", "shard-00000")
    with pytest.raises(ValueError, match="7 rows but .* 8 documents"):
        load_embeddings(store)


def test_long_texts_are_read_only_as_far_as_the_cap_and_vectors_match_encode(
        embedder: ShardEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's preprocessing sees a long text cut at a whitespace after CHARS_PER_TOKEN x max_seq_length
    characters (encode hands it the whole text); a cut that would leave fewer tokens than the cap (a long run
    of spaces, a text without whitespace) falls back to the whole text. Vectors equal encode's in input order:
    only batch composition differs (float32 GEMM blocking; a unit vector's components after six layers agree
    to well under 1e-5)."""
    long_texts = ["Stock markets fell sharply on Monday as investors sold. " * 60, " " * 600 + "A kitten sleeps.",
                  "x" * 900, TEXTS[0], "The dog chased the ball across the wide green park. " * 40, TEXTS[3]]
    limit = embed_module.CHARS_PER_TOKEN * SETTINGS.max_seq_length
    seen: list[str] = []
    preprocess = embedder.model.preprocess
    monkeypatch.setattr(embedder.model, "preprocess", lambda texts, *a, **k: seen.extend(texts) or preprocess(texts, *a, **k))
    ours = embedder(long_texts)
    assert max(len(t) for t in seen if "Stock" in t or "dog" in t) <= limit
    assert {t for t in seen if len(t) > limit} == {long_texts[1], long_texts[2]}
    monkeypatch.undo()
    theirs = embedder.model.encode(long_texts, batch_size=SETTINGS.batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
