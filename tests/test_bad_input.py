"""Bad input and shared run folders (issue 12): each case a user met, with the one line it prints.

Every test here failed on the code before the fix (see the commit message for the old behaviour).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pandas as pd
import pytest

from quadlib.cli import main
from quadlib.corpus import CorpusSettings, content_id, ingest, read_corpus
from quadlib.execution.executors import LocalExecutor
from quadlib.execution.step import ShardStep
from quadlib.execution.steps import DsirFeatureStep
from quadlib.influence.cache import ScoreCache
from quadlib.runstore import RunStore, clean_stale_tmp

REPO = Path(__file__).resolve().parents[1]
DEAD_PID = 2**22 + 12345  # above Linux's default pid_max (4,194,304): never a live process


def _rec(i: int, text: str | None = None, **extra) -> bytes:
    return json.dumps({"id": f"d{i}", "text": text or f"document number {i} says {i * 7}.", **extra}).encode()


def _jsonl(path: Path, records: list[bytes], gz: bool = False) -> Path:
    data = b"\n".join(records) + b"\n"
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. re-ingest never loses data -------------------------------------------------------------------

def test_failed_reingest_keeps_the_finished_corpus_and_heldout(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    good = _jsonl(tmp_path / "good.jsonl", [_rec(i) for i in range(60)])
    settings = CorpusSettings(shard_size=10, heldout_fraction=0.2)
    ingest(store, good, settings=settings)
    before = {step: _snapshot(store.root / step) for step in ("corpus", "heldout")}

    other = _jsonl(tmp_path / "other.jsonl", [_rec(i + 100) for i in range(60)])
    calls = 0

    def crashes_midway(text: str) -> int:  # a crash after several new shards were written
        nonlocal calls
        calls += 1
        if calls > 45:
            raise RuntimeError("killed")
        return len(text.split())

    with pytest.raises(RuntimeError, match="killed"):
        ingest(store, other, settings=settings, count_tokens=crashes_midway)
    assert {step: _snapshot(store.root / step) for step in ("corpus", "heldout")} == before
    assert store.is_done("corpus") and len(read_corpus(store)) + len(read_corpus(store, "heldout")) == 60
    assert not [p for p in store.root.iterdir() if p.name.startswith(".corpus")]  # no staging left behind


def test_truncated_gzip_keeps_the_records_before_the_cut(store: RunStore, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    data = b"".join(_rec(i, "word " * 50) + b"\n" for i in range(400))
    full = gzip.compress(data, mtime=0)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full[: len(full) // 2])
    decoded = zlib.decompressobj(wbits=31).decompress(full[: len(full) // 2])
    complete_lines = decoded.count(b"\n")
    with caplog.at_level(logging.WARNING):
        summary = ingest(store, cut)
    assert 0 < complete_lines < 400 and summary["kept"] == complete_lines
    assert read_corpus(store)["id"].tolist() == [f"d{i}" for i in range(complete_lines)]
    example = summary["examples"]["truncated_file"][0]
    assert example["file"] == str(cut) and example["line"] >= complete_lines
    line = next(r.getMessage() for r in caplog.records if "mid-stream" in r.getMessage())
    assert str(cut) in line and f"after line {example['line'] - 1}" in line and "again" in line
    print(line)


# -- 2. steps keyed by a fingerprint of their inputs ------------------------------------------------

def test_pool_edited_in_place_is_ingested_again(store: RunStore, tmp_path: Path) -> None:
    pool = _jsonl(tmp_path / "pool.jsonl", [_rec(i) for i in range(10)])
    assert ingest(store, pool)["kept"] == 10
    _jsonl(pool, [_rec(i) for i in range(15)])
    stat = pool.stat()
    os.utime(pool, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # a later edit on any clock
    assert ingest(store, pool)["kept"] == 15 and len(read_corpus(store)) == 15


def test_heldout_fraction_zero_removes_the_stale_heldout(store: RunStore, tmp_path: Path) -> None:
    pool = _jsonl(tmp_path / "pool.jsonl", [_rec(i) for i in range(100)])
    ingest(store, pool, settings=CorpusSettings(heldout_fraction=0.3))
    assert len(read_corpus(store, "heldout")) > 10
    ref = _jsonl(tmp_path / "ref.jsonl", [_rec(i + 500) for i in range(5)])
    ingest(store, ref, step="reference")  # another step's ingest leaves the pool's held-out set alone
    assert (store.root / "heldout").exists()
    ingest(store, pool, settings=CorpusSettings(heldout_fraction=0.0))
    assert not (store.root / "heldout").exists() and len(read_corpus(store)) == 100


def test_no_step_starts_on_an_unfinished_corpus(store: RunStore, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    pool = _jsonl(tmp_path / "pool.jsonl", [_rec(i) for i in range(300)])
    calls = 0

    def crashes(text: str) -> int:
        nonlocal calls
        calls += 1
        if calls > 200:
            raise RuntimeError("killed")
        return 1

    with pytest.raises(RuntimeError, match="killed"):
        ingest(store, pool, settings=CorpusSettings(shard_size=50), count_tokens=crashes)
    with pytest.raises((FileNotFoundError, RuntimeError), match="corpus"):
        LocalExecutor().run(DsirFeatureStep(num_buckets=64), store)
    assert not store.is_done("dsir-features")

    ingest(store, pool, settings=CorpusSettings(shard_size=50))
    (store.root / "corpus" / "_done" / "_step.json").unlink()  # shards present, the step unfinished
    with pytest.raises(SystemExit) as exit_info:
        main(["scale", "--run", str(store.root), "--steps", "dsir"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert "corpus is not finished" in err and "'dsir-features' cannot start" in err and "quad ingest" in err
    print(err)


# -- 3. two processes on one run folder -------------------------------------------------------------

def test_two_ingests_on_one_run_folder_never_mix(tmp_path: Path) -> None:
    """B starts while A is midway; B waits for A's lock, then replaces A's corpus whole."""
    pool_a = _jsonl(tmp_path / "a.jsonl", [_rec(i) for i in range(40)])
    pool_b = _jsonl(tmp_path / "b.jsonl", [_rec(i + 1000) for i in range(40)])
    started, go = threading.Event(), threading.Event()

    def paused_counter(text: str) -> int:
        started.set()
        go.wait(60)
        return 1

    settings = CorpusSettings(shard_size=10)
    a = threading.Thread(target=ingest, args=(RunStore(tmp_path / "run"), pool_a),
                         kwargs={"settings": settings, "count_tokens": paused_counter})
    b = threading.Thread(target=ingest, args=(RunStore(tmp_path / "run"), pool_b), kwargs={"settings": settings})
    a.start()
    assert started.wait(60)
    b.start()
    b.join(1.0)
    b_waited = b.is_alive()
    go.set()
    a.join(60)
    b.join(60)
    store = RunStore(tmp_path / "run")
    assert b_waited
    assert store.read_config("corpus")["params"]["sources"] == [str(pool_b)]
    assert read_corpus(store)["id"].tolist() == [f"d{i + 1000}" for i in range(40)]


class _ScaledLength(ShardStep):
    """A toy per-shard step whose output depends on a parameter; the first call of a paused run waits."""

    name = "scaled"

    def __init__(self, scale: int, started: threading.Event | None = None, go: threading.Event | None = None):
        self.scale, self.started, self.go = scale, started, go

    def params(self, store: RunStore) -> dict:
        return {"scale": self.scale}

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.started is not None:
            self.started.set()
            self.go.wait(60)
            self.started = None
        return pd.DataFrame({"id": batch["id"], "value": batch["text"].str.len() * self.scale})


def test_two_runs_of_one_step_with_different_params_never_mix(store: RunStore, tmp_path: Path) -> None:
    """Like two embeds at max length 128 and 256: the config and every shard must agree at the end."""
    ingest(store, _jsonl(tmp_path / "p.jsonl", [_rec(i) for i in range(40)]), settings=CorpusSettings(shard_size=10))
    started, go = threading.Event(), threading.Event()
    a = threading.Thread(target=LocalExecutor().run, args=(_ScaledLength(1, started, go), RunStore(store.root)))
    b = threading.Thread(target=LocalExecutor().run, args=(_ScaledLength(2), RunStore(store.root)))
    a.start()
    assert started.wait(60)
    b.start()
    b.join(1.0)
    go.set()
    a.join(60)
    b.join(60)
    assert store.read_config("scaled")["params"] == {"scale": 2}
    values = pd.concat([pd.read_parquet(p) for p in sorted((store.root / "scaled").glob("shard-*.parquet"))])
    texts = read_corpus(store)
    assert values["value"].tolist() == (texts["text"].str.len() * 2).tolist()


_WRITER = """
import sys
from quadlib.influence.cache import ScoreCache
cache = ScoreCache(sys.argv[1])
cache.compact_after = 16
for batch in range(int(sys.argv[3])):
    ids = [f"{sys.argv[2]}-{batch}-{j}" for j in range(5)]
    cache.put(ids, [float(batch)] * 5)
    assert len(cache.get(ids)) == 5
"""


def test_score_cache_keeps_every_score_of_concurrent_writers(tmp_path: Path) -> None:
    """Three processes (the demo's ablation workers) write one cache at once; nothing is lost."""
    path = tmp_path / "scores.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), name, "60"], env=env,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b", "c")]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    cache = ScoreCache(path)
    assert len(cache) == 3 * 60 * 5
    assert cache.get(["b-59-4", "a-0-0"]) == {"b-59-4": 59.0, "a-0-0": 0.0}


def test_score_cache_compaction_keeps_scores_visible(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    reader, writer = ScoreCache(path), ScoreCache(path)
    writer.compact_after = 3
    for i in range(8):
        writer.put([f"d{i}"], [i / 2])
    assert path.exists() and len(list(writer.parts_dir.glob("*.parquet"))) <= 3  # folded into the base
    assert reader.get([f"d{i}" for i in range(8)]) == {f"d{i}": i / 2 for i in range(8)}
    assert pd.read_parquet(path).columns.tolist() == ["id", "score"]


# -- 4. errors that name the file, the record and the fix -------------------------------------------

def _folder_with(tmp_path: Path, name: str | bytes, content: bytes) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    _jsonl(folder / "a-good.jsonl", [_rec(i) for i in range(3)])
    pd.DataFrame({"id": ["p1"], "text": ["parquet text"]}).to_parquet(folder / "b-good.parquet")
    target = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else folder / name
    with open(target, "wb") as f:
        f.write(content)
    return folder


@pytest.mark.parametrize("name, content, message", [
    ("c-empty.parquet", b"", r"c-empty.parquet: empty file \(0 bytes\), not a parquet file; delete it or write it again"),
    ("c-pickle.parquet", pickle.dumps({"id": "x", "text": "a pickle"}),
     r"c-pickle.parquet: not a readable parquet file \(.*\); remove it from the input, or convert it"),
    ("c-plain.jsonl.gz", _rec(9) + b"\n",
     r"c-plain.jsonl.gz: not a gzip file \(it starts with b'\{\"'\); it looks like plain JSON lines: "
     r"rename it to .*c-plain.jsonl$"),
    (b"caf\xe9.jsonl", _rec(9) + b"\n",
     r"caf\\udce9.jsonl': the file name is not valid UTF-8.*rename the file"),
])
def test_unreadable_files_name_the_file_and_the_fix(store: RunStore, tmp_path: Path, capsys, name, content,
                                                    message) -> None:
    folder = _folder_with(tmp_path, name, content)
    with pytest.raises(ValueError, match=message):
        ingest(store, folder)
    assert not (store.root / "corpus").exists()
    with pytest.raises(SystemExit):
        main(["ingest", "--run", str(tmp_path / "cli"), "--pool", str(folder), "--reference", str(folder)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("quad: error: ")
    print(err)


def test_a_byte_order_mark_on_line_one_is_accepted(store: RunStore, tmp_path: Path) -> None:
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b"\n".join(_rec(i) for i in range(3)) + b"\n")
    summary = ingest(store, src)
    assert summary["kept"] == 3 and summary["skipped_total"] == 0


# -- 5. reported, not silent -------------------------------------------------------------------------

def test_reference_overlap_is_reported_and_can_be_dropped(tmp_path: Path, caplog) -> None:
    pool = _jsonl(tmp_path / "pool.jsonl", [_rec(i) for i in range(50)])
    ref_records = [_rec(i, f"reference text {i}") for i in (3, 4)]  # shared ids, other texts
    ref_records += [_rec(900 + i, f"document number {i} says {i * 7}.") for i in (10, 11, 12)]  # shared texts
    ref_records += [_rec(950, "a reference text of its own")]
    ref = _jsonl(tmp_path / "ref.jsonl", ref_records)
    store = RunStore(tmp_path / "run")
    ingest(store, ref, step="reference")
    with caplog.at_level(logging.WARNING):
        summary = ingest(store, pool, settings=CorpusSettings(overlap_step="reference"))
    assert summary["overlap"] == {"step": "reference", "documents": 5, "by_id": 2, "by_text": 3, "dropped": False,
                                  "examples": ["d3", "d4", "d10", "d11", "d12"]}
    assert len(read_corpus(store)) == 50
    line = next(r.getMessage() for r in caplog.records if "also in the 'reference' step" in r.getMessage())
    assert "5 document(s)" in line and "--drop-overlap" in line
    print(line)
    dropped = ingest(store, pool, settings=CorpusSettings(overlap_step="reference", drop_overlap=True))
    assert dropped["kept"] == 45 and dropped["skipped"] == {"in_reference": 5}
    kept_ids = set(read_corpus(store)["id"])
    assert kept_ids.isdisjoint({"d3", "d4", "d10", "d11", "d12"})
    assert not {content_id(t) for t in read_corpus(store)["text"]} & {
        content_id(t) for t in read_corpus(store, "reference")["text"]}


def test_a_document_cut_to_a_small_fraction_is_warned(store: RunStore, tmp_path: Path, caplog) -> None:
    src = _jsonl(tmp_path / "long.jsonl", [_rec(0), _rec(1, "y" * 5000), _rec(2, "z" * 300)])
    with caplog.at_level(logging.WARNING):
        summary = ingest(store, src, settings=CorpusSettings(max_chars=200))
    assert summary["truncated"] == 2 and summary["worst_cut"]["line"] == 2
    line = next(r.getMessage() for r in caplog.records if "were cut" in r.getMessage())
    assert f"{src}:2 kept 4% of its 5,000 chars" in line and "max_chars=200" in line
    print(line)


@pytest.mark.parametrize("size", [0, -5])
def test_a_shard_size_below_one_is_refused(tmp_path: Path, capsys, size: int) -> None:
    with pytest.raises(ValueError, match=f"shard_size must be a positive whole number, got {size}"):
        CorpusSettings(shard_size=size)
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--run", str(tmp_path / "run"), "--shard-size", str(size)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and err.startswith("quad: error: shard_size must be a positive")
    assert not (tmp_path / "run" / "corpus").exists()


# -- 6. one-line CLI errors, leftovers of a kill -----------------------------------------------------

def test_cli_errors_are_one_line_unless_traceback_is_asked(tmp_path: Path, capsys, monkeypatch) -> None:
    argv = ["ingest", "--run", str(tmp_path / "run"), "--pool", str(tmp_path / "missing.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "missing.jsonl: no such file" in err
    with pytest.raises(FileNotFoundError):
        main(argv + ["--traceback"])
    monkeypatch.setenv("QUAD_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


def test_files_left_by_a_kill_are_cleaned_on_the_next_run(store: RunStore, tmp_path: Path) -> None:
    checkpoints = store.step_dir("proxy") / "checkpoints"
    partial = checkpoints / f".step-120.{DEAD_PID}.tmp"  # a checkpoint folder a kill left half-written
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 1000)
    half_shard = store.step_dir("proxy") / f".shard-00000.parquet.{DEAD_PID}-7.tmp"
    half_shard.write_bytes(b"half")
    live = store.step_dir("proxy") / f".shard-00001.parquet.{os.getpid()}-7.tmp"  # a writer still running
    live.write_bytes(b"in progress")
    staging = store.root / f".corpus.{DEAD_PID}.tmp"  # a killed ingest's staging folder
    staging.mkdir()
    store.begin("proxy", {"x": 1})
    assert not partial.exists() and not half_shard.exists() and live.exists()
    ingest(store, _jsonl(tmp_path / "p.jsonl", [_rec(0)]))
    assert not staging.exists()
    assert clean_stale_tmp(store.root) == []


def test_a_kill_between_the_two_renames_of_a_swap_brings_the_old_step_back(store: RunStore, tmp_path: Path) -> None:
    pool = _jsonl(tmp_path / "p.jsonl", [_rec(i) for i in range(5)])
    ingest(store, pool)
    before = _snapshot(store.root / "corpus")
    os.replace(store.root / "corpus", store.root / ".corpus.old")  # the state right after the first rename
    assert ingest(store, pool)["kept"] == 5  # recovered, found finished, not redone
    assert _snapshot(store.root / "corpus") == before and not (store.root / ".corpus.old").exists()


def test_selection_gzip_header_holds_no_file_name_or_time(tmp_path: Path) -> None:
    from quadlib.selection.export import _write_jsonl_gz

    path = tmp_path / "selection.jsonl.gz"
    _write_jsonl_gz(pd.DataFrame({"id": ["a"], "text": ["x"]}), path)
    header = path.read_bytes()[:10]
    assert header[3] & 0x08 == 0, "FNAME flag set: the header stores a (temporary) file name"
    assert header[4:8] == b"\0\0\0\0"
