"""Figures of notebook 02: influence across and within clusters (the paper's Fig. 1), estimators
against each other, and where the score comes from (MLP against attention layers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from scipy import stats


def cluster_influence_figure(scores: pd.DataFrame, max_clusters: int = 40) -> go.Figure:
    """Box plot of influence per cluster, sorted by median (`scores`: columns cluster, score).

    Quad's premise: influence differs between clusters *and* varies inside them, so a cluster's
    mean alone is not enough and a few samples per cluster are informative.
    """
    medians = scores.groupby("cluster")["score"].median().sort_values(ascending=False)
    shown = medians.index[:max_clusters]
    frame = scores[scores["cluster"].isin(shown)].assign(cluster=lambda f: f["cluster"].astype(str))
    fig = px.box(frame, x="cluster", y="score", category_orders={"cluster": [str(c) for c in shown]},
                 points="all" if len(frame) <= 2000 else "outliers")
    fig.update_layout(title=f"Influence per cluster ({len(shown)} of {len(medians)} clusters, sorted by median)",
                      xaxis_title="cluster", yaxis_title="influence score (higher helps the reference more)")
    return fig


def estimator_scatter_figure(scores: pd.DataFrame, x: str, y: str) -> go.Figure:
    """Scatter of two estimators' scores on the same documents with Pearson and Spearman in the title."""
    pearson = stats.pearsonr(scores[x], scores[y]).statistic
    spearman = stats.spearmanr(scores[x], scores[y]).statistic
    fig = px.scatter(scores, x=x, y=y, opacity=0.6)
    fig.update_layout(title=f"{y} vs {x}: Pearson {pearson:.3f}, Spearman {spearman:.3f}")
    return fig


def estimator_correlation_figure(scores: pd.DataFrame, method: str = "spearman") -> go.Figure:
    """Heat map of pairwise correlations between estimator columns."""
    corr = scores.corr(method=method)
    fig = go.Figure(go.Heatmap(z=corr.to_numpy(), x=corr.columns, y=corr.index, zmin=-1, zmax=1,
                               colorscale="RdBu", text=np.round(corr.to_numpy(), 3), texttemplate="%{text}"))
    fig.update_layout(title=f"{method.capitalize()} correlation between estimators")
    return fig


def layer_contribution_figure(per_layer: pd.DataFrame) -> go.Figure:
    """Mean absolute score contribution per layer, coloured by group (MLP, attention QKV, output).

    `per_layer`: the long table of `InfluenceScorer.score_texts(..., per_layer=True)`.
    """
    frame = (per_layer.assign(abs_score=per_layer["score"].abs())
             .groupby(["block", "layer", "group"], as_index=False)["abs_score"].mean()
             .sort_values(["block", "layer"]))
    fig = px.bar(frame, x="layer", y="abs_score", color="group")
    share = frame.groupby("group")["abs_score"].sum() / frame["abs_score"].sum()
    parts = ", ".join(f"{g} {100 * v:.0f}%" for g, v in share.items())
    fig.update_layout(title=f"Where the score comes from (mean |contribution| per layer): {parts}",
                      xaxis_title="layer", yaxis_title="mean |score contribution|")
    return fig
