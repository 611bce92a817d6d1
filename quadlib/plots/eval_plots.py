"""Figures and tables of the evaluation report (notebook 05_evaluate): method comparison with cost,
per-task accuracy with spreads over seeds, metric against a swept ablation parameter, and the
agreement of two influence estimators.

Inputs are the tidy frames of `quadlib.evaluation.stats` (method, seed, metric, value) and of
`quadlib.ablate.collect_results` (one row per run: parameters and results).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from scipy import stats as sps

from quadlib.evaluation.stats import summarize

PALETTE = plotly.colors.qualitative.Dark24


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs columns {list(columns)}; missing {missing}")


def comparison_table_figure(table: pd.DataFrame, title: str = "Methods at the same budget (mean ± std over seeds)") -> go.Figure:
    """A plotly table of `stats.results_table` (rows methods, cells "mean ± std", `*` = differs from Random)."""
    shown = table.reset_index()
    cells = [[("" if pd.isna(v) else f"{v:.3g}" if isinstance(v, (float, np.floating)) else str(v))
              for v in shown[c]] for c in shown.columns]
    fig = go.Figure(go.Table(header={"values": [f"<b>{c}</b>" for c in shown.columns], "align": "left"},
                             cells={"values": cells, "align": "left"}))
    fig.update_layout(title=title, height=120 + 30 * len(shown))
    return fig


def task_bars_figure(tidy: pd.DataFrame, metric: str = "acc", tasks: Sequence[str] | None = None,
                     methods: Sequence[str] | None = None, title: str | None = None,
                     axis: str = "task") -> go.Figure:
    """Grouped bars: `<task>/<metric>` per task (or held-out domain: `axis`), one bar per method,
    error bars = std over seeds."""
    _require(tidy, ("method", "seed", "metric", "value"), "task_bars_figure")
    summary = summarize(tidy)
    summary = summary[summary["metric"].str.endswith(f"/{metric}") & ~summary["metric"].str.startswith("tasks/")]
    summary = summary.assign(task=summary["metric"].str.rsplit("/", n=1).str[0])
    tasks = list(tasks) if tasks is not None else sorted(summary["task"].unique())
    methods = list(methods) if methods is not None else sorted(summary["method"].unique())
    fig = go.Figure()
    for i, method in enumerate(methods):
        rows = summary[summary["method"] == method].set_index("task").reindex(tasks)
        fig.add_trace(go.Bar(x=tasks, y=rows["mean"], name=method, marker_color=PALETTE[i % len(PALETTE)],
                             error_y={"type": "data", "array": rows["std"].fillna(0.0)}))
    fig.update_layout(barmode="group", title=title or f"Zero-shot {metric} per {axis} (mean ± std over seeds)",
                      xaxis_title=axis, yaxis_title=metric)
    return fig


def sweep_figure(results: pd.DataFrame, param: str, metric: str, group: str | None = None,
                 log_x: bool = False, title: str | None = None) -> go.Figure:
    """`metric` against a swept `param` (alpha, tau, k, budget ...): mean ± std over the runs sharing a
    value (e.g. seeds), one line per value of `group` (e.g. the estimator) when given."""
    _require(results, [param, metric] + ([group] if group else []), "sweep_figure")
    frame = results.dropna(subset=[metric])
    fig = go.Figure()
    for i, (label, part) in enumerate(frame.groupby(group, sort=True) if group else [(metric, frame)]):
        stats = part.groupby(param, sort=True)[metric].agg(mean="mean", std=lambda v: v.std(ddof=1))
        fig.add_trace(go.Scatter(x=stats.index, y=stats["mean"], mode="lines+markers", name=str(label),
                                 line={"color": PALETTE[i % len(PALETTE)]},
                                 error_y={"type": "data", "array": stats["std"].fillna(0.0)}))
    fig.update_layout(title=title or f"{metric} against {param}", xaxis_title=param, yaxis_title=metric,
                      xaxis_type="log" if log_x else None)
    return fig


def estimator_scatter_figure(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str,
                             color: pd.Series | None = None) -> go.Figure:
    """Scores of two estimators on the same documents (frames with `id, score`), joined by id;
    the title gives Pearson and Spearman correlations. `color` (indexed by id) tints the points."""
    _require(a, ("id", "score"), "estimator_scatter_figure (first)")
    _require(b, ("id", "score"), "estimator_scatter_figure (second)")
    joined = a[["id", "score"]].merge(b[["id", "score"]], on="id", suffixes=("_a", "_b")).dropna()
    if len(joined) < 2:
        raise ValueError(f"{name_a} and {name_b} share {len(joined)} scored documents; at least 2 are needed")
    pearson = sps.pearsonr(joined["score_a"], joined["score_b"]).statistic
    spearman = sps.spearmanr(joined["score_a"], joined["score_b"]).statistic
    marker = {"size": 5, "opacity": 0.7}
    if color is not None:
        marker |= {"color": color.reindex(joined["id"]).to_numpy(), "colorscale": "Viridis", "showscale": True}
    fig = go.Figure(go.Scattergl(x=joined["score_a"], y=joined["score_b"], mode="markers", marker=marker,
                                 text=joined["id"], hovertemplate="%{text}<br>%{x:.3g}, %{y:.3g}<extra></extra>"))
    fig.update_layout(title=f"{name_b} vs {name_a} on {len(joined)} documents: Pearson {pearson:.3f}, "
                            f"Spearman {spearman:.3f}", xaxis_title=name_a, yaxis_title=name_b)
    return fig
