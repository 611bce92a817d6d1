"""Evaluation figures: the numbers drawn are the means, spreads and correlations of the inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from quadlib.evaluation.stats import results_table, verdict_sentences
from quadlib.plots.eval_plots import (
    comparison_table_figure, cost_gain_figure, paired_differences_figure, sweep_figure,
    task_bars_figure, tradeoff_figure,
)
from quadlib.plots.bandit_plots import source_mix_figure
from quadlib.plots.palette import method_color, method_order

TIDY = pd.DataFrame([
    {"method": m, "seed": s, "from_scratch": False, "metric": metric, "value": v}
    for m, base in (("random", 0.3), ("quad", 0.4)) for s in range(3)
    for metric, v in (("arc_easy/acc", base + 0.01 * s), ("piqa/acc", base + 0.02 * s), ("tasks/acc_mean", base),
                      ("ref_loss", 3.0 - base))
])


def test_task_bars_show_mean_and_std_per_method() -> None:
    fig = task_bars_figure(TIDY)
    assert [t.name for t in fig.data] == ["random", "quad"]  # the palette's order: Random first
    quad = fig.data[1]
    assert list(quad.x) == ["arc_easy", "piqa"]  # tasks/acc_mean is an aggregate, not a task
    assert quad.y[1] == pytest.approx(0.42)
    assert quad.error_y.array[1] == pytest.approx(np.std([0.4, 0.42, 0.44], ddof=1))


def test_comparison_table_figure_carries_the_table() -> None:
    table = results_table(TIDY, ["arc_easy/acc", "ref_loss"], method_order=["random", "quad"])
    fig = comparison_table_figure(table)
    assert list(fig.data[0].cells.values[0]) == ["random", "quad"]
    assert fig.data[0].cells.values[1][1] == table.loc["quad", "arc_easy/acc"]


def test_sweep_figure_groups_and_aggregates_runs() -> None:
    runs = pd.DataFrame({"ALPHA": [0.0, 0.0, 0.002, 0.002] * 2, "ESTIMATOR": ["dot"] * 4 + ["kfac"] * 4,
                         "ref_loss": [3.0, 3.2, 2.9, 2.9, 2.5, 2.7, 2.4, 2.6]})
    fig = sweep_figure(runs, "ALPHA", "ref_loss", group="ESTIMATOR")
    assert [t.name for t in fig.data] == ["dot", "kfac"]
    assert list(fig.data[1].y) == pytest.approx([2.6, 2.5])
    assert fig.data[0].error_y.array[0] == pytest.approx(np.std([3.0, 3.2], ddof=1))
    assert fig.layout.yaxis.title.text == "ref_loss (nats per token)"
    with pytest.raises(ValueError, match="missing"):
        sweep_figure(runs, "TAU", "ref_loss")


# ---- the verdict's figures -----------------------------------------------------------------------

LEVELS = pd.DataFrame([
    {"method": m, "metric": metric, "value": v, "ci_low": v - 0.1, "ci_high": v + 0.2, "n_items": 50, "n_seeds": 3}
    for m, ref, held in (("random", 3.0, 2.0), ("quad", 2.5, 2.1), ("dsir", 3.2, 1.5), ("mates", 3.1, 2.2))
    for metric, v in (("ref_loss", ref), ("heldout_bpb_mean", held))
])
PAIRED = pd.DataFrame([
    {"method": "quad", "metric": "ref_loss", "diff": -0.5, "ci_low": -0.7, "ci_high": -0.3, "gain": 0.5, "p": 0.001,
     "p_holm": 0.004, "significant": True, "n_items": 50, "n_seeds": 3},
    {"method": "dsir", "metric": "ref_loss", "diff": 0.2, "ci_low": -0.1, "ci_high": 0.4, "gain": -0.2, "p": 0.2,
     "p_holm": 0.6, "significant": False, "n_items": 50, "n_seeds": 3},
    {"method": "mates", "metric": "ref_loss", "diff": 0.1, "ci_low": -0.2, "ci_high": 0.3, "gain": -0.1, "p": 0.5,
     "p_holm": 1.0, "significant": False, "n_items": 50, "n_seeds": 3},
    {"method": "quad", "metric": "arc_easy/gold_bpb", "diff": -0.01, "ci_low": -0.03, "ci_high": 0.01, "gain": 0.01,
     "p": 0.3, "p_holm": 0.9, "significant": False, "n_items": 50, "n_seeds": 3},
])


def test_one_palette_gives_each_method_its_colour_and_place_in_every_figure() -> None:
    bars = task_bars_figure(TIDY)
    trade = tradeoff_figure(LEVELS)
    assert [t.name for t in bars.data] == ["random", "quad"]  # Random first, then Quad
    colours = {t.name.removesuffix(" (front)"): t.marker.color for t in trade.data if t.mode == "markers"}
    assert colours["random"] == method_color("random") == bars.data[0].marker.color
    assert colours["quad"] == method_color("quad") == bars.data[1].marker.color
    assert len(set(colours.values())) == 4
    assert method_order(["mates", "dsir", "quad", "random"]) == ["random", "quad", "dsir", "mates"]
    mix = pd.Series({"web": 0.5, "code": 0.5})
    bars_03 = source_mix_figure({"quad": mix, "pool": mix, "random": mix})  # 03_bandit's mix by source
    assert [t.name for t in bars_03.data] == ["pool", "random", "quad"]
    assert [t.marker.color for t in bars_03.data][1:] == [method_color("random"), method_color("quad")]


def test_tradeoff_marks_the_pareto_front_with_intervals_and_units() -> None:
    fig = tradeoff_figure(LEVELS)
    points = {t.name: t for t in fig.data if t.mode == "markers"}
    assert set(points) == {"random (front)", "quad (front)", "dsir (front)", "mates"}  # mates: dominated by random
    quad = points["quad (front)"]
    assert (quad.x[0], quad.y[0]) == (2.1, 2.5)
    assert quad.error_y.array[0] == pytest.approx(0.2) and quad.error_y.arrayminus[0] == pytest.approx(0.1)
    front = next(t for t in fig.data if t.name == "Pareto front")
    assert list(front.x) == [1.5, 2.0, 2.1]  # sorted along the held-out axis
    assert fig.layout.xaxis.title.text == "heldout_bpb_mean (bits per byte)"
    assert fig.layout.yaxis.title.text == "ref_loss (nats per token)"
    with pytest.raises(ValueError, match="higher-is-better"):
        tradeoff_figure(LEVELS.replace({"ref_loss": "arc_easy/acc"}), y="arc_easy/acc")


def test_cost_gain_and_paired_figures_draw_gains_with_their_intervals() -> None:
    costs = pd.DataFrame({"method": ["random", "quad", "dsir", "mates"], "wall_time_s": [0.1, 30.0, 2.0, 10.0]})
    fig = cost_gain_figure(PAIRED, costs)
    quad = next(t for t in fig.data if t.name == "quad *")
    assert (quad.x[0], quad.y[0]) == (30.0, 0.5)
    # gain = -diff for a loss: the interval [-0.7, -0.3] of the difference is [0.3, 0.7] of the gain
    assert quad.error_y.array[0] == pytest.approx(0.2) and quad.error_y.arrayminus[0] == pytest.approx(0.2)
    assert fig.layout.xaxis.title.text == "selection cost: wall_time_s (s)"
    assert fig.layout.yaxis.title.text == "gain over Random in ref_loss (nats per token)"
    assert fig.layout.xaxis.type == "log"
    free = cost_gain_figure(PAIRED, costs.assign(wall_time_s=[0.1, 30.0, 0.0, 10.0]))  # DSIR costs nothing here
    assert free.layout.xaxis.type is None and [t.x[0] for t in free.data if t.name == "dsir"] == [0.0]
    forest = paired_differences_figure(PAIRED, ["ref_loss"])
    assert [t.name for t in forest.data] == ["quad", "dsir", "mates"]
    assert list(forest.data[0].text) == ["*"] and list(forest.data[1].text) == [""]
    assert forest.layout.xaxis.title.text == "gain over Random (nats per token)"
    with pytest.raises(ValueError, match="one unit"):
        paired_differences_figure(PAIRED, ["ref_loss", "arc_easy/gold_bpb"])


def test_verdict_sentences_come_from_the_numbers() -> None:
    text = " ".join(verdict_sentences(LEVELS, PAIRED, order=method_order(LEVELS["method"])))
    assert "the Pareto front is random, quad and dsir" in text
    assert "better than random: quad on ref_loss (-0.5, 95% CI [-0.7, -0.3])" in text
    assert "over 4 paired tests" in text
    assert "dsir and mates are indistinguishable from random" in text
    flipped = PAIRED.assign(significant=False)
    assert "quad, dsir and mates are indistinguishable" in " ".join(verdict_sentences(LEVELS, flipped,
                                                                                       order=["quad", "dsir", "mates"]))
