"""Splits nothing leaks through (issue 14, item 1).

The reference set is split once by a seeded id hash: selection (every selector, scorer, probe and
DSIR target reads only it) and evaluation (only evaluation reads it). Held-out pool documents are
split by origin group (a book, a HumanEval problem across languages, the pieces of one split
document, near-duplicates, or a user's group field), so no group is on both sides. Each rule's
test fails on the old behaviour: the whole reference read by both sides; held-out by id hash.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from selection_helpers import TableScorer
from test_selectors import SMALL_SETTINGS, LengthRater, hashed_embeddings, word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import quadlib.corpus as corpus
import quadlib.evaluation.train_eval as train_eval
import quadlib.pipeline as pipeline
from quadlib.corpus import (EVALUATION_PART, REFERENCE_SPLIT_FILE, REFERENCE_SPLIT_STEP, SELECTION_PART,
                            CorpusSettings, ReferenceSplitSettings, ingest, read_corpus, read_reference,
                            split_heldout, split_reference)
from quadlib.evaluation.train_eval import EvalSettings, evaluate_model
from quadlib.cost import Cost, Passes
from quadlib.runstore import RunStore
from quadlib.selection import SELECTORS, make_selector
from quadlib.synthetic import SyntheticSettings, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REFERENCE_SETTINGS = CorpusSettings(id_field=None, source_field=None)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    folder = tmp_path_factory.mktemp("splits")
    pool, reference = generate(SyntheticSettings(docs_per_domain=12, reference_docs=40, seed=1))
    store = RunStore(folder / "run")
    ingest(store, write_jsonl(folder / "pool.jsonl.gz", pool))
    ingest(store, write_jsonl(folder / "reference.jsonl.gz", [{"text": r["text"]} for r in reference]),
           step="reference", settings=REFERENCE_SETTINGS)
    return store


# -- the reference split ------------------------------------------------------------------------

def test_reference_split_is_recorded_disjoint_complete_and_seeded(run: RunStore) -> None:
    ids = read_corpus(run, "reference", columns=["id"])["id"].tolist()
    split = split_reference(run)
    recorded = json.loads((run.root / REFERENCE_SPLIT_STEP / REFERENCE_SPLIT_FILE).read_text())
    assert recorded[SELECTION_PART] == split[SELECTION_PART] and recorded[EVALUATION_PART] == split[EVALUATION_PART]
    selection, evaluation = set(split[SELECTION_PART]), set(split[EVALUATION_PART])
    assert selection.isdisjoint(evaluation) and selection | evaluation == set(ids)
    assert 0 < len(evaluation) < len(ids)
    assert read_reference(run, SELECTION_PART)["id"].tolist() == [i for i in ids if i in selection]
    assert read_reference(run, EVALUATION_PART)["id"].tolist() == [i for i in ids if i in evaluation]
    assert split_reference(run) == split  # split once: the same split on every read
    other = corpus.split_reference_ids(ids, ReferenceSplitSettings(seed=1))
    assert other[EVALUATION_PART] != split[EVALUATION_PART]  # the seed moves it
    share = len(corpus.split_reference_ids([f"doc-{i}" for i in range(4000)],
                                           ReferenceSplitSettings(evaluation_fraction=0.25))[EVALUATION_PART]) / 4000
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5  # a binomial share: four standard errors


def test_an_empty_part_is_a_clear_error(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    ingest(store, write_jsonl(tmp_path / "ref.jsonl.gz", [{"text": "one lonely passage"}]), step="reference",
           settings=REFERENCE_SETTINGS)
    with pytest.raises(ValueError, match="part empty"):
        split_reference(store)


def test_evaluation_reads_only_the_evaluation_part(run: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    monkeypatch.setattr(train_eval, "reference_items",
                        lambda model, tok, texts, ids, lm: (read.extend(texts), ({}, pd.DataFrame()))[1])
    evaluate_model(run, None, None, EvalSettings(heldout_step=None))
    assert sorted(read) == sorted(read_reference(run, EVALUATION_PART)["text"])


def _context(run: RunStore, monkeypatch: pytest.MonkeyPatch):
    """`pipeline.selection_context` on the run, with stand-in embeddings and clusters and a tiny proxy."""
    pool = read_corpus(run)
    reference = read_corpus(run, "reference")
    tokenizer = word_tokenizer(pool["text"].tolist() + reference["text"].tolist())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, pad_token_id=0))
    domains = {s: i for i, s in enumerate(sorted(pool["source"].unique()))}
    monkeypatch.setattr(pipeline, "load_embeddings",
                        lambda store: (pool["id"].tolist(), hashed_embeddings(pool["text"].tolist())))
    monkeypatch.setattr(pipeline, "load_assignments",
                        lambda store: pd.DataFrame({"id": pool["id"], "cluster": pool["source"].map(domains)}))
    ctx = pipeline.selection_context(run, TableScorer({i: float(len(t)) for i, t in zip(pool["id"], pool["text"],
                                                                                         strict=True)}),
                                     model, tokenizer, seed=3)
    ctx.rater = LengthRater()
    return ctx


def test_no_selector_reaches_the_evaluation_part(run: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _context(run, monkeypatch)
    evaluation = set(read_reference(run, EVALUATION_PART)["text"])
    assert set(ctx.reference_texts) == set(read_reference(run, SELECTION_PART)["text"])
    assert evaluation.isdisjoint(ctx.reference_texts) and evaluation.isdisjoint(ctx.probe.reference_texts)

    # From here on the reference's files raise when read: a selector must work from the context alone.
    reference_dir = (run.root / "reference").resolve()

    def guarded(read):
        def reader(path, *args, **kwargs):
            if reference_dir in Path(str(path)).resolve().parents:
                raise AssertionError(f"a selector read the reference set's file {path}")
            return read(path, *args, **kwargs)
        return reader

    monkeypatch.setattr(pd, "read_parquet", guarded(pd.read_parquet))
    monkeypatch.setattr(corpus.pq, "ParquetFile", guarded(corpus.pq.ParquetFile))
    monkeypatch.setattr(corpus, "read_corpus", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("a selector read a corpus step")))
    for name in sorted(SELECTORS):
        selection = make_selector(name, SMALL_SETTINGS.get(name)).select(ctx, 1_500)
        assert selection.ids, name


def test_the_influence_reference_gradient_reads_only_the_selection_part(run: RunStore,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    class FakeEstimator:
        def save(self, path: Path) -> None:
            Path(path).write_bytes(b"")

    class FakeScorer:
        n_params = 1

        def __init__(self, *args, **kwargs) -> None:
            self.cost = Cost()

        def fit_texts(self, texts) -> None:
            pass

        def set_reference_texts(self, texts) -> None:
            seen.extend(texts)

        def score_texts(self, texts):
            return np.zeros(len(texts))

        def passes_per_document(self) -> Passes:
            return Passes(forward=2)

    monkeypatch.setattr(pipeline, "make_estimator", lambda *a, **k: FakeEstimator())
    monkeypatch.setattr(pipeline, "InfluenceScorer", FakeScorer)
    pipeline.prepare_scorer(run, None, None, pipeline.ScoreSettings(reference_docs=1000))
    assert seen and set(seen) == set(read_reference(run, SELECTION_PART)["text"])


# -- the held-out split by origin group ----------------------------------------------------------------

def _words(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{int(x)}" for x in rng.integers(0, 50_000, size=n))


def grouped_pool() -> tuple[list[dict], dict[str, str]]:
    """Records of several kinds of origin group, and each record's true group."""
    records, truth = [], {}

    def add(doc_id: str, group: str, text: str, meta: dict, source: str, **extra) -> None:
        records.append({"id": doc_id, "text": text, "source": source, "meta": meta, **extra})
        truth[doc_id] = group

    n = 0
    for book in range(6):  # pieces of one book
        for piece in range(8):
            add(f"books-pg-{n:06d}", f"book{book}", _words(n, 80), {"book": f"Book {book}", "chunk": piece}, "books")
            n += 1
    for task in range(12):  # one HumanEval problem in three languages
        for lang, prefix in (("python", "HumanEval"), ("cpp", "CPP"), ("javascript", "JavaScript")):
            add(f"code-{lang}-{n:06d}", f"task{task}", _words(n, 40), {"language": lang, "task_id": f"{prefix}/{task}"},
                "code")
            n += 1
    for doc in range(10):  # pieces of a split document with no other provenance: consecutive ids
        for part in range(3):
            add(f"c4-demo-{n:06d}", f"split{doc}", _words(n, 60), {"part": part, "parts": 3}, "c4")
            n += 1
    for pair in range(12):  # near-duplicates: same story, a few words changed, unrelated ids
        story = _words(10_000 + pair, 120).split()
        add(f"news-a-{n:06d}", f"dup{pair}", " ".join(story), {}, "news")
        story[::40] = ["changed"] * len(story[::40])
        add(f"news-b-{n:06d}", f"dup{pair}", " ".join(story), {}, "news")
        n += 1
    return records, truth


def _sides(held: dict[str, bool], truth: dict[str, str]) -> dict[str, set[bool]]:
    sides: dict[str, set[bool]] = defaultdict(set)
    for doc_id, group in truth.items():
        sides[group].add(held[doc_id])
    return sides


def test_heldout_keeps_each_origin_group_on_one_side(tmp_path: Path) -> None:
    records, truth = grouped_pool()
    store = RunStore(tmp_path / "run")
    summary = ingest(store, write_jsonl(tmp_path / "pool.jsonl.gz", records),
                     settings=CorpusSettings(heldout_fraction=0.5))
    held_ids = set(read_corpus(store, "heldout")["id"])
    held = {doc_id: doc_id in held_ids for doc_id in truth}
    sides = _sides(held, truth)
    mixed = sorted(g for g, s in sides.items() if len(s) > 1)
    assert not mixed, f"groups on both sides: {mixed}"
    for kind in ("book", "task", "split", "dup"):  # every kind of group lands on both sides, as whole groups
        assert {next(iter(s)) for g, s in sides.items() if g.startswith(kind)} == {True, False}, kind
    assert summary["heldout_split"]["crossing_near_duplicates"] == 0
    assert summary["heldout_split"]["near_duplicates_joined"] == 12
    assert set(read_corpus(store)["id"]).isdisjoint(held_ids)


def test_heldout_group_field_is_configurable() -> None:
    records, _ = grouped_pool()
    frame = pd.DataFrame(records)
    frame["team"] = [f"t{i % 5}" for i in range(len(frame))]
    held = split_heldout(frame, CorpusSettings(heldout_fraction=0.5, group_field="team",
                                               near_duplicate_containment=0.0))
    sides = held.groupby(frame["team"]).nunique()
    assert (sides == 1).all() and held.any() and not held.all()
    nested = split_heldout(frame, CorpusSettings(heldout_fraction=0.5, group_field="meta.book",
                                                 near_duplicate_containment=0.0))
    books = frame["meta"].map(lambda m: m.get("book"))
    assert (nested[books.notna()].groupby(books[books.notna()]).nunique() == 1).all()


def test_shared_pool_books_and_humaneval_never_straddle(shared_data: Path) -> None:
    records = []
    for name in ("books", "code"):
        with gzip.open(shared_data / "pool" / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            records += [json.loads(line) for line in f]
    frame = pd.DataFrame(records)
    held = split_heldout(frame, CorpusSettings(heldout_fraction=0.2))
    book = frame["meta"].map(lambda m: m.get("book"))
    task = frame["meta"].map(lambda m: str(m.get("task_id", "")).rsplit("/", 1)[-1])
    assert (held[book.notna()].groupby(book[book.notna()]).nunique() == 1).all()
    code = frame["source"] == "code"
    assert (held[code].groupby(task[code]).nunique() == 1).all()
    assert 0.05 < held.mean() < 0.4
