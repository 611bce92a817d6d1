"""Per-shard steps and the executors that run them in-process or on a Ray cluster (issue: scale-out)."""

from quadlib.execution.executors import (EXECUTORS, Executor, ExecutorSettings, LocalExecutor, RayExecutor, StepRun,
                                         make_executor)
from quadlib.execution.ray_cluster import RaySettings, connect_ray
from quadlib.execution.step import (SHARD_FORMATS, Resources, ShardFormat, ShardResult, ShardStep,
                                    read_step_output, run_shard, shard_is_done)

__all__ = [
    "EXECUTORS", "Executor", "ExecutorSettings", "LocalExecutor", "RayExecutor", "StepRun", "make_executor",
    "RaySettings", "connect_ray",
    "SHARD_FORMATS", "Resources", "ShardFormat", "ShardResult", "ShardStep", "read_step_output", "run_shard",
    "shard_is_done",
]
