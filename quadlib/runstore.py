"""Run folder: every step writes its config, artifacts and completion markers here.

Layout (one folder per step, datatrove-style markers so reruns skip finished work)::

    <run>/<step>/config.json        the step's parameters + package versions, seed, git revision
    <run>/<step>/_done/<shard>.json  completion marker of one shard (written last, atomically)
    <run>/<step>/_done/_step.json    completion marker of the whole step
    <run>/<step>/...                 artifacts in open formats (parquet, npy, safetensors, JSON)

A step is "done" when its marker exists *and* its stored config equals the requested one,
so changing a parameter recomputes instead of silently reusing a stale artifact.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = (
    "torch", "transformers", "tokenizers", "sentence-transformers", "faiss-cpu", "scikit-learn",
    "numpy", "pandas", "pyarrow", "ray", "quadlib",
)


def package_versions() -> dict[str, str]:
    """Versions of the packages that change results, for the run's provenance."""
    out: dict[str, str] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision(start: Path | None = None) -> str | None:
    """The project's git revision (with '-dirty' when the tree has changes), or None outside git."""
    cwd = start or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and numpy scalars as plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
        json.dump(to_jsonable(payload), f, indent=2, sort_keys=True)
        tmp = Path(f.name)
    tmp.chmod(0o644)  # NamedTemporaryFile creates 0600; run folders are shared and read by others
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class RunStore:
    """One run folder shared by all steps and both executors (local and Ray)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def step_dir(self, step: str) -> Path:
        path = self.root / step
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- configs -----------------------------------------------------------------------------
    def config_path(self, step: str) -> Path:
        return self.root / step / "config.json"

    def read_config(self, step: str) -> dict[str, Any] | None:
        path = self.config_path(step)
        if not path.exists():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def begin(self, step: str, params: Any, *, seed: int | None = None, recompute: bool = False) -> bool:
        """Prepare `step` for `params`; return True when it is already done with exactly these params.

        A changed config (or `recompute=True`) clears the step's completion markers, so every
        shard is redone; artifacts are overwritten shard by shard.
        """
        wanted = to_jsonable(params)
        stored = self.read_config(step)
        if stored is not None and stored.get("params") == wanted and not recompute:
            return self.is_done(step)
        self.clear_markers(step)
        write_json_atomic(self.config_path(step), {
            "params": wanted, "seed": seed, "versions": package_versions(), "git_revision": git_revision(),
        })
        return False

    # -- completion markers ------------------------------------------------------------------
    def _marker(self, step: str, shard: str | None) -> Path:
        return self.root / step / "_done" / f"{shard if shard is not None else '_step'}.json"

    def is_done(self, step: str, shard: str | None = None) -> bool:
        return self._marker(step, shard).exists()

    def mark_done(self, step: str, shard: str | None = None, info: dict[str, Any] | None = None) -> None:
        write_json_atomic(self._marker(step, shard), info or {})

    def done_info(self, step: str, shard: str | None = None) -> dict[str, Any]:
        return json.loads(self._marker(step, shard).read_text(encoding="utf-8"))

    def clear_markers(self, step: str) -> None:
        folder = self.root / step / "_done"
        if folder.exists():
            for marker in folder.glob("*.json"):
                marker.unlink()

    def shards(self, step: str, pattern: str = "shard-*.parquet") -> list[Path]:
        """The step's shard files in name order (the order every later step follows)."""
        return sorted((self.root / step).glob(pattern))
