"""SemDeDup (Abbas et al., 2023): drop semantic near-duplicates inside embedding clusters, then random.

Within each cluster, documents are visited from the least to the most prototypical (descending
distance to the cluster's mean embedding, ties by id: SemDeDup keeps the "hard" member of a
duplicate group); a document is dropped when its cosine similarity to a document already kept in
the cluster exceeds `threshold`, so each near-duplicate group keeps one member. The survivors are
then sampled uniformly (seeded) up to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.methods.base import Selector, random_rows
from quadlib.selection.scoring import Cost
from quadlib.settings import setting


@dataclass
class SemDeDupSettings:
    threshold: float = setting(0.95, "cosine similarity above which two documents are near-duplicates")


def dedup_cluster(vectors: np.ndarray, ids: np.ndarray, threshold: float) -> np.ndarray:
    """Positions (into `vectors` `[m, d]`) kept by the greedy near-duplicate rule of the module docstring."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # [m, d]
    centre = unit.mean(axis=0)
    distance = 1.0 - unit @ (centre / max(np.linalg.norm(centre), 1e-12))  # [m]
    kept: list[int] = []
    for i in np.lexsort((ids.astype(str), -distance)):
        if not kept or float((unit[kept] @ unit[i]).max()) <= threshold:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


class SemDeDupSelector(Selector):
    name = "semdedup"
    settings_type = SemDeDupSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        vectors = ctx.require("embeddings", "semdedup")
        labels = ctx.clusters()
        ids = ctx.pool["id"].to_numpy().astype(str)
        survivor = np.zeros(len(ids), dtype=bool)
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            survivor[rows[dedup_cluster(vectors[rows], ids[rows], self.settings.threshold)]] = True
        order = random_rows(ctx)
        order = order[survivor[order]]
        cost = Cost(docs_scored=len(ids))  # embedding comparisons only; embeddings come from quadlib.embed
        return self.ranked(ctx, order, np.full(len(ids), np.nan), budget_tokens, cost,
                           n_duplicates_removed=int((~survivor).sum()))
