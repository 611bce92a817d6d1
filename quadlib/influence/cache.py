"""Parquet score cache keyed by document id, so replays and resumed runs recompute nothing scored.

One cache file holds scores of ONE estimator against ONE reference direction on ONE model:
callers put that identity in the file name (e.g. `influence/scores-kfac_joint_qkv.parquet`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from quadlib.runstore import atomic_path


class ScoreCache:
    """get(ids) -> {id: score} for the ids present; put(ids, scores) persists atomically, merged
    with what other processes wrote meanwhile (a lost race only costs a recomputation)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen_mtime: int | None = None  # the file version our scores include
        self._scores: dict[str, float] = self._read()

    def _mtime(self) -> int | None:
        return self.path.stat().st_mtime_ns if self.path.exists() else None

    def _read(self) -> dict[str, float]:
        self._seen_mtime = self._mtime()
        if self._seen_mtime is None:
            return {}
        table = pd.read_parquet(self.path)
        if list(table.columns) != ["id", "score"]:
            raise ValueError(f"{self.path}: expected columns ['id', 'score'], found {list(table.columns)}; "
                             "delete the file to rebuild the cache")
        return dict(zip(table["id"].astype(str), table["score"].astype(float), strict=True))

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._scores

    def get(self, ids: Sequence[str]) -> dict[str, float]:
        return {doc_id: self._scores[doc_id] for doc_id in ids if doc_id in self._scores}

    def put(self, ids: Sequence[str], scores: Sequence[float] | np.ndarray) -> None:
        if len(ids) != len(scores):
            raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
        # Another process (a parallel ablation run) may have added scores since we read the file:
        # keep them too. A score depends only on the document, so either copy of an id is right.
        if self._mtime() != self._seen_mtime:
            self._scores = self._read() | self._scores
        self._scores.update(zip(map(str, ids), map(float, scores), strict=True))
        table = pd.DataFrame({"id": list(self._scores), "score": np.fromiter(self._scores.values(), dtype=np.float64)})
        with atomic_path(self.path) as tmp:
            table.sort_values("id").to_parquet(tmp, index=False)
        self._seen_mtime = self._mtime()
