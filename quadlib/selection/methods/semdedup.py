"""SemDeDup (Abbas et al., 2023): remove semantic near-duplicates inside k-means clusters.

As published (facebookresearch/SemDeDup, `sort_clusters.py` + `semdedup.py`):
1. each cluster's members are ordered by cosine distance to the cluster centroid, farthest first
   ("keep hard": the least prototypical member of a duplicate group is the one kept);
2. `M_j = max_{i before j} cos(e_i, e_j)`, the largest similarity of member j to any member
   earlier in that order (the first member has M = 0);
3. member j is removed when `M_j > 1 - eps`.
Since M does not depend on eps, the kept set at eps is `{M <= 1 - eps}`: choosing eps to reach a
target keep ratio is an exact search over the sorted M values (`epsilon_for_ratio`).

Budget: by default the target keep ratio is the budget's share of the pool's tokens, so eps is
set where the deduplicated pool just fits the budget and the selection *is* SemDeDup's output.
With an explicit `keep_ratio` the method trains, as published, on the deduplicated set: a
budget below it reads a seeded uniform subset of it (what a token-budgeted run over the shuffled
deduplicated data sees; drawn with SemDeDup's own salt, not Random's permutation); a budget above
it is filled from the removed documents in ascending M, i.e. those a smaller eps would have kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quadlib.selection.context import Selection, SelectionContext
from quadlib.selection.methods.base import Selector, random_rows, reads
from quadlib.selection.scoring import Cost
from quadlib.settings import setting

FILL_SALT = 3  # the seeded subsample of the kept set is SemDeDup's own draw, independent of Random's
ROUNDOFF = 1e-9  # 1 - (1 - M) can miss M by an ulp: the kept-set test allows it
COLUMN_BLOCK = 1024  # similarity columns per block: memory is [cluster size, COLUMN_BLOCK] floats


@dataclass
class SemDeDupSettings:
    keep_ratio: float | None = setting(None, "target fraction of the pool's tokens kept after deduplication "
                                       "(eps is searched to reach it); None: the budget's share of the pool")
    which_to_keep: str = setting("hard", "which member of a duplicate group survives: 'hard' (farthest from the "
                                 "centroid, the published default) or 'easy' (closest)")


def max_similarity_to_earlier(vectors: np.ndarray, order: np.ndarray) -> np.ndarray:
    """SemDeDup's M for one cluster: `M[p]` = max cosine of member `order[p]` to any member before it.

    `vectors` is `[m, d]`; the result `[m]` is aligned with `order` (so `M[0] == 0`). Blocks of
    columns keep memory at `[m, COLUMN_BLOCK]` whatever the cluster size.
    """
    unit = vectors[order] / np.maximum(np.linalg.norm(vectors[order], axis=1, keepdims=True), 1e-12)  # [m, d]
    m = len(unit)
    out = np.zeros(m, dtype=np.float64)
    for start in range(0, m, COLUMN_BLOCK):
        stop = min(start + COLUMN_BLOCK, m)
        sims = unit[:stop] @ unit[start:stop].T  # [stop, b]: row i (earlier candidate) x column j
        earlier = np.arange(stop)[:, None] < np.arange(start, stop)[None, :]  # [stop, b]
        sims = np.where(earlier, sims, -np.inf)
        out[start:stop] = np.maximum(sims.max(axis=0), 0.0) if stop > 1 else 0.0  # published: triu zeros floor M at 0
    return out


def semdedup_scores(vectors: np.ndarray, labels: np.ndarray, ids: np.ndarray, which_to_keep: str = "hard") -> np.ndarray:
    """M `[n]` for every row (vectors `[n, d]`, cluster labels `[n]`): remove row j at eps iff `M[j] > 1 - eps`."""
    if which_to_keep not in ("hard", "easy"):
        raise ValueError(f"which_to_keep must be 'hard' or 'easy', got {which_to_keep!r}")
    out = np.zeros(len(ids), dtype=np.float64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        unit = vectors[rows] / np.maximum(np.linalg.norm(vectors[rows], axis=1, keepdims=True), 1e-12)  # [m, d]
        centre = unit.mean(axis=0)
        distance = 1.0 - unit @ (centre / max(float(np.linalg.norm(centre)), 1e-12))  # [m] cosine distance
        key = -distance if which_to_keep == "hard" else distance
        order = np.lexsort((ids[rows].astype(str), key))  # farthest first for "hard"; ties by id
        out[rows[order]] = max_similarity_to_earlier(vectors[rows], order)
    return out


def epsilon_for_ratio(m_values: np.ndarray, n_tokens: np.ndarray, keep_ratio: float) -> float:
    """The largest eps whose kept set `{M <= 1 - eps}` holds at least `keep_ratio` of the tokens.

    Exact: the kept set only changes at the M values, so the search walks them in ascending order.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    order = np.argsort(m_values, kind="stable")
    cumulative = np.cumsum(n_tokens[order])  # tokens kept when the threshold admits the first p+1 values
    target = keep_ratio * float(cumulative[-1])
    position = int(np.searchsorted(cumulative, target - 1e-9 * max(target, 1.0)))  # first prefix reaching target
    threshold = float(m_values[order[min(position, len(order) - 1)]])  # keep M <= threshold
    return 1.0 - threshold


class SemDeDupSelector(Selector):
    name = "semdedup"
    settings_type = SemDeDupSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        vectors = ctx.require("embeddings", "semdedup")
        labels = ctx.clusters()
        ids = ctx.pool["id"].to_numpy().astype(str)
        n_tokens = ctx.pool["n_tokens"].to_numpy(dtype=np.int64)
        m_values = semdedup_scores(vectors, labels, ids, self.settings.which_to_keep)  # [n_pool]
        target = self.settings.keep_ratio
        if target is None:
            target = min(1.0, budget_tokens / max(int(n_tokens.sum()), 1))
        epsilon = epsilon_for_ratio(m_values, n_tokens, target) if target > 0 else 0.0
        kept = m_values <= 1.0 - epsilon + ROUNDOFF if target > 0 else np.zeros(len(ids), dtype=bool)
        shuffled = random_rows(ctx, salt=FILL_SALT)
        removed_by_m = np.flatnonzero(~kept)[np.lexsort((ids[~kept], m_values[~kept]))]
        order = np.concatenate([shuffled[kept[shuffled]], removed_by_m])
        cost = Cost(docs_scored=len(ids))  # embedding comparisons only; embeddings come from quadlib.embed
        return self.ranked(ctx, order, m_values, budget_tokens, cost, epsilon=epsilon, target_keep_ratio=target,
                           kept_token_ratio=float(n_tokens[kept].sum() / max(int(n_tokens.sum()), 1)),
                           kept_doc_ratio=float(kept.mean()), n_duplicates_removed=int((~kept).sum()),
                           reads=reads(ctx, "embeddings", "assignments"))
