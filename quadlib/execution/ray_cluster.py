"""Connecting to Ray: an existing cluster by address, or a local Ray whose files stay in the run.

Ray is imported here and only here (lazily), so the local executor, `make demo` and the notebooks
never need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from quadlib.settings import setting

# A Unix socket path must stay under ~107 bytes and Ray nests about 60 bytes of session folders
# below its temp dir; longer temp dirs fail at start-up with an opaque socket error.
MAX_RAY_TMP_CHARS = 45


@dataclass
class RaySettings:
    address: str | None = setting(None, "Ray cluster to join ('auto', 'ray://host:10001', 'host:6379'); "
                                  "None starts a local Ray on this machine")
    num_cpus: int | None = setting(None, "CPUs of the local Ray (None: all of this machine's); ignored with an address")
    num_workers: int | None = setting(None, "workers (actors or tasks) per step; None: as many as the cluster's "
                                      "CPUs/GPUs fit for the step's declared resources")
    max_retries: int = setting(3, "restarts of a dead worker and retries of its shard before the step fails "
                               "(bounded, so a deterministic crash cannot loop forever)")
    tmp_dir: str | None = setting(None, "RAY_TMPDIR of a local Ray (logs, sockets, spilled objects); "
                                  "None: <run>/_ray, or a short folder in the system temp dir when that path is too long")


def local_tmp_dir(settings: RaySettings, run_root: Path) -> Path:
    """Where a local Ray keeps its session files: inside the run folder unless the path is too long."""
    if settings.tmp_dir is not None:
        path = Path(settings.tmp_dir).resolve()
    else:
        path = (run_root / "_ray").resolve()
        if len(str(path)) > MAX_RAY_TMP_CHARS:
            import tempfile

            path = Path(tempfile.gettempdir()) / f"ray-{os.getuid()}"
    if len(str(path)) > MAX_RAY_TMP_CHARS:
        raise ValueError(f"Ray temp dir {path} is longer than {MAX_RAY_TMP_CHARS} characters; Ray's socket "
                         "paths would overflow. Set RaySettings.tmp_dir to a shorter folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def connect_ray(settings: RaySettings, run_root: Path) -> None:
    """Join the configured cluster, or start a local Ray; a no-op when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    if settings.address:
        ray.init(address=settings.address, log_to_driver=False)
        return
    tmp = local_tmp_dir(settings, run_root)
    os.environ["RAY_TMPDIR"] = str(tmp)
    ray.init(num_cpus=settings.num_cpus, _temp_dir=str(tmp), include_dashboard=False, log_to_driver=False)


def worker_count(settings: RaySettings, num_cpus: float, num_gpus: float) -> int:
    """The configured worker count, else how many workers the cluster's resources hold."""
    if settings.num_workers is not None:
        if settings.num_workers < 1:
            raise ValueError(f"RaySettings.num_workers must be >= 1, got {settings.num_workers}")
        return settings.num_workers
    import ray

    total = ray.cluster_resources()
    fits = [int(total.get(name, 0.0) // need) for name, need in (("CPU", num_cpus), ("GPU", num_gpus)) if need > 0]
    return max(1, min(fits)) if fits else 1
