"""Influence baselines without a bandit: rank documents, or rank clusters, by estimated influence.

- `topk_influence` (LESS-style): score a uniform sample, take the highest-scoring documents.
- `topk_clusters` (Quad, Fig. 4a): estimate every cluster's mean influence from a small sample,
  then take the clusters with the highest mean, each in uniformly random order, until the budget.
Both show what Quad's exploration adds: they exploit the scores and ignore diversity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.methods.base import Selector, descending, random_rows
from quadlib.selection.scoring import DocScorer
from quadlib.settings import setting


@dataclass
class TopKInfluenceSettings:
    sample_size: int | None = setting(None, "documents scored, drawn uniformly (None: the whole pool)")


class TopKInfluenceSelector(Selector):
    name = "topk_influence"
    settings_type = TopKInfluenceSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        scorer: DocScorer = ctx.require("scorer", "topk_influence")
        rows = random_rows(ctx, self.settings.sample_size)
        before = scorer.cost.copy()
        ids = ctx.pool["id"].to_numpy().astype(str)
        scores = np.full(len(ctx.pool), np.nan)
        scores[rows] = scorer.score(ids[rows].tolist())
        order = rows[descending(scores[rows], ids[rows])]
        return self.ranked(ctx, order, scores, budget_tokens, scorer.cost - before)


@dataclass
class TopKClustersSettings:
    sample_per_cluster: int = setting(16, "documents scored per cluster to estimate its mean influence")


class TopKClustersSelector(Selector):
    name = "topk_clusters"
    settings_type = TopKClustersSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        scorer: DocScorer = ctx.require("scorer", "topk_clusters")
        labels = ctx.clusters()
        ids = ctx.pool["id"].to_numpy().astype(str)
        shuffled = random_rows(ctx)  # one seeded order: its head per cluster is the sample, the rest the fill
        per_cluster = {label: shuffled[labels[shuffled] == label] for label in np.unique(labels)}
        sampled = np.concatenate([rows[:self.settings.sample_per_cluster] for rows in per_cluster.values()])
        before = scorer.cost.copy()
        scores = np.full(len(ctx.pool), np.nan)
        scores[sampled] = scorer.score(ids[sampled].tolist())
        cluster_labels = np.array(list(per_cluster))
        means = np.array([np.nanmean(scores[per_cluster[c][:self.settings.sample_per_cluster]]) for c in cluster_labels])
        ranked_clusters = cluster_labels[np.lexsort((np.arange(len(means)), -means))]
        order = np.concatenate([per_cluster[c] for c in ranked_clusters])
        cluster_mean = dict(zip(cluster_labels.tolist(), means.tolist(), strict=True))
        return self.ranked(ctx, order, scores, budget_tokens, scorer.cost - before, cluster_mean=cluster_mean)

