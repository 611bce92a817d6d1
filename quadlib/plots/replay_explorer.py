"""Sliders over α, τ, γ and k that redraw a bandit replay from cached scores (notebook 03).

The figures for the starting values are ordinary outputs (they reach the HTML report); the
sliders redraw into their own panel only when a person moves one. Executing the cell therefore
writes nothing into a widget, which keeps batch runs (papermill, nbval) clear of nbclient's
intermittent hang on cells whose execution captures output in a widget (jupyter/nbclient#312,
seen here once in a `make demo` run of an earlier `widgets.interactive` version).
"""

from __future__ import annotations

from dataclasses import replace

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from quadlib.plots.bandit_plots import cs_trajectories_figure, pulls_per_cluster_figure, source_mix_figure
from quadlib.selection import BanditSettings, replay
from quadlib.selection.metrics import source_mix


def replay_figures(scores: pd.Series, pool: pd.DataFrame, assignments: pd.DataFrame,
                   settings: BanditSettings) -> tuple[str, list[go.Figure]]:
    """A one-line summary and the pulls, CS trajectories and source-mix figures of one replay."""
    result = replay(scores, pool, assignments, settings)
    summary = f"{len(result.ids)} documents, {result.tokens_selected:,} tokens, stop: {result.stop_reason}"
    mixes = {"pool": source_mix(pool["id"].tolist(), pool, weight="tokens"),
             "replay": source_mix(result.ids, pool, weight="tokens")}
    return summary, [pulls_per_cluster_figure(result.arms), cs_trajectories_figure(result.arms),
                     source_mix_figure(mixes)]


def replay_explorer(scores: pd.Series, pool: pd.DataFrame, assignments: pd.DataFrame,
                    settings: BanditSettings) -> widgets.VBox:
    """Sliders for α (log scale), τ, γ and k starting at `settings`, above a panel they redraw."""
    spread = float(np.nanstd(scores)) or 1.0
    sliders = {
        "alpha": widgets.FloatLogSlider(value=max(settings.alpha, 1e-6), base=10, min=-6,
                                        max=np.log10(10 * spread) + 1, description="alpha"),
        "tau": widgets.FloatSlider(value=settings.tau, min=float(scores.min()), max=float(scores.quantile(0.95)),
                                   step=spread / 100, description="tau", readout_format=".4g"),
        "gamma": widgets.FloatSlider(value=settings.gamma, min=0.05, max=1.0, step=0.05, description="gamma"),
        "k": widgets.IntSlider(value=settings.k, min=1, max=int(assignments["cluster"].nunique()), description="k"),
    }
    panel = widgets.Output()
    hint = widgets.HTML("Move a slider to redraw the replay here; the figures below are for the starting values.")

    def redraw(_change: object) -> None:
        chosen = replace(settings, **{name: slider.value for name, slider in sliders.items()})
        with panel:
            panel.clear_output(wait=True)
            summary, figures = replay_figures(scores, pool, assignments, chosen)
            print(summary)
            for figure in figures:
                figure.show()

    for slider in sliders.values():
        slider.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(sliders.values())), hint, panel])
