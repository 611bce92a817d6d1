"""Run folder: every step writes its config, artifacts and completion markers here.

Layout (one folder per step, datatrove-style markers so reruns skip finished work)::

    <run>/<step>/config.json        the step's parameters + package versions, seed, git revision
    <run>/<step>/_done/<shard>.json  completion marker of one shard (written last, atomically)
    <run>/<step>/_done/_step.json    completion marker of the whole step
    <run>/<step>/...                 artifacts in open formats (parquet, npy, safetensors, JSON)

A step is "done" when its marker exists *and* its stored config equals the requested one,
so changing a parameter recomputes instead of silently reusing a stale artifact. Parameters carry a
fingerprint of the step's inputs (`file_fingerprints`, the upstream step's config), so an input
edited in place is a changed parameter too.

Shared run folders: `lock(step)` serialises the processes that run one step (a `filelock` lock in
`<run>/.locks/`), `staged(step, ...)` builds a whole step beside the old one and swaps it in only
when complete, and `require_done` refuses to read an unfinished upstream step. Temporary files and
folders (`.<name>.<pid>.tmp`) left by a killed process are removed when the step next begins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

LOCKS_FOLDER = ".locks"
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(-\d+)?\.tmp$")  # what tmp_sibling names
_OLD_SUFFIX = ".old"

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


def params_digest(params: Any) -> str:
    """sha256 of a parameter record's canonical JSON: one fingerprint of everything that made a step."""
    return hashlib.sha256(json.dumps(to_jsonable(params), sort_keys=True).encode("utf-8")).hexdigest()


def file_fingerprints(paths: list[str]) -> list[dict[str, Any]]:
    """(path, size, mtime) of each input file, so a file edited in place changes a step's parameters.

    Size and modification time (as `make` does) instead of a content hash: re-reading a 600M-document
    pool on every run would cost as much as ingesting it. Specs that are not local files (`hf:...`)
    are kept as they are.
    """
    out: list[dict[str, Any]] = []
    for path in paths:
        if not os.path.isfile(path):
            out.append({"path": path})
            continue
        stat = os.stat(path)
        out.append({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def tmp_sibling(path: Path) -> Path:
    """The temporary name of `path` while this thread writes it: `.<name>.<pid>-<thread>.tmp` beside
    it, so two writers never share one, and `clean_stale_tmp` tells a killed writer's leftovers from a
    live one's."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_native_id()}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def clean_stale_tmp(folder: Path, recursive: bool = True) -> list[Path]:
    """Remove temporary files and folders (`tmp_sibling` names) whose writer process is gone.

    A process killed mid-write leaves them (a 2.5 MB checkpoint folder, half a shard); they are
    never read, so removing them loses nothing. Returns what was removed.
    """
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    candidates = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for path in sorted(candidates):
        match = _TMP_NAME.match(path.name)
        if match is None or _pid_alive(int(match["pid"])) or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by a killed run in %s", len(removed), folder)
    return removed


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and rename, so a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(payload), indent=2, sort_keys=True), encoding="utf-8")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it replaces `path` only if the block succeeds.

    The old folder is moved aside (`.<name>.old`) before the new one is renamed in, and removed
    after; a kill between the two renames is undone by `recover_dir` (the old folder comes back).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = tmp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}{_OLD_SUFFIX}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """Finish an `atomic_dir` swap a kill interrupted: bring the old folder back if the new one
    never arrived, else drop it."""
    old = path.with_name(f".{path.name}{_OLD_SUFFIX}")
    if not old.exists():
        return
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, path)


_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


class RunStore:
    """One run folder shared by all steps and both executors (local and Ray)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def step_dir(self, step: str) -> Path:
        path = self.root / step
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- shared run folders ---------------------------------------------------------------------
    def lock_path(self, step: str) -> Path:
        return self.root / LOCKS_FOLDER / (step.replace("/", "__") + ".lock")

    @contextmanager
    def lock(self, step: str, timeout: float = -1) -> Iterator[None]:
        """Hold `step`'s run-folder lock: another process (or thread) running the same step waits.

        Re-entrant in one thread, so a step may call helpers that lock it again. Locks live in
        `<run>/.locks/` (not in the step folder, which `staged` replaces). `timeout` < 0 waits forever.
        """
        path = self.lock_path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _LOCKS_GUARD:
            lock = _LOCKS.setdefault(str(path.resolve()), FileLock(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("%s: another process is running step %r here; waiting for it to finish", self.root, step)
            try:
                lock.acquire(timeout=timeout)
            except Timeout:
                raise TimeoutError(f"{self.root}: step {step!r} is still locked by another process after "
                                   f"{timeout:.0f} s ({path}); wait for it, or delete the lock file if no "
                                   "process is running") from None
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def staged(self, step: str, params: Any, *, seed: int | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Build all of `step` in a temporary folder beside it; swap it in only when the block succeeds.

        Yields (folder, info): write the artifacts into `folder` and fill `info` (the step marker's
        content). On success the config and the step marker are written into the folder and it
        replaces `<run>/<step>` in one rename, so a rerun that fails or is killed midway leaves the
        finished step (artifacts, config, marker) exactly as it was. Hold `lock(step)` around it.
        """
        final = self.root / step
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(final.parent, recursive=False)
        info: dict[str, Any] = {}
        with atomic_dir(final) as folder:
            yield folder, info
            write_json_atomic(folder / "config.json", self._config_record(params, seed))
            write_json_atomic(folder / "_done" / "_step.json", info)

    def remove_step(self, step: str) -> None:
        """Delete a step's folder (its artifacts, config and markers)."""
        shutil.rmtree(self.root / step, ignore_errors=True)

    def fingerprint(self, step: str) -> str | None:
        """sha256 of a finished step's stored parameters (None when not finished): what a
        downstream step keys on, so it is redone whenever this step's inputs changed."""
        config = self.read_config(step)
        if config is None or not self.is_done(step):
            return None
        return params_digest(config.get("params"))

    def require_done(self, step: str, needed_by: str) -> None:
        """Refuse to start `needed_by` on an unfinished `step` (a crashed or running ingest)."""
        if not self.is_done(step):
            state = "has no output" if not (self.root / step).exists() else "is not finished (its last run stopped before the end)"
            raise RuntimeError(f"{self.root / step} {state}, so {needed_by!r} cannot start on it; "
                               f"run the {step!r} step to the end first (e.g. `quad ingest --run {self.root}`)")

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
        recover_dir(self.root / step)
        clean_stale_tmp(self.root / step)
        stored = self.read_config(step)
        if stored is not None and stored.get("params") == wanted and not recompute:
            return self.is_done(step)
        self.clear_markers(step)
        write_json_atomic(self.config_path(step), self._config_record(wanted, seed))
        return False

    def is_current(self, step: str, params: Any) -> bool:
        """True when `step` is finished with exactly `params` (nothing is changed on disk)."""
        recover_dir(self.root / step)
        stored = self.read_config(step)
        return stored is not None and stored.get("params") == to_jsonable(params) and self.is_done(step)

    @staticmethod
    def _config_record(params: Any, seed: int | None) -> dict[str, Any]:
        return {"params": to_jsonable(params), "seed": seed, "versions": package_versions(),
                "git_revision": git_revision()}

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
