"""Corpus store: read a candidate pool or reference set, validate it, write parquet shards.

Shards (`<run>/<step>/shard-00000.parquet`, columns id, text, source, n_chars, n_tokens) are the
unit of work of every later step, so a distributed executor can map over them.

Inputs: `.jsonl`, `.jsonl.gz`, `.parquet`, a folder or glob of such files, or a Hugging Face
dataset written as ``hf:<hub name or local path>[@split]`` (streamed). Bad records (invalid JSON,
undecodable bytes, a missing or empty text, a duplicate id, a text far over the length limit) are
counted and reported by file and line; they are skipped or truncated as configured and never crash
the run. The report is written to `<run>/<step>/summary.json`.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from quadlib.runstore import RunStore, atomic_path, write_json_atomic
from quadlib.settings import setting

log = logging.getLogger(__name__)

CORPUS_COLUMNS = ("id", "text", "source", "n_chars", "n_tokens")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
HF_PREFIX = "hf:"
_WORDPIECE = re.compile(r"\w+|[^\w\s]")

TokenCounter = Callable[[str], int]


def approx_token_count(text: str) -> int:
    """Word-piece approximation of a token count (words and punctuation marks)."""
    return len(_WORDPIECE.findall(text))


@dataclass
class CorpusSettings:
    text_field: str = setting("text", "record field holding the document text")
    id_field: str | None = setting("id", "record field holding a stable id; None or absent -> content hash")
    source_field: str | None = setting("source", "record field naming the domain; absent -> the file's stem")
    max_chars: int = setting(200_000, "documents longer than this are bad records (truncated or skipped)")
    too_long: str = setting("truncate", "'truncate' or 'skip' documents over max_chars")
    shard_size: int = setting(2_000, "documents per parquet shard")
    limit: int | None = setting(None, "stop after this many kept documents (None: all)")
    hf_split: str = setting("train", "split of a Hugging Face dataset when the spec names none")
    heldout_fraction: float = setting(0.0, "fraction of documents (chosen by id hash) written to a held-out step instead")
    max_examples: int = setting(20, "bad-record examples kept per reason in the summary")

    def __post_init__(self) -> None:
        if self.too_long not in ("truncate", "skip"):
            raise ValueError(f"too_long must be 'truncate' or 'skip', got {self.too_long!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass
class RawRecord:
    """One physical record: where it came from, and its fields or why they could not be read."""

    file: str
    line: int
    data: dict[str, Any] | None
    error: str | None = None


@dataclass
class IngestReport:
    """What an ingest read, kept and rejected, by reason and by file (written as summary.json)."""

    read: int = 0
    kept: int = 0
    heldout: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    by_file: dict[str, Counter] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def bad(self, rec: RawRecord, reason: str, max_examples: int, detail: str = "", skipped: bool = True) -> None:
        """Count a bad record by reason and file, keeping its location as an example."""
        if skipped:
            self.skipped[reason] += 1
        self.by_file.setdefault(rec.file, Counter())[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < max_examples:
            examples.append({"file": rec.file, "line": rec.line, "detail": detail})

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read, "kept": self.kept, "heldout": self.heldout, "truncated": self.truncated,
            "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
            "by_file": {k: dict(v) for k, v in self.by_file.items()}, "examples": self.examples,
        }

    def describe(self) -> str:
        lines = [f"read {self.read}, kept {self.kept} (+{self.heldout} held out), truncated {self.truncated}, "
                 f"skipped {sum(self.skipped.values())}"]
        for reason, examples in self.examples.items():
            where = ", ".join(f"{e['file']}:{e['line']}" for e in examples[:3])
            count = self.skipped.get(reason, self.truncated if reason == "too_long_truncated" else 0)
            lines.append(f"  {reason}: {count} (e.g. {where})")
        return "\n".join(lines)


# -- reading ------------------------------------------------------------------------------------

def expand_sources(spec: str | Path) -> list[str]:
    """Files named by a path, folder or glob (sorted), or the spec itself for an `hf:` dataset."""
    text = str(spec)
    if text.startswith(HF_PREFIX):
        return [text]
    path = Path(text)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(FILE_SUFFIXES))
    elif any(ch in text for ch in "*?["):
        files = sorted(f for f in glob.glob(text, recursive=True) if f.endswith(FILE_SUFFIXES))
    elif path.is_file():
        if not text.endswith(FILE_SUFFIXES):
            raise ValueError(f"{text}: unsupported file type; use one of {FILE_SUFFIXES} or hf:<dataset>")
        files = [text]
    else:
        raise FileNotFoundError(f"{text}: no such file, folder or glob match (check the path)")
    if not files:
        raise FileNotFoundError(f"{text}: matched no {'/'.join(FILE_SUFFIXES)} files")
    return files


def _iter_jsonl(path: str) -> Iterator[RawRecord]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:  # bytes, so an undecodable line is one bad record, not a crash
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(path, lineno, None, f"undecodable_bytes: {exc.reason} at byte {exc.start}")
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRecord(path, lineno, None, f"invalid_json: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(data, dict):
                yield RawRecord(path, lineno, None, f"not_an_object: got {type(data).__name__}")
                continue
            yield RawRecord(path, lineno, data)


def _iter_parquet(path: str) -> Iterator[RawRecord]:
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for data in batch.to_pylist():
            row += 1
            yield RawRecord(path, row, data)


def _iter_hf(spec: str, split: str) -> Iterator[RawRecord]:
    """A hub dataset by name, or a local dataset folder, streamed (`hf:name@split`)."""
    import datasets  # heavy import, only for this input kind

    name, _, explicit_split = spec[len(HF_PREFIX):].partition("@")
    split = explicit_split or split
    if Path(name, "dataset_info.json").exists() or Path(name, "state.json").exists():
        ds = datasets.load_from_disk(name)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    for row, data in enumerate(ds, start=1):
        yield RawRecord(spec, row, dict(data))


def iter_records(spec: str | Path, settings: CorpusSettings | None = None) -> Iterator[RawRecord]:
    """Every physical record of a source spec, in a deterministic order."""
    settings = settings or CorpusSettings()
    for path in expand_sources(spec):
        if path.startswith(HF_PREFIX):
            yield from _iter_hf(path, settings.hf_split)
        elif path.endswith(".parquet"):
            yield from _iter_parquet(path)
        else:
            yield from _iter_jsonl(path)


# -- validation -----------------------------------------------------------------------------------

def content_id(text: str) -> str:
    """A stable id from the text itself, for records that bring none."""
    return "h-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Held-out membership by id hash: stable across runs, readers and shard layouts."""
    if fraction <= 0:
        return False
    bucket = int(hashlib.sha1(doc_id.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def clean_records(records: Iterable[RawRecord], settings: CorpusSettings, report: IngestReport,
                  count_tokens: TokenCounter = approx_token_count) -> Iterator[tuple[dict[str, Any], bool]]:
    """Validated documents as (row, heldout) pairs; every rejection is recorded in `report`."""
    seen: set[str] = set()
    for rec in records:
        report.read += 1
        if rec.error is not None:
            reason, _, detail = rec.error.partition(": ")
            report.bad(rec, reason, settings.max_examples, detail)
            continue
        assert rec.data is not None
        text = rec.data.get(settings.text_field)
        if not isinstance(text, str) or not text.strip():
            why = "missing" if text is None else ("not a string" if not isinstance(text, str) else "empty")
            report.bad(rec, "missing_or_empty_text", settings.max_examples,
                       f"field {settings.text_field!r} is {why}; set text_field to the right field")
            continue
        if len(text) > settings.max_chars:
            if settings.too_long == "skip":
                report.bad(rec, "too_long", settings.max_examples, f"{len(text)} chars > max_chars={settings.max_chars}")
                continue
            report.truncated += 1
            report.bad(rec, "too_long_truncated", settings.max_examples,
                       f"{len(text)} chars cut to {settings.max_chars}", skipped=False)
            text = text[: settings.max_chars]
        raw_id = rec.data.get(settings.id_field) if settings.id_field else None
        doc_id = str(raw_id) if raw_id not in (None, "") else content_id(text)
        if doc_id in seen:
            report.bad(rec, "duplicate_id", settings.max_examples, f"id {doc_id!r} already seen")
            continue
        seen.add(doc_id)
        source = rec.data.get(settings.source_field) if settings.source_field else None
        if not source:
            source = Path(rec.file.split("@")[0]).name.split(".")[0]
        row = {"id": doc_id, "text": text, "source": str(source),
               "n_chars": len(text), "n_tokens": count_tokens(text)}
        yield row, is_heldout(doc_id, settings.heldout_fraction)


# -- writing --------------------------------------------------------------------------------------

_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                     ("n_chars", pa.int32()), ("n_tokens", pa.int32())])


class _ShardWriter:
    """Buffers rows and writes numbered parquet shards atomically."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.rows: list[dict[str, Any]] = []
        self.paths: list[Path] = []
        for old in folder.glob("shard-*.parquet"):
            old.unlink()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        path = self.folder / f"shard-{len(self.paths):05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(pa.Table.from_pylist(self.rows, schema=_SCHEMA), tmp)
        self.paths.append(path)
        self.rows = []


def ingest(store: RunStore, sources: str | Path | list[str | Path], *, step: str = "corpus",
           settings: CorpusSettings | None = None, heldout_step: str = "heldout",
           count_tokens: TokenCounter = approx_token_count, recompute: bool = False) -> dict[str, Any]:
    """Read, validate and shard `sources` into `<run>/<step>/`; return the summary.

    Skipped when the step is done with the same sources and settings. Documents chosen by
    `heldout_fraction` go to `<run>/<heldout_step>/` and are never offered for selection.
    """
    settings = settings or CorpusSettings()
    specs = [str(s) for s in (sources if isinstance(sources, list) else [sources])]
    params = {"sources": specs, "settings": settings, "token_counter": getattr(count_tokens, "__name__", "custom")}
    if store.begin(step, params, recompute=recompute):
        return json.loads((store.step_dir(step) / "summary.json").read_text(encoding="utf-8"))
    report = IngestReport()
    writer = _ShardWriter(store.step_dir(step), settings.shard_size)
    held = _ShardWriter(store.step_dir(heldout_step), settings.shard_size) if settings.heldout_fraction > 0 else None
    records = (rec for spec in specs for rec in iter_records(spec, settings))
    for row, heldout in clean_records(records, settings, report, count_tokens):
        if heldout and held is not None:
            held.add(row)
            report.heldout += 1
            continue
        writer.add(row)
        report.kept += 1
        if settings.limit is not None and report.kept >= settings.limit:
            break
    writer.flush()
    if held is not None:
        held.flush()
    if report.kept == 0:
        raise ValueError(f"no usable documents in {specs}:\n{report.describe()}")
    summary = report.as_dict() | {"shards": [p.name for p in writer.paths]}
    write_json_atomic(store.step_dir(step) / "summary.json", summary)
    if report.read != report.kept + report.heldout:
        log.warning("corpus %s: %s", step, report.describe())
    store.mark_done(step, info={"documents": report.kept})
    return summary


def read_corpus(store: RunStore, step: str = "corpus", columns: list[str] | None = None) -> pd.DataFrame:
    """All shards of a corpus step, concatenated in shard order."""
    shards = store.shards(step)
    if not shards:
        raise FileNotFoundError(f"{store.root / step}: no shards; run ingest(store, ..., step={step!r}) first")
    return pd.concat([pd.read_parquet(p, columns=columns) for p in shards], ignore_index=True)
