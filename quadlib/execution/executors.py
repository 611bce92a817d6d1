"""Executors: who runs a `ShardStep`'s pending shards, in-process or on Ray.

Both share the step's bookkeeping (config check, skipping finished shards, the step marker) and
run every shard through `run_shard`, so their artifacts are byte-for-byte the same files with the
same markers: a run started with one executor can be finished with the other.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from quadlib.execution.ray_cluster import RaySettings, connect_ray, worker_count
from quadlib.execution.step import ShardResult, ShardStep, input_ids, run_shard, shard_is_done
from quadlib.runstore import RunStore
from quadlib.settings import setting


@dataclass(frozen=True)
class StepRun:
    """What one `Executor.run` did: the shards it processed now and those found finished."""

    step: str
    processed: list[ShardResult]
    skipped: int
    workers: int = 0  # workers that ran the pending shards (0 when nothing was pending)

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.processed)

    def throughput(self) -> float:
        """Documents per second over the processing window (first shard start to last shard end)."""
        if not self.processed:
            return 0.0
        start = min(r.finished_at - r.seconds for r in self.processed)
        return self.rows / max(max(r.finished_at for r in self.processed) - start, 1e-9)

    def busy_throughput(self) -> float:
        """Documents per second of busy workers: rows / (summed shard seconds / workers). Unlike
        `throughput`, it leaves out workers idling while others still start, so it measures how
        much each worker slows down when they share the machine."""
        busy = sum(r.seconds for r in self.processed)
        return self.rows * self.workers / busy if busy > 0 else 0.0


class Executor(ABC):
    """Runs a step over its input shards; subclasses only decide where pending shards run."""

    def run(self, step: ShardStep, store: RunStore, recompute: bool = False) -> StepRun:
        """Run `step`'s pending shards, holding the step's run-folder lock: a second process running
        the same step (say with another max length) waits, then finds the config changed and redoes
        the shards, so config and artifacts always agree."""
        with store.lock(step.name):
            shards = step.input_shards(store)
            if store.begin(step.name, step.params(store), recompute=recompute):
                return StepRun(step.name, [], len(shards))
            pending = [shard for shard in shards if not shard_is_done(step, store, shard, input_ids(shard))]
            processed, workers = self.run_pending(step, store, pending) if pending else ([], 0)
            store.mark_done(step.name, info={"shards": len(shards)})
            return StepRun(step.name, processed, len(shards) - len(pending), workers)

    @abstractmethod
    def run_pending(self, step: ShardStep, store: RunStore, shards: list[Path]) -> tuple[list[ShardResult], int]:
        """Process `shards` (none finished yet); return one result per shard and the worker count."""


class LocalExecutor(Executor):
    """In-process, one shard after another; the default (no Ray needed)."""

    def run_pending(self, step: ShardStep, store: RunStore, shards: list[Path]) -> tuple[list[ShardResult], int]:
        step.setup()
        return [run_shard(step, store, shard) for shard in tqdm(shards, desc=step.name, unit="shard")], 1


def _run_shard_rows(step: ShardStep, root: str, batch: pd.DataFrame) -> pd.DataFrame:
    """Ray Data UDF body: the rows of `batch` name input shards; each is processed and written."""
    store = RunStore(root)
    results = [run_shard(step, store, Path(path)) for path in batch["shard"]]
    return pd.DataFrame([asdict(r) for r in results])


class _ShardActor:
    """A Ray Data actor: the step's model is set up once here and reused for every shard it gets."""

    def __init__(self, step: ShardStep, root: str) -> None:
        self.step, self.root = step, root
        step.setup()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _run_shard_rows(self.step, self.root, batch)


def _run_shard_task(batch: pd.DataFrame, step: ShardStep, root: str) -> pd.DataFrame:
    """A Ray Data task for a step without a model (its setup is cheap, so it runs per task)."""
    step.setup()
    return _run_shard_rows(step, root, batch)


class RayExecutor(Executor):
    """Ray Data over the pending shards: `map_batches` with one shard per call.

    Steps that hold a model get an actor pool (`ActorPoolStrategy`), so the model is loaded once
    per actor; others run as tasks. The step's declared resources are requested per worker. A
    worker that dies is restarted and its shard retried (`max_restarts`, `max_task_retries`);
    since a shard's output is written atomically before its marker, a retried shard is written
    exactly once. Workers read and write the run folder directly: on a multi-node cluster it must
    be on a shared file system (NFS, a FUSE-mounted bucket).
    """

    def __init__(self, settings: RaySettings | None = None) -> None:
        self.settings = settings or RaySettings()

    def run_pending(self, step: ShardStep, store: RunStore, shards: list[Path]) -> tuple[list[ShardResult], int]:
        import ray.data

        connect_ray(self.settings, store.root)
        ray.data.DataContext.get_current().enable_progress_bars = False
        workers = min(len(shards), worker_count(self.settings, step.resources.num_cpus, step.resources.num_gpus))
        retries = self.settings.max_retries
        root = str(store.root.resolve())
        items = ray.data.from_items([{"shard": str(shard.resolve())} for shard in shards],
                                    override_num_blocks=len(shards))
        common: dict[str, Any] = {"batch_size": 1, "batch_format": "pandas", "num_cpus": step.resources.num_cpus,
                                  "num_gpus": step.resources.num_gpus, "memory": step.resources.memory}
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for retries yet and flags the remote-args route as
            # deprecated; its default (unbounded actor restarts) would loop on a deterministic crash.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            if step.holds_model:
                mapped = items.map_batches(_ShardActor, fn_constructor_args=(step, root),
                                           compute=ray.data.ActorPoolStrategy(size=workers),
                                           max_restarts=retries, max_task_retries=retries, **common)
            else:
                mapped = items.map_batches(_run_shard_task, fn_kwargs={"step": step, "root": root},
                                           compute=ray.data.TaskPoolStrategy(size=workers), max_retries=retries,
                                           **common)
        results = []
        with tqdm(total=len(shards), desc=f"{step.name} (ray x{workers})", unit="shard") as progress:
            for row in mapped.iter_rows():
                results.append(ShardResult(str(row["shard"]), int(row["rows"]), float(row["seconds"]),
                                           float(row["finished_at"])))
                progress.update(1)
        return sorted(results, key=lambda r: r.shard), workers


@dataclass
class ExecutorSettings:
    executor: str = setting("local", "where per-shard steps run: a key of quadlib.execution.EXECUTORS ('local', 'ray')")
    ray: RaySettings = field(default_factory=RaySettings,
                             metadata={"help": "Ray cluster address, workers and retries (executor='ray')"})


EXECUTORS: dict[str, Callable[[RaySettings], Executor]] = {
    "local": lambda ray_settings: LocalExecutor(),
    "ray": RayExecutor,
}


def make_executor(settings: ExecutorSettings | None = None) -> Executor:
    """The executor named by `settings.executor`, configured."""
    settings = settings or ExecutorSettings()
    if settings.executor not in EXECUTORS:
        raise ValueError(f"unknown executor {settings.executor!r}; known: {sorted(EXECUTORS)}")
    return EXECUTORS[settings.executor](settings.ray)
