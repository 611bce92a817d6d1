"""Training on a selection and evaluating it, per method and seed, resumable and skipped when done."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from eval_fixtures import tiny_model, tiny_tokenizer

from quadlib.corpus import CorpusSettings, ingest, read_corpus
from quadlib.evaluation import train_eval
from quadlib.evaluation.items import ITEMS_FILE, UNTRAINED, weighted_means
from quadlib.evaluation.stats import collect_items, paired_differences
from quadlib.evaluation.train_eval import (
    EvalSettings, eval_step, initial_model, read_selection_texts, train_and_evaluate,
)
from quadlib.proxy import TrainSettings, save_model
from quadlib.runstore import RunStore
from quadlib.synthetic import SyntheticSettings, write_default_data

TRAIN = TrainSettings(total_steps=3, batch_size=2, block_size=32, warmup_steps=1, checkpoint_every=2, device="cpu")


@pytest.fixture
def setup(store: RunStore, tmp_path: Path):
    pool, reference = write_default_data(tmp_path / "data", SyntheticSettings(docs_per_domain=6, reference_docs=4))
    ingest(store, pool, settings=CorpusSettings(heldout_fraction=0.3))
    ingest(store, reference, step="reference")
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    save_model(tiny_model(tokenizer), tokenizer, tmp_path / "warmup")
    texts = read_corpus(store)["text"].tolist()[:12]
    return store, tokenizer, tmp_path / "warmup", texts


def test_train_and_evaluate_writes_metrics_and_skips_finished_pairs(setup) -> None:
    store, tokenizer, warmup, texts = setup
    records = train_and_evaluate(store, "random", texts, warmup, tokenizer, TRAIN, [0, 1], EvalSettings())
    assert [r["seed"] for r in records] == [0, 1]
    for seed, rec in zip([0, 1], records):
        folder = store.root / eval_step("random", seed)
        assert json.loads((folder / "metrics.json").read_text()) == rec
        assert (folder / "model" / "model.safetensors").exists() and not (folder / "checkpoints").exists()
        assert rec["train"]["steps"] == 3 and rec["train"]["tokens_seen"] == 3 * 2 * 32
        assert {"ref_loss", "ref_ppl", "heldout_mean"} <= set(rec["metrics"])
        assert any(k.startswith("heldout/") for k in rec["metrics"])
        items = pd.read_parquet(folder / ITEMS_FILE)  # the per-item results the metrics aggregate
        assert weighted_means(items)[("reference", "loss")] == pytest.approx(rec["metrics"]["ref_loss"], rel=1e-9)
    assert records[0]["metrics"]["ref_loss"] != records[1]["metrics"]["ref_loss"]  # seeds change the data order
    stamp = (store.root / eval_step("random", 0) / "metrics.json").stat().st_mtime_ns
    again = train_and_evaluate(store, "random", texts, warmup, tokenizer, TRAIN, [0, 1], EvalSettings())
    assert again == records
    assert (store.root / eval_step("random", 0) / "metrics.json").stat().st_mtime_ns == stamp


def test_same_seed_same_result_and_a_changed_selection_recomputes(setup) -> None:
    store, tokenizer, warmup, texts = setup
    a = train_and_evaluate(store, "a", texts, warmup, tokenizer, TRAIN, [3], EvalSettings(heldout_step=None))
    b = train_and_evaluate(store, "b", texts, warmup, tokenizer, TRAIN, [3], EvalSettings(heldout_step=None))
    assert a[0]["metrics"] == b[0]["metrics"]
    changed = train_and_evaluate(store, "a", texts[::-1], warmup, tokenizer, TRAIN, [3], EvalSettings(heldout_step=None))
    assert changed[0]["metrics"]["ref_loss"] != a[0]["metrics"]["ref_loss"]


def test_a_fixed_token_budget_is_required(setup) -> None:
    store, tokenizer, warmup, texts = setup
    with pytest.raises(ValueError, match="token_budget"):
        train_and_evaluate(store, "x", texts, warmup, tokenizer, replace(TRAIN, total_steps=None), [0], EvalSettings())


def test_from_scratch_reinitialises_the_warmup_architecture(setup) -> None:
    _, tokenizer, warmup, _ = setup
    warm = initial_model(warmup, tokenizer, from_scratch=False, seed=0, device="cpu")
    fresh = initial_model(warmup, tokenizer, from_scratch=True, seed=5, device="cpu")
    again = initial_model(warmup, tokenizer, from_scratch=True, seed=5, device="cpu")
    assert type(fresh) is type(warm) and fresh.config.to_dict() == warm.config.to_dict()
    w = dict(warm.named_parameters())
    assert any(not torch.equal(p, w[n]) for n, p in fresh.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), again.parameters()))


def test_read_selection_texts_sorts_by_id(store: RunStore) -> None:
    with pytest.raises(FileNotFoundError, match="select-quad"):
        read_selection_texts(store, "quad")
    folder = store.step_dir("select-quad")
    pd.DataFrame({"id": ["b", "a"], "text": ["second", "first"]}).to_parquet(folder / "selection.parquet")
    (folder / "manifest.json").write_text("{}")
    store.mark_done("select-quad")
    assert read_selection_texts(store, "quad") == ["first", "second"]


def _fake_selection(store: RunStore, method: str, texts: list[str]) -> None:
    folder = store.step_dir(f"select-{method}")
    pd.DataFrame({"id": [f"{method}-{i:03d}" for i in range(len(texts))], "text": texts}).to_parquet(
        folder / "selection.parquet")
    (folder / "manifest.json").write_text(json.dumps({"seed": 0}))
    store.mark_done(f"select-{method}")


def test_worker_processes_give_the_same_records_as_one_process(setup, tmp_path: Path) -> None:
    """Two spawned 1-thread workers train and evaluate every (method, seed) pair exactly as one process does
    (same seeds, same data, same float32 arithmetic on 1 thread), in method-then-seed order."""
    store, tokenizer, warmup, texts = setup
    _fake_selection(store, "a", texts[:6])
    _fake_selection(store, "b", texts[6:])
    evaluation = EvalSettings(heldout_step=None)
    torch.set_num_threads(1)
    parallel = train_eval.evaluate_selections(store, ["a", "b"], warmup, tokenizer, TRAIN, [0, 1], evaluation,
                                              vary_selection=False, workers=2, keep_models=False)
    assert [(r["method"], r["seed"]) for r in parallel] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert not (store.root / eval_step("a", 0) / "model").exists()  # keep_models=False
    serial_store = RunStore(tmp_path / "serial")
    for step in ("reference",):
        shutil.copytree(store.root / step, serial_store.root / step)
    _fake_selection(serial_store, "a", texts[:6])
    _fake_selection(serial_store, "b", texts[6:])
    serial = train_eval.evaluate_selections(serial_store, ["a", "b"], warmup, tokenizer, TRAIN, [0, 1], evaluation,
                                            vary_selection=False, workers=1)
    for p, s in zip(parallel, serial, strict=True):
        assert p["metrics"] == pytest.approx(s["metrics"], rel=1e-6)  # same computation, another process
        assert p["train"]["steps"] == s["train"]["steps"]
    assert parallel[0]["metrics"]["ref_loss"] != parallel[2]["metrics"]["ref_loss"]  # a and b really differ
    stamp = (store.root / eval_step("b", 1) / "metrics.json").stat().st_mtime_ns
    again = train_eval.evaluate_selections(store, ["a", "b"], warmup, tokenizer, TRAIN, [0, 1], evaluation,
                                           vary_selection=False, workers=2, keep_models=False)
    assert again == parallel  # finished pairs are skipped
    assert (store.root / eval_step("b", 1) / "metrics.json").stat().st_mtime_ns == stamp


def test_the_untrained_model_is_evaluated_once_and_written_for_every_seed(setup) -> None:
    """`untrained=True` adds the starting model, untouched, as the method "untrained": its metrics are those of
    `evaluate_model` on the warm-up weights, for each seed, so the paired test can compare every method with it."""
    store, tokenizer, warmup, texts = setup
    _fake_selection(store, "a", texts[:6])
    evaluation = EvalSettings(heldout_step=None)
    records = train_eval.evaluate_selections(store, ["a"], warmup, tokenizer, TRAIN, [0, 1], evaluation,
                                             vary_selection=False, untrained=True)
    assert [(r["method"], r["seed"]) for r in records] == [(UNTRAINED, 0), (UNTRAINED, 1), ("a", 0), ("a", 1)]
    model = initial_model(warmup, tokenizer, False, 0, "cpu").eval()
    direct = train_eval.evaluate_model(store, model, tokenizer, evaluation)
    assert records[0]["metrics"] == pytest.approx(direct, rel=1e-9)
    assert records[1]["metrics"] == records[0]["metrics"] and records[0]["train"]["steps"] == 0
    assert records[2]["metrics"]["ref_loss"] != records[0]["metrics"]["ref_loss"]  # training moved the model
    items = collect_items(store.root)
    paired = paired_differences(items, UNTRAINED, ["ref_loss"])
    assert list(paired["method"]) == ["a"] and paired["n_seeds"].iloc[0] == 2
    trained = (records[2]["metrics"]["ref_loss"] + records[3]["metrics"]["ref_loss"]) / 2
    assert paired["diff"].iloc[0] == pytest.approx(trained - records[0]["metrics"]["ref_loss"], rel=1e-6)  # a - untrained
