"""Shared fixtures: a temporary run folder and the optional ../shared/data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from quadlib.runstore import RunStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("QUAD_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "run")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a clean skip when this machine does not have it."""
    if not (SHARED_DATA / "MANIFEST.json").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA.resolve()} (set QUAD_SHARED_DATA)")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; more only contend with the other test workers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
