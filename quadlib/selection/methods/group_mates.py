"""Group-MATES (Yu et al., 2025), scaled down: relational data influence from rollouts, cluster-based inference.

1. Oracles from rollouts: a rollout trains the proxy for a few sequential one-document steps; the
   marginal drop in reference loss at each step is the oracle of that document *given the documents
   before it* (`ProbeModel.rollout_delta`).
2. Relational influence model: ridge regression on [e, c ⊙ m, cos(c, m)], where e is the document's
   embedding, c its cluster's mean embedding and m the mean embedding of what is already selected
   (zero for an empty context). Using the cluster's mean for the interaction terms is the
   cluster-based approximation: documents of one cluster share their interaction with the selection.
3. Cluster-based greedy inference: the per-document term is computed once; each step evaluates the
   interaction term once per cluster, takes from the cluster whose best remaining document scores
   highest its next `picks_per_step` documents (those that still fit the budget), updates m, repeats.
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

ROLLOUT_SAMPLE_SALT = 2


@dataclass
class GroupMATESSettings:
    n_rollouts: int = setting(16, "rollouts probed with the proxy")
    rollout_length: int = setting(4, "sequential one-document training steps per rollout")
    ridge_alpha: float = setting(1.0, "L2 penalty of the ridge relational influence model")
    picks_per_step: int = setting(8, "documents taken from the chosen cluster before the conditioning is updated")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of `a` `[n, d]` with the vector `b` `[d]` (0 where either is zero) `[n]`."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b)
    return np.divide(a @ b, norms, out=np.zeros(len(a)), where=norms > 0)


def relational_features(doc_vectors: np.ndarray, cluster_means: np.ndarray, context: np.ndarray) -> np.ndarray:
    """[e, c ⊙ m, cos(c, m)] `[n, 2d + 1]` for documents `[n, d]`, their clusters' means `[n, d]`, context m `[d]`."""
    return np.hstack([doc_vectors, cluster_means * context, _cosine(cluster_means, context)[:, None]])


class GroupMATESSelector(Selector):
    name = "group_mates"
    settings_type = GroupMATESSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        probe: ProbeModel = ctx.require("probe", "group_mates (a ProbeModel such as HFProbeModel)")
        vectors = ctx.require("embeddings", "group_mates")
        labels = ctx.clusters()
        cluster_labels, arm = np.unique(labels, return_inverse=True)
        means = np.stack([vectors[arm == a].mean(axis=0) for a in range(len(cluster_labels))])  # [K, d]
        before = probe.cost.copy()
        model = self._fit(ctx, vectors, means[arm], probe)
        d = vectors.shape[1]
        own = vectors @ model.coef_[:d] + model.intercept_  # [n_pool]
        order, picked_scores = self._greedy(ctx, vectors, arm, means, own, model.coef_[d:], budget_tokens)
        scores = np.full(len(ctx.pool), np.nan)
        scores[order] = picked_scores
        return self.ranked(ctx, order, scores, budget_tokens, probe.cost - before)

    def _fit(self, ctx: SelectionContext, vectors: np.ndarray, doc_means: np.ndarray, probe: ProbeModel) -> Ridge:
        s = self.settings
        rows = random_rows(ctx, s.n_rollouts * s.rollout_length, salt=ROLLOUT_SAMPLE_SALT)
        texts = ctx.pool["text"].to_numpy()
        features, targets = [], []
        for start in tqdm(range(0, len(rows), s.rollout_length), desc="group-mates rollouts"):
            group = rows[start:start + s.rollout_length]
            cumulative = probe.rollout_delta([[texts[r]] for r in group])  # [len(group)]
            targets.append(np.diff(cumulative, prepend=0.0))
            for j, r in enumerate(group):
                context = vectors[group[:j]].mean(axis=0) if j else np.zeros(vectors.shape[1], dtype=vectors.dtype)
                features.append(relational_features(vectors[r:r + 1], doc_means[r:r + 1], context))
        return Ridge(alpha=s.ridge_alpha).fit(np.vstack(features), np.concatenate(targets))

    def _greedy(self, ctx: SelectionContext, vectors: np.ndarray, arm: np.ndarray, means: np.ndarray,
                own: np.ndarray, relational_coef: np.ndarray, budget_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Cluster-based greedy selection (module docstring, step 3): rows in order and their scores."""
        d = vectors.shape[1]
        n_tokens = ctx.pool["n_tokens"].to_numpy(dtype=np.int64)
        ids = ctx.pool["id"].to_numpy()
        queues = [np.flatnonzero(arm == a)[descending(own[arm == a], ids[arm == a])] for a in range(len(means))]
        heads = np.zeros(len(means), dtype=np.int64)
        remaining, total = int(budget_tokens), np.zeros(d)
        taken: list[int] = []
        taken_scores: list[float] = []
        while True:
            for a, queue in enumerate(queues):  # drop heads that no longer fit: the budget only shrinks
                while heads[a] < len(queue) and n_tokens[queue[heads[a]]] > remaining:
                    heads[a] += 1
            open_arms = np.flatnonzero(heads < np.array([len(q) for q in queues]))
            if not len(open_arms):
                break
            context = total / len(taken) if taken else np.zeros(d)
            interaction = (means[open_arms] * context) @ relational_coef[:d] \
                + _cosine(means[open_arms], context) * relational_coef[d]  # [n_open]
            best = own[[queues[a][heads[a]] for a in open_arms]] + interaction
            chosen = int(np.lexsort((open_arms, -best))[0])
            a = open_arms[chosen]
            picks = 0
            while picks < self.settings.picks_per_step and heads[a] < len(queues[a]):
                row = queues[a][heads[a]]
                heads[a] += 1
                if n_tokens[row] <= remaining:
                    taken.append(int(row))
                    taken_scores.append(float(own[row] + interaction[chosen]))
                    remaining -= int(n_tokens[row])
                    total += vectors[row]
                    picks += 1
        return np.asarray(taken, dtype=np.int64), np.asarray(taken_scores)
