"""Thread pools: never larger than the cores a process is given; the K-FAC eigendecompositions on one thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info

import quadlib.device as device
from quadlib.device import cap_threads, cores_given, torch_threads
from quadlib.influence.kfac import KroneckerFactors


@pytest.fixture
def torch_pool():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_kfac_eigendecompositions_run_on_one_thread(monkeypatch: pytest.MonkeyPatch, torch_pool: None) -> None:
    """At 2 threads a busy neighbour made each eigh wait for descheduled threads (02_score 11x slower)."""
    torch.set_num_threads(2)
    seen = []
    eigh = torch.linalg.eigh

    def recording(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(torch.get_num_threads())
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", recording)
    x = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, q_a, g, q_g = KroneckerFactors(x @ x.T, x[:3] @ x[:3].T, 9).eigen()
    assert seen == [1, 1]
    assert torch.get_num_threads() == 2  # restored for the rest of the work
    assert torch.allclose(q_a @ torch.diag(a) @ q_a.T, x @ x.T, atol=1e-10)


def test_torch_threads_never_raises_the_pool(torch_pool: None) -> None:
    torch.set_num_threads(1)
    with torch_threads(4):
        assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_cores_given_follows_a_cgroup_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(device, "CGROUP_CPU_MAX", cpu_max)
    affinity = cores_given()  # no such file: the affinity mask
    cpu_max.write_text("max 100000\n")
    assert cores_given() == affinity
    cpu_max.write_text("50000 100000\n")  # half a core: at least one thread
    assert cores_given() == 1
    cpu_max.write_text(f"{(affinity + 3) * 100000} 100000\n")  # a quota above the mask does not raise it
    assert cores_given() == affinity


def test_cap_threads_caps_torch_and_the_blas_pools(monkeypatch: pytest.MonkeyPatch, torch_pool: None) -> None:
    import numpy as np  # noqa: F401 - its BLAS pool is loaded

    from threadpoolctl import threadpool_limits

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    with threadpool_limits(limits=None):  # restores the BLAS pools after the test
        assert cap_threads() == 1
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())


def test_importing_quadlib_makes_openmp_threads_sleep_while_they_wait() -> None:
    """A spinning OpenMP pool beside a competing load made a 2-thread training step 8x slower (12.9 s
    against 1.6 s, quadlib/__init__.py); the setting must hold in every process that imports quadlib,
    including the notebook kernels started from it, and must not override the user's own value."""
    import subprocess
    import sys

    code = "import os, quadlib; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"
