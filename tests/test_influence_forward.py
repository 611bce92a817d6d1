"""Forward-only scoring modes (jvp, central difference) against the exact reverse-mode score."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from quadlib.influence.directional import central_difference_scores
from quadlib.influence.estimators import InfluenceEstimator, InfluenceSettings, make_estimator
from quadlib.influence.scorer import InfluenceScorer
from quadlib.influence.toy import random_batch, tiny_gpt2, tiny_llama

VOCAB = 64
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# Relative to the largest score. Llama's RMSNorm computes in float32 even in a float64 model, and
# forward- and reverse-mode AD round that cast differently (~1e-7); GPT-2 stays in float64 throughout.
JVP_RTOL = {"llama": 1e-6, "gpt2": 1e-10}


def _eager(layout: str) -> nn.Module:
    """SDPA and eager attention differ by ~1e-9 in float64; compare modes on one attention path."""
    model = MODELS[layout]()
    model.config._attn_implementation = "eager"
    return model


def _fitted(model: nn.Module, name: str, mode: str) -> InfluenceEstimator:
    estimator = make_estimator(name, InfluenceSettings(seed=3, mode=mode))
    estimator.fit(model, [random_batch(4, 10, VOCAB, seed=1, lengths=[10, 7, 10, 4])])
    estimator.set_reference(model, [random_batch(3, 9, VOCAB, seed=11, lengths=[9, 9, 5])])
    return estimator


def _in_mode(estimator: InfluenceEstimator, mode: str, model: nn.Module) -> torch.Tensor:
    estimator.settings = replace(estimator.settings, mode=mode)
    return estimator.score(model, random_batch(5, 8, VOCAB, seed=21, lengths=[8, 6, 8, 3, 8]))


@pytest.mark.parametrize(("layout", "name"), [("llama", "kfac_joint_qkv"), ("gpt2", "kfac_joint_qkv"),
                                              ("gpt2", "kfac_attn_indep")])  # the last: Q/K/V rows of one Conv1D
def test_jvp_equals_reverse(layout: str, name: str) -> None:
    model = _eager(layout)
    estimator = _fitted(model, name, "reverse")
    reverse = _in_mode(estimator, "reverse", model)
    forward = _in_mode(estimator, "jvp", model)
    scale = float(reverse.abs().max())
    assert scale > 0
    torch.testing.assert_close(forward, reverse, rtol=0, atol=JVP_RTOL[layout] * scale)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("layout", sorted(MODELS))
def test_central_difference_close_and_weights_restored(layout: str) -> None:
    model = MODELS[layout]()
    model.config._attn_implementation = "sdpa"
    estimator = _fitted(model, "kfac_joint_qkv", "reverse")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    reverse = _in_mode(estimator, "reverse", model)
    difference = _in_mode(estimator, "central_difference", model)
    torch.testing.assert_close(difference, reverse, rtol=0, atol=1e-3 * float(reverse.abs().max()))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert model.config._attn_implementation == "sdpa" and all(p.requires_grad for p in model.parameters())
    _in_mode(estimator, "jvp", model)
    assert model.config._attn_implementation == "sdpa", "jvp must restore the attention implementation"
    tangents, eps = estimator.parameter_direction(model)
    with pytest.raises(ValueError, match="round-off"):
        central_difference_scores(model.to(torch.bfloat16), random_batch(2, 4, VOCAB, seed=0), tangents, eps)


def test_scorer_runs_the_estimators_mode_and_cosine_stays_reverse() -> None:
    model = _eager("llama")
    texts = ["the cat sat on the mat", "dogs bark", "a b c d e f g"]

    def scores(mode: str) -> tuple[np.ndarray, int]:
        estimator = make_estimator("kfac_joint_qkv", InfluenceSettings(mode=mode))
        scorer = InfluenceScorer(model, lambda text: [2 + b % 60 for b in text.encode()], estimator,
                                 max_length=16, batch_size=2, device="cpu")
        scorer.fit_texts(texts)
        scorer.set_reference_texts(texts[:1])
        return scorer.score_texts(texts), scorer.cost.backward_passes

    (forward, forward_backwards), (reverse, reverse_backwards) = scores("jvp"), scores("reverse")
    np.testing.assert_allclose(forward, reverse, rtol=1e-6, atol=1e-10)
    assert forward_backwards == reverse_backwards - 3, "three scored documents, no backward pass in jvp mode"
    assert make_estimator("cosine", InfluenceSettings(mode="jvp")).scoring_mode == "reverse"
    with pytest.raises(ValueError, match="mode"):
        InfluenceSettings(mode="finite")
