"""Every selector on tiny data: ids within budget, costs recorded; Quad vs random vs top-k influence."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from selection_helpers import TableScorer, clustered_pool, id_noise, tiny_encoder
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quadlib.corpus import approx_token_count
from quadlib.selection import SELECTORS, BanditSettings, SelectionContext, make_selector
from quadlib.selection.context import fill_budget
from quadlib.selection.methods.qurating import QuRatingSelector, QuRatingSettings
from quadlib.selection.probes import HFProbeModel
from quadlib.synthetic import DOMAINS, REFERENCE_DOMAINS, SyntheticSettings, generate

BUDGET = 1_500
SMALL_SETTINGS = {
    "topk_influence": {"sample_size": 60}, "topk_influence_quadcost": {"equal_cost_with": None, "sample_size": 60},
    "topk_clusters": {"sample_per_cluster": 4},
    "mates": {"n_intervals": 2, "oracles_per_interval": 8, "influence_model": {"epochs": 2, "lr": 1e-3}},
    "group_mates": {"n_rollouts": 3, "n_bootstrap_rollouts": 2, "rollout_length": 3, "bootstrap_candidates": 16,
                    "influence_model": {"epochs": 2, "lr": 1e-3, "batch_size": 2}},
    "quad": {"k": 2, "batch_size": 8, "gamma": 0.25},
}


def hashed_embeddings(texts: list[str], dim: int = 48) -> np.ndarray:
    """Bag-of-words vectors with hashed word buckets: similar vocabulary, similar vector."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, int(hashlib.md5(word.encode()).hexdigest()[:8], 16) % dim] += 1.0
    return out


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


class LengthRater:
    """A test rater: prefers documents with many distinct words."""

    n_params = 10

    def rate(self, texts):
        return np.array([len(set(t.split())) for t in texts], dtype=np.float64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module", autouse=True)
def tiny_influence_encoder(tmp_path_factory):
    """MATES and Group-MATES fine-tune a tiny BERT here instead of MiniLM (same code path, a fraction of the time)."""
    pool, reference = generate(SyntheticSettings(docs_per_domain=12, reference_docs=12, seed=1))
    path = tiny_encoder([r["text"] for r in pool + reference], tmp_path_factory.mktemp("encoder"))
    for name in ("mates", "group_mates"):
        SMALL_SETTINGS[name]["influence_model"]["encoder"] = path


@pytest.fixture(scope="module")
def ctx() -> SelectionContext:
    pool_records, reference = generate(SyntheticSettings(docs_per_domain=12, reference_docs=12, seed=1))
    pool = pd.DataFrame(pool_records)
    pool["n_tokens"] = pool["text"].map(approx_token_count)
    domain_index = {d.name: i for i, d in enumerate(DOMAINS)}
    assignments = pd.DataFrame({"id": pool["id"], "cluster": pool["source"].map(domain_index)})
    truth = {i: (0.01 if s in REFERENCE_DOMAINS else -0.002) + id_noise(i, 0.004)
             for i, s in zip(pool["id"], pool["source"], strict=True)}
    ref_texts = [r["text"] for r in reference]
    tokenizer = word_tokenizer(pool["text"].tolist() + ref_texts)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, pad_token_id=0))
    probe = HFProbeModel(model, tokenizer, ref_texts, lr=0.05, max_length=64, batch_size=16, device="cpu")
    return SelectionContext(pool=pool, reference_texts=ref_texts, assignments=assignments,
                            embeddings=hashed_embeddings(pool["text"].tolist()), scorer=TableScorer(truth),
                            doc_losses=probe.doc_losses, proxy_params=probe.n_params, probe=probe,
                            rater=LengthRater(), seed=5)


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_every_selector_fills_the_budget_with_pool_ids(ctx, name):
    selection = make_selector(name, SMALL_SETTINGS.get(name)).select(ctx, BUDGET)
    tokens = ctx.pool.set_index("id")["n_tokens"]
    assert selection.method == name
    assert len(set(selection.ids)) == len(selection.ids) > 0
    assert selection.tokens_selected == tokens[selection.ids].sum() <= BUDGET
    assert BUDGET - selection.tokens_selected < tokens.min() or name in ("quad", "topk_influence", "semdedup")
    assert len(selection.scores) == len(selection.ids)
    model_based = {"topk_influence", "topk_clusters", "quad", "mates", "group_mates", "ppl", "qurating"}
    if name in model_based:
        assert selection.cost.docs_scored > 0
    if name in {"mates", "group_mates"}:
        assert selection.cost.backward_passes > 0 and selection.cost.flops > 0
    if name in {"ppl", "qurating"}:
        assert selection.cost.forward_passes == len(ctx.pool) and selection.cost.backward_passes == 0


@pytest.mark.parametrize("name", ["random", "dsir", "mates", "group_mates", "semdedup"])
def test_same_seed_same_selection(ctx, name):
    first = make_selector(name, SMALL_SETTINGS.get(name)).select(ctx, BUDGET)
    second = make_selector(name, SMALL_SETTINGS.get(name)).select(ctx, BUDGET)
    assert first.ids == second.ids


def test_dsir_prefers_the_reference_style(ctx):
    chosen = ctx.pool.set_index("id").loc[make_selector("dsir").select(ctx, BUDGET).ids, "source"]
    assert chosen.isin(REFERENCE_DOMAINS).mean() > 2 * len(REFERENCE_DOMAINS) / len(DOMAINS)


def test_mates_oracles_come_from_real_probes(ctx):
    before = ctx.probe.reference_loss()
    selection = make_selector("mates", SMALL_SETTINGS["mates"]).select(ctx, BUDGET)
    assert ctx.probe.reference_loss() == pytest.approx(before)  # probes restore the weights
    oracle = np.array(selection.extra["intervals"][0]["oracles"])
    assert np.isfinite(oracle).all() and np.ptp(oracle) > 0


def test_qurating_refuses_an_unknown_criterion(ctx):
    with pytest.raises(ValueError, match="criterion must be one of"):
        QuRatingSelector(QuRatingSettings(criterion="vibes")).select(ctx, BUDGET)


def test_fill_budget_skips_what_does_not_fit():
    assert fill_budget(np.array([0, 1, 2, 3]), np.array([5, 9, 3, 1]), 9).tolist() == [0, 2, 3]


def test_quad_covers_relevant_clusters_better_than_random_and_more_clusters_than_topk():
    means = [0.03, 0.022, 0.016, 0.012] + [-0.004] * 8  # four reference-relevant clusters of twelve
    pool, assignments, truth = clustered_pool(means, docs_per_cluster=60, noise=0.004)
    ctx = SelectionContext(pool=pool.assign(text=pool["id"]), assignments=assignments, scorer=TableScorer(truth),
                           seed=2)
    budget = 1_800
    cluster = assignments.set_index("id")["cluster"]
    tokens = pool.set_index("id")["n_tokens"]
    picks = {}
    for name, settings in (("quad", BanditSettings(k=4, batch_size=10, gamma=0.3, alpha=0.002, tau=0.0025)),
                           ("random", None), ("topk_influence", None)):
        selector = SELECTORS[name](settings) if settings is not None else SELECTORS[name]()
        picks[name] = selector.select(ctx, budget).ids
    relevant = {n: tokens[ids][cluster[ids] < 4].sum() / tokens[ids].sum() for n, ids in picks.items()}
    covered = {n: cluster[ids].nunique() for n, ids in picks.items()}
    assert relevant["quad"] > relevant["random"] + 0.4
    assert covered["quad"] > covered["topk_influence"]


def test_topk_clusters_takes_the_highest_mean_clusters_first():
    """Quad's Fig. 4a baseline ranks clusters by their sampled mean influence, best first (issue 14's
    mutant: lowest first)."""
    pool, assignments, truth = clustered_pool([0.001, 0.03, -0.01, 0.015], docs_per_cluster=30)
    ctx = SelectionContext(pool=pool.assign(text=pool["id"]), assignments=assignments, scorer=TableScorer(truth),
                           seed=0)
    cluster = assignments.set_index("id")["cluster"]
    tokens = pool.set_index("id")["n_tokens"]
    budget = int(tokens[cluster == 1].sum() * 1.5)  # the best cluster and about half of the second
    ids = SELECTORS["topk_clusters"]().select(ctx, budget).ids
    per_cluster = tokens[ids].groupby(cluster[ids]).sum().reindex(range(4), fill_value=0)
    assert per_cluster[1] == tokens[cluster == 1].sum()  # all of the best cluster
    assert per_cluster[3] > per_cluster[0] + per_cluster[2]  # then the second best
