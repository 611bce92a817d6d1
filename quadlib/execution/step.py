"""A per-shard step, written once and run by any executor (datatrove-style pipeline blocks).

A `ShardStep` maps every input shard (`<run>/<input_step>/shard-XXXXX.parquet`) to one output shard
(`<run>/<name>/shard-XXXXX.<format>`) through `process`, a pure function over a batch of rows keyed
by `id`. Whatever executes it (in-process or a Ray actor), one shard goes through `run_shard`: the
output is written atomically and then marked done with the input's id fingerprint, so a finished
shard is skipped by the next run of either executor and a crash never leaves half a shard.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter, time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from quadlib.embed import ids_digest
from quadlib.runstore import RunStore, atomic_path


@dataclass(frozen=True)
class Resources:
    """What one worker of a step reserves; passed to Ray (a GPU cluster gives each scorer a GPU)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes of heap per worker; None lets Ray decide

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0 or (self.memory is not None and self.memory <= 0):
            raise ValueError(f"resources must be non-negative (memory positive), got {self}")


# -- output formats ---------------------------------------------------------------------------------
class ShardFormat(ABC):
    """How a step's output frame (id + result columns) is stored on disk."""

    suffix: str

    @abstractmethod
    def write(self, frame: pd.DataFrame, path: Path) -> dict[str, Any]:
        """Write `frame` to `path`; return facts for the shard's completion marker."""

    @abstractmethod
    def read(self, path: Path, ids: list[str]) -> pd.DataFrame:
        """The frame back (id + result columns); `ids` are the input shard's ids, in order."""


class ParquetFormat(ShardFormat):
    """id plus result columns: the default for scores, features and assignments."""

    suffix = ".parquet"

    def write(self, frame: pd.DataFrame, path: Path) -> dict[str, Any]:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
        return {"columns": [c for c in frame.columns if c != "id"]}

    def read(self, path: Path, ids: list[str]) -> pd.DataFrame:
        return pd.read_parquet(path)


class VectorFormat(ShardFormat):
    """One `vector` column stacked as `[n_docs, d]` float32 `.npy`, rows aligned with the input shard.

    This is `quadlib.embed`'s layout, so vectors written by any executor are read by `quadlib.cluster`.
    """

    suffix = ".npy"
    column = "vector"

    def write(self, frame: pd.DataFrame, path: Path) -> dict[str, Any]:
        if list(frame.columns) != ["id", self.column]:
            raise ValueError(f"a vector step must return columns ['id', 'vector'], got {list(frame.columns)}")
        vectors = np.stack(frame[self.column].to_list()).astype(np.float32)  # [n, d]
        with open(path, "wb") as f:
            np.save(f, vectors)
        return {"dim": int(vectors.shape[1])}

    def read(self, path: Path, ids: list[str]) -> pd.DataFrame:
        vectors = np.load(path)  # [n, d]
        return pd.DataFrame({"id": ids, self.column: list(vectors)})


SHARD_FORMATS: dict[str, ShardFormat] = {"parquet": ParquetFormat(), "npy": VectorFormat()}


# -- the step -----------------------------------------------------------------------------------------
class ShardStep(ABC):
    """One per-shard step: declared resources, a once-per-worker `setup`, a pure `process`.

    Subclasses set `name` (the output step folder) and implement `params` and `process`. A step
    that holds a model sets `holds_model = True`, loads it in `setup` (never in `__init__`: the
    step object travels to the workers before setup) into the attributes named in `worker_state`,
    which are left out when the step is pickled, and gets an actor pool on Ray.
    """

    name: str
    input_step: str = "corpus"
    input_columns: tuple[str, ...] = ("id", "text")
    output_format: str = "parquet"
    holds_model: bool = False
    resources: Resources = Resources()
    batch_size: int = 256
    worker_state: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        """The step without what `setup` loaded: a model never travels to the workers."""
        return {k: (None if k in self.worker_state else v) for k, v in self.__dict__.items()}

    @abstractmethod
    def params(self, store: RunStore) -> dict[str, Any]:
        """Everything that changes the output (not the executor, device or worker count), including
        the configs of the upstream steps read from `store`."""

    def setup(self) -> None:
        """Load models and broadcast state once per worker; the default step needs nothing."""

    @abstractmethod
    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Rows `id` + results, one per input row, in input order; no side effects."""

    def input_shards(self, store: RunStore) -> list[Path]:
        """The shards to map over, in name order; only from a finished input step (a crashed or
        running ingest leaves shards that are not the whole pool)."""
        shards = store.shards(self.input_step)
        if not shards:
            raise FileNotFoundError(f"step {self.name!r}: no input shards in {store.root / self.input_step}; "
                                    f"run the {self.input_step!r} step first")
        store.require_done(self.input_step, self.name)
        return shards

    def read_input(self, store: RunStore, shard: Path) -> pd.DataFrame:
        """The rows `process` sees for one input shard (a step may join other aligned artifacts here)."""
        return pd.read_parquet(shard, columns=list(self.input_columns))

    @property
    def format(self) -> ShardFormat:
        if self.output_format not in SHARD_FORMATS:
            raise ValueError(f"step {self.name!r}: unknown output_format {self.output_format!r}; "
                             f"known: {sorted(SHARD_FORMATS)}")
        return SHARD_FORMATS[self.output_format]

    def output_path(self, store: RunStore, shard: Path) -> Path:
        return store.step_dir(self.name) / f"{shard.stem}{self.format.suffix}"


# -- one shard ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardResult:
    """One processed shard: its size, its processing time and when it finished (epoch seconds),
    so throughput can be measured over the processing window, without worker start-up."""

    shard: str
    rows: int
    seconds: float
    finished_at: float


def input_ids(shard: Path) -> list[str]:
    return pd.read_parquet(shard, columns=["id"])["id"].tolist()


def shard_is_done(step: ShardStep, store: RunStore, shard: Path, ids: list[str] | None = None) -> bool:
    """Done = marker present, output present, and the marker's ids are this input shard's ids."""
    if not (store.is_done(step.name, shard.stem) and step.output_path(store, shard).exists()):
        return False
    ids = input_ids(shard) if ids is None else ids
    return store.done_info(step.name, shard.stem).get("ids_sha256") == ids_digest(ids)


def run_shard(step: ShardStep, store: RunStore, shard: Path) -> ShardResult:
    """Process one input shard in batches, write its output atomically, then mark it done.

    The output must hold exactly the input ids in input order (checked), so whichever worker
    finishes a shard, the shard contains every document exactly once.
    """
    start = perf_counter()
    frame = step.read_input(store, shard)
    if "id" not in frame.columns:
        raise ValueError(f"{shard}: step {step.name!r} input has no 'id' column")
    ids = frame["id"].tolist()
    parts = [step.process(frame.iloc[i:i + step.batch_size].reset_index(drop=True))
             for i in range(0, len(frame), step.batch_size)]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"id": []})
    if "id" not in out.columns or out["id"].tolist() != ids:
        raise ValueError(f"{shard}: step {step.name!r} returned ids that differ from its input "
                         f"({len(out)} rows for {len(ids)} inputs); process() must keep one row per input, in order")
    path = step.output_path(store, shard)
    with atomic_path(path) as tmp:
        facts = step.format.write(out, tmp)
    store.mark_done(step.name, shard.stem, {"rows": len(ids), "ids_sha256": ids_digest(ids), **facts})
    return ShardResult(shard.stem, len(ids), perf_counter() - start, time())


def read_step_output(store: RunStore, step: ShardStep) -> pd.DataFrame:
    """A finished step's outputs for every input shard, concatenated in shard order."""
    frames = []
    for shard in step.input_shards(store):
        if not shard_is_done(step, store, shard):
            raise FileNotFoundError(f"step {step.name!r}: shard {shard.stem} is not finished; run the step first")
        frames.append(step.format.read(step.output_path(store, shard), input_ids(shard)))
    return pd.concat(frames, ignore_index=True)
