"""MATES (Yu et al., 2024), scaled down: a data-influence model learned from one-step probe oracles.

1. Oracle: for a uniform sample of documents, the drop in reference loss after one training step of
   the proxy on the document (`ProbeModel.one_step_delta`).
2. Data-influence model: ridge regression from the document's sentence embedding to its oracle (MATES
   fine-tunes a small BERT; a linear probe on frozen embeddings keeps it CPU-sized).
3. Predict the whole pool and take the highest predictions up to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import Ridge
from tqdm.auto import tqdm

from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.methods.base import Selector, descending, random_rows
from quadlib.selection.probes import ProbeModel
from quadlib.settings import setting

ORACLE_SAMPLE_SALT = 1  # the oracle sample is its own seeded draw, independent of other methods' draws


@dataclass
class MATESSettings:
    n_oracle: int = setting(64, "documents probed with a one-step oracle (MATES: a few thousand)")
    ridge_alpha: float = setting(1.0, "L2 penalty of the ridge data-influence model")


class MATESSelector(Selector):
    name = "mates"
    settings_type = MATESSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        probe: ProbeModel = ctx.require("probe", "mates (a ProbeModel such as HFProbeModel)")
        vectors = ctx.require("embeddings", "mates")
        rows = random_rows(ctx, self.settings.n_oracle, salt=ORACLE_SAMPLE_SALT)
        texts = ctx.pool["text"].to_numpy()
        before = probe.cost.copy()
        oracle = np.array([probe.one_step_delta([texts[r]]) for r in tqdm(rows, desc="mates oracles")])
        model = Ridge(alpha=self.settings.ridge_alpha).fit(vectors[rows], oracle)
        predicted = model.predict(vectors)  # [n_pool]
        order = descending(predicted, ctx.pool["id"].to_numpy())
        return self.ranked(ctx, order, predicted, budget_tokens, probe.cost - before,
                           oracle_ids=ctx.pool["id"].to_numpy()[rows].astype(str).tolist(), oracle=oracle.tolist())
