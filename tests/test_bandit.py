"""The Quad bandit: UCB formula, tie-breaking, keep rules, exhaustion, budget, determinism, resume, replay."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from selection_helpers import TableScorer, clustered_pool

from quadlib.runstore import RunStore
from quadlib.selection.bandit import (
    BanditSettings, cluster_scores, keep_mask, load_rounds, pick_arms, replay, run_bandit,
)
from quadlib.selection.scoring import CachingScorer

MEANS = [0.02, 0.015, 0.01, 0.0, -0.005, -0.01]


@pytest.fixture
def setup():
    return clustered_pool(MEANS, docs_per_cluster=40)


def settings(**overrides) -> BanditSettings:
    base = dict(alpha=0.002, gamma=0.25, tau=0.0025, k=2, batch_size=8, budget_tokens=400, seed=3)
    return BanditSettings(**{**base, **overrides})


def test_cluster_scores_match_the_ucb_formula_by_hand():
    reward, pulls, scored = np.array([3.0, 1.0, 0.0]), np.array([2.0, 1.0, 0.0]), np.array([6.0, 2.0, 0.0])
    bonus = lambda t: 0.5 * math.sqrt(2 * math.log(3.0) / t)  # noqa: E731 - the paper's exploration term
    per_pull = cluster_scores(reward, pulls, scored, alpha=0.5, mean_rule="per_pull")
    assert per_pull[:2] == pytest.approx([1.5 + bonus(2), 1.0 + bonus(1)])
    assert per_pull[2] == np.inf  # untried arms first (pull_all cold start)
    per_doc = cluster_scores(reward, pulls, scored, alpha=0.5, mean_rule="per_doc")
    assert per_doc[:2] == pytest.approx([0.5 + bonus(2), 0.5 + bonus(1)])


def test_ties_go_to_the_smaller_label_and_inactive_arms_drop_out():
    cs = np.array([1.0, 2.0, 2.0, 2.0, np.inf])
    active = np.array([True, True, True, True, False])
    assert pick_arms(cs, active, 2).tolist() == [1, 2]
    assert pick_arms(cs, active, 10).tolist() == [1, 2, 3, 0]


def test_keep_rules():
    scores = np.array([0.01, 0.003, 0.02, 0.001, 0.004, -0.01, 0.005, 0.006])
    ids = [f"d{i}" for i in range(8)]
    top = settings(gamma=0.25, tau=0.0025)  # cap floor(0.25 * 8) = 2
    assert np.flatnonzero(keep_mask(scores, ids, top)).tolist() == [0, 2]
    only = settings(keep_rule="threshold_only", tau=0.0045)
    assert np.flatnonzero(keep_mask(scores, ids, only)).tolist() == [0, 2, 6, 7]
    fraction = settings(keep_rule="top_fraction", gamma=0.375, tau=1.0)  # tau ignored, cap 3
    assert np.flatnonzero(keep_mask(scores, ids, fraction)).tolist() == [0, 2, 7]
    strict = settings(gamma=0.5, tau=0.0055)  # cap 4, but only 3 exceed tau
    assert np.flatnonzero(keep_mask(scores, ids, strict)).tolist() == [0, 2, 7]
    arms = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # per batch: cap floor(0.5 * 4) = 2 in each arm
    per_batch = settings(gamma=0.5, tau=0.0025, keep_scope="batch")
    assert np.flatnonzero(keep_mask(scores, ids, per_batch, arms)).tolist() == [0, 2, 6, 7]
    per_round = settings(gamma=0.5, tau=0.0025, keep_scope="round")
    assert np.flatnonzero(keep_mask(scores, ids, per_round, arms)).tolist() == [0, 2, 6, 7]
    per_round_quarter = settings(gamma=0.25, tau=0.0025, keep_scope="round")
    assert np.flatnonzero(keep_mask(scores, ids, per_round_quarter, arms)).tolist() == [0, 2]
    per_batch_quarter = settings(gamma=0.25, tau=0.0025, keep_scope="batch", batch_size=4)
    assert np.flatnonzero(keep_mask(scores, ids, per_batch_quarter, arms)).tolist() == [2, 7]


def test_settings_reject_a_keep_rule_that_keeps_nothing():
    with pytest.raises(ValueError, match="batch_size"):
        settings(gamma=0.05, batch_size=8)
    with pytest.raises(ValueError, match="keep_rule"):
        settings(keep_rule="best")


def test_cold_start_pulls_every_cluster_once_in_label_order(setup):
    pool, assignments, truth = setup
    result = run_bandit(pool, assignments, TableScorer(truth), settings(max_rounds=5), progress=False)
    pulled = result.arms[result.arms["pulled"]].groupby("round")["cluster"].apply(list)
    assert pulled.iloc[:3].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert set(pulled.iloc[3]) <= {0, 1, 2}  # then UCB exploits the best arms (alpha is small)


def test_optimistic_cold_start_counts_a_pseudo_pull(setup):
    pool, assignments, truth = setup
    result = run_bandit(pool, assignments, TableScorer(truth),
                        settings(cold_start="optimistic", optimistic_mean=5.0, max_rounds=1), progress=False)
    first = result.arms[result.arms["round"] == 0]
    assert (first["T"] == 1).all() and (first["R"] == 5.0).all()


def test_exhausted_clusters_drop_out_and_every_doc_is_seen_once(setup):
    pool, assignments, truth = setup
    s = settings(keep_rule="threshold_only", tau=-1.0, budget_tokens=10**9, batch_size=16, k=3)
    scorer = TableScorer(truth)
    result = run_bandit(pool, assignments, scorer, s, progress=False)
    assert result.stop_reason == "exhausted"
    assert sorted(scorer.scored) == sorted(pool["id"])  # no document scored twice
    assert not (result.arms["pulled"] & ~result.arms["active"]).any()
    assert set(result.ids) == set(pool["id"])


def test_budget_is_never_exceeded_and_nothing_unseen_still_fits(setup):
    pool, assignments, truth = setup
    result = run_bandit(pool, assignments, TableScorer(truth), settings(budget_tokens=157), progress=False)
    tokens = pool.set_index("id")["n_tokens"]
    assert result.tokens_selected == tokens[result.ids].sum() <= 157
    assert result.stop_reason == "budget"
    unseen = tokens.drop(result.docs["id"])
    assert unseen.min() > 157 - result.tokens_selected


def test_same_seed_same_selection_whatever_the_row_order(setup):
    pool, assignments, truth = setup
    first = run_bandit(pool, assignments, TableScorer(truth), settings(), progress=False)
    shuffled = pool.sample(frac=1.0, random_state=7)
    second = run_bandit(shuffled, assignments.sample(frac=1.0, random_state=8), TableScorer(truth), settings(),
                        progress=False)
    assert first.ids == second.ids and len(first.ids) > 5
    other = run_bandit(pool, assignments, TableScorer(truth), settings(seed=4), progress=False)
    assert other.ids != first.ids


def test_resume_after_a_crash_gives_the_uninterrupted_selection(setup, tmp_path):
    pool, assignments, truth = setup
    reference = run_bandit(pool, assignments, TableScorer(truth), settings(), progress=False)
    store = RunStore(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_bandit(pool, assignments, TableScorer(truth, fail_on_call=6), settings(), store, progress=False)
    resumed_scorer = TableScorer(truth)
    resumed = run_bandit(pool, assignments, resumed_scorer, settings(), store, progress=False)
    assert resumed.ids == reference.ids
    assert resumed.rounds.tolist() == reference.rounds.tolist()
    n_rounds = int(reference.arms["round"].max()) + 1
    assert resumed_scorer.calls == n_rounds - 5  # the five finished rounds were not re-scored
    arms, docs = load_rounds(store)
    pd.testing.assert_frame_equal(docs, reference.docs)
    again = TableScorer(truth)
    assert run_bandit(pool, assignments, again, settings(), store, progress=False).ids == reference.ids
    assert again.calls == 0  # a finished run is read back, not recomputed


def _truth_scorer(setup, cache, n_params=1000):
    """A CachingScorer over the hidden true scores, with the texts and token counts it needs."""
    pool, _, truth = setup
    texts = dict(zip(pool["id"], pool["text"], strict=True))
    by_text = {texts[i]: v for i, v in truth.items()}
    n_tokens = dict(zip(pool["id"], pool["n_tokens"], strict=True))
    scorer = CachingScorer(lambda batch: np.array([by_text[t] for t in batch]), texts, n_tokens, cache,
                           n_params=n_params)
    return scorer, texts, n_tokens


def test_replay_from_the_cache_scores_nothing(setup, tmp_path):
    pool, assignments, truth = setup
    cache = tmp_path / "scores.parquet"
    live, texts, n_tokens = _truth_scorer(setup, cache)
    result = run_bandit(pool, assignments, live, settings(), progress=False)
    assert live.calls > 0 and live.cost.flops == 6 * 1000 * live.cost.tokens

    def refuse(batch):
        raise AssertionError("replay must not compute influence")

    cached = CachingScorer(refuse, texts, n_tokens, cache)
    assert run_bandit(pool, assignments, cached, settings(), progress=False).ids == result.ids
    assert cached.calls == 0
    for overrides in ({"alpha": 0.5}, {"tau": 0.012}, {"gamma": 0.5}, {"k": 3}):
        replayed = replay(cached.cached(pool["id"].tolist()), pool, assignments, settings(), **overrides)
        assert set(replayed.docs["id"]) <= set(cached.cached(pool["id"].tolist()))
        assert replayed.tokens_selected <= settings().budget_tokens
    live.score(pool["id"].tolist())  # with the whole pool scored, a replay is the live run exactly
    assert replay(live.cached(pool["id"].tolist()), pool, assignments, settings()).ids == result.ids


def test_bandit_prefers_better_clusters_but_explores(setup):
    pool, assignments, truth = setup
    result = run_bandit(pool, assignments, TableScorer(truth), settings(budget_tokens=600), progress=False)
    chosen = assignments.set_index("id").loc[result.ids, "cluster"]
    assert chosen.isin([0, 1, 2]).mean() > 0.9
    assert chosen.nunique() >= 2


def test_bandit_figures_draw_from_a_replay(setup):
    from quadlib.plots.bandit_plots import (
        cs_trajectories_figure, influence_distribution_figure, pulls_per_cluster_figure, quality_diversity_figure,
        source_mix_figure,
    )
    from quadlib.selection.metrics import quality_diversity, replay_sweep, source_mix

    pool, assignments, truth = setup
    result = replay(truth, pool, assignments, settings())
    heat = pulls_per_cluster_figure(result.arms).data[0]
    assert heat.z.shape == (len(MEANS), result.arms["round"].nunique())
    assert heat.z[:, -1].sum() == result.arms["pulled"].sum()  # the last column holds every pull
    assert len(cs_trajectories_figure(result.arms).data) == len(MEANS)
    assert len(influence_distribution_figure(result.scores, list(truth.values())).data) == 2
    mix = source_mix(result.ids, pool)
    assert mix.sum() == pytest.approx(1.0)
    assert len(source_mix_figure({"pool": source_mix(pool["id"], pool), "quad": mix}).data) == 2
    ranked_only = settings(keep_rule="top_fraction")  # tau off: low clusters may contribute when pulled
    sweep = replay_sweep(truth, pool, assignments, ranked_only, [{"alpha": a} for a in (0.0, 0.01, 1.0)])
    assert len(quality_diversity_figure(sweep).data[0].x) == 3
    summary = quality_diversity(result.ids, truth, assignments)
    assert summary["clusters_covered"] == assignments.set_index("id").loc[result.ids, "cluster"].nunique()
    exploring = sweep.set_index("alpha")
    assert exploring.loc[1.0, "entropy"] > exploring.loc[0.0, "entropy"]  # a large alpha spreads the pulls
    assert exploring.loc[1.0, "mean_influence"] < exploring.loc[0.0, "mean_influence"]  # ... at a quality cost


def test_cost_counts_cached_scores_too(setup, tmp_path):
    """A method's cost is its standalone cost: a warm cache changes `calls`, not `cost`."""
    pool, assignments, _ = setup
    cache = tmp_path / "scores.parquet"
    cold, _, _ = _truth_scorer(setup, cache, n_params=10)
    run_bandit(pool, assignments, cold, settings(), progress=False)
    warm, _, _ = _truth_scorer(setup, cache, n_params=10)
    run_bandit(pool, assignments, warm, settings(), progress=False)
    assert cold.calls > 0 and warm.calls == 0
    assert warm.cost == cold.cost and warm.cost.docs_scored > 0


def test_replay_explorer_starts_at_the_settings_and_redraws_with_the_moved_slider(setup, monkeypatch):
    from quadlib.plots import replay_explorer as explorer_module

    pool, assignments, truth = setup
    scores = pd.Series(truth)
    summary, figures = explorer_module.replay_figures(scores, pool, assignments, settings())
    assert summary.startswith(f"{len(replay(truth, pool, assignments, settings()).ids)} documents")
    assert len(figures) == 3 and len(figures[1].data) == len(MEANS)

    drawn: list[BanditSettings] = []
    monkeypatch.setattr(explorer_module, "replay_figures", lambda *args: drawn.append(args[3]) or ("", []))
    explorer = explorer_module.replay_explorer(scores, pool, assignments, settings())
    sliders = {s.description: s for s in explorer.children[0].children}
    assert {name: sliders[name].value for name in ("tau", "gamma", "k")} == {"tau": 0.0025, "gamma": 0.25, "k": 2}
    assert sliders["alpha"].value == pytest.approx(0.002) and sliders["k"].max == len(MEANS)
    assert drawn == []  # building the widget draws nothing (batch runs write no widget output)
    sliders["k"].value = 4
    assert len(drawn) == 1 and drawn[0] == settings(k=4)
