"""Random: a seeded uniform sample of the pool up to the budget (the baseline every method must beat)."""

from __future__ import annotations

import numpy as np

from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.methods.base import Selector, random_rows, reads
from quadlib.selection.scoring import Cost


class RandomSelector(Selector):
    name = "random"

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        return self.ranked(ctx, random_rows(ctx), np.full(len(ctx.pool), np.nan), budget_tokens, Cost(),
                           reads=reads(ctx))
