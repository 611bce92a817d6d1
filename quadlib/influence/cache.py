"""Parquet score cache keyed by document id, so replays and resumed runs recompute nothing scored.

One cache holds scores of ONE estimator against ONE reference direction on ONE model: callers put
that identity in the file name (e.g. `influence/scores-kfac_joint_qkv.parquet`).

Safe under concurrent writers (the demo's parallel ablation workers, two bandit runs on one run
folder): a cache at `scores.parquet` is

    scores.parquet           the merged scores (columns id, score), replaced only by a compaction
    scores.parquet.parts/    append-only parts: each `put` writes one new file, never rewrites one

A reader merges the base and every part. When parts pile up, a writer compacts them into the base
under a file lock: the new base is written (atomically) before the parts it holds are deleted, and a
reader that finds a listed part gone re-reads, so no reader ever sees a score disappear.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from itertools import count
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from quadlib.runstore import atomic_path

COLUMNS = ["id", "score"]
_PART_COUNTER = count()


class ScoreCache:
    """get(ids) -> {id: score} for the ids present (reading what other processes added meanwhile);
    put(ids, scores) persists them as one append-only part. A score depends only on the document,
    so when two writers store one id, either copy is right."""

    compact_after: int = 64  # parts before a writer folds them into the base file

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self._scores: dict[str, float] = {}
        self._seen_parts: set[str] = set()
        self._base_stamp: tuple[int, int] | None = None
        self._refresh()

    # -- reading -----------------------------------------------------------------------------------
    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def _read_table(self, path: Path) -> dict[str, float]:
        with open(path, "rb") as f:  # one open file: a compaction renaming a new base in cannot mix two versions
            table = pd.read_parquet(f)
        if list(table.columns) != COLUMNS:
            raise ValueError(f"{path}: expected columns {COLUMNS}, found {list(table.columns)}; "
                             f"delete {self.path} and {self.parts_dir} to rebuild the cache")
        return dict(zip(table["id"].astype(str), table["score"].astype(float), strict=True))

    def _list_parts(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.parts_dir) if n.endswith(".parquet") and not n.startswith("."))
        except FileNotFoundError:
            return []

    def _refresh(self) -> None:
        """Merge what is new on disk: the base when a compaction replaced it, and unseen parts.

        Parts are listed before the base is read: a part that vanishes afterwards was compacted
        into a base newer than the one read, so the whole read starts again.
        """
        for _ in range(10):
            parts = self._list_parts()
            stamp = self._stamp()
            fresh: dict[str, float] = {}
            if stamp != self._base_stamp and stamp is not None:
                try:
                    fresh = self._read_table(self.path)
                except FileNotFoundError:
                    continue
                self._seen_parts = set()
            new = [name for name in parts if name not in self._seen_parts]
            try:
                for name in new:
                    fresh |= self._read_table(self.parts_dir / name)
            except FileNotFoundError:
                self._base_stamp = None  # a compaction ran: read the new base and the parts again
                continue
            self._scores |= fresh
            self._seen_parts.update(new)
            self._base_stamp = stamp
            return
        raise RuntimeError(f"{self.path}: the cache kept changing while being read (10 tries); retry")

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._scores

    def get(self, ids: Sequence[str]) -> dict[str, float]:
        if any(doc_id not in self._scores for doc_id in ids):
            self._refresh()  # another process may have scored them meanwhile
        return {doc_id: self._scores[doc_id] for doc_id in ids if doc_id in self._scores}

    # -- writing -----------------------------------------------------------------------------------
    def put(self, ids: Sequence[str], scores: Sequence[float] | np.ndarray) -> None:
        if len(ids) != len(scores):
            raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
        if len(ids) == 0:
            return
        new = dict(zip(map(str, ids), map(float, scores), strict=True))
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{os.getpid()}-{threading.get_native_id()}-{next(_PART_COUNTER):06d}-{os.urandom(4).hex()}.parquet"
        with atomic_path(self.parts_dir / name) as tmp:
            _frame(new).to_parquet(tmp, index=False)
        self._scores |= new
        self._seen_parts.add(name)
        if len(self._list_parts()) > self.compact_after:
            self.compact()

    def compact(self) -> None:
        """Fold every part into the base file (one writer at a time): write the merged base, then
        delete the parts it holds."""
        with FileLock(self.path.with_name(self.path.name + ".lock")):
            self._refresh()
            parts = self._list_parts()
            merged: dict[str, float] = self._read_table(self.path) if self.path.exists() else {}
            for name in parts:
                merged |= self._read_table(self.parts_dir / name)
            with atomic_path(self.path) as tmp:
                _frame(merged).to_parquet(tmp, index=False)
            for name in parts:
                (self.parts_dir / name).unlink(missing_ok=True)
            self._scores |= merged
            self._seen_parts = set()
            self._base_stamp = self._stamp()


def _frame(scores: dict[str, float]) -> pd.DataFrame:
    table = pd.DataFrame({"id": list(scores), "score": np.fromiter(scores.values(), dtype=np.float64, count=len(scores))})
    return table.sort_values("id", kind="stable").reset_index(drop=True)
