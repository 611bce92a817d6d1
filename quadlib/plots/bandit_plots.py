"""Figures of the Quad bandit (notebook 03_bandit): where it pulled, how cluster scores evolved, and
what the selection looks like against the pool (influence, sources, quality vs diversity).

All take the round tables of `quadlib.selection.bandit.BanditResult` (`arms`, `docs`) or plain
DataFrames, so the notebook's widgets can redraw them from `replay(...)` without any scoring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go

from plotly.subplots import make_subplots

from quadlib.plots.palette import method_color, method_order, registered_methods

PALETTE = plotly.colors.qualitative.Dark24
MAX_TRAJECTORIES = 12  # more CS lines than this are unreadable; the most-pulled clusters are drawn


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs columns {list(columns)}; missing {missing} (pass BanditResult.arms/.docs)")


def pulls_per_cluster_figure(arms: pd.DataFrame) -> go.Figure:
    """Heatmap of cumulative pulls T_i (after each round) per cluster over rounds: exploration vs exploitation."""
    _require(arms, ("round", "cluster", "pulled"), "pulls_per_cluster_figure")
    counts = arms.assign(pulled=arms["pulled"].astype(int)).pivot(index="cluster", columns="round", values="pulled")
    cumulative = counts.cumsum(axis=1)  # [n_clusters, n_rounds]
    fig = go.Figure(go.Heatmap(z=cumulative.to_numpy(), x=cumulative.columns, y=[str(c) for c in cumulative.index],
                               colorscale="Viridis", colorbar={"title": "pulls"}))
    fig.update_layout(title=f"Pulls per cluster over {counts.shape[1]} rounds", xaxis_title="round",
                      yaxis_title="cluster", yaxis_type="category")
    return fig


def cs_trajectories_figure(arms: pd.DataFrame, clusters: Sequence | None = None,
                           units: str | None = None) -> go.Figure:
    """CS_i per round for `clusters` (default: the most-pulled ones); infinite cold-start scores are left out.
    `units`: how CS is measured (`quadlib.selection.bandit.units_label`), for the axis title."""
    _require(arms, ("round", "cluster", "cs", "pulled"), "cs_trajectories_figure")
    if clusters is None:
        clusters = arms.groupby("cluster")["pulled"].sum().sort_values(ascending=False).index[:MAX_TRAJECTORIES]
    fig = go.Figure()
    for i, label in enumerate(clusters):
        rows = arms[arms["cluster"] == label].sort_values("round")
        cs = rows["cs"].replace([np.inf, -np.inf], np.nan)
        fig.add_trace(go.Scatter(x=rows["round"], y=cs, mode="lines", name=f"cluster {label}",
                                 line={"color": PALETTE[i % len(PALETTE)]}))
    fig.update_layout(title="Cluster score CS_i = mean_i + alpha·sqrt(2 ln ΣT / (T_i + 1)) per round",
                      xaxis_title="round", yaxis_title=f"CS ({units or 'units of BanditSettings.units'})")
    return fig


def influence_distribution_figure(selection_scores: Sequence[float], pool_scores: Sequence[float]) -> go.Figure:
    """Overlaid densities of influence: the selection against every scored document of the pool."""
    fig = go.Figure()
    for name, values, color in (("pool (scored)", pool_scores, PALETTE[1]), ("selection", selection_scores, PALETTE[0])):
        values = np.asarray(values, dtype=np.float64)
        fig.add_trace(go.Histogram(x=values[np.isfinite(values)], name=name, histnorm="probability density",
                                   opacity=0.6, marker_color=color))
    fig.update_layout(barmode="overlay", title="Influence of the selection vs the pool", xaxis_title="influence",
                      yaxis_title="density")
    return fig


def source_mix_figure(mixes: dict[str, pd.Series]) -> go.Figure:
    """Grouped bars of source shares, one group per source and one bar per named mix (e.g. pool, quad).
    Methods take their colour and order from `quadlib.plots.palette`; other mixes (the pool) come
    first, in black."""
    sources = sorted(set().union(*(m.index for m in mixes.values())))
    known = set(registered_methods())
    names = [n for n in mixes if n not in known] + method_order(n for n in mixes if n in known)
    fig = go.Figure([go.Bar(x=sources, y=[float(mixes[name].get(s, 0.0)) for s in sources], name=name,
                            marker_color=method_color(name) if name in known else "black") for name in names])
    fig.update_layout(barmode="group", title="Mix by source", xaxis_title="source", yaxis_title="share",
                      yaxis_tickformat=".0%")
    return fig


def quality_diversity_figure(points: pd.DataFrame, label: str | None = None, *, frontier: str | None = None,
                             default: float | None = None, current: Mapping[str, float] | None = None,
                             units: str | None = None) -> go.Figure:
    """Mean influence (quality) against cluster entropy (diversity), one point per parameter setting;
    marker size = clusters covered. `points` as returned by `quadlib.selection.metrics.replay_sweep`.

    frontier: a swept column (e.g. "alpha"); its rows are joined in increasing order by a line (the
    quality-diversity frontier over that parameter) and the row equal to `default` is marked with a
    star. current: one more point ({"entropy", "mean_influence"}) drawn as a red cross, the replay a
    slider is showing. units: how the swept parameter is measured, written into the title.
    """
    _require(points, ("mean_influence", "entropy", "clusters_covered"), "quality_diversity_figure")
    params = [c for c in points.columns if c not in ("mean_influence", "entropy", "clusters_covered", "n_docs",
                                                      "tokens_selected", "stop_reason", "n_seeds", "seed")
              and not c.endswith(("_lo", "_hi"))]
    if label:
        text = points[label].map(str)
    elif params:  # "alpha=0.02" or "k=4": only the parameters a row actually sets
        text = points[params].apply(lambda row: ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in row.dropna().items()), axis=1)
    else:
        text = None
    covered = points["clusters_covered"].to_numpy(dtype=np.float64)
    sizes = 8 + 22 * covered / max(covered.max(), 1.0)
    fig = go.Figure(go.Scatter(
        x=points["entropy"], y=points["mean_influence"], mode="markers+text", text=text, textposition="top center",
        name="settings", showlegend=False,
        marker={"size": sizes, "color": covered, "colorscale": "Viridis", "colorbar": {"title": "clusters"}},
        customdata=covered, hovertemplate="entropy %{x:.3f}<br>mean influence %{y:.4g}<br>clusters %{customdata:.0f}"
                                          "<br>%{text}<extra></extra>"))
    if frontier is not None:
        _require(points, (frontier,), "quality_diversity_figure(frontier=...)")
        line = points.dropna(subset=[frontier]).sort_values(frontier)
        fig.add_trace(go.Scatter(x=line["entropy"], y=line["mean_influence"], mode="lines",
                                 name=f"frontier over {frontier}", line={"color": "grey", "dash": "dot"}))
        if default is not None:
            marked = line[np.isclose(line[frontier].to_numpy(dtype=np.float64), default)]
            fig.add_trace(go.Scatter(x=marked["entropy"], y=marked["mean_influence"], mode="markers",
                                     name=f"default {frontier} = {default:g}",
                                     marker={"symbol": "star", "size": 18, "color": "gold",
                                             "line": {"color": "black", "width": 1}}))
    if current is not None:
        fig.add_trace(go.Scatter(x=[current["entropy"]], y=[current["mean_influence"]], mode="markers",
                                 name="this replay", marker={"symbol": "x", "size": 16, "color": "red"}))
    swept = f" over {frontier}" + (f" ({units})" if units else "") if frontier else ""
    fig.update_layout(title=f"Quality vs diversity{swept}", xaxis_title="cluster entropy of the selection (nats)",
                      yaxis_title="mean influence of the selection (score units)")
    return fig


def alpha_sweep_figure(summaries: Mapping[str, pd.DataFrame], default: float | None = None,
                       units: str | None = None) -> go.Figure:
    """Clusters covered and mean influence of the selection against alpha, one line per method
    (its colour from `quadlib.plots.palette`), with the seeds' intervals as error bars.

    summaries: method -> `quadlib.selection.metrics.sweep_intervals(runs, by="alpha")` (columns alpha,
    clusters_covered[_lo/_hi], mean_influence[_lo/_hi]). The alpha axis is categorical (the grid holds
    0, which a log axis cannot show); `default` is marked by a dotted vertical line.
    """
    for name, frame in summaries.items():
        _require(frame, ("alpha", "clusters_covered", "mean_influence"), f"alpha_sweep_figure({name})")
    alphas = sorted({float(a) for frame in summaries.values() for a in frame["alpha"]})
    labels = {a: f"{a:g}" for a in alphas}
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Clusters covered", "Mean influence"))
    for method in method_order(summaries):
        frame = summaries[method].sort_values("alpha")
        x = [labels[float(a)] for a in frame["alpha"]]
        for col, metric in ((1, "clusters_covered"), (2, "mean_influence")):
            error = None
            if f"{metric}_hi" in frame:
                error = {"type": "data", "array": (frame[f"{metric}_hi"] - frame[metric]).to_numpy(),
                         "arrayminus": (frame[metric] - frame[f"{metric}_lo"]).to_numpy()}
            fig.add_trace(go.Scatter(x=x, y=frame[metric], error_y=error, mode="lines+markers", name=method,
                                     legendgroup=method, showlegend=col == 1,
                                     line={"color": method_color(method)}), row=1, col=col)
    if default is not None and float(default) in labels:
        for col in (1, 2):
            fig.add_vline(x=alphas.index(float(default)), line={"dash": "dot", "color": "black"}, row=1, col=col)
    seeds = [int(f["n_seeds"].min()) for f in summaries.values() if "n_seeds" in f]
    over = f", mean over {min(seeds)} seeds with 95% intervals" if seeds else ""
    axis = f"α ({units})" if units else "α"
    fig.update_xaxes(title_text=axis, type="category", categoryorder="array", categoryarray=list(labels.values()))
    fig.update_yaxes(title_text="clusters in the selection", row=1, col=1)
    fig.update_yaxes(title_text="mean influence per selected document (score units)", row=1, col=2)
    title = "α sweep at the run's budget" + (f" (default α = {default:g} dotted)" if default is not None else "")
    fig.update_layout(title=title + over)
    return fig
