"""Corpus store: readers, validation with located bad records, shards, held-out split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from quadlib.corpus import CorpusSettings, content_id, expand_sources, ingest, read_corpus
from quadlib.runstore import RunStore


def _write_jsonl(path: Path, lines: list[bytes], gz: bool = False) -> Path:
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _rec(i: int, text: str = "hello world", **extra) -> bytes:
    return json.dumps({"id": f"d{i}", "text": text, "source": "web", **extra}).encode()


def test_ingest_jsonl_writes_schema_and_shards(store: RunStore, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "a.jsonl", [_rec(i, f"document number {i}.") for i in range(25)])
    summary = ingest(store, src, settings=CorpusSettings(shard_size=10))
    assert summary["kept"] == 25 and summary["shards"] == ["shard-00000.parquet", "shard-00001.parquet",
                                                           "shard-00002.parquet"]
    df = read_corpus(store)
    assert list(df.columns) == ["id", "text", "source", "n_chars", "n_tokens"]
    assert df["id"].tolist() == [f"d{i}" for i in range(25)]
    assert df.loc[0, "n_chars"] == len("document number 0.") and df.loc[0, "n_tokens"] == 4


def test_bad_records_are_counted_by_file_and_line(store: RunStore, tmp_path: Path) -> None:
    lines = [
        _rec(0),
        b"{not json",
        b"\xff\xfe broken bytes",
        json.dumps({"id": "d3", "text": ""}).encode(),
        json.dumps({"id": "d4"}).encode(),
        _rec(0, "same id again"),
        _rec(6, "x" * 500),
        b"[1, 2]",
        _rec(8, "fine text"),
    ]
    src = _write_jsonl(tmp_path / "bad.jsonl.gz", lines, gz=True)
    summary = ingest(store, src, settings=CorpusSettings(max_chars=100, too_long="truncate"))
    assert summary["read"] == 9 and summary["kept"] == 3 and summary["truncated"] == 1
    assert summary["skipped"] == {"invalid_json": 1, "undecodable_bytes": 1, "missing_or_empty_text": 2,
                                  "duplicate_id": 1, "not_an_object": 1}
    where = {(e["file"].split("/")[-1], e["line"]) for ex in summary["examples"].values() for e in ex}
    assert ("bad.jsonl.gz", 2) in where and ("bad.jsonl.gz", 3) in where and ("bad.jsonl.gz", 6) in where
    df = read_corpus(store)
    assert df.set_index("id").loc["d6", "n_chars"] == 100
    assert json.loads((store.root / "corpus" / "summary.json").read_text())["kept"] == 3


def test_too_long_skip_and_all_bad_input_error(store: RunStore, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "long.jsonl", [_rec(0, "y" * 50), _rec(1, "ok")])
    summary = ingest(store, src, settings=CorpusSettings(max_chars=10, too_long="skip"))
    assert summary["kept"] == 1 and summary["skipped"] == {"too_long": 1}
    bad = _write_jsonl(tmp_path / "allbad.jsonl", [b"{", b"oops"])
    with pytest.raises(ValueError, match="allbad.jsonl:1"):
        ingest(RunStore(tmp_path / "r2"), bad)


def test_parquet_folder_glob_and_missing_fields(store: RunStore, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    pd.DataFrame({"body": ["alpha text", "beta text"]}).to_parquet(folder / "part-0.parquet")
    _write_jsonl(folder / "part-1.jsonl", [json.dumps({"body": "gamma text"}).encode()])
    assert [Path(p).name for p in expand_sources(folder)] == ["part-0.parquet", "part-1.jsonl"]
    assert len(expand_sources(str(folder / "*.parquet"))) == 1
    ingest(store, folder, settings=CorpusSettings(text_field="body", id_field=None, source_field=None))
    df = read_corpus(store)
    assert df["id"].tolist() == [content_id("alpha text"), content_id("beta text"), content_id("gamma text")]
    assert df["source"].tolist() == ["part-0", "part-0", "part-1"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_sources(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a")
        expand_sources(tmp_path / "x.csv")


def test_hf_local_dataset(store: RunStore, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": ["a", "b"], "text": ["first doc", "second doc"], "source": ["s", "s"]})
    ds.save_to_disk(str(tmp_path / "hfds"))
    ingest(store, f"hf:{tmp_path / 'hfds'}")
    assert read_corpus(store)["text"].tolist() == ["first doc", "second doc"]


def test_rerun_is_skipped_and_heldout_is_stable(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "p.jsonl", [_rec(i, f"text {i}") for i in range(200)])
    store = RunStore(tmp_path / "run")
    settings = CorpusSettings(heldout_fraction=0.2)
    first = ingest(store, src, settings=settings)
    shard = store.shards("corpus")[0]
    mtime = shard.stat().st_mtime_ns
    assert ingest(store, src, settings=settings) == first and shard.stat().st_mtime_ns == mtime
    held = read_corpus(store, "heldout")
    assert 20 < len(held) < 60 and first["kept"] + len(held) == 200
    assert set(held["id"]).isdisjoint(read_corpus(store)["id"])
    other = RunStore(tmp_path / "run2")
    ingest(other, src, settings=settings)
    assert read_corpus(other, "heldout")["id"].tolist() == held["id"].tolist()


def test_hf_streaming_path_on_local_files(store: RunStore, tmp_path: Path) -> None:
    """The hub code path (`load_dataset(..., streaming=True)`), exercised on a local data folder."""
    pytest.importorskip("datasets")
    folder = tmp_path / "hub_like"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [_rec(i, f"streamed {i}") for i in range(3)])
    ingest(store, f"hf:{folder}@train")
    assert read_corpus(store)["text"].tolist() == ["streamed 0", "streamed 1", "streamed 2"]


def test_sample_fraction_keeps_a_seeded_share_of_every_source_whatever_the_file_order(tmp_path: Path) -> None:
    """sample_fraction keeps each document by a hash of its id: about that share of each source, the same ids when
    the files are read in another order, and a smaller fraction keeps a subset of a larger one."""
    lines = [_rec(i, f"document {i} of {'ab'[i % 2]}", source="ab"[i % 2]) for i in range(400)]
    (tmp_path / "f").mkdir()
    (tmp_path / "b").mkdir()
    forward = _write_jsonl(tmp_path / "f" / "pool.jsonl", lines)
    backward = _write_jsonl(tmp_path / "b" / "pool.jsonl", lines[::-1])

    def kept(path: Path, fraction: float, name: str) -> pd.DataFrame:
        store = RunStore(tmp_path / name)
        summary = ingest(store, str(path), settings=CorpusSettings(sample_fraction=fraction))
        assert summary["kept"] + summary["sampled_out"] == 400
        return read_corpus(store)

    quarter = kept(forward, 0.25, "q")
    assert set(quarter["id"]) == set(kept(backward, 0.25, "qb")["id"])  # not the first documents read
    assert 60 <= len(quarter) <= 140  # 400 x 0.25 = 100, binomial sd 8.7: +-40 is over 4.5 sd
    for source in "ab":
        assert 25 <= (quarter["source"] == source).sum() <= 75  # each source in proportion (mean 50, sd 6.1)
    assert set(quarter["id"]) < set(kept(forward, 0.5, "h")["id"])
    assert len(kept(forward, 1.0, "all")) == 400
    with pytest.raises(ValueError, match="sample_fraction"):
        CorpusSettings(sample_fraction=0.0)
