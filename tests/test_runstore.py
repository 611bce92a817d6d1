"""Run store: configs with provenance, markers, and recompute on a changed parameter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from quadlib.runstore import RunStore, atomic_path
from quadlib.settings import describe, from_dict, setting


@dataclass
class _Params:
    k: int = setting(3, "number of things")


def test_begin_mark_done_and_changed_params(store: RunStore) -> None:
    assert store.begin("step", _Params(), seed=1) is False
    store.mark_done("step", "shard-00000")
    store.mark_done("step")
    cfg = store.read_config("step")
    assert cfg["params"] == {"k": 3} and cfg["seed"] == 1 and "torch" in cfg["versions"]
    assert store.begin("step", _Params()) is True
    assert store.begin("step", _Params(k=4)) is False
    assert not store.is_done("step") and not store.is_done("step", "shard-00000")
    store.mark_done("step")
    assert store.begin("step", _Params(k=4), recompute=True) is False


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"


def test_settings_help_and_unknown_keys() -> None:
    assert "k = 3: number of things" in describe(_Params)
    assert from_dict(_Params, {"k": 5}).k == 5
    with pytest.raises(ValueError, match="unknown _Params setting"):
        from_dict(_Params, {"kk": 5})
