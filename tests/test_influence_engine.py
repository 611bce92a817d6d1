"""Exact identities of the influence engine, checked against brute force in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from quadlib.influence.capture import augment_bias, backward_pass
from quadlib.influence.estimators import (
    ESTIMATORS,
    FD_STEP_CANDIDATES,
    InfluenceEstimator,
    SCORING_MODES,
    InfluenceSettings,
    make_estimator,
)
from quadlib.influence.kfac import (
    DampedKroneckerInverse,
    FactorAccumulator,
    KroneckerFactors,
    SymmetricSum,
    kfac_inverses,
)
from quadlib.influence.layers import GROUPS, LayerPart, TrackedLayer, discover_layers, layer_gradient
from quadlib.influence import loss as influence_loss
from quadlib.influence.loss import Batch, sample_labels, summed_token_loss
from quadlib.influence.toy import random_batch, tiny_gpt2, tiny_llama
from quadlib.proxy.loss import document_losses

VOCAB = 64
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _fit_batches() -> list[Batch]:
    return [random_batch(4, 10, VOCAB, seed=s, lengths=[10, 7, 10, 4]) for s in (1, 2)]


def _ref_batches() -> list[Batch]:
    return [random_batch(3, 9, VOCAB, seed=11, lengths=[9, 9, 5])]


def _doc_batch() -> Batch:
    return random_batch(5, 8, VOCAB, seed=21, lengths=[8, 6, 8, 3, 8])


def _random_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    root = torch.randn(n, n + 3, generator=generator, dtype=torch.float64)
    return root @ root.T / n


def _fitted(model: nn.Module, name: str, settings: InfluenceSettings | None = None) -> InfluenceEstimator:
    estimator = make_estimator(name, settings or InfluenceSettings(fisher="sampled", seed=3, mode="reverse"))
    estimator.fit(model, _fit_batches())
    estimator.set_reference(model, _ref_batches())
    return estimator


def _brute_force_scores(model: nn.Module, estimator: InfluenceEstimator, batch: Batch) -> torch.Tensor:
    """grad_ref^T (H + lambda I)^-1 grad_z from autograd parameter gradients and dense explicit solves."""
    layers = estimator.layers
    model.zero_grad()
    n_ref = sum(int((b["labels"][:, 1:] != -100).sum()) for b in _ref_batches())
    sum(summed_token_loss(model, b)[0] for b in _ref_batches()).backward()  # scaled after: Llama's RMSNorm
    reference = {layer.name: layer_gradient(model, layer).flatten() / n_ref for layer in layers}  # rounds in fp32
    if estimator.inverses is not None:  # (H + lambda I) is symmetric: solve once for the reference side
        reference = {name: torch.linalg.solve(estimator.inverses[name].explicit(), g) for name, g in reference.items()}
    scores = []
    for row in range(batch["input_ids"].shape[0]):
        model.zero_grad()
        document_losses(model, {k: v[row:row + 1] for k, v in batch.items()}).sum().backward()
        grads = {layer.name: layer_gradient(model, layer).flatten() for layer in layers}
        if estimator.spec.cosine:
            ref_all, doc_all = torch.cat(list(reference.values())), torch.cat(list(grads.values()))
            scores.append(ref_all @ doc_all / (ref_all.norm() * doc_all.norm()))
            continue
        scores.append(sum(reference[layer.name] @ grads[layer.name] for layer in layers))
    model.zero_grad()
    return torch.stack(scores)


def test_eigen_damped_inverse_equals_explicit_solve() -> None:
    generator = torch.Generator().manual_seed(0)
    n_in, n_out, damping = 5, 4, 0.37
    factors = KroneckerFactors(_random_spd(n_in, generator), _random_spd(n_out, generator), n_tokens=1)
    inverse = kfac_inverses({"w": factors}, damping, "absolute")["w"]
    matrix = torch.randn(n_out, n_in, generator=generator, dtype=torch.float64)
    dense = torch.kron(factors.gradient, factors.activation) + damping * torch.eye(n_in * n_out, dtype=torch.float64)
    expected = torch.linalg.solve(dense, matrix.flatten()).view(n_out, n_in)
    torch.testing.assert_close(inverse.apply(matrix), expected, rtol=1e-6, atol=1e-9)
    relative = kfac_inverses({"w": factors}, 0.1, "relative")["w"]
    assert relative.damping == pytest.approx(0.1 * float(torch.outer(*(torch.linalg.eigvalsh(f) for f in
                                                                       (factors.gradient, factors.activation))).mean()))


def test_kfac_equals_exact_fisher_solve_when_factorisation_is_exact() -> None:
    """One token per example and a shared input x: E[(d d^T) (x) (x x^T)] = G (x) A holds exactly."""
    generator = torch.Generator().manual_seed(1)
    n, n_in, n_out, damping = 12, 4, 3, 0.05
    layer = TrackedLayer("fc", "mlp", 0, (LayerPart("fc"),), n_in, n_out, has_bias=False)
    x = torch.randn(n_in, generator=generator, dtype=torch.float64).expand(n, 1, n_in)  # [N, 1, in]
    delta = torch.randn(n, 1, n_out, generator=generator, dtype=torch.float64)  # [N, 1, out]
    accumulator = FactorAccumulator([layer])
    accumulator.mask = torch.ones(n, 1, dtype=torch.bool)
    accumulator(layer, x, delta)
    factors = accumulator.factors()
    per_example = torch.einsum("nto,nti->noi", delta, x).flatten(1)  # [N, out*in]
    fisher = per_example.T @ per_example / n
    torch.testing.assert_close(torch.kron(factors["fc"].gradient, factors["fc"].activation), fisher)
    inverse = kfac_inverses(factors, damping, "absolute")["fc"]
    matrix = torch.randn(n_out, n_in, generator=generator, dtype=torch.float64)
    exact = torch.linalg.solve(fisher + damping * torch.eye(n_in * n_out, dtype=torch.float64), matrix.flatten())
    torch.testing.assert_close(inverse.apply(matrix).flatten(), exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("layout", sorted(MODELS))
def test_hook_per_document_gradients_equal_autograd(layout: str) -> None:
    model = MODELS[layout]()
    batch = _doc_batch()
    joint = discover_layers(model, ("mlp", "attn_qkv_joint", "attn_out"))
    layers = joint + discover_layers(model, ("attn_qkv_independent",))
    mask = batch["attention_mask"].to(torch.float64)
    from_hooks: dict[str, torch.Tensor] = {}

    def consumer(layer: TrackedLayer, x: torch.Tensor, delta: torch.Tensor) -> None:
        x = augment_bias(x) if layer.has_bias else x
        from_hooks[layer.name] = torch.einsum("bto,bti->boi", delta, x * mask[..., None])

    backward_pass(model, layers, consumer, lambda: document_losses(model, batch).sum())
    assert all(p.requires_grad for p in model.parameters()), "weights must be unfrozen after the pass"
    for row in range(batch["input_ids"].shape[0]):
        model.zero_grad()
        document_losses(model, {k: v[row:row + 1] for k, v in batch.items()}).sum().backward()
        for layer in layers:
            torch.testing.assert_close(from_hooks[layer.name][row], layer_gradient(model, layer),
                                       rtol=1e-9, atol=1e-12, msg=f"{layout} {layer.name} doc {row}")


@pytest.mark.parametrize("layout", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_reverse_mode_score_equals_brute_force(layout: str, name: str) -> None:
    model = MODELS[layout]()
    estimator = _fitted(model, name)
    batch = _doc_batch()
    scores = estimator.score(model, batch)
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, _brute_force_scores(model, estimator, batch), rtol=1e-7, atol=1e-10)
    per_layer = estimator.score_layers(model, batch)
    torch.testing.assert_close(torch.stack(list(per_layer.values())).sum(0), scores)


@pytest.mark.parametrize("layout", sorted(MODELS))
def test_joint_and_independent_qkv_differ(layout: str) -> None:
    model = MODELS[layout]()
    joint, independent = _fitted(model, "kfac_joint_qkv"), _fitted(model, "kfac_attn_indep")
    joint_qkv = [layer for layer in joint.layers if layer.group == "attn_qkv_joint"]
    assert joint_qkv and all(joint.inverses[layer.name].q_gradient.shape[0] == layer.out_features for layer in joint_qkv)
    assert len([layer for layer in independent.layers if layer.group == "attn_qkv_independent"]) == 3 * len(joint_qkv)
    batch = _doc_batch()
    assert not torch.allclose(joint.score(model, batch), independent.score(model, batch), rtol=1e-3)


@pytest.mark.parametrize("layout", sorted(MODELS))
@pytest.mark.parametrize("name", ["kfac_joint_qkv", "cosine"])
def test_padding_does_not_change_scores(layout: str, name: str) -> None:
    model = MODELS[layout]()
    estimator = _fitted(model, name)
    padded = random_batch(3, 12, VOCAB, seed=5, lengths=[6, 12, 9])
    alone = {k: v[:1, :6] for k, v in padded.items()}
    torch.testing.assert_close(estimator.score(model, alone)[0], estimator.score(model, padded)[0],
                               rtol=1e-9, atol=1e-12)


def test_same_seed_same_scores_and_save_load(tmp_path) -> None:
    model = tiny_llama()
    batch = _doc_batch()
    first, second = _fitted(model, "ekfac_joint_qkv"), _fitted(model, "ekfac_joint_qkv")
    assert torch.equal(first.score(model, batch), second.score(model, batch))
    first.save(tmp_path / "ekfac.safetensors")
    restored = make_estimator("ekfac_joint_qkv", InfluenceSettings(mode="reverse"))
    restored.load(model, tmp_path / "ekfac.safetensors")
    torch.testing.assert_close(restored.score(model, batch), first.score(model, batch))


def test_unsupported_models_and_bad_input_fail_clearly() -> None:
    with pytest.raises(ValueError, match="not a supported decoder layout"):
        discover_layers(nn.Sequential(nn.Linear(4, 4)), GROUPS[:1])
    with pytest.raises(ValueError, match="unknown layer group"):
        discover_layers(tiny_llama(), ("mlp", "attn"))
    with pytest.raises(ValueError, match="unknown estimator"):
        make_estimator("kfac_everything")
    with pytest.raises(RuntimeError, match="set_reference"):
        make_estimator("dot").score(tiny_llama(), _doc_batch())
    with pytest.raises(ValueError, match="lacks"):
        document_losses(tiny_llama(), {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="damping_mode"):
        InfluenceSettings(damping_mode="adaptive")


def test_explicit_matrix_matches_apply_for_ekfac_eigenvalues() -> None:
    generator = torch.Generator().manual_seed(2)
    q_a = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))[0]
    q_g = torch.linalg.qr(torch.randn(2, 2, generator=generator, dtype=torch.float64))[0]
    inverse = DampedKroneckerInverse(q_a, q_g, torch.rand(2, 3, generator=generator, dtype=torch.float64), 0.2)
    matrix = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(inverse.apply(matrix).flatten(), torch.linalg.solve(inverse.explicit(), matrix.flatten()))


# -- a real model's scale: SmolLM2-135M's layout, memory, Fisher sampling, the central-difference step --------
def test_smollm2_layout_joint_gqa_qkv_and_untracked_head() -> None:
    """SmolLM2-135M (built on the meta device): joint Q/K/V with grouped-query attention is one block of
    576 + 192 + 192 outputs; the tied embedding/output head is not tracked (layers.py says why), and the
    float64 K-FAC factors of all 150 layers take the 2.4 GB that kfac.py states."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    layers = discover_layers(model, ESTIMATORS["kfac_joint_qkv"].groups)
    qkv = [layer for layer in layers if layer.group == "attn_qkv_joint"]
    assert len(layers) == 150 and len(qkv) == 30
    assert {(layer.out_features, layer.in_features) for layer in qkv} == {(576 + 192 + 192, 576)}
    assert not any("lm_head" in layer.name or "embed" in layer.name for layer in layers)
    factor_bytes = 8 * sum(layer.in_augmented ** 2 + layer.out_features ** 2 for layer in layers)
    assert 2.3e9 < factor_bytes < 2.5e9, factor_bytes


def test_sampled_labels_follow_the_softmax_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels are drawn chunk by chunk in float32, yet follow softmax(logits) and the seed."""
    monkeypatch.setattr(influence_loss, "FISHER_SAMPLE_ROWS", 7)
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.clamp_min(1e-30).log().double().expand(4, 1000, 4)  # [B, T, V], float64 like a toy model
    drawn = sample_labels(logits, torch.Generator().manual_seed(5))  # [4, 1000]
    assert drawn.shape == (4, 1000) and drawn.dtype == torch.long
    frequencies = torch.bincount(drawn.flatten(), minlength=4).double() / drawn.numel()
    sigma = (probs.double() * (1 - probs.double()) / drawn.numel()).sqrt()
    assert bool(((frequencies - probs.double()).abs() <= 5 * sigma + 1e-12).all()), frequencies
    assert torch.equal(drawn, sample_labels(logits, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigenbases_are_kept_in_the_models_precision(dtype: torch.dtype) -> None:
    model = tiny_llama(dtype=dtype)
    estimator = make_estimator("kfac_joint_qkv", InfluenceSettings(mode="reverse"))
    estimator.fit(model, _fit_batches())
    assert {inv.q_activation.dtype for inv in estimator.inverses.values()} == {dtype}
    assert {e.dtype for inv in estimator.inverses.values() for e in inv.kronecker_eigenvalues} == {dtype}
    assert {inv.diagonal().dtype for inv in estimator.inverses.values()} == {dtype}


def test_central_difference_step_is_chosen_per_model(tmp_path) -> None:
    """With fd_step None, set_reference measures every candidate step against reverse mode on the first
    reference batch and keeps the most accurate; it is saved with the estimator and scores stay close."""
    model = tiny_llama(hidden=64, layers=2, dtype=torch.float32)
    estimator = make_estimator("kfac_joint_qkv", InfluenceSettings(mode="central_difference"))
    assert estimator.settings.fd_step is None
    estimator.fit(model, _fit_batches())
    estimator.set_reference(model, _ref_batches())
    errors = estimator.fd_errors
    assert set(errors) == set(FD_STEP_CANDIDATES) and estimator.fd_step == min(errors, key=errors.get)
    assert errors[estimator.fd_step] < max(errors.values())
    batch = random_batch(5, 8, VOCAB, seed=21, lengths=[8, 6, 8, 3, 8])
    reverse = estimator.score_layers(model, batch)
    exact = torch.stack(list(reverse.values())).sum(0)
    chosen = estimator.score(model, batch)
    worst_step = max(errors, key=errors.get)
    estimator.settings.fd_step = worst_step
    worst = estimator.score(model, batch)
    estimator.settings.fd_step = None
    assert (chosen - exact).abs().max() <= (worst - exact).abs().max()
    estimator.save(tmp_path / "est.safetensors")
    again = make_estimator("kfac_joint_qkv", InfluenceSettings(mode="central_difference"))
    again.load(model, tmp_path / "est.safetensors")
    assert again.fd_step == estimator.fd_step
    torch.testing.assert_close(again.score(model, batch), chosen)


# -- what a fitted estimator holds: eigenbases, K-FAC eigenvalues as (g, a), V once in the model's precision ----
@pytest.mark.parametrize("name", ["kfac_joint_qkv", "ekfac_joint_qkv"])
def test_float32_estimator_holds_eigenbases_eigenvalues_and_one_direction(name: str) -> None:
    """Exact byte count after fit, set_reference and scoring in every mode: float32 Q_A and Q_G, K-FAC's
    eigenvalues as the vectors g and a (EK-FAC's diagonal whole), V once in float32 and no scoring copy
    (Llama's q/k/v tangents are views of V). The old layout held g a^T whole, V in float64 and a float32 copy."""
    model = tiny_llama(hidden=32, layers=2, dtype=torch.float32)
    estimator = _fitted(model, name, InfluenceSettings(fisher="sampled", seed=3, mode="reverse", fd_step=1e-3))
    batch = _doc_batch()
    for mode in SCORING_MODES:
        estimator.settings.mode = mode
        estimator.score(model, batch)
    shapes = [(layer.out_features, layer.in_augmented) for layer in estimator.layers]
    eigenvalues = sum(o * i for o, i in shapes) if name.startswith("ekfac") else sum(o + i for o, i in shapes)
    assert estimator.held_bytes() == {"eigenbases": 4 * sum(o * o + i * i for o, i in shapes),
                                      "eigenvalues": 4 * eigenvalues,
                                      "direction": 4 * sum(o * i for o, i in shapes), "scoring copies": 0}
    assert {v.dtype for v in estimator.direction.values()} == {torch.float32}


def test_kfac_save_load_keeps_eigenvalue_vectors_and_reads_full_eigenvalues(tmp_path) -> None:
    """K-FAC saves (g, a) and reloads to the same scores; a file holding the full g a^T (the older layout)
    loads to the same scores too."""
    model = tiny_llama()
    batch = _doc_batch()
    fitted = _fitted(model, "kfac_joint_qkv")
    fitted.save(tmp_path / "kfac.safetensors")
    restored = make_estimator("kfac_joint_qkv", InfluenceSettings(mode="reverse"))
    restored.load(model, tmp_path / "kfac.safetensors")
    assert all(inv.eigenvalues is None for inv in restored.inverses.values())
    torch.testing.assert_close(restored.score(model, batch), fitted.score(model, batch), rtol=0, atol=0)
    for inv in fitted.inverses.values():
        inv.eigenvalues, inv.kronecker_eigenvalues = inv.diagonal(), None
    fitted.save(tmp_path / "full.safetensors")
    old_layout = make_estimator("kfac_joint_qkv", InfluenceSettings(mode="reverse"))
    old_layout.load(model, tmp_path / "full.safetensors")
    old_layout.set_reference(model, _ref_batches())
    restored.set_reference(model, _ref_batches())
    torch.testing.assert_close(old_layout.score(model, batch), restored.score(model, batch), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_packed_factor_sums_hold_half_and_decompose_bit_for_bit(n: int) -> None:
    """The float64 K-FAC sums keep only the lower triangle ((n+1) ceil(n/2) numbers), unpack to the sum of
    the matrices' lower triangles mirrored, and eigh of the unpacked sum equals eigh of the plain float64
    sum exactly (eigh reads the lower triangle only); the old accumulator held n^2 numbers per factor."""
    generator = torch.Generator().manual_seed(n)
    grams = [(lambda x: x.T @ x)(torch.randn(7, n, generator=generator)) for _ in range(3)]  # float32 [n, n]
    packed = SymmetricSum(n)
    for gram in grams:
        packed.add_(gram)
    plain = sum(gram.double() for gram in grams)  # [n, n]
    assert packed.top.numel() + packed.bottom.numel() == (n + 1) * ((n + 1) // 2)
    unpacked = packed.full()
    assert torch.equal(unpacked.tril(), plain.tril()) and torch.equal(unpacked, unpacked.T)
    assert torch.equal(packed.lower(), plain.tril())
    for got, want in zip(KroneckerFactors(packed, packed, 3).eigen()[:2], torch.linalg.eigh(plain / 3), strict=True):
        assert torch.equal(got.clamp_min(0) if got.ndim == 1 else got, want.clamp_min(0) if want.ndim == 1 else want)
    layer = TrackedLayer("fc", "mlp", 0, (LayerPart("fc"),), n, 2 * n + 1, has_bias=True)
    accumulator = FactorAccumulator([layer])
    held = [accumulator.activation["fc"], accumulator.gradient["fc"]]
    assert sum(s.top.nbytes + s.bottom.nbytes for s in held) == 8 * sum((m + 1) * ((m + 1) // 2) for m in (n + 1, 2 * n + 1))
