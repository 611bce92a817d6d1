"""Figures and tables of the evaluation report (notebook 05_evaluate): method comparison with cost,
per-task accuracy with spreads over seeds, metric against a swept ablation parameter, and the
verdict's figures (trade-off with the Pareto front,
cost against gain over Random, paired differences per task with intervals).

Inputs are the tidy frames of `quadlib.evaluation.stats` (method, seed, metric, value; the
`paired_differences` and `metric_intervals` tables) and of `quadlib.ablate.collect_results` (one row
per run: parameters and results). Methods take their colour and order from `quadlib.plots.palette`;
every axis names its unit (`axis_title`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go

from quadlib.evaluation.stats import higher_is_better, pareto_front, summarize
from quadlib.plots.palette import BASELINE, method_color, method_order

PALETTE = plotly.colors.qualitative.Dark24
UNITS = (  # (marker in the metric's name, unit), first match wins
    ("bpb", "bits per byte"), ("logprob", "nats"), ("loss", "nats per token"), ("ppl", "perplexity"),
    ("acc", "fraction correct"), ("seconds", "s"), ("wall_time_s", "s"), ("flops", "FLOPs"),
    ("forward", "forward passes"), ("backward", "backward passes"), ("docs_scored", "documents"),
)


def metric_unit(metric: str) -> str:
    """The unit of a metric or cost column, from its name ("" when none is known)."""
    return next((unit for marker, unit in UNITS if marker in metric), "")


def axis_title(metric: str, prefix: str = "") -> str:
    """"<prefix><metric> (<unit>)", the title of an axis that shows `metric`."""
    unit = metric_unit(metric)
    return f"{prefix}{metric} ({unit})" if unit else f"{prefix}{metric}"


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
    methods = list(methods) if methods is not None else method_order(summary["method"].unique())
    fig = go.Figure()
    for method in methods:
        rows = summary[summary["method"] == method].set_index("task").reindex(tasks)
        fig.add_trace(go.Bar(x=tasks, y=rows["mean"], name=method, marker_color=method_color(method),
                             error_y={"type": "data", "array": rows["std"].fillna(0.0)}))
    fig.update_layout(barmode="group", title=title or f"Zero-shot {metric} per {axis} (mean ± std over seeds)",
                      xaxis_title=axis, yaxis_title=axis_title(metric))
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
    fig.update_layout(title=title or f"{metric} against {param}", xaxis_title=param, yaxis_title=axis_title(metric),
                      xaxis_type="log" if log_x else None)
    return fig


def _error(frame: pd.DataFrame, value: str, low: str, high: str) -> dict:
    """Asymmetric plotly error bars from an interval [low, high] around value."""
    return {"type": "data", "symmetric": False, "array": (frame[high] - frame[value]).to_numpy(),
            "arrayminus": (frame[value] - frame[low]).to_numpy()}


def tradeoff_figure(levels: pd.DataFrame, x: str = "heldout_bpb_mean", y: str = "ref_loss",
                    title: str | None = None) -> go.Figure:
    """Each method's `y` (reference-eval loss) against its `x` (held-out loss), both lower-is-better,
    with the 95% intervals of `stats.metric_intervals` as error bars; the Pareto front (the
    methods no other method beats on both) is drawn as a line and its members as diamonds."""
    _require(levels, ("method", "metric", "value", "ci_low", "ci_high"), "tradeoff_figure")
    for metric in (x, y):
        if higher_is_better(metric):
            raise ValueError(f"tradeoff_figure draws lower-is-better metrics; {metric!r} is higher-is-better")
    wide = {m: levels[levels["metric"] == m].set_index("method") for m in (x, y)}
    methods = method_order(set(wide[x].index) & set(wide[y].index))
    if not methods:
        raise ValueError(f"no method has both {x!r} and {y!r} intervals")
    points = pd.DataFrame({"x": wide[x].loc[methods, "value"], "y": wide[y].loc[methods, "value"]})
    front = pareto_front(points, "x", "y")
    fig = go.Figure()
    for method in methods:
        px, py = wide[x].loc[[method]], wide[y].loc[[method]]
        fig.add_trace(go.Scatter(
            x=px["value"], y=py["value"], mode="markers", name=method + (" (front)" if front[method] else ""),
            marker={"color": method_color(method), "size": 13 if front[method] else 9,
                    "symbol": "diamond" if front[method] else "circle"},
            error_x=_error(px, "value", "ci_low", "ci_high"), error_y=_error(py, "value", "ci_low", "ci_high")))
    line = points[front].sort_values("x")
    fig.add_trace(go.Scatter(x=line["x"], y=line["y"], mode="lines", name="Pareto front",
                             line={"color": "black", "dash": "dot"}, hoverinfo="skip"))
    n_items = int(wide[y]["n_items"].min()) if "n_items" in wide[y] else None
    fig.update_layout(title=title or "Trade-off: reference-eval loss against held-out loss (95% "
                      "intervals; lower-left is better)" + (f", {n_items} reference items" if n_items else ""),
                      xaxis_title=axis_title(x), yaxis_title=axis_title(y))
    return fig


def cost_gain_figure(paired: pd.DataFrame, costs: pd.DataFrame, metric: str = "ref_loss",
                     cost_column: str = "wall_time_s", log_x: bool = True, title: str | None = None) -> go.Figure:
    """Gain over Random on `metric` (paired difference oriented so that up is better, with its
    interval) against each method's selection cost (`stats.collect_costs` column `cost_column`, e.g.
    the standalone `cost_flops` or the cached `wall_time_s`); a log axis unless a cost is 0."""
    _require(paired, ("method", "metric", "gain", "ci_low", "ci_high"), "cost_gain_figure (paired)")
    _require(costs, ("method", cost_column), "cost_gain_figure (costs)")
    rows = paired[paired["metric"] == metric].set_index("method")
    cost = costs.set_index("method")[cost_column]
    methods = [m for m in method_order(rows.index) if m in cost.index and pd.notna(cost[m])]
    sign = 1.0 if higher_is_better(metric) else -1.0
    fig = go.Figure()
    for method in methods:
        row = rows.loc[method]
        low, high = sorted((sign * row["ci_low"], sign * row["ci_high"]))
        star = " *" if bool(row.get("significant", False)) else ""
        fig.add_trace(go.Scatter(x=[cost[method]], y=[row["gain"]], mode="markers", name=method + star,
                                 marker={"color": method_color(method), "size": 10},
                                 error_y={"type": "data", "symmetric": False, "array": [high - row["gain"]],
                                          "arrayminus": [row["gain"] - low]}))
    fig.add_hline(y=0.0, line={"color": BASELINE_LINE, "dash": "dash"}, annotation_text=f"{BASELINE}")
    positive = bool(len(methods)) and bool((cost[methods].astype(float) > 0).all())  # a log axis drops cost 0
    fig.update_layout(title=title or f"Cost against gain over Random on {metric} (95% paired "
                      "intervals; * = Holm-adjusted p < 0.05)",
                      xaxis_title=axis_title(cost_column, "selection cost: "),
                      yaxis_title=axis_title(metric, "gain over Random in "),
                      xaxis_type="log" if log_x and positive else None)
    return fig


BASELINE_LINE = "#7f7f7f"


def paired_differences_figure(paired: pd.DataFrame, metrics: Sequence[str], title: str | None = None,
                              labels: Sequence[str] | None = None) -> go.Figure:
    """Per metric (e.g. each task's gold bits per byte) and method: the paired gain over Random with
    its 95% interval, as horizontal error bars; right of 0 is better, `*` marks a
    Holm-adjusted significant difference. The metrics must share a unit."""
    _require(paired, ("method", "metric", "gain", "ci_low", "ci_high", "significant"), "paired_differences_figure")
    units = {metric_unit(m) for m in metrics}
    if len(units) > 1:
        raise ValueError(f"paired_differences_figure draws metrics of one unit; {list(metrics)} mix {sorted(units)}")
    labels = list(labels) if labels is not None else list(metrics)
    shown = paired[paired["metric"].isin(list(metrics))]
    fig = go.Figure()
    for method in method_order(shown["method"]):
        rows = shown[shown["method"] == method].set_index("metric").reindex(list(metrics))
        signs = np.array([1.0 if higher_is_better(m) else -1.0 for m in metrics])
        low = np.minimum(signs * rows["ci_low"], signs * rows["ci_high"])
        high = np.maximum(signs * rows["ci_low"], signs * rows["ci_high"])
        fig.add_trace(go.Scatter(
            x=rows["gain"], y=labels, mode="markers+text", name=method, marker={"color": method_color(method), "size": 9},
            text=["*" if s is True else "" for s in rows["significant"]], textposition="top center",
            error_x={"type": "data", "symmetric": False, "array": (high - rows["gain"]).to_numpy(),
                     "arrayminus": (rows["gain"] - low).to_numpy()}))
    fig.add_vline(x=0.0, line={"color": BASELINE_LINE, "dash": "dash"})
    unit = units.pop() if units else ""
    fig.update_layout(title=title or "Paired difference from Random per task (95% intervals; right is "
                      "better; * = Holm-adjusted p < 0.05)", scattermode="group",
                      xaxis_title=f"gain over Random ({unit})" if unit else "gain over Random", yaxis_title="metric",
                      height=200 + 40 * len(labels))
    return fig
