"""Quality and diversity of a selection: mean influence, cluster entropy, clusters covered, source mix.

Quad's claim is a better quality-diversity trade-off than top-k influence; these are the two axes
the notebook plots across bandit parameters (`replay_sweep`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from quadlib.selection.bandit import BanditSettings, replay


def cluster_entropy(clusters: Sequence[Any]) -> float:
    """Shannon entropy (nats) of the selection's distribution over clusters; 0 for one cluster."""
    counts = pd.Series(list(clusters)).value_counts().to_numpy(dtype=np.float64)
    if counts.sum() == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def quality_diversity(ids: Sequence[str], scores: Mapping[str, float] | pd.Series,
                      assignments: pd.DataFrame) -> dict[str, float]:
    """mean_influence (over selected ids with a score), entropy and clusters_covered of a selection."""
    lookup = scores if isinstance(scores, pd.Series) else pd.Series(dict(scores), dtype=np.float64)
    clusters = pd.Series(list(ids)).map(assignments.set_index("id")["cluster"]).dropna()
    values = lookup.reindex(list(ids)).dropna()
    return {"n_docs": float(len(ids)), "mean_influence": float(values.mean()) if len(values) else float("nan"),
            "entropy": cluster_entropy(clusters), "clusters_covered": float(clusters.nunique())}


def source_mix(ids: Sequence[str], pool: pd.DataFrame, weight: str = "docs") -> pd.Series:
    """Share of each source in the selection, by document count ("docs") or by tokens ("tokens")."""
    chosen = pool.set_index("id").loc[list(ids)]
    values = chosen.groupby("source")["n_tokens"].sum() if weight == "tokens" else chosen["source"].value_counts()
    return (values / values.sum()).sort_index()


def replay_sweep(scores: Mapping[str, float] | pd.Series, pool: pd.DataFrame, assignments: pd.DataFrame,
                 settings: BanditSettings, grid: Sequence[Mapping[str, Any]],
                 seeds: Sequence[int] | None = None, centroids: np.ndarray | None = None) -> pd.DataFrame:
    """One row per parameter setting of `grid` (overrides of `settings`), or per setting and seed of
    `seeds` (a "seed" column; `sweep_intervals` averages them): the replayed selection's quality and
    diversity, from cached scores only. `centroids` `[n_clusters, d]`: for the released_code preset."""
    rows = []
    for overrides in grid:
        for seed in ([settings.seed] if seeds is None else seeds):
            result = replay(scores, pool, assignments, settings, centroids, **{**overrides, "seed": seed})
            rows.append({**overrides, **({} if seeds is None else {"seed": seed}),
                         **quality_diversity(result.ids, scores, assignments),
                         "tokens_selected": result.tokens_selected, "stop_reason": result.stop_reason})
    return pd.DataFrame(rows)


SWEEP_METRICS = ("mean_influence", "entropy", "clusters_covered")


def sweep_intervals(runs: pd.DataFrame, by: str, level: float = 0.95) -> pd.DataFrame:
    """Per value of `by`, the mean over seeds of each metric of a seeded `replay_sweep` and its
    two-sided Student-t interval at `level`: mean +- t_{level, n-1} * sd / sqrt(n), columns
    `<metric>`, `<metric>_lo`, `<metric>_hi`, plus n_seeds (the interval is the mean's when n >= 2)."""
    from scipy import stats

    rows = []
    for value, group in runs.groupby(by, sort=True):
        n = len(group)
        row: dict[str, Any] = {by: value, "n_seeds": n}
        for metric in SWEEP_METRICS:
            values = group[metric].to_numpy(dtype=np.float64)  # [n_seeds]
            mean = float(values.mean())
            half = (float(stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / np.sqrt(n))
                    if n >= 2 else float("nan"))
            row |= {metric: mean, f"{metric}_lo": mean - half, f"{metric}_hi": mean + half}
        rows.append(row)
    return pd.DataFrame(rows)
