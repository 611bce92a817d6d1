"""Quad as a selector: the bandit of `quadlib.selection.bandit` at the requested token budget."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np

from quadlib.runstore import RunStore
from quadlib.selection.bandit import BanditSettings, run_bandit
from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.methods.base import Selector


class QuadSelector(Selector):
    """Runs the bandit (recorded and resumable under `<run>/select-quad/rounds/` when ctx.run_dir is set)."""

    name = "quad"
    settings_type = BanditSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        scorer = ctx.require("scorer", "quad")
        assignments = ctx.require("assignments", "quad")
        settings = replace(self.settings, budget_tokens=budget_tokens, seed=ctx.seed)
        store = RunStore(ctx.run_dir) if ctx.run_dir is not None else None
        result = run_bandit(ctx.pool, assignments, scorer, settings, store)
        return Selection(method=self.name, ids=result.ids, scores=result.scores, cost=result.cost,
                         params=asdict(settings), budget_tokens=budget_tokens, tokens_selected=result.tokens_selected,
                         rounds=np.asarray(result.rounds), extra={"stop_reason": result.stop_reason,
                                                                  "n_rounds": int(result.arms["round"].max() + 1)
                                                                  if len(result.arms) else 0})
