"""Text-level scorer, score cache, and the peer cross-check against Kronfluence's K-FAC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quadlib.influence.cache import ScoreCache
from quadlib.influence.estimators import InfluenceSettings, make_estimator
from quadlib.influence.peers import conv1d_to_linear, kronfluence_scores
from quadlib.influence.scorer import InfluenceScorer, collate
from quadlib.influence.toy import random_batch, tiny_gpt2, tiny_llama

TEXTS = ["the cat sat on the mat", "a b c d e f g h i j k", "influence", "", "dogs bark at night, cats sleep"]
REFERENCE = ["the dog sat on the log", "cats and dogs"]


def byte_encoder(text: str) -> list[int]:
    return [2 + (b % 60) for b in text.encode()]


def _scorer(estimator: str = "kfac_joint_qkv") -> InfluenceScorer:
    """Reverse mode: per-layer scores (always reverse) must sum to the totals exactly."""
    scorer = InfluenceScorer(tiny_llama(), byte_encoder, make_estimator(estimator, InfluenceSettings(mode="reverse")),
                             max_length=24, batch_size=2, device="cpu")
    scorer.fit_texts(TEXTS + REFERENCE)
    scorer.set_reference_texts(REFERENCE)
    return scorer


def test_score_texts_matches_estimator_in_input_order() -> None:
    scorer = _scorer()
    scores = scorer.score_texts(TEXTS)
    direct = [scorer.estimator.score(scorer.model, collate([scorer.tokenize(t)], 0, torch.device("cpu"))).item()
              for t in TEXTS]
    np.testing.assert_allclose(scores, direct, rtol=1e-8, atol=1e-12)
    assert scorer.tokenize("") == [0, 1], "an empty document is framed [bos] [eos] (the model's config ids)"
    assert scorer.tokenize("x" * 40)[-1] == 1 and len(scorer.tokenize("x" * 40)) == 24, "cut text still ends in eos"
    assert scorer.cost.docs_scored == len(TEXTS) and scorer.cost.backward_passes > 0
    assert scorer.cost.flops == pytest.approx(6 * scorer.n_params * scorer.cost.tokens)


def test_per_layer_frame_sums_to_totals() -> None:
    scorer = _scorer()
    frame = scorer.score_texts(TEXTS, ids=[f"d{i}" for i in range(len(TEXTS))], per_layer=True)
    assert set(frame["group"]) == {"mlp", "attn_qkv_joint", "attn_out"}
    totals = frame.groupby("doc")["score"].sum().reindex([f"d{i}" for i in range(len(TEXTS))]).to_numpy()
    np.testing.assert_allclose(totals, scorer.score_texts(TEXTS), rtol=1e-9, atol=1e-12)


def test_cache_recomputes_nothing_already_scored(tmp_path) -> None:
    scorer = _scorer("cosine")
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    first = scorer.score_texts(TEXTS[:3], ids=ids[:3], cache=ScoreCache(tmp_path / "scores.parquet"))
    scored = scorer.cost.docs_scored
    cache = ScoreCache(tmp_path / "scores.parquet")  # reopened from disk
    assert len(cache) == 3
    second = scorer.score_texts(TEXTS, ids=ids, cache=cache)
    assert scorer.cost.docs_scored == scored + 2
    np.testing.assert_array_equal(second[:3], first)
    np.testing.assert_allclose(second, scorer.score_texts(TEXTS), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="ids"):
        scorer.score_texts(TEXTS, cache=cache)


def test_cache_keeps_what_a_parallel_process_wrote(tmp_path) -> None:
    first, second = ScoreCache(tmp_path / "s.parquet"), ScoreCache(tmp_path / "s.parquet")  # two ablation runs
    first.put(["a", "b"], [1.0, 2.0])
    second.put(["c"], [3.0])  # opened before "a" and "b" were written
    assert ScoreCache(tmp_path / "s.parquet").get(["a", "b", "c"]) == {"a": 1.0, "b": 2.0, "c": 3.0}


@pytest.mark.parametrize(("layout", "estimator", "max_gap"),
                         [("llama", "kfac_attn_indep", 1e-6), ("gpt2", "kfac_joint_qkv", 1e-12)])
def test_kronfluence_kfac_agrees_with_ours(layout: str, estimator: str, max_gap: float) -> None:
    """Peer cross-check with Kronfluence's heuristic damping, one K-FAC block per module it tracks:
    Llama's separate q/k/v = our independent layers; GPT-2's fused c_attn = our joint QKV layer.

    In float64 the scores are proportional (the two libraries normalise the losses differently):
    GPT-2 measured 1 - Pearson = 1.1e-16 (round-off), Llama 8.6e-8 (each module's scores differ by
    about 1.3e-6 relative: a float32-level difference not yet traced), hence the per-layout bound.
    Dropping one tracked module on the peer side gives 1 - Pearson = 8.3e-3 (Llama) and 2.5e-2 (GPT-2),
    a flipped sign -1: both fail here (the Llama drop passed the old bound Pearson >= 0.99)."""
    model = tiny_llama() if layout == "llama" else tiny_gpt2()
    fit = [random_batch(4, 10, 64, seed=s) for s in range(3)]
    reference, documents = [random_batch(3, 10, 64, seed=10)], [random_batch(6, 10, 64, seed=20)]
    ours = make_estimator(estimator, "kronfluence_match")
    ours.fit(model, fit)
    ours.set_reference(model, reference)
    our_scores = ours.score(model, documents[0]).numpy()
    peer_model = conv1d_to_linear(model) if layout == "gpt2" else model
    modules = sorted({part.module_name for layer in ours.layers for part in layer.parts})
    peer = kronfluence_scores(peer_model, modules, fit, reference, documents, damping=None)
    assert 1.0 - np.corrcoef(our_scores, peer.scores)[0, 1] <= max_gap


def test_bench_influence_uses_every_requested_count_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/bench_influence.py: 4 reference docs at batch 16 are 4 docs (they silently became 16 before);
    a count that is not a whole number of batches is refused with a one-line error naming the flag."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_influence.py"
    spec = importlib.util.spec_from_file_location("bench_influence", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_influence", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    for count, width, shape in ((4, 16, [4]), (8, 16, [8]), (128, 16, [16] * 8), (16, 4, [4] * 4)):
        batches = bench.batches_of(count, width, 0, 6, 64, "--reference-docs")
        assert [int(b["input_ids"].shape[0]) for b in batches] == shape
    for count, width in ((20, 16), (6, 4), (0, 4)):
        with pytest.raises(SystemExit, match=f"--fit-docs {count} is not a whole number"):
            bench.batches_of(count, width, 0, 6, 64, "--fit-docs")
