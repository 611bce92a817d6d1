"""Statistics over seeds: tidy collection, mean ± std, Welch and paired tests against Random, tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from quadlib.evaluation.stats import (
    bootstrap_statistic, collect_costs, collect_items, collect_metrics, compare_to_baseline, higher_is_better, holm, metric_intervals, paired_differences, pareto_front,
    results_table, significance_table, summarize,
)
from quadlib.evaluation.train_eval import METRICS_FILE, eval_step
from quadlib.runstore import write_json_atomic

ACC = {"random": [0.30, 0.32, 0.31], "quad": [0.40, 0.41, 0.43], "dsir": [0.29, 0.33, 0.31]}
LOSS = {"random": [3.0, 3.1, 3.2], "quad": [2.8, 2.9, 2.85], "dsir": [3.1, 3.0, 3.3]}


def _write_run(run: Path) -> None:
    for method in ACC:
        for seed in range(3):
            write_json_atomic(run / eval_step(method, seed) / METRICS_FILE, {
                "method": method, "seed": seed, "from_scratch": False,
                "metrics": {"arc_easy/acc": ACC[method][seed], "ref_loss": LOSS[method][seed], "arc_easy/n": 20},
                "train": {"final_loss": 3.0, "seconds": 1.0}, "eval_seconds": 0.5})
        write_json_atomic(run / f"select-{method}" / "manifest.json",
                          {"method": method, "wall_time_s": len(method), "cost": {"flops": 1e9, "docs_scored": 5}})


def test_collect_and_summarize(tmp_path: Path) -> None:
    _write_run(tmp_path)
    tidy = collect_metrics(tmp_path)
    assert len(tidy) == 3 * 3 * 6 and set(tidy.columns) == {"method", "seed", "from_scratch", "metric", "value"}
    summary = summarize(tidy).set_index(["method", "metric"])
    assert summary.loc[("quad", "arc_easy/acc"), "mean"] == pytest.approx(np.mean(ACC["quad"]))
    assert summary.loc[("quad", "arc_easy/acc"), "std"] == pytest.approx(np.std(ACC["quad"], ddof=1))
    assert summary.loc[("quad", "arc_easy/acc"), "n"] == 3
    costs = collect_costs(tmp_path).set_index("method")
    assert costs.loc["quad", "wall_time_s"] == 4 and costs.loc["dsir", "cost_flops"] == 1e9


def test_tests_against_random_match_scipy_and_orient_losses(tmp_path: Path) -> None:
    _write_run(tmp_path)
    comparison = compare_to_baseline(collect_metrics(tmp_path), "random").set_index(["method", "metric"])
    assert "arc_easy/n" not in set(comparison.index.get_level_values("metric"))
    row = comparison.loc[("quad", "arc_easy/acc")]
    assert row["p_welch"] == pytest.approx(sps.ttest_ind(ACC["quad"], ACC["random"], equal_var=False).pvalue)
    assert row["p_paired"] == pytest.approx(sps.ttest_rel(ACC["quad"], ACC["random"]).pvalue)
    assert row["diff"] > 0
    assert comparison.loc[("quad", "ref_loss"), "diff"] == pytest.approx(np.mean(LOSS["random"]) - np.mean(LOSS["quad"]))
    assert comparison.loc[("dsir", "ref_loss"), "diff"] < 0  # higher loss is worse
    with pytest.raises(ValueError, match="baseline 'nope'"):
        compare_to_baseline(collect_metrics(tmp_path), "nope")


def test_tables_mark_significance_and_carry_cost(tmp_path: Path) -> None:
    _write_run(tmp_path)
    tidy = collect_metrics(tmp_path)
    table = results_table(tidy, ["arc_easy/acc", "ref_loss"], costs=collect_costs(tmp_path),
                          method_order=["random", "dsir", "quad"])
    assert list(table.index) == ["random", "dsir", "quad"]
    assert table.loc["quad", "arc_easy/acc"] == f"{np.mean(ACC['quad']):.3f} ± {np.std(ACC['quad'], ddof=1):.3f}*"
    assert not table.loc["dsir", "arc_easy/acc"].endswith("*") and not table.loc["random", "ref_loss"].endswith("*")
    assert table.loc["quad", "wall_time_s"] == 4
    p = significance_table(tidy, ["arc_easy/acc"])
    assert list(p.index) == ["dsir", "quad"] and p.loc["quad", "arc_easy/acc"] < 0.05


def test_a_single_seed_gives_no_std_and_no_test(tmp_path: Path) -> None:
    _write_run(tmp_path)
    tidy = collect_metrics(tmp_path)
    one = tidy[tidy["seed"] == 0]
    assert math.isnan(summarize(one)["std"].iloc[0])
    assert compare_to_baseline(one, "random")[["p_welch", "p_paired"]].isna().all().all()
    assert "±" not in results_table(one, ["arc_easy/acc"]).loc["quad", "arc_easy/acc"]


# ---- per-item paired statistics -----------------------------------------------------------------

def test_metric_direction() -> None:
    for name in ("ref_loss", "heldout_mean", "heldout/web", "heldout_bpb_mean", "arc_easy/gold_bpb", "lambada_ppl"):
        assert not higher_is_better(name), name
    for name in ("arc_easy/acc", "arc_easy/gold_logprob", "lambada_logprob", "tasks/acc_mean"):
        assert higher_is_better(name), name


def test_holm_adjusts_in_ascending_order_and_skips_missing_tests() -> None:
    # sorted: 0.005, 0.01, 0.03, 0.04 (m = 4) -> 4*0.005, 3*0.01, 2*0.03, 1*0.04 = .02 .03 .06 .04 -> cummax
    adjusted = holm([0.01, 0.04, 0.03, float("nan"), 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, np.nan, 0.02], rtol=1e-12)
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]  # capped at 1
    assert np.isnan(holm([float("nan")])).all()


def _items(values: dict[tuple[str, int], np.ndarray], task: str = "arc_easy", metric: str = "gold_bpb",
           weights: np.ndarray | None = None) -> pd.DataFrame:
    frames = []
    for (method, seed), v in values.items():
        frames.append(pd.DataFrame({"method": method, "seed": seed, "from_scratch": False, "task": task,
                                    "item": [str(i) for i in range(len(v))], "metric": metric, "value": v,
                                    "weight": 1.0 if weights is None else weights}))
    return pd.concat(frames, ignore_index=True)


def test_paired_differences_see_a_shift_that_item_variance_hides() -> None:
    """Items vary far more than the methods differ: a Welch test over items cannot see a 0.05 bpb
    gain, the paired difference can; an exactly balanced difference has an interval around 0."""
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 1.0, size=400)  # per-item bits per byte of Random
    noise = rng.normal(0.0, 0.05, size=400)
    better = base - 0.05 + noise  # lower bpb is better
    balanced = base + np.where(np.arange(400) % 2 == 0, 0.05, -0.05)  # mean difference exactly 0
    items = _items({("random", 0): base, ("quad", 0): better, ("dsir", 0): balanced})
    assert sps.ttest_ind(better, base, equal_var=False).pvalue > 0.05  # unpaired: not significant
    table = paired_differences(items, "random", ["arc_easy/gold_bpb"], n_boot=4000).set_index("method")
    quad, dsir = table.loc["quad"], table.loc["dsir"]
    assert quad["diff"] == pytest.approx(np.mean(better - base), rel=1e-12)
    assert quad["gain"] == pytest.approx(-quad["diff"]) and quad["gain"] > 0
    assert quad["ci_high"] < 0 and quad["significant"] and quad["p"] < 0.01
    assert dsir["diff"] == pytest.approx(0.0, abs=1e-12)
    assert dsir["ci_low"] < 0 < dsir["ci_high"] and not dsir["significant"] and dsir["p"] > 0.5
    # the interval of a mean of n differences is about +-1.96 sd / sqrt(n) (Monte Carlo error of 4000 draws)
    half = (quad["ci_high"] - quad["ci_low"]) / 2
    assert half == pytest.approx(1.96 * np.std(better - base) / np.sqrt(400), rel=0.1)
    assert table["p_holm"].tolist() == pytest.approx(holm(table["p"]).tolist())


def test_seeds_that_disagree_widen_the_interval_as_a_t_test_over_seeds_would() -> None:
    """Three seeds (selections) whose mean differences disagree: the items alone would call a gain
    of 0.083 certain; the seed part of the error and t with ~2 degrees of freedom do not."""
    rng = np.random.default_rng(3)
    offsets = np.array([0.3, -0.25, 0.2])  # per-seed mean difference
    diffs = offsets[:, None] + rng.normal(0.0, 0.01, size=(3, 100))  # [S, I]
    out = bootstrap_statistic(diffs, np.ones(100), np.zeros(100), n_boot=1000)
    seed_means = diffs.mean(axis=1)
    assert out["estimate"] == pytest.approx(seed_means.mean(), rel=1e-12)
    assert out["se"] >= np.std(seed_means, ddof=1) / np.sqrt(3)  # at least the seed part
    assert out["df"] == pytest.approx(2.0, rel=0.05)  # the seed part dominates
    assert out["p"] == pytest.approx(sps.ttest_1samp(seed_means, 0.0).pvalue, rel=0.05)
    assert out["ci_low"] < 0 < out["ci_high"]
    one_seed = bootstrap_statistic(diffs[:1], np.ones(100), np.zeros(100), n_boot=1000)
    assert one_seed["p"] < 1e-10  # one seed sees only item noise


def test_identical_models_and_constant_seed_groups_get_no_test() -> None:
    """MATES 0.485 +- 0.000 against Random 0.515 +- 0.000 over three seeds: no t-test and no star;
    two identical models have a zero paired difference with no spread: no test either."""
    tidy = pd.DataFrame([{"method": m, "seed": s, "from_scratch": False, "metric": "siqa/acc", "value": v}
                         for m, v in (("random", 0.515), ("mates", 0.485)) for s in range(3)])
    row = compare_to_baseline(tidy, "random").iloc[0]
    assert math.isnan(row["p_welch"]) and math.isnan(row["p_paired"])
    assert not results_table(tidy, ["siqa/acc"]).loc["mates", "siqa/acc"].endswith("*")
    acc = np.array([1.0, 0.0] * 50)
    same = paired_differences(_items({("random", 0): acc, ("mates", 0): acc.copy()}, metric="acc"), "random",
                              ["arc_easy/acc"])
    assert same.loc[0, "diff"] == 0.0 and math.isnan(same.loc[0, "p"]) and not same.loc[0, "significant"]


def test_weighted_and_composite_metrics_equal_the_reported_aggregates() -> None:
    """ref_loss is token-weighted; heldout_mean is the mean over domains of each domain's weighted
    mean, and the paired statistic is the difference of those aggregates, averaged over seeds."""
    w = np.array([10.0, 1.0, 1.0])
    ref = {("random", s): np.array([3.0, 5.0, 5.0]) + s for s in (0, 1)} | {("quad", s): np.array([2.0, 5.0, 6.0]) + s
                                                                              for s in (0, 1)}
    items = _items(ref, task="reference", metric="loss", weights=w)
    web = _items({("random", 0): np.array([1.0, 3.0]), ("quad", 0): np.array([1.0, 1.0])}, "heldout/web", "loss")
    code = _items({("random", 0): np.array([2.0]), ("quad", 0): np.array([3.0])}, "heldout/code", "loss")
    items = pd.concat([items, web, code], ignore_index=True)
    table = paired_differences(items, "random", ["ref_loss", "heldout_mean"], n_boot=200).set_index("metric")
    assert table.loc["ref_loss", "diff"] == pytest.approx((10 * -1 + 0 + 1) / 12)
    assert table.loc["ref_loss", "gain"] == pytest.approx(9 / 12)
    assert table.loc["ref_loss", "n_seeds"] == 2 and table.loc["ref_loss", "n_items"] == 3
    assert table.loc["heldout_mean", "diff"] == pytest.approx(((1.0 - 2.0) + (3.0 - 2.0)) / 2)
    levels = metric_intervals(items, ["ref_loss"], n_boot=200).set_index("method")
    assert levels.loc["random", "value"] == pytest.approx(np.mean([(30 + 10) / 12, (40 + 12) / 12]))


def test_pareto_front_keeps_the_undominated_methods() -> None:
    points = pd.DataFrame({"ref": [1.0, 2.0, 3.0, 2.5, 1.0], "held": [3.0, 2.0, 1.0, 2.5, 3.5]},
                          index=["a", "b", "c", "d", "e"])
    assert pareto_front(points, "ref", "held").to_dict() == {"a": True, "b": True, "c": True, "d": False, "e": False}


def test_collect_items_reads_finished_runs_and_pairs_them(tmp_path: Path) -> None:
    from quadlib.evaluation.items import ITEMS_FILE, item_frame

    for method, shift in (("random", 0.0), ("quad", -0.2)):
        for seed in (0, 1):
            folder = tmp_path / eval_step(method, seed)
            folder.mkdir(parents=True)
            noise = np.random.default_rng(seed).normal(0.0, 0.05, 30) if method == "quad" else 0.0
            values = np.linspace(2.0, 3.0, 30) + shift + noise
            item_frame("reference", [f"r{i}" for i in range(30)], {"loss": values}, {"loss": np.full(30, 5.0)}
                       ).to_parquet(folder / ITEMS_FILE)
            write_json_atomic(folder / METRICS_FILE, {"method": method, "seed": seed, "from_scratch": False,
                                                      "metrics": {}, "train": {"final_loss": 3.0, "seconds": 1.0},
                                                      "eval_seconds": 0.5})
    unfinished = tmp_path / eval_step("dsir", 0)  # items without metrics.json: an interrupted run
    unfinished.mkdir(parents=True)
    item_frame("reference", ["r0"], {"loss": [1.0]}).to_parquet(unfinished / ITEMS_FILE)
    items = collect_items(tmp_path)
    assert sorted(set(items["method"])) == ["quad", "random"] and len(items) == 2 * 2 * 30
    row = paired_differences(items, "random", ["ref_loss"], n_boot=200).iloc[0]
    expected = np.mean([np.random.default_rng(s).normal(0.0, 0.05, 30).mean() for s in (0, 1)]) - 0.2
    assert row["method"] == "quad" and row["diff"] == pytest.approx(expected) and row["n_seeds"] == 2
    assert row["significant"] and row["gain"] == pytest.approx(-expected)
    with pytest.raises(ValueError, match="baseline 'dsir'"):
        paired_differences(items, "dsir")


def _write_seed_run(run: Path) -> dict[str, np.ndarray]:
    """A finished run of Random, Quad and DSIR at seeds 0 and 1 and the untrained model at seed 0 only:
    per-item reference losses (30 items) with metrics.json, and each method's selection manifest."""
    from quadlib.evaluation.items import ITEMS_FILE, UNTRAINED, item_frame

    base = np.linspace(2.0, 3.0, 30)
    shifts = {UNTRAINED: 0.5, "random": 0.0, "quad": -0.2, "dsir": 0.1}
    losses = {}
    for method, shift in shifts.items():
        for seed in ((0,) if method == UNTRAINED else (0, 1)):
            noise = np.random.default_rng(10 * seed + len(method)).normal(0.0, 0.02, 30) if method != UNTRAINED else 0.0
            values = base + shift + noise + 0.01 * seed  # seed 1 a little worse: pairing it counts
            losses[method, seed] = values
            folder = run / eval_step(method, seed)
            folder.mkdir(parents=True)
            item_frame("reference", [f"r{i}" for i in range(30)], {"loss": values}, {"loss": np.full(30, 5.0)}
                       ).to_parquet(folder / ITEMS_FILE)
            write_json_atomic(folder / METRICS_FILE, {"method": method, "seed": seed, "from_scratch": False,
                                                      "metrics": {"ref_loss": float(values.mean())},
                                                      "train": {"final_loss": 3.0, "seconds": 1.0},
                                                      "eval_seconds": 0.5})
        if method != UNTRAINED:
            write_json_atomic(run / f"select-{method}" / "manifest.json",
                              {"method": method, "wall_time_s": 12.4, "cost": {"flops": 2.5e12, "docs_scored": 1234}})
    return losses


def test_seed_table_pairs_every_seed_with_the_untrained_model_and_orients_each_difference(tmp_path: Path) -> None:
    """mean ± sd over seeds; `method - baseline` (a loss gain is negative) with its interval and Holm star;
    the untrained model, evaluated at seed 0 only, pairs with both seeds of every method; the Random
    family of tests leaves the untrained model out."""
    from quadlib.evaluation.stats import markdown_table, seed_table

    losses = _write_seed_run(tmp_path)
    items, tidy, costs = collect_items(tmp_path), collect_metrics(tmp_path), collect_costs(tmp_path)
    order = ["untrained", "random", "quad", "dsir"]
    table = seed_table(items, tidy, costs, metrics=["ref_loss"], order=order)
    assert list(table.index) == order
    quad = [losses["quad", s].mean() for s in (0, 1)]
    assert table.loc["quad", "ref_loss (nats)"] == f"{np.mean(quad):.3f} ± {np.std(quad, ddof=1):.3f}"

    def number(text: str) -> float:
        return float(text.split(" [")[0])

    untrained = losses["untrained", 0].mean()
    random = np.mean([losses["random", s].mean() for s in (0, 1)])
    assert number(table.loc["quad", "ref_loss vs untrained"]) == pytest.approx(np.mean(quad) - untrained, abs=5e-4)
    assert number(table.loc["quad", "ref_loss vs random"]) == pytest.approx(np.mean(quad) - random, abs=5e-4)
    assert number(table.loc["quad", "ref_loss vs random"]) < 0 < number(table.loc["dsir", "ref_loss vs random"])
    assert table.loc["quad", "ref_loss vs random"].endswith("*") and table.loc["dsir", "ref_loss vs random"].endswith("*")
    assert table.loc["random", "ref_loss vs random"] == "—" and table.loc["untrained", "ref_loss vs untrained"] == "—"
    # the untrained model pairs with seed 1 too (seed 0 alone would give quad[0] - untrained)
    assert abs(number(table.loc["quad", "ref_loss vs untrained"]) - (quad[0] - untrained)) > 3e-3
    assert table.loc["quad", "docs scored"] == "1,234" and table.loc["quad", "selection FLOPs"] == "2.5e+12"
    assert table.loc["quad", "selection (s)"] == "12" and table.loc["untrained", "docs scored"] == "—"
    lines = markdown_table(table).splitlines()
    assert lines[0].startswith("| method | ref_loss (nats) | ref_loss vs untrained | ref_loss vs random |")
    assert lines[1] == "|" + "---|" * 7 and lines[3].startswith("| random | ")


def test_quad_table_prints_a_runs_comparison_and_refuses_a_run_without_one(tmp_path: Path, capsys) -> None:
    from quadlib.cli import main

    _write_seed_run(tmp_path / "run")
    main(["table", "--run", str(tmp_path / "run"), "--methods", "random", "quad"])
    out = capsys.readouterr().out
    assert "3 methods, seeds [0, 1]" in out and "| untrained |" in out and "| quad |" in out and "| dsir |" not in out
    with pytest.raises(SystemExit) as refused:
        main(["table", "--run", str(tmp_path / "run"), "--methods", "nosuch"])
    assert refused.value.code == 1 and "no selection of ['nosuch']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["table", "--run", str(tmp_path / "empty")])
    assert refused.value.code == 1 and "run 03_bandit first" in capsys.readouterr().err
