"""Per-item evaluation results: one long table shared by every metric family, so that two methods
can be compared item by item (paired differences, `quadlib.evaluation.stats.paired_differences`).

A row is one (task, item, metric) of one trained model: `task` names the item set ("arc_easy",
"lambada", "reference", "heldout/<source>"), `item` identifies the item within it (stable across
methods and seeds: the record's position in a task file, or a document id), `value` is the item's
metric and `weight` its weight in the task's aggregate. An aggregate is the weighted mean
sum_i w_i v_i / sum_i w_i: weight 1 for accuracies and log-probabilities, predicted tokens for a
per-document loss (giving the token-weighted loss), bytes for per-document bits per byte (giving
total bits over total bytes). Stored as `items.parquet` beside each run's metrics.json.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

ITEM_COLUMNS = ("task", "item", "metric", "value", "weight")
ITEMS_FILE = "items.parquet"
UNTRAINED = "untrained"  # the method name of the starting model, evaluated without training (train_eval)


def item_frame(task: str, items: Sequence[str], metrics: dict[str, Sequence[float]],
               weights: dict[str, Sequence[float]] | None = None) -> pd.DataFrame:
    """Rows of one task: `metrics` maps a metric to its per-item values, `weights` (default 1) likewise."""
    weights = weights or {}
    ids = [str(i) for i in items]
    frames = [pd.DataFrame({"task": task, "item": ids, "metric": metric,
                            "value": np.asarray(values, dtype=np.float64),
                            "weight": np.asarray(weights.get(metric, np.ones(len(ids))), dtype=np.float64)})
              for metric, values in metrics.items()]
    return concat_items(frames)


def concat_items(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("task", "item", "metric") else np.float64)
                             for c in ITEM_COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(ITEM_COLUMNS)]


def weighted_means(items: pd.DataFrame) -> pd.Series:
    """The aggregate of every (task, metric): sum_i w_i v_i / sum_i w_i."""
    weighted = items.assign(wv=items["value"] * items["weight"])
    sums = weighted.groupby(["task", "metric"], sort=True)[["wv", "weight"]].sum()
    return sums["wv"] / sums["weight"]
