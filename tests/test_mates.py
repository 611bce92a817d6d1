"""MATES and Group-MATES: the behaviours that define them, each pinned by a test that fails under its mutant.

- the probe oracle's sign (positive = the step lowered the reference loss);
- MATES draws each interval's data by Gumbel-top-k on the predictions, highest first, and trains the
  proxy between intervals (then restores it);
- Group-MATES' relational term: a document similar to what is already picked is worth less.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch
from selection_helpers import id_noise, tiny_encoder
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quadlib.corpus import approx_token_count
from quadlib.selection import SelectionContext
from quadlib.selection.context import gumbel_order
from quadlib.selection.methods.group_mates import greedy_group_select, rollout_prediction
from quadlib.selection.methods.mates import (
    DataInfluenceModel,
    InfluenceModelSettings,
    MATESSelector,
    MATESSettings,
    domain_mean_prediction,
)
from quadlib.selection.probes import HFProbeModel
from quadlib.selection.scoring import Cost
from quadlib.synthetic import REFERENCE_DOMAINS, SyntheticSettings, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, list[str]]:
    records, reference = generate(SyntheticSettings(docs_per_domain=16, reference_docs=8, seed=3))
    pool = pd.DataFrame(records)
    pool["n_tokens"] = pool["text"].map(approx_token_count)
    return pool, [r["text"] for r in reference]


@pytest.fixture(scope="module")
def encoder(data, tmp_path_factory) -> str:
    pool, reference = data
    return tiny_encoder(pool["text"].tolist() + reference, tmp_path_factory.mktemp("encoder"))


def tiny_lm_probe(texts: list[str], reference: list[str], **kwargs) -> HFProbeModel:
    words = sorted({w for t in texts + reference for w in t.split()})
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, pad_token_id=0))
    return HFProbeModel(model, tokenizer, reference, max_length=64, device="cpu", **kwargs)


# -- the oracle's sign --------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_step_on_the_reference_itself_is_a_positive_oracle(data, optimizer):
    pool, reference = data
    probe = tiny_lm_probe(pool["text"].tolist(), reference, optimizer=optimizer,
                          lr=0.05 if optimizer == "sgd" else 1e-3)
    before = probe.reference_loss()
    drops = probe.rollout_delta([reference[:4], reference[4:]])  # two steps on reference documents
    assert drops[0] > 0 and drops[1] > drops[0]  # each step lowered L_ref further: oracle = L_before - L_after
    assert probe.reference_loss() == before  # weights restored
    with probe.preserved():
        probe.train_on(reference)
        trained = probe.reference_loss()
    assert trained < before and probe.reference_loss() == before  # train_on moves the checkpoint, preserved undoes it


def test_the_probe_step_is_the_training_step_on_the_framed_document(data):
    """One SGD step by hand (framing, loss, clipping) gives the probe's oracle."""
    from quadlib.proxy import causal_lm_loss, document_batches

    pool, reference = data
    probe = tiny_lm_probe(pool["text"].tolist(), reference, optimizer="sgd", lr=0.05, grad_clip=0.0)
    text = pool["text"].iloc[0]
    oracle = probe.one_step_delta([text])
    model, tokenizer = probe.model, probe.tokenizer
    saved = [p.detach().clone() for p in model.parameters()]

    def reference_loss() -> float:
        (batch,) = document_batches(tokenizer, reference, 64, len(reference))
        with torch.no_grad():
            return float(causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]))

    base = reference_loss()
    (batch,) = document_batches(tokenizer, [text], 64, 1)
    model.zero_grad()
    causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    expected = base - reference_loss()
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved, strict=True):
            p.copy_(s)
    # Both sides are differences of two float32 mean losses over ~10^2 tokens; their rounding differs
    # (sum/count vs mean, fused vs plain update), each loss by a few float32 ulps of its value.
    assert oracle == pytest.approx(expected, rel=0, abs=32 * float(np.finfo(np.float32).eps) * base)
    assert abs(expected) > 1e3 * np.finfo(np.float32).eps * base  # the step moved the loss far beyond rounding


# -- MATES: Gumbel-top-k on the predictions, interleaved with training ----------------------------------
class DomainProbe:
    """A fake proxy whose oracle is +1 for reference-domain documents and 0 otherwise (plus id noise);
    it counts checkpoints: `train_on` moves to the next, `preserved` restores."""

    def __init__(self, pool: pd.DataFrame) -> None:
        self.helpful = {t: (1.0 if s in REFERENCE_DOMAINS else 0.0) + id_noise(i, 0.05)
                        for t, s, i in zip(pool["text"], pool["source"], pool["id"], strict=True)}
        self.cost = Cost()
        self.checkpoint = 0
        self.probed_at: list[int] = []
        self.trained: list[list[str]] = []

    def reference_loss(self) -> float:
        return 0.0

    def rollout_delta(self, steps):
        self.probed_at.append(self.checkpoint)
        return np.cumsum([sum(self.helpful[t] for t in texts) for texts in steps])

    def one_step_delta(self, texts) -> float:
        return float(self.rollout_delta([texts])[0])

    def train_on(self, texts):
        self.trained.append(list(texts))
        self.checkpoint += 1
        return []

    @contextmanager
    def preserved(self):
        saved = self.checkpoint
        try:
            yield
        finally:
            self.checkpoint = saved


def mates_settings(encoder: str, **overrides) -> MATESSettings:
    model = InfluenceModelSettings(encoder=encoder, epochs=8, lr=3e-3, batch_size=8, device="cpu")
    return MATESSettings(**{"n_intervals": 2, "oracles_per_interval": 40, "temperature": 0.05,
                            "influence_model": model, **overrides})


def test_mates_draws_the_highest_predictions_and_trains_between_intervals(data, encoder):
    pool, _ = data
    probe = DomainProbe(pool)
    ctx = SelectionContext(pool=pool, probe=probe, seed=0)
    budget = int(pool["n_tokens"].sum() * 0.15)
    selection = MATESSelector(mates_settings(encoder)).select(ctx, budget)
    chosen = pool.set_index("id").loc[selection.ids]
    tokens = chosen["n_tokens"].to_numpy()
    share = tokens[chosen["source"].isin(REFERENCE_DOMAINS).to_numpy()].sum() / tokens.sum()
    assert share > 0.8  # reference domains hold 25% of the pool; the oracle's sign and the draw's order pick them
    assert sorted(set(selection.rounds.tolist())) == [0, 1]
    assert probe.probed_at == [0] * 40 + [1] * 40  # interval 1 probes the checkpoint trained on interval 0
    assert probe.trained == [chosen["text"][selection.rounds == 0].tolist()]
    assert probe.checkpoint == 0  # the caller's proxy comes back untouched
    for interval in selection.extra["intervals"]:
        assert interval["spearman"] > interval["domain_mean_spearman"] - 0.5  # measured and reported


def test_probe_lr_sets_every_probe_step_and_is_restored(data, encoder, monkeypatch):
    pool, reference = data
    probe = tiny_lm_probe(pool["text"].tolist(), reference, optimizer="sgd", lr=0.05, grad_clip=0.0)
    text = pool["text"].iloc[0]
    at_default = probe.one_step_delta([text])
    with probe.learning_rate(0.01):
        slower = probe.one_step_delta([text])
    assert probe.lr == 0.05 and probe.optimizer.param_groups[0]["lr"] == 0.05
    assert probe.one_step_delta([text]) == at_default  # restored
    assert slower != at_default and abs(slower) < abs(at_default)  # a fifth of the SGD step moves the loss less

    used = []
    step = probe._step
    monkeypatch.setattr(probe, "_step", lambda texts: used.append(probe.optimizer.param_groups[0]["lr"]) or step(texts))
    ctx = SelectionContext(pool=pool, probe=probe, seed=0)
    MATESSelector(mates_settings(encoder, oracles_per_interval=8, probe_lr=0.01)).select(
        ctx, int(pool["n_tokens"].sum() * 0.1))
    assert len(used) > 16 and set(used) == {0.01}  # 2 x 8 oracles and the interval's training, all at probe_lr
    assert probe.optimizer.param_groups[0]["lr"] == 0.05
    with pytest.raises(ValueError, match="probe_lr"):  # a probe that cannot change its rate is refused, not ignored
        MATESSelector(mates_settings(encoder, probe_lr=0.01)).select(SelectionContext(pool=pool, probe=DomainProbe(pool), seed=0), 100)


def test_gumbel_top_k_samples_high_log_weights_first():
    rng = np.random.default_rng(0)
    firsts = np.array([gumbel_order(np.log([1.0, 2.0, 7.0]), rng)[0] for _ in range(4000)])
    assert np.bincount(firsts, minlength=3) / 4000 == pytest.approx([0.1, 0.2, 0.7], abs=0.03)


def test_the_influence_model_fine_tunes_the_encoder(data, encoder):
    pool, _ = data
    texts = pool["text"].tolist()[:24]
    model = DataInfluenceModel(InfluenceModelSettings(encoder=encoder, epochs=2, lr=1e-3, device="cpu"))
    matrices = {n: p for n, p in model.encoder.named_parameters() if p.ndim == 2 and "pooler" not in n}
    before = {n: p.detach().clone() for n, p in matrices.items()}
    model.fit(texts, np.linspace(-1, 1, len(texts)))
    unchanged = [n for n, p in matrices.items() if torch.equal(before[n], p)]
    assert not unchanged  # every encoder matrix moved (the unused BERT pooler aside): not a head on frozen features


def test_domain_mean_baseline_predicts_each_domains_training_mean():
    got = domain_mean_prediction(np.array(["a", "a", "b"]), np.array([1.0, 3.0, 5.0]), np.array(["b", "a", "c"]))
    assert got.tolist() == [5.0, 2.0, 3.0]


# -- Group-MATES: the relational term ------------------------------------------------------------------
def unit(*rows: list[float]) -> np.ndarray:
    x = np.array(rows, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_relational_prediction_discounts_a_document_similar_to_its_predecessors():
    reps = torch.tensor(unit([1, 0], [1, 0.01], [0, 1]), dtype=torch.float32)  # A, A' (near A), B (orthogonal)
    predicted = rollout_prediction(torch.tensor([1.0, 1.0, 1.0]), reps, torch.tensor(1.0), torch.tensor(1.0))
    # A alone: its individual influence; A' after A: 1 * (1 - cos) ~ 0; B after A, A': 1 * mean(1 - 0, 1 - 0.01)
    np.testing.assert_allclose(predicted.numpy(), [1.0, 1 - 1 / np.hypot(1, 0.01), 1 - 0.01 / np.hypot(1, 0.01) / 2],
                               rtol=1e-5, atol=1e-6)


def test_greedy_group_selection_prefers_a_diverse_second_pick():
    individual = np.array([1.0, 0.99, 0.8])
    reps = unit([1, 0], [1, 0.01], [0, 1])
    picked, scores = greedy_group_select(individual, reps, np.ones(3, dtype=np.int64), 2, alpha=1.0, tau=1.0)
    assert picked.tolist() == [0, 2]  # individual influence alone would take the near-duplicate [0, 1]
    assert scores[1] == pytest.approx(0.8)


def test_greedy_group_selection_respects_the_budget_and_stops_when_nothing_fits():
    picked, _ = greedy_group_select(np.array([3.0, 2.0, 1.0]), unit([1, 0], [0, 1], [1, 1]),
                                    np.array([5, 4, 1]), 6, alpha=1.0, tau=1.0)
    assert picked.tolist() == [0, 2]


def test_the_probe_continues_the_warmup_optimizer_state(data, tmp_path):
    from quadlib.proxy import TrainSettings, latest_checkpoint, train_lm
    from quadlib.proxy.checkpoint import read_optimizer_moments

    pool, reference = data
    probe = tiny_lm_probe(pool["text"].tolist(), reference)
    train_lm(probe.model, probe.tokenizer, pool["text"].tolist()[:40],
             TrainSettings(total_steps=2, batch_size=2, block_size=16, warmup_steps=1, device="cpu"),
             tmp_path / "ckpt", progress=False)
    probe.model.eval()
    folder = latest_checkpoint(tmp_path / "ckpt")
    fresh = probe.one_step_delta([pool["text"].iloc[0]])
    probe.load_optimizer_moments(folder)
    saved = read_optimizer_moments(folder)
    params = [p for group in probe.optimizer.param_groups for p in group["params"]]
    assert torch.equal(probe.optimizer.state[params[0]]["exp_avg"], saved[0]["exp_avg"])
    assert probe.optimizer.param_groups[0]["lr"] == probe.lr  # the probe keeps its own learning rate
    assert probe.one_step_delta([pool["text"].iloc[0]]) != fresh  # the moments shape the step
    other = tiny_lm_probe(["a b c"], ["a b"])  # another vocabulary: other embedding shapes
    with pytest.raises(ValueError, match="does not fit this model"):
        other.load_optimizer_moments(folder)


def test_group_mates_inference_clusters_the_pool_and_spends_the_budget():
    from quadlib.selection.methods.group_mates import GroupMATESSelector, GroupMATESSettings

    rng = np.random.default_rng(0)
    centres = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    reps = unit(*(centres[i % 3] + 0.05 * rng.normal(size=3) for i in range(60)))  # three tight groups
    individual = np.where(np.arange(60) % 3 == 0, 1.0, 0.5) + 0.01 * rng.normal(size=60)
    pool = pd.DataFrame({"id": [f"d{i:02d}" for i in range(60)], "text": "x", "source": "s", "n_tokens": 10})
    selector = GroupMATESSelector(GroupMATESSettings(docs_per_cluster=20))
    order, scores, labels = selector._cluster_greedy(SelectionContext(pool=pool), individual, reps,
                                                     pool["n_tokens"].to_numpy(), 300, 1.0, 1.0)
    assert len(set(labels.tolist())) == 3 and len(order) == len(set(order.tolist())) == 30  # 300 tokens, all spent
    assert np.bincount(labels[order], minlength=3).tolist() == [10, 10, 10]  # each cluster its token share
