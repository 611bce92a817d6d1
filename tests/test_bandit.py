"""The Quad bandit: UCB formula, units, cold start, keep rules, stop rule, released_code preset,
determinism, resume, replay, the selection key, and the replay explorer driven from Python."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from selection_helpers import TableScorer, clustered_pool

from quadlib.cost import Passes
from quadlib.runstore import RunStore
from quadlib.selection.bandit import (
    BanditSettings, RunningScale, cluster_scores, keep_mask, load_rounds, pick_arms, replay, run_bandit,
)
from quadlib.selection.metrics import quality_diversity
from quadlib.selection.scoring import CachingScorer

MEANS = [0.02, 0.015, 0.01, 0.0, -0.005, -0.01]
# 16 clusters for the exploration tests, their quality in no relation to their label (the first arms
# the bandit tries are not the best, as on real data)
SPREAD = list(np.round(np.linspace(0.02, -0.01, 16), 4)[np.random.default_rng(1).permutation(16)])
BEST5 = set(np.argsort(SPREAD)[-5:].tolist())


@pytest.fixture
def setup():
    return clustered_pool(MEANS, docs_per_cluster=40)


@pytest.fixture(scope="module")
def spread():
    return clustered_pool(SPREAD, docs_per_cluster=100, noise=0.01)


def settings(**overrides) -> BanditSettings:
    base = dict(alpha=0.3, gamma=0.25, tau=0.0, k=2, batch_size=8, budget_tokens=400, seed=3)
    return BanditSettings(**{**base, **overrides})


def test_cluster_scores_match_the_ucb_formula_by_hand():
    # two pulls of arm 0 with batch means 1.0 and 2.0; one of arm 1 (mean 1.0); arm 2 untried
    reward, weight, pulls = np.array([3.0, 1.0, 0.0]), np.array([2.0, 1.0, 0.0]), np.array([2.0, 1.0, 0.0])
    log_total = math.log(3.0)
    cs = cluster_scores(reward, weight, pulls, alpha=0.5, prior_mean=0.25)
    assert cs == pytest.approx([1.5 + 0.5 * math.sqrt(2 * log_total / 3), 1.0 + 0.5 * math.sqrt(2 * log_total / 2),
                                0.25 + 0.5 * math.sqrt(2 * log_total / 1)])
    paper = cluster_scores(reward, weight, pulls, alpha=0.5, cold_start="pull_all")
    assert paper[:2] == pytest.approx([1.5 + 0.5 * math.sqrt(2 * log_total / 2), 1.0 + 0.5 * math.sqrt(2 * log_total)])
    assert paper[2] == np.inf  # untried arms first
    # in units of the score scale: each batch mean m is read as m / scale - offset
    z = cluster_scores(reward, weight, pulls, alpha=0.0, scale=2.0, offset=0.1)
    assert z[:2] == pytest.approx([(1.0 / 2 + 2.0 / 2) / 2 - 0.1, 1.0 / 2 - 0.1])


def test_running_scale_is_the_mean_and_std_of_every_score_seen():
    rng = np.random.default_rng(0)
    batches = [rng.normal(5.0, 3.0, size=n) for n in (1, 7, 16, 3)]
    scale = RunningScale(absolute=False)
    for batch in batches:
        scale.update(batch)
    everything = np.concatenate(batches)
    assert scale.mean == pytest.approx(everything.mean()) and scale.scale == pytest.approx(everything.std())
    absolute = RunningScale(absolute=True)
    absolute.update(everything)
    assert absolute.scale == 1.0


def test_rewards_are_batch_means_and_T_counts_pulls(setup):
    """R_i sums each pull's *mean* influence and T_i counts pulls (Eq. 6), read off the round records."""
    pool, assignments, truth = setup
    result = run_bandit(pool, assignments, TableScorer(truth), settings(batch_size=8, max_rounds=8), progress=False)
    docs, arms = result.docs, result.arms
    for r in range(1, 8):
        before = docs[docs["round"] < r]
        pulls = before.groupby("cluster")["round"].nunique()
        means = before.groupby(["cluster", "round"])["score"].mean().groupby("cluster").sum()
        state = arms[arms["round"] == r].set_index("cluster")
        assert state["T"].to_dict() == pulls.reindex(state.index, fill_value=0).astype(float).to_dict()
        assert state["R"].to_numpy() == pytest.approx(means.reindex(state.index, fill_value=0.0).to_numpy())
    assert (docs.groupby(["round", "cluster"]).size() == 8).all()  # batches of 8: a sum would be 8x the mean


def test_ties_go_to_the_smaller_label_and_inactive_arms_drop_out():
    cs = np.array([1.0, 2.0, 2.0, 2.0, np.inf])
    active = np.array([True, True, True, True, False])
    assert pick_arms(cs, active, 2).tolist() == [1, 2]
    assert pick_arms(cs, active, 10).tolist() == [1, 2, 3, 0]


def test_keep_rules():
    scores = np.array([0.01, 0.003, 0.02, 0.001, 0.004, -0.01, 0.005, 0.006])
    ids = [f"d{i}" for i in range(8)]
    absolute = dict(units="absolute", tau=0.0025)
    top = settings(gamma=0.25, **absolute)  # cap floor(0.25 * 8) = 2
    assert np.flatnonzero(keep_mask(scores, ids, top)).tolist() == [0, 2]
    only = settings(keep_rule="threshold_only", units="absolute", tau=0.0045)
    assert np.flatnonzero(keep_mask(scores, ids, only)).tolist() == [0, 2, 6, 7]
    fraction = settings(keep_rule="top_fraction", gamma=0.375, units="absolute", tau=1.0)  # tau ignored, cap 3
    assert np.flatnonzero(keep_mask(scores, ids, fraction)).tolist() == [0, 2, 7]
    strict = settings(gamma=0.5, units="absolute", tau=0.0055)  # cap 4, but only 3 exceed tau
    assert np.flatnonzero(keep_mask(scores, ids, strict)).tolist() == [0, 2, 7]
    arms = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # per batch: cap floor(0.5 * 4) = 2 in each arm
    per_batch = settings(gamma=0.5, keep_scope="batch", **absolute)
    assert np.flatnonzero(keep_mask(scores, ids, per_batch, arms)).tolist() == [0, 2, 6, 7]
    per_round = settings(gamma=0.5, keep_scope="round", **absolute)
    assert np.flatnonzero(keep_mask(scores, ids, per_round, arms)).tolist() == [0, 2, 6, 7]
    per_round_quarter = settings(gamma=0.25, keep_scope="round", **absolute)
    assert np.flatnonzero(keep_mask(scores, ids, per_round_quarter, arms)).tolist() == [0, 2]
    per_batch_quarter = settings(gamma=0.25, keep_scope="batch", batch_size=4, **absolute)
    assert np.flatnonzero(keep_mask(scores, ids, per_batch_quarter, arms)).tolist() == [2, 7]
    # tau in standard deviations from zero influence: score / scale > tau
    scaled = settings(keep_rule="threshold_only", tau=1.0)
    assert np.flatnonzero(keep_mask(scores, ids, scaled, scale=0.0045)).tolist() == [0, 2, 6, 7]
    with pytest.raises(ValueError, match="keep_rule"):
        settings(keep_rule="best")


def test_last_batch_smaller_than_one_over_gamma_keeps_its_best_document():
    scores, ids = np.array([0.1, 0.3, 0.2]), ["a", "b", "c"]
    assert np.flatnonzero(keep_mask(scores, ids, settings(gamma=0.25, units="absolute"))).tolist() == [1]
    assert np.flatnonzero(keep_mask(scores, ids, settings(gamma=0.25, units="absolute", tau=0.5))).tolist() == []


def test_score_scale_units_make_the_selection_independent_of_the_score_scale(spread):
    pool, assignments, truth = spread
    big = {i: 1000.0 * v for i, v in truth.items()}  # another proxy: scores on another scale
    base = run_bandit(pool, assignments, TableScorer(truth), settings(budget_tokens=600), progress=False)
    scaled = run_bandit(pool, assignments, TableScorer(big), settings(budget_tokens=600), progress=False)
    assert scaled.ids == base.ids and len(base.ids) > 20
    absolute = settings(budget_tokens=600, units="absolute", alpha=0.01, tau=0.0)
    assert (run_bandit(pool, assignments, TableScorer(truth), absolute, progress=False).ids
            != run_bandit(pool, assignments, TableScorer(big), absolute, progress=False).ids)


def test_alpha_sweep_moves_coverage_up_and_quality_down_monotonically(spread):
    """Averaged over seeds: each step up in alpha never lowers coverage or entropy and never raises the mean
    influence beyond the seeds' 95% interval, and the extremes differ beyond their intervals; the default
    alpha lies between them (up to the intervals: a little exploration may find a slightly better arm).
    Fails with the bonus's sign flipped (coverage falls), with alpha ignored (flat), and
    with a prior of 0 for untried arms (alpha 0 sweeps the clusters in label order: quality rose with alpha)."""
    from quadlib.selection.metrics import replay_sweep, sweep_intervals

    pool, assignments, truth = spread
    alphas = sorted({0.0, BanditSettings.alpha, 0.3, 1.0, 3.0, 10.0})
    runs = replay_sweep(truth, pool, assignments, settings(budget_tokens=600), [{"alpha": a} for a in alphas],
                        seeds=range(4))
    sweep = sweep_intervals(runs, "alpha").set_index("alpha")
    assert list(sweep.index) == alphas and (sweep["n_seeds"] == 4).all()
    for metric, sign in (("clusters_covered", 1), ("entropy", 1), ("mean_influence", -1)):
        mean, lo, hi = (sweep[c].to_numpy() for c in (metric, f"{metric}_lo", f"{metric}_hi"))
        if sign > 0:
            assert (mean[1:] >= lo[:-1]).all() and lo[-1] > hi[0], metric  # up, not by chance
        else:
            assert (mean[1:] <= hi[:-1]).all() and hi[-1] < lo[0], metric  # down, not by chance
        default = sweep.loc[BanditSettings.alpha, metric]  # between the extremes, up to their intervals
        assert min(lo[0], lo[-1]) <= default <= max(hi[0], hi[-1]), metric


def test_seen_mean_prior_makes_the_selection_independent_of_a_shift_of_the_scores(spread):
    """Untried arms are expected to be like the average document seen, so adding a constant to every
    score changes nothing (with a keep rule that does not read tau); a fixed prior of 0 does change it."""
    pool, assignments, truth = spread
    shifted = {i: v + 0.05 for i, v in truth.items()}  # every cluster now has a positive mean
    for alpha in (0.0, 0.3):
        s = settings(budget_tokens=600, alpha=alpha, keep_rule="top_fraction")
        base = run_bandit(pool, assignments, TableScorer(truth), s, progress=False)
        assert run_bandit(pool, assignments, TableScorer(shifted), s, progress=False).ids == base.ids
    fixed = settings(budget_tokens=600, alpha=0.0, keep_rule="top_fraction", prior="fixed")
    sweep = run_bandit(pool, assignments, TableScorer(shifted), fixed, progress=False)
    assert sweep.ids != run_bandit(pool, assignments, TableScorer(truth), fixed, progress=False).ids
    pulled = sweep.arms[sweep.arms["pulled"]].groupby("round")["cluster"].apply(list)
    assert pulled.iloc[0] == [0, 1] and sorted(set().union(*pulled)) == list(range(len(set().union(*pulled))))
    assert BanditSettings().prior_rule == "seen_mean" and BanditSettings(preset="released_code").prior_rule == "fixed"
    with pytest.raises(ValueError, match="prior"):
        BanditSettings(prior="optimistic")


def test_ten_thousand_arms_start_exploiting_within_a_few_rounds():
    n_arms = 10_000
    rng = np.random.default_rng(0)
    means = rng.normal(0.0, 1.0, n_arms)
    ids = [f"d{i:06d}" for i in range(3 * n_arms)]
    pool = pd.DataFrame({"id": ids, "n_tokens": 10})
    assignments = pd.DataFrame({"id": ids, "cluster": np.repeat(np.arange(n_arms), 3)})
    truth = dict(zip(ids, np.repeat(means, 3) + rng.normal(0.0, 0.1, 3 * n_arms), strict=True))
    s = BanditSettings(alpha=0.1, k=4, batch_size=1, budget_tokens=10**9, max_rounds=10)
    result = run_bandit(pool, assignments, TableScorer(truth), s, progress=False)
    pulls = result.arms[result.arms["pulled"]]
    assert pulls.groupby("cluster").size().max() >= 3  # an arm above the prior is pulled again and again
    assert pulls["cluster"].nunique() < 40  # 10 rounds of k = 4, far from the 2,500-round sweep
    sweep = run_bandit(pool, assignments, TableScorer(truth), BanditSettings(
        alpha=0.1, k=4, batch_size=1, budget_tokens=10**9, max_rounds=10, cold_start="pull_all"), progress=False)
    assert sweep.arms[sweep.arms["pulled"]]["cluster"].nunique() == 40  # the label-order sweep: nothing repeats


def test_pull_all_cold_start_pulls_every_cluster_once_in_label_order(setup):
    pool, assignments, truth = setup
    result = run_bandit(pool, assignments, TableScorer(truth), settings(max_rounds=5, cold_start="pull_all",
                                                                        alpha=0.01), progress=False)
    pulled = result.arms[result.arms["pulled"]].groupby("round")["cluster"].apply(list)
    assert pulled.iloc[:3].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert set(pulled.iloc[3]) <= {0, 1, 2}  # then UCB exploits the best arms (alpha is small)


def test_exhausted_clusters_drop_out_and_every_doc_is_seen_once(setup):
    pool, assignments, truth = setup
    s = settings(keep_rule="threshold_only", tau=-100.0, budget_tokens=10**9, batch_size=16, k=3)
    scorer = TableScorer(truth)
    result = run_bandit(pool, assignments, scorer, s, progress=False)
    assert result.stop_reason == "exhausted"
    assert sorted(scorer.scored) == sorted(pool["id"])  # no document scored twice
    assert not (result.arms["pulled"] & ~result.arms["active"]).any()
    assert set(result.ids) == set(pool["id"])


def test_no_round_starts_once_the_remaining_budget_is_below_the_median_document(spread):
    pool, assignments, truth = spread
    row = np.arange(len(pool))
    pool = pool.assign(n_tokens=np.where(row % 40 == 0, 1, 50 + row % 50))  # median 74, a few 1-token docs
    budget = 600
    result = run_bandit(pool, assignments, TableScorer(truth), settings(budget_tokens=budget), progress=False)
    tokens = pool.set_index("id")["n_tokens"]
    median = float(tokens.median())
    assert result.tokens_selected == tokens[result.ids].sum() <= budget
    assert result.stop_reason == "budget" and budget - result.tokens_selected < median
    selected = pd.Series(tokens[result.ids].to_numpy(), index=result.rounds)
    for r in range(int(result.arms["round"].max()) + 1):
        assert budget - selected[selected.index < r].sum() >= median  # every round began with a useful fill left
    # the rule "stop when nothing unseen fits" scored 1,596 documents in 106 rounds here to add 7 tokens
    assert len(result.docs) <= 64


def test_budget_stop_when_nothing_unseen_fits(setup):
    pool, assignments, truth = setup
    result = run_bandit(pool, assignments, TableScorer(truth), settings(budget_tokens=157, tau=-100.0),
                        progress=False)
    tokens = pool.set_index("id")["n_tokens"]
    assert result.tokens_selected <= 157 and result.stop_reason == "budget"


def test_same_seed_same_selection_whatever_the_row_order(setup):
    pool, assignments, truth = setup
    first = run_bandit(pool, assignments, TableScorer(truth), settings(), progress=False)
    shuffled = pool.sample(frac=1.0, random_state=7)
    second = run_bandit(shuffled, assignments.sample(frac=1.0, random_state=8), TableScorer(truth), settings(),
                        progress=False)
    assert first.ids == second.ids and len(first.ids) > 5
    other = run_bandit(pool, assignments, TableScorer(truth), settings(seed=4), progress=False)
    assert other.ids != first.ids


@pytest.mark.parametrize("preset", ["paper", "released_code"])
def test_resume_after_a_crash_gives_the_uninterrupted_selection(setup, tmp_path, preset):
    pool, assignments, truth = setup
    centroids = np.eye(len(MEANS)) + 0.05
    s = settings(preset=preset, accept_run=3)
    reference = run_bandit(pool, assignments, TableScorer(truth), s, progress=False, centroids=centroids)
    store = RunStore(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_bandit(pool, assignments, TableScorer(truth, fail_on_call=6), s, store, progress=False,
                   centroids=centroids)
    resumed_scorer = TableScorer(truth)
    resumed = run_bandit(pool, assignments, resumed_scorer, s, store, progress=False, centroids=centroids)
    assert resumed.ids == reference.ids and len(reference.ids) > 5
    assert resumed.rounds.tolist() == reference.rounds.tolist()
    n_rounds = int(reference.arms["round"].max()) + 1
    assert resumed_scorer.calls == n_rounds - 5  # the five finished rounds were not re-scored
    arms, docs = load_rounds(store)
    pd.testing.assert_frame_equal(docs, reference.docs)
    again = TableScorer(truth)
    assert run_bandit(pool, assignments, again, s, store, progress=False, centroids=centroids).ids == reference.ids
    assert again.calls == 0  # a finished run is read back, not recomputed


def test_released_code_preset_shares_rewards_with_neighbours_and_accepts_runs(setup):
    pool, assignments, truth = setup
    # arms 0 and 1 at cosine distance 0.1 (< 0.2), every other arm orthogonal (distance 1)
    centroids = np.zeros((len(MEANS), len(MEANS)))
    centroids[np.arange(len(MEANS)), np.arange(len(MEANS))] = 1.0
    centroids[1, :2] = [0.9, math.sqrt(1 - 0.81)]
    s = settings(preset="released_code", k=1, accept_run=5, units="absolute", alpha=0.0, max_rounds=1)
    result = run_bandit(pool, assignments, TableScorer(truth), s, progress=False, centroids=centroids)
    first = result.docs[result.docs["scored"]]
    m0 = first["score"].mean()
    after = run_bandit(pool, assignments, TableScorer(truth), settings(**{**vars(s), "max_rounds": 2}),
                       progress=False, centroids=centroids).arms.set_index(["round", "cluster"])
    assert after.loc[(1, 0), "T"] == 1 and after.loc[(1, 0), "R"] == pytest.approx(m0)
    assert after.loc[(1, 1), "T"] == 1 and after.loc[(1, 1), "R"] == pytest.approx(m0 * (1 - 0.1 / 0.2))
    assert after.loc[(1, 2), "T"] == 0
    # arm 0's mean influence 0.02 - 0.002 > 0: it accepts its first 5 documents in id order, scored or not
    assert result.ids == sorted(assignments[assignments["cluster"] == 0]["id"])[:5]
    with pytest.raises(ValueError, match="centroids"):
        run_bandit(pool, assignments, TableScorer(truth), s, progress=False)
    negative = {i: v - 1.0 for i, v in truth.items()}  # every arm below the offset: nothing is accepted
    assert run_bandit(pool, assignments, TableScorer(negative), s, progress=False, centroids=centroids).ids == []
    assert BanditSettings(preset="released_code").round_cap == 200
    # a replay on a cache that lacks every document of cluster 2: its centroid row drops out with it
    cached = {i: v for i, v in truth.items() if not i.startswith("c02-")}
    replayed = replay(cached, pool, assignments, settings(**{**vars(s), "max_rounds": 3}), centroids)
    assert 2 not in set(replayed.arms["cluster"]) and len(replayed.ids) > 0
    assert replayed.ids == run_bandit(pool[~pool["id"].str.startswith("c02-")], assignments, TableScorer(truth),
                                      settings(**{**vars(s), "max_rounds": 3}), progress=False,
                                      centroids=np.delete(centroids, 2, axis=0)).ids


def _truth_scorer(pool, truth, cache, n_params=1000):
    """A CachingScorer over the hidden true scores, with the texts and token counts it needs."""
    texts = dict(zip(pool["id"], pool["text"], strict=True))
    by_text = {texts[i]: v for i, v in truth.items()}
    n_tokens = dict(zip(pool["id"], pool["n_tokens"], strict=True))
    scorer = CachingScorer(lambda batch: np.array([by_text[t] for t in batch]), texts, n_tokens, cache,
                           n_params=n_params, passes=Passes(forward=1, backward=1))
    return scorer, texts, n_tokens


def test_replay_from_the_cache_scores_nothing(setup, tmp_path):
    pool, assignments, truth = setup
    cache = tmp_path / "scores.parquet"
    live, texts, n_tokens = _truth_scorer(pool, truth, cache)
    result = run_bandit(pool, assignments, live, settings(), progress=False)
    assert live.calls > 0

    def refuse(batch):
        raise AssertionError("replay must not compute influence")

    cached = CachingScorer(refuse, texts, n_tokens, cache)
    assert run_bandit(pool, assignments, cached, settings(), progress=False).ids == result.ids
    assert cached.calls == 0
    for overrides in ({"alpha": 3.0}, {"tau": 1.0}, {"gamma": 0.5}, {"k": 3}):
        replayed = replay(cached.cached(pool["id"].tolist()), pool, assignments, settings(), **overrides)
        assert set(replayed.docs["id"]) <= set(cached.cached(pool["id"].tolist()))
        assert replayed.tokens_selected <= settings().budget_tokens
    live.score(pool["id"].tolist())  # with the whole pool scored, a replay is the live run exactly
    assert replay(live.cached(pool["id"].tolist()), pool, assignments, settings()).ids == result.ids


def test_bandit_prefers_better_clusters_but_explores(spread):
    pool, assignments, truth = spread
    result = run_bandit(pool, assignments, TableScorer(truth), settings(budget_tokens=600, alpha=1.0),
                        progress=False)
    chosen = assignments.set_index("id").loc[result.ids, "cluster"]
    assert chosen.isin(BEST5).mean() > 0.6  # the five best of 16 clusters: 31% of the pool
    greedy = run_bandit(pool, assignments, TableScorer(truth), settings(budget_tokens=600, alpha=0.0),
                        progress=False)
    assert chosen.nunique() > assignments.set_index("id").loc[greedy.ids, "cluster"].nunique()


def test_changing_the_estimator_recomputes_the_selection(setup, tmp_path):
    """A saved selection is reused only for the same scorer identity (issue 14.4)."""
    from quadlib.pipeline import SelectionPlan, run_selections
    from quadlib.selection import SelectionContext

    pool, assignments, truth = setup
    store = RunStore(tmp_path / "run")
    plan = SelectionPlan(methods=["quad"], budget_tokens=200, method_settings={"quad": {"k": 2, "batch_size": 8}})
    first, _, _ = _truth_scorer(pool, truth, tmp_path / "run/influence/dot-aaaa/scores.parquet")
    run_selections(store, SelectionContext(pool=pool, assignments=assignments, scorer=first, run_dir=store.root), plan)
    assert first.calls > 0
    same, _, _ = _truth_scorer(pool, truth, tmp_path / "run/influence/dot-aaaa/scores.parquet")
    run_selections(store, SelectionContext(pool=pool, assignments=assignments, scorer=same, run_dir=store.root), plan)
    assert same.cost.docs_scored == 0  # same scorer: the saved selection is reused
    flipped = {i: -v for i, v in truth.items()}
    other, _, _ = _truth_scorer(pool, flipped, tmp_path / "run/influence/kfac_mlp-bbbb/scores.parquet")
    rows = run_selections(store, SelectionContext(pool=pool, assignments=assignments, scorer=other,
                                                  run_dir=store.root), plan)
    assert other.calls > 0 and rows.loc[0, "n_docs"] > 0  # another estimator: selected again, with its scores
    regrouped = assignments.assign(cluster=(assignments["cluster"] + 1) % len(MEANS))
    again, _, _ = _truth_scorer(pool, flipped, tmp_path / "run/influence/kfac_mlp-bbbb/scores.parquet")
    run_selections(store, SelectionContext(pool=pool, assignments=regrouped, scorer=again, run_dir=store.root), plan)
    assert again.cost.docs_scored > 0  # another clustering: selected again


def test_bandit_figures_draw_from_a_replay_and_the_alpha_frontier_marks_the_default(spread):
    from quadlib.plots.bandit_plots import (
        cs_trajectories_figure, influence_distribution_figure, pulls_per_cluster_figure, quality_diversity_figure,
        source_mix_figure,
    )
    from quadlib.selection.metrics import replay_sweep, source_mix

    pool, assignments, truth = spread
    s = settings(budget_tokens=600)
    result = replay(truth, pool, assignments, s)
    heat = pulls_per_cluster_figure(result.arms).data[0]
    assert heat.z.shape == (len(SPREAD), result.arms["round"].nunique())
    assert np.nansum(heat.z[:, -1]) == result.arms["pulled"].sum()  # the last column holds every pull
    assert len(cs_trajectories_figure(result.arms).data) == 12
    assert len(influence_distribution_figure(result.scores, list(truth.values())).data) == 2
    mix = source_mix(result.ids, pool)
    assert mix.sum() == pytest.approx(1.0)
    assert len(source_mix_figure({"pool": source_mix(pool["id"], pool), "quad": mix}).data) == 2
    sweep = replay_sweep(truth, pool, assignments, s, [{"alpha": a} for a in (10.0, 1.0, 3.0)])
    figure = quality_diversity_figure(sweep, frontier="alpha", default=3.0, current={"entropy": 1.0,
                                                                                     "mean_influence": 0.02})
    frontier, star, cross = figure.data[1], figure.data[2], figure.data[3]
    by_alpha = sweep.sort_values("alpha")
    assert list(frontier.x) == by_alpha["entropy"].tolist()  # joined in increasing alpha
    assert list(star.x) == sweep.loc[sweep["alpha"] == 3.0, "entropy"].tolist()
    assert (list(cross.x), list(cross.y)) == ([1.0], [0.02])
    # from alpha = 1 on, the sweep moves diversity up and quality down monotonically
    assert (np.diff(by_alpha["entropy"]) > 0).all() and (np.diff(by_alpha["mean_influence"]) < 0).all()


def test_alpha_sweep_figure_draws_each_method_in_its_colour_with_the_seeds_intervals(spread):
    from quadlib.plots.bandit_plots import alpha_sweep_figure, quality_diversity_figure
    from quadlib.plots.palette import method_color
    from quadlib.selection.metrics import replay_sweep, sweep_intervals

    pool, assignments, truth = spread
    s = settings(budget_tokens=600)
    grid = [{"alpha": a} for a in (1.0, 0.0, 0.3)]
    runs = replay_sweep(truth, pool, assignments, s, grid, seeds=[0, 1, 2])
    assert sorted(runs["seed"].unique()) == [0, 1, 2] and len(runs) == 9
    one = runs[(runs["alpha"] == 0.3)]["mean_influence"].to_numpy()
    quad = sweep_intervals(runs, "alpha")
    row = quad.set_index("alpha").loc[0.3]
    half = 4.302652729911275 * one.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    assert row["mean_influence"] == pytest.approx(one.mean())
    assert (row["mean_influence_lo"], row["mean_influence_hi"]) == pytest.approx((one.mean() - half, one.mean() + half))
    released = quad.assign(mean_influence=quad["mean_influence"] / 2)  # any second method
    figure = alpha_sweep_figure({"quad_released": released, "quad": quad}, default=0.3, units="std of the scores seen")
    names = [trace.name for trace in figure.data]
    assert names == ["quad", "quad", "quad_released", "quad_released"]  # the palette's order, two panels each
    assert all(trace.line.color == method_color(trace.name) for trace in figure.data)
    influence = figure.data[1]
    assert list(influence.x) == ["0", "0.3", "1"]  # alpha = 0 on the axis, in increasing order
    assert list(influence.error_y.array) == pytest.approx(quad["mean_influence_hi"] - quad["mean_influence"])
    assert "std of the scores seen" in figure.layout.xaxis.title.text
    assert "score units" in figure.layout.yaxis2.title.text and len(figure.layout.shapes) == 2  # default marked
    qd = quality_diversity_figure(quad, frontier="alpha", default=0.3)
    assert list(qd.data[0].text) == ["alpha=0", "alpha=0.3", "alpha=1"]  # interval columns are not parameters


def test_replay_explorer_replays_at_the_run_budget_and_reports_live(spread):
    from quadlib.plots.replay_explorer import parameter_grids, replay_explorer, replay_figures

    pool, assignments, truth = spread
    scores = pd.Series(truth).iloc[: len(truth) * 3 // 4]  # three quarters of the pool cached
    run = settings(budget_tokens=600)
    summary, figures = replay_figures(scores, pool, assignments, run)
    assert "of 600 tokens" in summary and len(figures) == 3
    explorer = replay_explorer(scores, pool, assignments, run)
    assert "600 tokens" in explorer.header.value and "75.0%" in explorer.header.value
    assert {name: s.value for name, s in explorer.sliders.items()} == {"alpha": 0.3, "tau": 0.0, "gamma": 0.25,
                                                                       "k": 2, "batch_size": 8}
    assert "std of the scores seen" in explorer.sliders["alpha"].description
    start = dict(explorer.summary)
    assert start["budget_tokens"] == 600 and start["tokens_selected"] <= 600
    assert start == pytest.approx({**start, **quality_diversity(replay(scores, pool, assignments, run).ids, scores,
                                                                 assignments)})
    explorer.panel.clear_output = lambda **kwargs: None  # no kernel: the panel's figures are not drawn here
    explorer.sliders["alpha"].value = 3.0  # drag alpha to its largest value
    assert explorer.summary["entropy"] > start["entropy"] and explorer.summary["budget_tokens"] == 600
    assert f"{explorer.summary['entropy']:.3f}" in explorer.readout.value
    explorer.sliders["alpha"].value = 0.0  # alpha = 0 is on the slider
    assert explorer.summary["clusters_covered"] <= start["clusters_covered"]
    explorer.sliders["alpha"].value = 0.3
    grids = parameter_grids(settings(alpha=0.7, tau=0.4), scores)
    assert {0.0, 0.7} <= set(grids["alpha"]) and {0.0, 0.4} <= set(grids["tau"])
    absolute = parameter_grids(settings(units="absolute", alpha=0.002, tau=0.0025), scores)
    assert {0.0, 0.002} <= set(absolute["alpha"]) and {0.0, 0.0025} <= set(absolute["tau"])


def test_dragging_any_slider_changes_the_selection_at_the_run_budget(spread):
    """Every slider of the explorer, moved from the run's value, re-runs the bandit: another selection, with
    the slider's value in force, within the run's budget (tokens of the selected documents <= 600)."""
    from quadlib.plots.replay_explorer import replay_explorer

    pool, assignments, truth = spread
    scores = pd.Series(truth)
    run = settings(budget_tokens=600)
    explorer = replay_explorer(scores, pool, assignments, run)
    explorer.panel.clear_output = lambda **kwargs: None  # no kernel: the panel's figures are not drawn here
    tokens = pool.set_index("id")["n_tokens"]
    start = explorer.result.ids
    moves = {"alpha": 3.0, "tau": 0.5, "gamma": 0.5, "k": 4, "batch_size": 32}
    assert set(moves) == set(explorer.sliders)  # every slider is driven
    for name, value in moves.items():
        explorer.sliders[name].value = value
        result = explorer.result
        assert getattr(result.settings, name) == value and result.settings.budget_tokens == 600, name
        assert result.ids != start, name
        assert result.tokens_selected == tokens[result.ids].sum() <= 600, name
        assert explorer.summary["n_docs"] == len(result.ids)
        assert f"{len(result.ids)} documents" in explorer.readout.value
        explorer.sliders[name].value = getattr(run, name)  # back to the run's value: the run's selection again
        assert explorer.result.ids == start, name


def test_the_explorer_button_scores_the_rest_and_the_replay_becomes_the_live_run(spread, tmp_path):
    """With a quarter of the pool cached by other steps, a replay explores only that quarter; the button
    scores the rest (each missing document once) and the replay is then the live run at the run's budget."""
    from quadlib.plots.replay_explorer import replay_explorer

    pool, assignments, truth = spread
    run = settings(budget_tokens=600)
    scorer, _, _ = _truth_scorer(pool, truth, tmp_path / "scores.parquet")
    others = pool["id"].iloc[::4].tolist()  # what another method happened to score
    scorer.score(others)
    scores = pd.Series(scorer.cached(pool["id"].tolist()))
    explorer = replay_explorer(scores, pool, assignments, run, scorer=scorer)
    explorer.panel.clear_output = lambda **kwargs: None  # no kernel: the panel's figures are not drawn here
    assert "25.0%" in explorer.header.value and not explorer.score_button.disabled
    assert f"{len(pool) - len(others):,} documents" in explorer.score_button.description
    assert set(explorer.result.docs["id"]) <= set(others)
    live = run_bandit(pool, assignments, TableScorer(truth), run, progress=False)
    assert explorer.result.ids != live.ids
    computed = scorer.cost.docs_scored
    explorer.score_button.click()
    assert scorer.cost.docs_scored - computed == len(pool) - len(others)  # each missing document once
    assert "100.0%" in explorer.header.value and explorer.score_button.disabled
    assert explorer.result.ids == live.ids and explorer.result.settings.budget_tokens == 600
    without = replay_explorer(scores, pool, assignments, run)  # no scorer: no button, and the header says so
    assert without.score_button.disabled and "complete_scores" in without.header.value
