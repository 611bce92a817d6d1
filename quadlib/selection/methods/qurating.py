"""QuRating: select by a learned quality rater (Wettig et al., 2024), behind a pluggable interface.

The QuRating rater (a 1.3B model fine-tuned on pairwise LLM judgments) cannot be downloaded on this
project's machines; users pass any `Rater` (their QuRater wrapper, a classifier, a heuristic).
Selection samples without replacement with probability ∝ exp(rating / temperature) (the paper's
temperature sampling, done by Gumbel top-k); temperature 0 takes the highest ratings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from quadlib.selection.context import Selection, SelectionContext, gumbel_order
from quadlib.selection.methods.base import Selector, descending, forward_cost
from quadlib.settings import setting


@runtime_checkable
class Rater(Protocol):
    """Rates documents (higher = better); `n_params` (None if unknown) prices its forward passes."""

    n_params: int | None

    def rate(self, texts: Sequence[str]) -> np.ndarray:
        """Ratings `[len(texts)]`."""
        ...


@dataclass
class QuRatingSettings:
    temperature: float = setting(0.0, "sampling temperature over ratings (0: top ratings; QuRating used 2.0)")


class QuRatingSelector(Selector):
    name = "qurating"
    settings_type = QuRatingSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        rater: Rater = ctx.require("rater", "qurating (a user-provided Rater; the QuRating model is not bundled)")
        texts = ctx.pool["text"].tolist()
        ratings = np.asarray(rater.rate(texts), dtype=np.float64)
        if ratings.shape != (len(texts),):
            raise ValueError(f"rater returned shape {ratings.shape} for {len(texts)} documents")
        if self.settings.temperature > 0:
            order = gumbel_order(ratings / self.settings.temperature, np.random.default_rng(ctx.seed))
        else:
            order = descending(ratings, ctx.pool["id"].to_numpy())
        cost = forward_cost(ctx, np.arange(len(texts)), getattr(rater, "n_params", None))
        return self.ranked(ctx, order, ratings, budget_tokens, cost)
