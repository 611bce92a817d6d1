"""Costs that describe what ran (issue 14, item 5; issue 13's one cost record).

Each scorer books the passes it really makes, per document and by kind: reverse mode one forward
and one backward, JVP one forward with tangents, central difference (the default) two forwards and
no backward. A selection records them: its standalone cost (every document its scoring asked for,
priced at the scorer's own per-document passes, cached or not) and what it computed (cache misses).
The old booking (one forward and one backward per scored document, passes counted per batch) fails
every count below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from quadlib.cost import Cost, Passes
from quadlib.influence.estimators import DEFAULT_MODE, InfluenceSettings, make_estimator
from quadlib.influence.scorer import InfluenceScorer
from quadlib.influence.toy import tiny_llama
from quadlib.selection import SelectionContext, export_selection, make_selector
from quadlib.selection.scoring import CachingScorer
from quadlib.evaluation.stats import collect_costs
from quadlib.runstore import RunStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXTS = ["the cat sat on the mat", "a b c d e f g h i j k", "influence functions", "dogs bark at night, cats sleep",
         "one more document to score", "and a sixth one"]
REFERENCE = ["the dog sat on the log", "cats and dogs"]
BATCH = 2  # smaller than the number of texts: passes must not be counted per batch
EXPECTED = {"reverse": Passes(forward=1, backward=1), "jvp": Passes(jvp=1), "central_difference": Passes(forward=2)}
FLOPS_PER_PARAM_TOKEN = {"forward": 2, "backward": 4, "jvp": 6}


def byte_encoder(text: str) -> list[int]:
    return [2 + (b % 60) for b in text.encode()]


def fitted_scorer(mode: str | None = None) -> InfluenceScorer:
    settings = InfluenceSettings() if mode is None else InfluenceSettings(mode=mode)
    scorer = InfluenceScorer(tiny_llama(), byte_encoder, make_estimator("kfac_joint_qkv", settings), max_length=24,
                             batch_size=BATCH, device="cpu")
    scorer.fit_texts(TEXTS)
    scorer.set_reference_texts(REFERENCE)
    return scorer


def tokens_of(scorer: InfluenceScorer, texts: list[str]) -> int:
    return sum(len(scorer.tokenize(t)) for t in texts)


def test_the_default_scorer_makes_two_forwards_and_no_backward() -> None:
    assert DEFAULT_MODE == "central_difference"
    assert fitted_scorer().passes_per_document() == Passes(forward=2)


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_each_mode_books_the_passes_it_runs(mode: str) -> None:
    scorer = fitted_scorer(mode)
    before = scorer.cost.copy()
    scorer.score_texts(TEXTS)
    spent = scorer.cost - before
    n, tokens, passes = len(TEXTS), tokens_of(scorer, TEXTS), EXPECTED[mode]
    assert scorer.passes_per_document() == passes
    assert spent.docs_scored == n
    assert (spent.forward_passes, spent.backward_passes, spent.jvp_passes) == (
        passes.forward * n, passes.backward * n, passes.jvp * n)
    assert spent.tokens == (passes.forward + passes.jvp) * tokens  # a backward re-uses its forward's tokens
    flops_per_token = sum(FLOPS_PER_PARAM_TOKEN[k] * getattr(passes, k) for k in FLOPS_PER_PARAM_TOKEN)
    assert spent.flops == flops_per_token * scorer.n_params * tokens


def test_fit_and_reference_are_booked_apart_from_scoring() -> None:
    scorer = fitted_scorer("reverse")  # (central difference adds the passes that choose its step)
    fit_and_reference = scorer.cost.copy()
    assert fit_and_reference.docs_scored == 0  # fitting and the reference gradient score no document
    assert fit_and_reference.forward_passes == fit_and_reference.backward_passes == len(TEXTS) + len(REFERENCE)


def _caching(scorer: InfluenceScorer, cache: Path) -> CachingScorer:
    ids = [f"d{i}" for i in range(len(TEXTS))]
    return CachingScorer(scorer.score_texts, dict(zip(ids, TEXTS, strict=True)),
                         {i: len(scorer.tokenize(t)) for i, t in zip(ids, TEXTS, strict=True)}, cache,
                         n_params=scorer.n_params, passes=scorer.passes_per_document(), counter=scorer.cost)


def test_a_cached_scorer_books_its_scorers_passes_and_what_it_computed(tmp_path: Path) -> None:
    scorer = fitted_scorer()  # central difference
    first = _caching(scorer, tmp_path / "scores.parquet")
    ids = [f"d{i}" for i in range(len(TEXTS))]
    first.score(ids[:4])
    first.score(ids)  # four hits, two misses
    tokens = tokens_of(scorer, TEXTS[:4]) + tokens_of(scorer, TEXTS)
    assert (first.cost.docs_scored, first.cost.forward_passes, first.cost.backward_passes) == (10, 20, 0)
    assert first.cost.flops == 2 * 2 * scorer.n_params * tokens
    assert (first.computed.docs_scored, first.computed.forward_passes, first.computed.backward_passes) == (6, 12, 0)

    second = _caching(scorer, tmp_path / "scores.parquet")  # another method, the cache already full
    second.score(ids[:4])
    second.score(ids)
    assert second.calls == 0 and second.computed == Cost()
    assert second.cost == first.cost  # standalone: not borrowed from the first method's work


def test_a_selection_records_standalone_and_computed_cost(tmp_path: Path) -> None:
    scorer = fitted_scorer()
    ids = [f"d{i}" for i in range(len(TEXTS))]
    pool = pd.DataFrame({"id": ids, "text": TEXTS, "source": "s", "n_tokens": [len(scorer.tokenize(t)) for t in TEXTS]})
    store = RunStore(tmp_path / "run")
    warm = _caching(scorer, tmp_path / "scores.parquet")
    warm.score(ids[:3])  # another method scored half the pool first
    ctx = SelectionContext(pool=pool, scorer=_caching(scorer, tmp_path / "scores.parquet"), seed=0)
    selection = make_selector("topk_influence").select(ctx, budget_tokens=40)
    assert selection.cost.docs_scored == 6 and selection.cost.forward_passes == 12
    assert selection.cost.backward_passes == 0
    assert selection.computed_cost.docs_scored == 3 and selection.computed_cost.forward_passes == 6
    export_selection(selection, ctx, store)
    manifest = json.loads((store.root / "select-topk_influence" / "manifest.json").read_text())
    assert manifest["cost"]["forward_passes"] == 12 and manifest["computed_cost"]["forward_passes"] == 6
    row = collect_costs(store.root).set_index("method").loc["topk_influence"]
    assert row["cost_forward_passes"] == 12 and row["computed_forward_passes"] == 6 and row["wall_time_s"] >= 0
    assert np.isclose(row["cost_flops"], 2 * 2 * scorer.n_params * pool["n_tokens"].sum())


def test_a_function_of_unknown_cost_counts_documents_only(tmp_path: Path) -> None:
    texts = {"a": "x", "b": "y"}
    unknown = CachingScorer(lambda batch: np.zeros(len(batch)), texts, {"a": 1, "b": 1}, tmp_path / "s.parquet")
    unknown.score(["a", "b"])
    assert unknown.cost.docs_scored == 2 and unknown.cost.forward_passes == unknown.cost.backward_passes == 0
    assert unknown.cost.flops is None
