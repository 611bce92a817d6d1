"""Seeds vary the selection (issue 14, item 2).

Each evaluation seed re-runs every seeded selection (the same plan, another seed) and trains on
it; metrics.json says which sources of variance the spread over seeds covers. On the old code
every seed trained on the selection made with seed 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from eval_fixtures import tiny_model, tiny_tokenizer
from selection_helpers import TableScorer
from test_selectors import hashed_embeddings, word_tokenizer
from test_splits import REFERENCE_SETTINGS, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

import quadlib.evaluation.train_eval as train_eval
import quadlib.pipeline as pipeline
from quadlib.corpus import ingest, read_corpus
from quadlib.evaluation.train_eval import EvalSettings, evaluate_selections, texts_sha256, variance_sources
from quadlib.proxy import TrainSettings, save_model
from quadlib.runstore import RunStore
from quadlib.selection import read_selection, selection_store
from quadlib.synthetic import SyntheticSettings, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
METHODS = ["random", "dsir", "quad", "ppl"]  # three seeded selections (the bandit among them) and a deterministic one
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def selected(tmp_path_factory: pytest.TempPathFactory):
    """A run whose selections were made with seed 0, then re-made for seeds 1 and 2."""
    folder = tmp_path_factory.mktemp("seeds")
    pool, reference = generate(SyntheticSettings(docs_per_domain=12, reference_docs=24, seed=2))
    store = RunStore(folder / "run")
    ingest(store, write_jsonl(folder / "pool.jsonl.gz", pool))
    ingest(store, write_jsonl(folder / "ref.jsonl.gz", [{"text": r["text"]} for r in reference]), step="reference",
           settings=REFERENCE_SETTINGS)
    frame = read_corpus(store)
    tokenizer = word_tokenizer(frame["text"].tolist() + [r["text"] for r in reference])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, pad_token_id=0))
    patch = pytest.MonkeyPatch()
    patch.setattr(pipeline, "load_embeddings",
                  lambda store: (frame["id"].tolist(), hashed_embeddings(frame["text"].tolist())))
    patch.setattr(pipeline, "load_assignments",
                  lambda store: pd.DataFrame({"id": frame["id"], "cluster": frame["source"].astype("category").cat.codes}))
    scorer = TableScorer({i: float(len(t)) for i, t in zip(frame["id"], frame["text"], strict=True)})
    ctx = pipeline.selection_context(store, scorer, model, tokenizer, seed=0)
    budget = int(0.2 * frame["n_tokens"].sum())
    pipeline.run_selections(store, ctx, pipeline.SelectionPlan(methods=METHODS, budget_tokens=budget, method_settings={
        "quad": {"k": 2, "batch_size": 4}}))
    made = pipeline.select_for_seeds(store, scorer, model, tokenizer, METHODS, SEEDS)
    yield store, made, budget, (scorer, model, tokenizer)
    patch.undo()


def ids_of(store: RunStore, method: str, seed: int) -> list[str]:
    return read_selection(selection_store(store, method, seed), method)[0]["id"].tolist()


def test_each_seed_remakes_the_plan_with_its_own_seed(selected) -> None:
    store, made, budget, _ = selected
    assert sorted(zip(made["seed"], made["method"])) == sorted((s, m) for s in (1, 2) for m in METHODS)
    for seed in SEEDS:
        for method in METHODS:
            _, manifest = read_selection(selection_store(store, method, seed), method)
            assert manifest["seed"] == seed and manifest["budget_tokens"] == budget
    assert selection_store(store, "random", 0).root == store.root  # the run's own selection serves seed 0
    assert len({tuple(ids_of(store, "random", s)) for s in SEEDS}) == 3  # a seeded method differs by seed
    assert len({tuple(ids_of(store, "quad", s)) for s in SEEDS}) == 3  # the bandit's sampling too
    quad_rounds = selection_store(store, "quad", 1).root / "select-quad" / "rounds"
    assert quad_rounds.exists() and not (store.root / "selection-seeds" / "seed-0").exists()
    assert len({tuple(ids_of(store, "ppl", s)) for s in SEEDS}) == 1  # a deterministic one does not


def test_a_second_call_remakes_nothing(selected) -> None:
    store, _, _, (scorer, model, tokenizer) = selected
    stamp = (selection_store(store, "random", 1).root / "select-random" / "manifest.json").stat().st_mtime_ns
    pipeline.select_for_seeds(store, scorer, model, tokenizer, ["random"], SEEDS)
    assert (selection_store(store, "random", 1).root / "select-random" / "manifest.json").stat().st_mtime_ns == stamp


def test_each_seed_trains_on_its_own_selection(selected, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _, _, _ = selected
    calls = []

    def record(store, method, texts, base, tok, train, seeds, evaluation, **kwargs):
        calls.append((method, texts_sha256(texts), list(seeds), kwargs))
        return []

    monkeypatch.setattr(train_eval, "train_and_evaluate", record)
    train = TrainSettings(total_steps=1)
    evaluate_selections(store, ["random"], "base", None, train, SEEDS, EvalSettings())
    assert [c[2] for c in calls] == [[0], [1], [2]]
    texts = [train_eval.read_selection_texts(selection_store(store, "random", s), "random") for s in SEEDS]
    assert [c[1] for c in calls] == [texts_sha256(t) for t in texts]
    assert [c[3]["selection_seed"] for c in calls] == SEEDS and all(c[3]["selection_varies"] for c in calls)

    calls.clear()
    evaluate_selections(store, ["random"], "base", None, train, SEEDS, EvalSettings(), vary_selection=False)
    assert [c[2] for c in calls] == [[s] for s in SEEDS]  # every seed, each on the run's one selection
    assert {c[1] for c in calls} == {texts_sha256(train_eval.read_selection_texts(store, "random"))}
    assert all(c[3]["selection_seed"] == 0 and not c[3]["selection_varies"] for c in calls)
    with pytest.raises(FileNotFoundError, match="select_for_seeds"):
        evaluate_selections(store, ["random"], "base", None, train, [7], EvalSettings())


def test_metrics_state_what_the_spread_covers(tmp_path: Path, store: RunStore) -> None:
    assert variance_sources(True, False) == ["selection", "training order"]
    assert variance_sources(False, True) == ["training order", "initialisation"]
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    save_model(tiny_model(tokenizer), tokenizer, tmp_path / "warmup")
    train = TrainSettings(total_steps=1, batch_size=2, block_size=16, warmup_steps=0, device="cpu")
    texts = [f"document number {i} with a few words" for i in range(6)]
    record = train_eval.train_and_evaluate(store, "m", texts, tmp_path / "warmup", tokenizer, train, [4],
                                           EvalSettings(reference_step=None, heldout_step=None),
                                           selection_seed=4, selection_varies=True)[0]
    on_disk = json.loads((store.root / train_eval.eval_step("m", 4) / "metrics.json").read_text())
    assert on_disk["variance_sources"] == ["selection", "training order"] and on_disk["selection_seed"] == 4
    assert record == on_disk


def test_another_scorer_is_refused(selected) -> None:
    store, _, _, (scorer, model, tokenizer) = selected

    class OtherScorer(TableScorer):
        pass

    with pytest.raises(ValueError, match="scorer"):
        pipeline.select_for_seeds(store, OtherScorer(scorer.truth), model, tokenizer, ["random"], [5])

