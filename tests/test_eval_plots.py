"""Evaluation figures: the numbers drawn are the means, spreads and correlations of the inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from quadlib.evaluation.stats import results_table
from quadlib.plots.eval_plots import comparison_table_figure, estimator_scatter_figure, sweep_figure, task_bars_figure

TIDY = pd.DataFrame([
    {"method": m, "seed": s, "from_scratch": False, "metric": metric, "value": v}
    for m, base in (("random", 0.3), ("quad", 0.4)) for s in range(3)
    for metric, v in (("arc_easy/acc", base + 0.01 * s), ("piqa/acc", base + 0.02 * s), ("tasks/acc_mean", base),
                      ("ref_loss", 3.0 - base))
])


def test_task_bars_show_mean_and_std_per_method() -> None:
    fig = task_bars_figure(TIDY)
    assert [t.name for t in fig.data] == ["quad", "random"]
    quad = fig.data[0]
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
    with pytest.raises(ValueError, match="missing"):
        sweep_figure(runs, "TAU", "ref_loss")


def test_estimator_scatter_joins_by_id_and_reports_correlations() -> None:
    rng = np.random.default_rng(0)
    a = pd.DataFrame({"id": [f"d{i}" for i in range(50)], "score": rng.normal(size=50)})
    b = a.assign(score=a["score"] * 2 + rng.normal(scale=0.5, size=50)).iloc[::-1]  # other order
    fig = estimator_scatter_figure(a, b, "dot", "kfac_joint_qkv")
    expected = sps.pearsonr(a["score"], b.set_index("id").loc[a["id"], "score"]).statistic
    assert f"Pearson {expected:.3f}" in fig.layout.title.text and len(fig.data[0].x) == 50
