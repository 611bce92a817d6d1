"""PPL, SemDeDup and top-k influence as published: each test pins the method's defining behaviour.

Mutants each test must kill (issue 16): PPL band or order reversed; SemDeDup epsilon ignored;
top-k order reversed (QuRating's Bradley-Terry direction is pinned in tests/test_qurating.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from selection_helpers import TableScorer, clustered_pool

from quadlib.corpus import approx_token_count
from quadlib.evaluation.lm_metrics import LMMetricSettings, text_losses
from quadlib.proxy import build_model, train_bpe_tokenizer
from quadlib.runstore import RunStore
from quadlib.selection import Cost, Selection, SelectionContext, export_selection, make_selector
from quadlib.selection.methods.perplexity import band_order
from quadlib.selection.methods.semdedup import epsilon_for_ratio, max_similarity_to_earlier, semdedup_scores
from quadlib.synthetic import SyntheticSettings, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- SemDeDup

def duplicate_groups_pool(similarities=(0.995, 0.97, 0.9, 0.6), copies=3, seed=0):
    """One cluster per similarity level: a base vector and `copies` members at cosine ~`s` to it.

    Within a cluster the members are near-duplicates of each other at a known level, so the
    published rule (remove j when max similarity to an earlier member > 1 - eps) removes whole
    levels as eps grows.
    """
    rng = np.random.default_rng(seed)
    dim = 64
    rows, vectors, labels = [], [], []
    for c, s in enumerate(similarities):
        base = rng.normal(size=dim)
        base /= np.linalg.norm(base)
        for i in range(copies + 1):
            noise = rng.normal(size=dim)
            noise -= (noise @ base) * base
            noise /= np.linalg.norm(noise)
            v = base if i == 0 else s * base + np.sqrt(1 - s * s) * noise
            rows.append({"id": f"c{c}-{i}", "text": f"doc {c} {i}", "source": f"s{c}", "n_tokens": 10})
            vectors.append(v)
            labels.append(c)
    pool = pd.DataFrame(rows)
    return pool, np.asarray(vectors, dtype=np.float32), pd.DataFrame({"id": pool["id"], "cluster": labels})


def test_semdedup_m_is_the_max_similarity_to_any_earlier_member_even_a_removed_one():
    # a ~ b (0.99) and b ~ c (0.99) but a, c less similar: published SemDeDup removes c because of b,
    # although b itself is removed (M compares with every earlier member, not only kept ones).
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.99, np.sqrt(1 - 0.99**2), 0.0])
    c_dir = np.array([0.99**2 - (1 - 0.99**2), 2 * 0.99 * np.sqrt(1 - 0.99**2), 0.0])  # b rotated by the same angle
    m = max_similarity_to_earlier(np.stack([a, b, c_dir]), np.array([0, 1, 2]))
    assert m[0] == 0.0
    assert m[1] == pytest.approx(0.99, abs=1e-6) and m[2] == pytest.approx(0.99, abs=1e-6)


def test_semdedup_order_is_farthest_from_the_centroid_first():
    pool, vectors, assignments = duplicate_groups_pool(similarities=(0.97,), copies=3)
    labels = assignments["cluster"].to_numpy()
    m_hard = semdedup_scores(vectors, labels, pool["id"].to_numpy(), "hard")
    m_easy = semdedup_scores(vectors, labels, pool["id"].to_numpy(), "easy")
    # the base vector is the most central member: kept (M = 0) when easy examples are kept, removed when hard
    assert m_easy[0] == 0.0 and m_hard[0] > 0.9
    assert (m_hard == 0).sum() == 1 and (m_easy == 0).sum() == 1


@pytest.mark.parametrize("keep_ratio, removed_levels", [(0.8, 1), (0.6, 2), (0.25, 4)])
def test_semdedup_epsilon_is_searched_to_reach_the_keep_ratio(keep_ratio, removed_levels):
    pool, vectors, assignments = duplicate_groups_pool()
    ctx = SelectionContext(pool=pool, assignments=assignments, embeddings=vectors, seed=0)
    budget = int(pool["n_tokens"].sum())  # the whole pool fits: the order shows what dedup kept
    selection = make_selector("semdedup", {"keep_ratio": keep_ratio}).select(ctx, budget)
    eps = selection.extra["epsilon"]
    m = pd.Series(selection.scores, index=selection.ids)
    kept = m[m <= 1 - eps + 1e-9].index
    assert selection.extra["kept_token_ratio"] >= keep_ratio
    assert selection.extra["kept_token_ratio"] == pytest.approx(len(kept) / len(pool))
    # the most duplicated levels go first: 3 of 4 members of each removed level, the base survives
    assert selection.extra["n_duplicates_removed"] == 3 * removed_levels
    removed_clusters = {i.split("-")[0] for i in m.index if m[i] > 1 - eps + 1e-9}
    assert removed_clusters == {f"c{c}" for c in range(removed_levels)}
    # the kept set comes first in the selection; the removed fill in ascending M
    n_kept = len(kept)
    assert set(selection.ids[:n_kept]) == set(kept)
    assert np.all(np.diff(m.to_numpy()[n_kept:]) >= 0)


def test_semdedup_default_ratio_is_the_budget_so_the_selection_is_the_deduplicated_pool():
    pool, vectors, assignments = duplicate_groups_pool()
    ctx = SelectionContext(pool=pool, assignments=assignments, embeddings=vectors, seed=0)
    budget = 70  # 7 of 16 documents: eps removes the three most duplicated levels' copies (9 documents)
    selection = make_selector("semdedup").select(ctx, budget)
    assert selection.extra["target_keep_ratio"] == pytest.approx(budget / pool["n_tokens"].sum())
    assert len(selection.ids) == 7
    m = pd.Series(selection.scores, index=selection.ids)
    assert (m <= 1 - selection.extra["epsilon"] + 1e-9).all()


def test_epsilon_for_ratio_is_exact_on_the_sorted_similarities():
    m = np.array([0.0, 0.5, 0.9, 0.99])
    tokens = np.array([10, 10, 10, 10])
    assert epsilon_for_ratio(m, tokens, 0.5) == pytest.approx(0.5)  # keep M <= 0.5: two of four
    assert epsilon_for_ratio(m, tokens, 0.75) == pytest.approx(0.1)
    assert epsilon_for_ratio(m, tokens, 1.0) == pytest.approx(0.01)


# ---------------------------------------------------------------- Top-k influence

@pytest.fixture
def scored_pool():
    pool, assignments, truth = clustered_pool([0.03, 0.01, -0.01, -0.02], docs_per_cluster=30, noise=0.01)
    return pool.assign(text=pool["id"]), assignments, truth


def test_topk_influence_takes_the_highest_scores_of_the_whole_pool(scored_pool):
    pool, assignments, truth = scored_pool
    ctx = SelectionContext(pool=pool, assignments=assignments, scorer=TableScorer(truth), seed=1)
    selection = make_selector("topk_influence").select(ctx, 300)
    chosen = set(selection.ids)
    taken = [truth[i] for i in selection.ids]
    assert taken == sorted(taken, reverse=True)  # selection order is descending influence
    others = [truth[i] for i in pool["id"] if i not in chosen]
    tokens = pool.set_index("id")["n_tokens"]
    # every document with a higher score than the lowest taken one was taken, or did not fit
    skipped = [i for i in pool["id"] if i not in chosen and truth[i] > min(taken)]
    assert all(tokens[i] > 300 - selection.tokens_selected for i in skipped)
    assert np.mean(taken) > np.mean(others)
    assert selection.cost.docs_scored == len(pool) and selection.extra["scored_fraction"] == 1.0


def test_topk_influence_quadcost_scores_as_many_documents_as_quad(scored_pool, tmp_path):
    pool, assignments, truth = scored_pool
    store = RunStore(tmp_path / "run")
    ctx = SelectionContext(pool=pool, assignments=assignments, scorer=TableScorer(truth), seed=1, run_dir=store.root)
    quad = Selection(method="quad", ids=pool["id"].tolist()[:3], scores=np.zeros(3), cost=Cost(docs_scored=37),
                     params={}, budget_tokens=300, tokens_selected=int(pool["n_tokens"][:3].sum()))
    export_selection(quad, ctx, store)
    selection = make_selector("topk_influence_quadcost").select(ctx, 300)
    assert selection.cost.docs_scored == 37 == selection.extra["docs_scored"]
    with pytest.raises(ValueError, match="run 'quad' before"):
        make_selector("topk_influence_quadcost").select(
            SelectionContext(pool=pool, scorer=TableScorer(truth), run_dir=tmp_path / "empty"), 300)


# ---------------------------------------------------------------- PPL

def test_band_order_low_high_middle():
    losses = np.array([5.0, 1.0, 3.0, 4.0, 2.0])
    ids = np.array(["a", "b", "c", "d", "e"])
    assert band_order(losses, ids, "low").tolist() == [1, 4, 2, 3, 0]
    assert band_order(losses, ids, "high").tolist() == [0, 3, 2, 4, 1]
    assert band_order(losses, ids, "middle").tolist()[:3] == [2, 4, 3]  # the median, then its neighbours


@pytest.fixture(scope="module")
def reference_lm_dir(tmp_path_factory):
    """A tiny Llama with its own BPE tokenizer (pad/bos/eos), saved as a Hugging Face folder."""
    records, reference = generate(SyntheticSettings(docs_per_domain=10, reference_docs=8, seed=3))
    folder = tmp_path_factory.mktemp("reference-lm")
    tokenizer = train_bpe_tokenizer([r["text"] for r in records], 400, folder)
    model = build_model("test-llama", tokenizer=tokenizer, device="cpu", seed=0)
    model.save_pretrained(folder)
    pool = pd.DataFrame(records)
    pool["n_tokens"] = pool["text"].map(approx_token_count)
    return folder, pool, model, tokenizer


@pytest.mark.parametrize("band", ["low", "middle", "high"])
def test_ppl_keeps_its_band_of_the_reference_models_perplexity(reference_lm_dir, band):
    folder, pool, model, tokenizer = reference_lm_dir
    ctx = SelectionContext(pool=pool, seed=0)
    budget = int(pool["n_tokens"].sum() * 0.3)
    selection = make_selector("ppl", {"band": band, "reference_model": str(folder)}).select(ctx, budget)
    losses = text_losses(model.eval(), tokenizer, pool["text"].tolist(), LMMetricSettings())
    truth = pd.Series(losses.doc_mean_losses, index=pool["id"])
    np.testing.assert_allclose(selection.scores, truth[selection.ids].to_numpy(), rtol=1e-5)  # float32 logits
    chosen, rest = truth[selection.ids], truth.drop(selection.ids)
    median = truth.median()
    if band == "low":
        assert chosen.median() < truth.quantile(0.25)
    elif band == "high":
        assert chosen.median() > truth.quantile(0.75)
    else:
        assert truth.quantile(0.35) < chosen.median() < truth.quantile(0.65)
        assert (chosen - median).abs().median() < (rest - median).abs().median() / 2
    assert selection.extra["reads"]["reference_model"] == str(folder)
    # one forward pass per window read (longer documents than the context are read in several)
    assert selection.cost.forward_passes == losses.doc_windows.sum() > len(pool)
    assert selection.cost.tokens == losses.tokens_fed and selection.cost.backward_passes == 0


def test_ppl_refuses_an_untrained_architecture(reference_lm_dir):
    _, pool, _, _ = reference_lm_dir
    with pytest.raises(ValueError, match="untrained architecture"):
        make_selector("ppl", {"reference_model": "test-llama"}).select(SelectionContext(pool=pool), 100)
