"""Influence baselines without a bandit: rank documents, or rank clusters, by estimated influence.

- `topk_influence` (the paper's costly baseline, LESS-style): score the whole pool (or a uniform
  sample of `sample_size`), take the highest-scoring documents.
- `topk_influence_quadcost`: the same at equal scoring cost with Quad: it scores a uniform sample
  of exactly as many documents as this run's exported Quad selection scored, so a comparison
  separates the method (bandit vs ranking) from its scoring budget.
- `topk_clusters` (Quad, Fig. 4a): estimate every cluster's mean influence from a small sample,
  then take the clusters with the highest mean, each in uniformly random order, until the budget.
Both show what Quad's exploration adds: they exploit the scores and ignore diversity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quadlib.runstore import RunStore
from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.export import read_selection
from quadlib.selection.methods.base import Selector, descending, random_rows, reads
from quadlib.selection.scoring import DocScorer
from quadlib.settings import setting


@dataclass
class TopKInfluenceSettings:
    sample_size: int | None = setting(None, "documents scored, drawn uniformly (None: the whole pool, the "
                                      "paper's costly baseline)")
    equal_cost_with: str | None = setting(None, "a method whose exported selection in this run fixes the number "
                                          "of documents scored (e.g. 'quad'); overrides sample_size")


def docs_scored_by(ctx: SelectionContext, method: str) -> int:
    """How many documents `method`'s exported selection in `ctx.run_dir` scored (its manifest's cost)."""
    if ctx.run_dir is None:
        raise ValueError(f"equal_cost_with={method!r} needs SelectionContext.run_dir (the run holding the "
                         f"{method} selection); pass run_dir or set sample_size instead")
    try:
        _, manifest = read_selection(RunStore(ctx.run_dir), method)
    except FileNotFoundError as err:
        raise ValueError(f"{err}; run {method!r} before the equal-cost top-k (or set sample_size)") from None
    return int(manifest["cost"]["docs_scored"])


class TopKInfluenceSelector(Selector):
    name = "topk_influence"
    settings_type = TopKInfluenceSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        scorer: DocScorer = ctx.require("scorer", self.name)
        size = self.settings.sample_size
        if self.settings.equal_cost_with is not None:
            size = docs_scored_by(ctx, self.settings.equal_cost_with)
        rows = random_rows(ctx, size)
        before = scorer.cost.copy()
        ids = ctx.pool["id"].to_numpy().astype(str)
        scores = np.full(len(ctx.pool), np.nan)
        scores[rows] = scorer.score(ids[rows].tolist())
        order = rows[descending(scores[rows], ids[rows])]  # highest influence first
        return self.ranked(ctx, order, scores, budget_tokens, scorer.cost - before, docs_scored=len(rows),
                           scored_fraction=len(rows) / max(len(ids), 1), reads=reads(ctx, "scorer"))


@dataclass
class TopKInfluenceQuadCostSettings(TopKInfluenceSettings):
    equal_cost_with: str | None = setting("quad", "the method whose documents-scored count this run matches")


class TopKInfluenceQuadCostSelector(TopKInfluenceSelector):
    """`topk_influence` scoring as many documents as Quad did (run it after `quad` in the same run)."""

    name = "topk_influence_quadcost"
    settings_type = TopKInfluenceQuadCostSettings


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
        return self.ranked(ctx, order, scores, budget_tokens, scorer.cost - before, cluster_mean=cluster_mean,
                           reads=reads(ctx, "scorer", "assignments"))

