"""Quad as a selector: the bandit of `quadlib.selection.bandit` at the requested token budget.

"quad" runs the paper's equation (`BanditSettings()` defaults); "quad_released" runs the same
bandit under `preset="released_code"` (the authors' released script), so the two can be run side
by side; docs/methods.md, "Quad (the bandit)", lists the differences.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np

from quadlib.cluster import member_means
from quadlib.runstore import RunStore
from quadlib.selection.bandit import BanditSettings, run_bandit
from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.methods.base import Selector


def cluster_centroids(ctx: SelectionContext, assignments) -> np.ndarray:
    """Mean embedding of each cluster's documents `[n_clusters, d]`, in sorted label order."""
    if ctx.embeddings is None:
        raise ValueError("the released_code preset shares rewards between clusters by centroid distance: the "
                         "selection context needs the pool's embeddings (run 01_cluster)")
    labels, arm = np.unique(ctx.pool["id"].map(assignments.set_index("id")["cluster"]).to_numpy(),
                            return_inverse=True)
    return member_means(np.asarray(ctx.embeddings, dtype=np.float64), arm, len(labels))


class QuadSelector(Selector):
    """Runs the bandit (recorded and resumable under `<run>/select-<name>/rounds/` when ctx.run_dir is set)."""

    name = "quad"
    settings_type = BanditSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        scorer = ctx.require("scorer", self.name)
        assignments = ctx.require("assignments", self.name)
        settings = replace(self.settings, budget_tokens=budget_tokens, seed=ctx.seed)
        centroids = cluster_centroids(ctx, assignments) if settings.preset == "released_code" else None
        store = RunStore(ctx.run_dir) if ctx.run_dir is not None else None
        result = run_bandit(ctx.pool, assignments, scorer, settings, store, step=f"select-{self.name}/rounds",
                            centroids=centroids)
        return Selection(method=self.name, ids=result.ids, scores=result.scores, cost=result.cost,
                         params=asdict(settings), budget_tokens=budget_tokens, tokens_selected=result.tokens_selected,
                         rounds=np.asarray(result.rounds), extra={"stop_reason": result.stop_reason,
                                                                  "n_rounds": int(result.arms["round"].max() + 1)
                                                                  if len(result.arms) else 0})


class QuadReleasedSelector(QuadSelector):
    """The bandit as the authors' released script runs it (`preset="released_code"`)."""

    name = "quad_released"

    def __init__(self, settings: BanditSettings | None = None) -> None:
        super().__init__(settings if settings is not None else BanditSettings(preset="released_code"))
        if self.settings.preset != "released_code":
            self.settings = replace(self.settings, preset="released_code")
