"""Corpus store: read a candidate pool or reference set, validate it, write parquet shards.

Shards (`<run>/<step>/shard-00000.parquet`, columns id, text, source, n_chars, n_tokens) are the
unit of work of every later step, so a distributed executor can map over them.

Inputs: `.jsonl`, `.jsonl.gz`, `.parquet`, a folder or glob of such files, or a Hugging Face
dataset written as ``hf:<hub name or local path>[@split]`` (streamed). Bad records (invalid JSON,
undecodable bytes, a missing or empty text, a duplicate id, a text far over the length limit) are
counted and reported by file and line; they are skipped or truncated as configured and never crash
the run. A `.jsonl.gz` cut short keeps every record before the cut and reports where it ends. A file
that cannot be read at all (0 bytes, not parquet, not gzip, a name that is not UTF-8) stops the
ingest with one line naming the file and the fix. The report is written to
`<run>/<step>/summary.json`; truncated documents, a truncated file and documents shared with the
reference set (by id or by text) are also warned on the terminal.

A rerun writes the new shards beside the finished ones and swaps them in only when complete
(`RunStore.staged`), under the step's run-folder lock, so a failed, killed or concurrent ingest never
leaves a mix. The step's parameters include each input file's size and modification time, so a
pool edited in place is ingested again.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib.stride_tricks import sliding_window_view

from quadlib.runstore import RunStore, atomic_path, file_fingerprints, write_json_atomic
from quadlib.settings import setting

log = logging.getLogger(__name__)

CORPUS_COLUMNS = ("id", "text", "source", "n_chars", "n_tokens")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
UTF8_BOM = b"\xef\xbb\xbf"
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
    sample_fraction: float = setting(1.0, "keep each document with this probability, decided by a seeded hash of its "
                                          "id (split_seed): the same documents whatever the file order, every "
                                          "source in proportion (1.0: all); unlike `limit`, which keeps the first ones")
    hf_split: str = setting("train", "split of a Hugging Face dataset when the spec names none")
    heldout_fraction: float = setting(0.0, "fraction of origin groups (chosen by a seeded hash of the group key) "
                                           "written to a held-out step instead; see split_heldout")
    group_field: str | None = setting(None, "record field naming a document's origin group for the held-out split "
                                            "(a dotted path such as 'meta.book'); None: inferred from `meta` "
                                            "(origin_group), else the document id")
    near_duplicate_containment: float = setting(0.5, "a document sharing at least this fraction of its word 13-grams "
                                                     "with an earlier one joins that one's group (0 turns it off)")
    split_seed: int = setting(0, "seed of the held-out split's group hash")
    max_examples: int = setting(20, "bad-record examples kept per reason in the summary")
    overlap_step: str | None = setting(None, "a finished step of this run (the reference set) whose documents "
                                       "are looked up here by id and by text hash; shared ones are reported")
    drop_overlap: bool = setting(False, "drop the documents shared with overlap_step instead of only reporting them")

    def __post_init__(self) -> None:
        if self.too_long not in ("truncate", "skip"):
            raise ValueError(f"too_long must be 'truncate' or 'skip', got {self.too_long!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.near_duplicate_containment <= 1.0:
            raise ValueError(f"near_duplicate_containment must be in [0, 1], got {self.near_duplicate_containment}")
        for name in ("shard_size", "max_chars", "max_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be None or a positive whole number, got {self.limit!r}")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction!r}")
        if self.drop_overlap and self.overlap_step is None:
            raise ValueError("drop_overlap needs overlap_step (the step holding the reference set)")


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
    sampled_out: int = 0  # left out by CorpusSettings.sample_fraction
    truncated: int = 0
    split: dict[str, Any] = field(default_factory=dict)
    worst_cut: dict[str, Any] | None = None  # the truncated document that kept the smallest fraction
    overlap: dict[str, Any] | None = None  # documents shared with the reference step
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
            "read": self.read, "kept": self.kept, "heldout": self.heldout, "sampled_out": self.sampled_out,
            "truncated": self.truncated,
            "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
            "by_file": {k: dict(v) for k, v in self.by_file.items()}, "examples": self.examples,
            "heldout_split": self.split,
            "worst_cut": self.worst_cut, "overlap": self.overlap,
        }

    def cut(self, rec: RawRecord, n_chars: int, max_chars: int) -> None:
        """Remember the document that lost the largest share of its length to truncation."""
        kept = max_chars / n_chars
        if self.worst_cut is None or kept < self.worst_cut["kept_fraction"]:
            self.worst_cut = {"file": rec.file, "line": rec.line, "n_chars": n_chars, "kept_fraction": kept}

    def warnings(self, step: str, settings: CorpusSettings) -> list[str]:
        """One line per thing a user must know about (truncations, a cut file, reference overlap)."""
        out = []
        if self.worst_cut is not None:
            w = self.worst_cut
            out.append(f"{step}: {self.truncated} document(s) longer than max_chars={settings.max_chars:,} were cut; "
                       f"{w['file']}:{w['line']} kept {w['kept_fraction']:.0%} of its {w['n_chars']:,} chars "
                       "(raise max_chars, or set too_long='skip' to drop them)")
        for e in self.examples.get("truncated_file", []):
            out.append(f"{step}: {e['file']} {e['detail']}")
        if self.overlap is not None and self.overlap["documents"]:
            o = self.overlap
            action = ("dropped from the pool" if o["dropped"] else
                      "kept (pass --drop-overlap, or drop_overlap=True, to remove them from the pool)")
            out.append(f"{step}: {o['documents']} document(s) also in the {o['step']!r} step "
                       f"({o['by_id']} by id, {o['by_text']} by text, e.g. {o['examples'][:3]}); {action}")
        return out

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
    for name in files:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{ascii(name)}: the file name is not valid UTF-8, so it cannot be recorded as the "
                             "documents' source; rename the file to a UTF-8 (e.g. ASCII) name") from None
    return files


class _TruncatedStream(Exception):
    """A gzip stream that ends before its end-of-stream marker (a cut download or copy)."""


def _lines(path: str) -> Iterator[bytes]:
    """The raw lines of a JSON-lines file, gzip-compressed or not; raises `_TruncatedStream` where a
    gzip stream is cut short, after yielding every line before the cut."""
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            yield from f
        return
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"\x1f\x8b":
        hint = (f"it looks like plain JSON lines: rename it to {path[:-3]}" if head[:1] in (b"{", b"\n", b" ")
                else "re-create it with gzip, or convert it to .jsonl or .parquet")
        raise ValueError(f"{path}: not a gzip file (it starts with {head!r}); {hint}")
    with gzip.open(path, "rb") as f:
        try:
            yield from f
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise _TruncatedStream(str(exc)) from None


def _iter_jsonl(path: str) -> Iterator[RawRecord]:
    lineno = 0
    lines = _lines(path)  # bytes, so an undecodable line is one bad record, not a crash
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except _TruncatedStream as exc:
            yield RawRecord(path, lineno + 1, None,
                            f"truncated_file: ends mid-stream after line {lineno} ({exc}); the {lineno} line(s) "
                            "before the cut are kept: download or compress the file again to get the rest")
            return
        lineno += 1
        if lineno == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]  # a byte-order mark some editors write; not part of the JSON
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
    """Rows of a parquet file; a file that is not parquet (0 bytes, another format renamed) stops the
    ingest naming it, and is never handed to any other reader (a renamed pickle is never unpickled)."""
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a parquet file; delete it or write it again")
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable parquet file ({exc}); remove it from the input, or convert it "
                         "to parquet or JSON lines") from None
    row = 0
    try:
        for batch in reader.iter_batches(batch_size=4096):
            for data in batch.to_pylist():
                row += 1
                yield RawRecord(path, row, data)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: unreadable after row {row} ({exc}); write the file again") from None


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


# -- splits ---------------------------------------------------------------------------------------

def hash_unit(key: str, seed: int = 0) -> float:
    """A seeded hash of `key` in [0, 1): stable across runs, readers and shard layouts."""
    return int(hashlib.sha1(f"{seed}:{key}".encode("utf-8")).hexdigest()[:13], 16) / 16**13


_TASK_NUMBER = re.compile(r"/(\d+)$")
_ID_NUMBER = re.compile(r"^(.*?)(\d+)$")
# meta fields that name the document a record came from, most specific first (see origin_group)
ORIGIN_FIELDS = ("book", "repo_path", "arxiv_id", "url", "file", "title", "title_guess", "webtext_id")


def _field(data: dict[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def origin_group(data: dict[str, Any], doc_id: str, settings: CorpusSettings) -> str:
    """The origin group of a record: documents of one group go to the same side of the held-out split.

    With `settings.group_field` set, that field's value (a dotted path, e.g. ``meta.book``); a record
    without it is its own group. Otherwise, from the record's `meta` (the shared pool's provenance):
    a HumanEval-style `task_id` ("HumanEval/12", "CPP/12", "JavaScript/12") groups one problem across
    languages; a Stack Exchange `site` + `question_id` groups the answers to one question; the first
    of ORIGIN_FIELDS (book, arXiv id, url, file, title, ...) groups the pieces of one source document;
    a split document with no such field (`part` only, consecutive ids `<prefix><n>`) groups ids
    n - part .. n - part + parts - 1. Anything else is its own group (its id). Keys carry the
    record's source so two sources never share a group by accident.
    """
    if settings.group_field is not None:
        value = _field(data, settings.group_field)
        return f"{settings.group_field}={value}" if value not in (None, "") else f"id={doc_id}"
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    source = data.get(settings.source_field) if settings.source_field else None
    prefix = f"{source}:" if source else ""
    task = meta.get("task_id")
    if isinstance(task, str) and _TASK_NUMBER.search(task):
        return f"{prefix}task={_TASK_NUMBER.search(task).group(1)}"
    if meta.get("question_id") not in (None, ""):
        return f"{prefix}question={meta.get('site', '')}/{meta['question_id']}"
    for name in ORIGIN_FIELDS:
        if meta.get(name) not in (None, ""):
            return f"{prefix}{name}={meta[name]}"
    part, number = meta.get("part"), _ID_NUMBER.match(doc_id)
    if isinstance(part, int) and number is not None:
        head, digits = number.groups()
        return f"{prefix}split={head}{int(digits) - part:0{len(digits)}d}"
    return f"{prefix}id={doc_id}"


NGRAM = 13  # word n-grams for near-duplicates (the shared data's README measures overlap the same way)
NGRAM_SAMPLE = 4  # keep the n-grams whose hash is 0 mod this: a uniform sample, so containment is unbiased
_WORD = re.compile(r"[a-z0-9]+")


_GRAM_POWERS = np.array([pow(1_000_003, NGRAM - 1 - j, 2**64) for j in range(NGRAM)], dtype=np.uint64)


def ngram_sample(text: str, n: int = NGRAM, modulo: int = NGRAM_SAMPLE) -> set[int]:
    """Hashes of a uniform sample of the text's word n-grams (lower-cased alphanumeric words).

    A gram's hash is a polynomial over its words' CRC-32s (mod 2^64), mixed so its residues are
    uniform; stable across processes and machines, unlike Python's `hash` of strings.
    """
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return set()
    codes = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    powers = _GRAM_POWERS if n == NGRAM else np.array([pow(1_000_003, n - 1 - j, 2**64) for j in range(n)],
                                                      dtype=np.uint64)
    grams = (sliding_window_view(codes, n) * powers).sum(axis=1, dtype=np.uint64)  # [len(words) - n + 1]
    grams ^= grams >> np.uint64(31)
    grams *= np.uint64(0x9E3779B97F4A7C15)
    grams ^= grams >> np.uint64(29)
    return set(grams[grams % np.uint64(modulo) == 0].tolist())


class HeldoutSplitter:
    """The held-out split by origin group, decided as documents stream in (`split_heldout` for a table).

    A group's side is `hash_unit(group, split_seed) < heldout_fraction`. A document that shares at
    least `near_duplicate_containment` of its 13-grams with an earlier group (estimated from a 1/4
    sample, with two standard errors of slack) and whose own group is new joins that group, so its later pieces follow it too. A near-duplicate whose own
    group already sits on the other side cannot move (its siblings are written): it is counted in
    `stats["crossing_near_duplicates"]`, so a residual leak is reported, never silent.
    """

    def __init__(self, settings: CorpusSettings) -> None:
        self.fraction, self.seed = settings.heldout_fraction, settings.split_seed
        self.containment = settings.near_duplicate_containment
        self.canonical: dict[str, str] = {}  # group -> the group it joined (itself when it joined none)
        self.owner: dict[int, str] = {}  # sampled n-gram hash -> canonical group of its first document
        self.stats: dict[str, Any] = {"groups": 0, "heldout_groups": 0, "near_duplicates_joined": 0,
                                      "crossing_near_duplicates": 0, "crossing_examples": []}

    def side(self, group: str) -> bool:
        """True when `group` (canonical) is held out."""
        return hash_unit(group, self.seed) < self.fraction

    def _near_duplicate_of(self, grams: set[int]) -> str | None:
        if self.containment <= 0 or not grams:
            return None
        hits = Counter(self.owner[g] for g in grams if g in self.owner)
        if not hits:
            return None
        group, count = min(hits.items(), key=lambda kv: (-kv[1], kv[0]))
        # The containment is estimated from a sample of m n-grams: join when it could reach the
        # threshold (estimate + 2 binomial standard errors), so sampling noise errs towards joining.
        m, share = len(grams), count / len(grams)
        return group if share + 2 * math.sqrt(max(share * (1 - share), 1 / m) / m) >= self.containment else None

    def assign(self, doc_id: str, group: str, text: str) -> bool:
        """Whether this document is held out (and remember it for later near-duplicates)."""
        grams = ngram_sample(text) if self.containment > 0 else set()
        match = self._near_duplicate_of(grams)
        if group not in self.canonical:
            self.stats["groups"] += 1
            if match is not None and match != group:
                self.canonical[group] = match
                self.stats["near_duplicates_joined"] += 1
            else:
                self.canonical[group] = group
                self.stats["heldout_groups"] += int(self.side(group))
        canonical = self.canonical[group]
        if match is not None and self.side(match) != self.side(canonical):
            self.stats["crossing_near_duplicates"] += 1
            if len(self.stats["crossing_examples"]) < 20:
                self.stats["crossing_examples"].append({"id": doc_id, "group": group, "near_duplicate_of": match})
        for g in grams:
            self.owner.setdefault(g, canonical)
        return self.side(canonical)


def split_heldout(frame: pd.DataFrame, settings: CorpusSettings, groups: list[str] | None = None) -> pd.Series:
    """Which rows of `frame` (id, text, optional meta and source columns) are held out, by origin group.

    The same rule as ingest (`HeldoutSplitter`, groups from `origin_group` unless given), in row order.
    """
    splitter = HeldoutSplitter(settings)
    records = frame.to_dict(orient="records")
    keys = groups if groups is not None else [origin_group(r, str(r["id"]), settings) for r in records]
    return pd.Series([splitter.assign(str(r["id"]), k, str(r["text"])) for r, k in zip(records, keys, strict=True)],
                     index=frame.index, name="heldout")


@dataclass
class OverlapIndex:
    """Ids and text hashes (`content_id`) of a finished step, the reference set: documents of another
    ingest found in it by either are counted, and dropped when `drop` is set. A reference text in the
    pool lets selectors pick the very texts the evaluation then scores."""

    step: str
    ids: set[str]
    texts: set[str]
    drop: bool = False
    by_id: int = 0
    by_text: int = 0
    documents: int = 0
    examples: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, store: RunStore, step: str, drop: bool = False) -> OverlapIndex:
        store.require_done(step, "the reference overlap check")
        frame = read_corpus(store, step, columns=["id", "text"])
        return cls(step, set(frame["id"]), {content_id(t) for t in frame["text"]}, drop)

    def check(self, doc_id: str, text: str) -> bool:
        """True (and counted) when the document is in the indexed step by id or by text."""
        by_id, by_text = doc_id in self.ids, content_id(text) in self.texts
        if by_id or by_text:
            self.by_id += by_id
            self.by_text += by_text
            self.documents += 1
            if len(self.examples) < 10:
                self.examples.append(doc_id)
        return by_id or by_text

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "documents": self.documents, "by_id": self.by_id, "by_text": self.by_text,
                "dropped": self.drop, "examples": self.examples}


def clean_records(records: Iterable[RawRecord], settings: CorpusSettings, report: IngestReport,
                  count_tokens: TokenCounter = approx_token_count,
                  overlap: OverlapIndex | None = None) -> Iterator[tuple[dict[str, Any], bool]]:
    """Validated documents as (row, heldout) pairs; every rejection is recorded in `report`."""
    seen: set[str] = set()
    splitter = HeldoutSplitter(settings) if settings.heldout_fraction > 0 else None
    if splitter is not None:
        report.split = splitter.stats  # the same dict, kept current as documents arrive
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
            report.cut(rec, len(text), settings.max_chars)
            text = text[: settings.max_chars]
        raw_id = rec.data.get(settings.id_field) if settings.id_field else None
        doc_id = str(raw_id) if raw_id not in (None, "") else content_id(text)
        if doc_id in seen:
            report.bad(rec, "duplicate_id", settings.max_examples, f"id {doc_id!r} already seen")
            continue
        seen.add(doc_id)
        if overlap is not None and overlap.check(doc_id, text) and overlap.drop:
            report.bad(rec, "in_reference", settings.max_examples, f"id {doc_id!r} is in step {overlap.step!r}")
            continue
        source = rec.data.get(settings.source_field) if settings.source_field else None
        if not source:
            source = Path(rec.file.split("@")[0]).name.split(".")[0]
        row = {"id": doc_id, "text": text, "source": str(source),
               "n_chars": len(text), "n_tokens": count_tokens(text)}
        heldout = splitter is not None and splitter.assign(doc_id, origin_group(rec.data, doc_id, settings), text)
        yield row, heldout


# -- writing --------------------------------------------------------------------------------------

_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                     ("n_chars", pa.int32()), ("n_tokens", pa.int32())])


class _ShardWriter:
    """Buffers rows and writes numbered parquet shards atomically."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.rows: list[dict[str, Any]] = []
        self.paths: list[Path] = []

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

    Skipped when the step is done with the same sources (and the same file sizes and modification
    times), settings and reference step. Documents chosen by `heldout_fraction` go to
    `<run>/<heldout_step>/` and are never offered for selection; with `heldout_fraction=0`, a
    held-out step an earlier ingest of this step wrote is removed. The new step is built beside the
    old one and replaces it only when complete, under the step's lock.
    """
    settings = settings or CorpusSettings()
    specs = [str(s) for s in (sources if isinstance(sources, list) else [sources])]
    files = [path for spec in specs for path in expand_sources(spec)]
    with store.lock(step):
        params = {"sources": specs, "inputs": file_fingerprints(files), "settings": settings,
                  "token_counter": getattr(count_tokens, "__name__", "custom"),
                  "overlap_step_params": store.fingerprint(settings.overlap_step) if settings.overlap_step else None}
        held_params = {"split_from": step, "params": params}
        splits = settings.heldout_fraction > 0
        if (not recompute and store.is_current(step, params)
                and (not splits or store.is_current(heldout_step, held_params))):
            summary = json.loads((store.root / step / "summary.json").read_text(encoding="utf-8"))
        else:
            summary = _ingest_staged(store, specs, step, params, settings, heldout_step, held_params, count_tokens)
        if not splits:
            _remove_heldout_of(store, step, heldout_step)
    return summary


def _ingest_staged(store: RunStore, specs: list[str], step: str, params: dict[str, Any], settings: CorpusSettings,
                   heldout_step: str, held_params: dict[str, Any], count_tokens: TokenCounter) -> dict[str, Any]:
    """One ingest into staging folders that replace `step` (and `heldout_step`) only when complete."""
    report = IngestReport()
    overlap = (OverlapIndex.of(store, settings.overlap_step, settings.drop_overlap)
               if settings.overlap_step else None)
    with ExitStack() as stack:  # exits in reverse: the held-out step is swapped in before the corpus
        folder, info = stack.enter_context(store.staged(step, params))
        held = None
        if settings.heldout_fraction > 0:
            stack.enter_context(store.lock(heldout_step))
            held_folder, held_info = stack.enter_context(store.staged(heldout_step, held_params))
            held = _ShardWriter(held_folder, settings.shard_size)
        writer = _ShardWriter(folder, settings.shard_size)
        records = (rec for spec in specs for rec in iter_records(spec, settings))
        for row, heldout in clean_records(records, settings, report, count_tokens, overlap):
            if settings.sample_fraction < 1.0 and hash_unit(f"sample:{row['id']}", settings.split_seed) >= \
                    settings.sample_fraction:
                report.sampled_out += 1
                continue
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
            held_info["documents"] = report.heldout
        if report.kept == 0:
            raise ValueError(f"no usable documents in {specs}:\n{report.describe()}")
        report.overlap = overlap.as_dict() if overlap is not None else None
        summary = report.as_dict() | {"shards": [p.name for p in writer.paths]}
        write_json_atomic(folder / "summary.json", summary)
        info["documents"] = report.kept
    if report.read != report.kept + report.heldout + report.sampled_out:
        log.warning("%s: %s", step, report.describe())
    for line in report.warnings(step, settings):
        log.warning("%s", line)
    return summary


def _remove_heldout_of(store: RunStore, step: str, heldout_step: str) -> None:
    """Remove the held-out step an earlier ingest of `step` wrote (a stale one would be evaluated on
    documents that are now in the pool). One without a config predates the split record: it came
    from the default step."""
    if not (store.root / heldout_step).exists():
        return
    with store.lock(heldout_step):
        config = store.read_config(heldout_step)
        owner = (config or {}).get("params", {}).get("split_from", "corpus") if config else "corpus"
        if owner == step:
            store.remove_step(heldout_step)
            log.warning("%s: removed %s/ (held out by an earlier ingest; this one holds out nothing)",
                        step, store.root / heldout_step)


def read_corpus(store: RunStore, step: str = "corpus", columns: list[str] | None = None) -> pd.DataFrame:
    """All shards of a finished corpus step, concatenated in shard order."""
    shards = store.shards(step)
    if shards:
        store.require_done(step, "read_corpus")
    if not shards:
        raise FileNotFoundError(f"{store.root / step}: no shards; run ingest(store, ..., step={step!r}) first")
    return pd.concat([pd.read_parquet(p, columns=columns) for p in shards], ignore_index=True)


# -- the reference split ---------------------------------------------------------------------------

REFERENCE_STEP = "reference"
REFERENCE_SPLIT_STEP = "reference-split"
REFERENCE_SPLIT_FILE = "split.json"
SELECTION_PART, EVALUATION_PART = "selection", "evaluation"


@dataclass
class ReferenceSplitSettings:
    """The reference set is split once: selectors read one part, evaluation the other (never both)."""

    evaluation_fraction: float = setting(0.5, "share of reference documents (by a seeded hash of the id) that only "
                                              "evaluation reads; the rest is the selection part, the only part a "
                                              "selector, scorer, probe, DSIR target or target model reads")
    seed: int = setting(0, "seed of the id hash")

    def __post_init__(self) -> None:
        if not 0.0 < self.evaluation_fraction < 1.0:
            raise ValueError(f"evaluation_fraction must be in (0, 1), got {self.evaluation_fraction}")


def split_reference_ids(ids: Iterable[str], settings: ReferenceSplitSettings) -> dict[str, list[str]]:
    """{"selection": ids, "evaluation": ids}, each in input order: evaluation when hash_unit(id, seed) < fraction."""
    parts: dict[str, list[str]] = {SELECTION_PART: [], EVALUATION_PART: []}
    for doc_id in ids:
        part = EVALUATION_PART if hash_unit(str(doc_id), settings.seed) < settings.evaluation_fraction else SELECTION_PART
        parts[part].append(str(doc_id))
    return parts


def split_reference(store: RunStore, settings: ReferenceSplitSettings | None = None,
                    step: str = REFERENCE_STEP) -> dict[str, Any]:
    """Split the reference step once and record both id lists in `<run>/reference-split/split.json`.

    Without `settings`, the split already recorded keeps its settings (defaults for a new run). A
    re-ingested reference (other ids) is split again with the same settings; the same ids and
    settings always give the same split.
    """
    folder = store.step_dir(REFERENCE_SPLIT_STEP)
    path = folder / REFERENCE_SPLIT_FILE
    if settings is None:
        recorded = store.read_config(REFERENCE_SPLIT_STEP)
        settings = ReferenceSplitSettings(**recorded["params"]["settings"]) if recorded else ReferenceSplitSettings()
    ids = read_corpus(store, step, columns=["id"])["id"].astype(str).tolist()
    fingerprint = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()
    params = {"reference_step": step, "settings": settings, "reference_ids_sha256": fingerprint}
    if store.begin(REFERENCE_SPLIT_STEP, params, seed=settings.seed) and path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    parts = split_reference_ids(ids, settings)
    for part, members in parts.items():
        if not members:
            raise ValueError(f"{store.root / step}: the reference split leaves the {part} part empty ({len(ids)} "
                             f"documents, evaluation_fraction={settings.evaluation_fraction}); add reference "
                             "documents or change ReferenceSplitSettings.evaluation_fraction")
    record = {"settings": settings, "reference_step": step, "reference_ids_sha256": fingerprint, **parts}
    write_json_atomic(path, record)
    store.mark_done(REFERENCE_SPLIT_STEP, info={part: len(members) for part, members in parts.items()})
    return json.loads(path.read_text(encoding="utf-8"))


def read_reference(store: RunStore, part: str, step: str = REFERENCE_STEP,
                   columns: list[str] | None = None) -> pd.DataFrame:
    """One part of the reference set ("selection" or "evaluation"), in stored order (split on first use)."""
    if part not in (SELECTION_PART, EVALUATION_PART):
        raise ValueError(f"reference part must be {SELECTION_PART!r} or {EVALUATION_PART!r}, got {part!r}")
    members = set(split_reference(store, step=step)[part])
    frame = read_corpus(store, step, columns=None if columns is None else sorted(set(columns) | {"id"}))
    frame = frame[frame["id"].astype(str).isin(members)].reset_index(drop=True)
    return frame if columns is None else frame[columns]
