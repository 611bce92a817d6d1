"""PPL: the documents the proxy model finds most predictable (lowest mean token loss) first.

A common perplexity-filtering baseline in the Quad comparison; `score` is the negative loss.
"""

from __future__ import annotations

import numpy as np

from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.methods.base import Selector, descending, forward_cost


class PerplexitySelector(Selector):
    name = "ppl"

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        doc_losses = ctx.require("doc_losses", "ppl (a doc_losses(texts) callable, e.g. HFProbeModel.doc_losses)")
        losses = np.asarray(doc_losses(ctx.pool["text"].tolist()), dtype=np.float64)
        if losses.shape != (len(ctx.pool),):
            raise ValueError(f"doc_losses returned shape {losses.shape} for {len(ctx.pool)} documents")
        order = descending(-losses, ctx.pool["id"].to_numpy())
        cost = forward_cost(ctx, np.arange(len(ctx.pool)), ctx.proxy_params)
        return self.ranked(ctx, order, -losses, budget_tokens, cost)
