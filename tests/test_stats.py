"""Statistics over seeds: tidy collection, mean ± std, Welch and paired tests against Random, tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from quadlib.evaluation.stats import (
    collect_costs, collect_metrics, compare_to_baseline, results_table, significance_table, summarize,
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
