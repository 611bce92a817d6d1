"""Where tensors go and on how many threads: cuda when present, else cpu (the code never assumes a GPU);
CPU thread pools no larger than the cores the process is given."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def default_device(requested: str | None = None) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1") wins; otherwise cuda when available, else cpu."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cores_given() -> int:
    """CPU cores this process may use: its affinity mask, lowered by a cgroup v2 CPU quota when one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text(encoding="utf-8").split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def cap_threads(limit: int | None = None) -> int:
    """Cap torch's pool and every BLAS/OpenMP pool loaded so far (numpy, scipy, faiss) at `limit` threads
    (default: the cores given, or OMP_NUM_THREADS when lower, as the ablation workers set it); return it.
    A pool larger than the cores it gets makes every parallel region wait for a descheduled thread."""
    from threadpoolctl import threadpool_limits

    if limit is None:
        limit = cores_given()
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            limit = min(limit, max(1, int(os.environ["OMP_NUM_THREADS"])))
    torch.set_num_threads(min(limit, torch.get_num_threads()))
    threadpool_limits(limits=limit)
    return limit


@contextmanager
def torch_threads(limit: int) -> Iterator[None]:
    """Run a block on at most `limit` torch CPU threads (MKL's LAPACK included); restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(limit, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
