"""Sliders over α, τ, γ, k and the batch size that re-run the bandit on cached scores at the run's
budget (notebook 03).

Every slider change replays the bandit (`quadlib.selection.bandit.replay`, no influence computed)
with the run's settings, budget included, and updates a live read-out: the replay's mean
influence, cluster entropy, clusters covered, tokens against the budget and its stop reason; the
panel below redraws the quality-diversity plot (the α sweep's frontier with this replay as a red
cross), the pulls and the source mix. A header says which fraction of the pool has cached scores:
a replay explores only those documents; given the run's scorer, a button scores the rest
(`complete_scores`), after which every replay equals a live run. α and τ sliders are labelled with their units and their
grids hold 0 and the configured value.

The figures for the starting values are ordinary outputs (they reach the HTML report); the panel
is drawn into only when a person moves a slider. Executing the cell therefore writes nothing into
a widget, which keeps batch runs (papermill, nbval) clear of nbclient's intermittent hang on cells
whose execution captures output in a widget (jupyter/nbclient#312).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from quadlib.plots.bandit_plots import pulls_per_cluster_figure, quality_diversity_figure, source_mix_figure
from quadlib.selection.bandit import (
    BanditResult, BanditSettings, cached_fraction, complete_scores, replay, units_label,
)
from quadlib.selection.metrics import quality_diversity, source_mix

SCALE_ALPHAS = (0.03, 0.1, 0.3, 1.0, 3.0)  # in standard deviations of the scores seen
SCALE_TAUS = (-0.5, 0.25, 0.5, 1.0, 2.0)


def parameter_grids(settings: BanditSettings, scores: pd.Series) -> dict[str, list[float]]:
    """Slider values for alpha and tau in `settings.units`, each holding 0 and the configured value."""
    if settings.units == "score_scale":
        alphas, taus = SCALE_ALPHAS, SCALE_TAUS
    else:  # absolute: the same multiples of the cached scores' spread and quantiles
        spread = float(np.nanstd(scores.to_numpy(dtype=np.float64))) or 1.0
        alphas = tuple(spread * f for f in SCALE_ALPHAS)
        taus = tuple(float(q) for q in scores.quantile([0.25, 0.5, 0.75, 0.9]))
    return {"alpha": sorted({0.0, float(settings.alpha), *alphas}), "tau": sorted({0.0, float(settings.tau), *taus})}


def replay_summary(result: BanditResult, scores: pd.Series, pool: pd.DataFrame,
                   assignments: pd.DataFrame) -> dict[str, Any]:
    """What the read-out shows: quality, diversity and budget use of one replay."""
    return {**quality_diversity(result.ids, scores, assignments), "tokens_selected": result.tokens_selected,
            "budget_tokens": result.settings.budget_tokens, "stop_reason": result.stop_reason,
            "rounds": int(result.arms["round"].max()) + 1 if len(result.arms) else 0}


def _describe(summary: dict[str, Any]) -> str:
    return (f"{summary['n_docs']:.0f} documents, {summary['tokens_selected']:,} of {summary['budget_tokens']:,} "
            f"tokens, stop: {summary['stop_reason']} after {summary['rounds']} rounds; mean influence "
            f"{summary['mean_influence']:.4g}, cluster entropy {summary['entropy']:.3f} nats, "
            f"{summary['clusters_covered']:.0f} clusters covered")


def replay_figures(scores: pd.Series, pool: pd.DataFrame, assignments: pd.DataFrame, settings: BanditSettings,
                   sweep: pd.DataFrame | None = None,
                   result: BanditResult | None = None) -> tuple[str, list[go.Figure]]:
    """A one-line summary and the figures of one replay at `settings` (budget included): the
    quality-diversity plot (the `sweep` frontier over alpha, with this replay), pulls and source mix.
    `result`: that replay when already run (it is not run again)."""
    result = result if result is not None else replay(scores, pool, assignments, settings)
    summary = replay_summary(result, scores, pool, assignments)
    mixes = {"pool": source_mix(pool["id"].tolist(), pool, weight="tokens"),
             "replay": source_mix(result.ids, pool, weight="tokens")}
    points = sweep if sweep is not None else pd.DataFrame([{"alpha": settings.alpha, **summary}])
    quality = quality_diversity_figure(points, frontier="alpha" if "alpha" in points else None,
                                       default=settings.alpha, current=summary, units=units_label(settings))
    return _describe(summary), [quality, pulls_per_cluster_figure(result.arms), source_mix_figure(mixes)]


class ReplayExplorer:
    """The widget (`.widget`), its sliders by parameter name, the live read-out, the last replay (`.result`)
    and its summary."""

    def __init__(self, scores: pd.Series, pool: pd.DataFrame, assignments: pd.DataFrame, settings: BanditSettings,
                 sweep: pd.DataFrame | None = None, scorer: Any = None) -> None:
        self.scores, self.pool, self.assignments, self.settings, self.sweep = scores, pool, assignments, settings, sweep
        self.scorer = scorer
        grids = parameter_grids(settings, scores)
        unit = units_label(settings)
        gammas = sorted({round(g, 2) for g in np.arange(0.05, 1.0001, 0.05)} | {float(settings.gamma)})
        batches = sorted({4, 8, 16, 32, 64, int(settings.batch_size)})
        self.sliders: dict[str, widgets.Widget] = {
            "alpha": widgets.SelectionSlider(options=[(f"{a:.3g}", a) for a in grids["alpha"]],
                                             value=float(settings.alpha), description=f"α ({unit})", style={"description_width": "initial"}),
            "tau": widgets.SelectionSlider(options=[(f"{t:.3g}", t) for t in grids["tau"]], value=float(settings.tau),
                                           description=f"τ ({unit})", style={"description_width": "initial"}),
            "gamma": widgets.SelectionSlider(options=[(f"{g:.2f}", g) for g in gammas], value=float(settings.gamma),
                                             description="γ (fraction kept)", style={"description_width": "initial"}),
            "k": widgets.IntSlider(value=settings.k, min=1, max=int(assignments["cluster"].nunique()),
                                   description="k (arms per round)", style={"description_width": "initial"}),
            "batch_size": widgets.SelectionSlider(options=[(str(b), b) for b in batches],
                                                  value=int(settings.batch_size), description="batch (documents per pull)",
                                                  style={"description_width": "initial"}),
        }
        self.header = widgets.HTML()
        self.score_button = widgets.Button(description="Score the rest of the pool", icon="calculator",
                                           layout={"width": "auto"})
        self.score_button.on_click(self._score_the_rest)
        self._describe_cache()
        self.readout = widgets.HTML()
        self.panel = widgets.Output()
        self.summary: dict[str, Any] = {}
        self.result: BanditResult | None = None
        self._update()
        for slider in self.sliders.values():
            slider.observe(self._redraw, names="value")
        self.widget = widgets.VBox([widgets.HBox(list(self.sliders.values())), self.header, self.score_button,
                                    self.readout, self.panel])

    def _describe_cache(self) -> None:
        fraction = cached_fraction(self.scores, self.pool)
        missing = len(self.pool) - int(round(fraction * len(self.pool)))
        self.header.value = (
            f"Replays run at the run's budget of {self.settings.budget_tokens:,} tokens on cached scores only: "
            f"{fraction:.1%} of the pool ({len(self.pool) - missing:,} of {len(self.pool):,} documents) has one, "
            "and a replay explores only those" + (" (every replay equals a live run)." if not missing else
                                                  "; the button below scores the rest." if self.scorer is not None
                                                  else "; complete_scores(scorer, ids) scores the rest.")
            + " Move a slider to re-run the bandit; the figures below the widget are for the starting values.")
        self.score_button.description = f"Score the {missing:,} documents without a score"
        self.score_button.disabled = self.scorer is None or missing == 0
        self.score_button.layout.display = None if self.scorer is not None and missing else "none"

    def _score_the_rest(self, _button: object = None) -> None:
        """Score every pool document without a cached score, then replay with the whole pool."""
        self.score_button.disabled = True
        self.scores = complete_scores(self.scorer, self.pool["id"].tolist(), on_batch=lambda done, total: setattr(
            self.score_button, "description", f"scored {done:,} of {total:,} documents"))
        self._describe_cache()
        self._redraw(None)

    def chosen(self) -> BanditSettings:
        """The run's settings with the sliders' values."""
        return replace(self.settings, **{name: slider.value for name, slider in self.sliders.items()})

    def _update(self) -> BanditSettings:
        chosen = self.chosen()
        self.result = replay(self.scores, self.pool, self.assignments, chosen)
        self.summary = replay_summary(self.result, self.scores, self.pool, self.assignments)
        self.readout.value = f"<b>This replay:</b> {_describe(self.summary)}"
        return chosen

    def _redraw(self, _change: object) -> None:
        chosen = self._update()
        with self.panel:
            self.panel.clear_output(wait=True)
            _, figures = replay_figures(self.scores, self.pool, self.assignments, chosen, self.sweep, self.result)
            for figure in figures:
                figure.show()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def replay_explorer(scores: pd.Series, pool: pd.DataFrame, assignments: pd.DataFrame, settings: BanditSettings,
                    sweep: pd.DataFrame | None = None, scorer: Any = None) -> ReplayExplorer:
    """Sliders for α, τ, γ, k and the batch size starting at `settings` (the run's, budget included), above a
    live read-out and a panel they redraw; `sweep` (an α `replay_sweep`) draws the frontier; `scorer` (the
    run's CachingScorer) enables the button that scores the documents without a cached score."""
    return ReplayExplorer(scores, pool, assignments, settings, sweep, scorer)
