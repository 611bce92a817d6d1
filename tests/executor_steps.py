"""Shared helpers of the executor tests: a small sharded corpus and fault-injecting steps.

The steps wrap the real DSIR feature step, so the faults hit real per-shard work. They live in a
module (not a test file) so a driver subprocess can import them and Ray workers can unpickle them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from quadlib.corpus import CorpusSettings, ingest
from quadlib.execution.steps import DsirFeatureStep
from quadlib.execution.step import ShardStep, read_step_output
from quadlib.runstore import RunStore

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "synthetic"
# `quad select` on a tiny run: embeddings, 4 clusters, test-llama warmed up 4 steps, a scorer fitted on
# 16 documents, and bandit rounds of 12 documents (two of the scorer's batches of 8)
TINY_SELECT = ["--embed-max-seq-length", "32", "--cluster-k", "4", "--proxy-model", "test-llama",
               "--proxy-tokenizer-vocab", "300", "--proxy-warmup-docs", "64", "--proxy-train-total-steps", "4",
               "--proxy-train-batch-size", "4", "--proxy-train-block-size", "32", "--proxy-train-warmup-steps", "1",
               "--score-fit-docs", "16", "--score-reference-docs", "16", "--score-max-length", "32",
               "--quad-k", "2", "--quad-batch-size", "6", "--quad-gamma", "0.5", "--budget-fraction", "0.25",
               "--methods", "random", "quad"]

TOPICS = ("the harbour at night", "neutron stars and comets", "interest rates and markets",
          "a recipe for bread", "football results", "python functions", "rain over the hills")


def make_corpus(store: RunStore, tmp: Path, n_docs: int = 40, shard_size: int = 10) -> None:
    """`n_docs` short, distinct documents ingested into `n_docs / shard_size` corpus shards."""
    src = tmp / f"docs-{n_docs}.jsonl"
    lines = [json.dumps({"id": f"doc-{i:03d}", "source": f"s{i % 3}",
                         "text": f"Document {i} is about {TOPICS[i % len(TOPICS)]}; note {i * 7 % 11} of it."})
             for i in range(n_docs)]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ingest(store, src, settings=CorpusSettings(shard_size=shard_size))


def ingest_tiny_run(store: RunStore) -> None:
    """What `quad ingest` leaves: 64 pool documents of the default data in 4 shards, 32 reference documents."""
    ingest(store, DATA / "reference.jsonl.gz", step="reference",
           settings=CorpusSettings(id_field=None, source_field=None, limit=32))
    ingest(store, DATA / "pool.jsonl.gz", settings=CorpusSettings(limit=64, shard_size=16, overlap_step="reference"))


class CrashOnceStep(DsirFeatureStep):
    """Kills its own worker process the first time it meets `victim` (a marker file remembers it)."""

    holds_model = True  # run on an actor pool: the crash must kill an actor and be retried

    def __init__(self, marker: Path, victim: str) -> None:
        super().__init__(num_buckets=512, name="dsir-crash")
        self.marker, self.victim = marker, victim

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.victim in set(batch["id"]) and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)  # a hard worker death: no exception, no cleanup
        return super().process(batch)


class SlowStep(DsirFeatureStep):
    """The real DSIR step, slowed down so a driver can be killed between shards."""

    def __init__(self, seconds: float = 0.4) -> None:
        super().__init__(num_buckets=512, name="dsir-slow")
        self.seconds = seconds

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        time.sleep(self.seconds)
        return super().process(batch)


def run_slow_step(root: str, executor: str, address: str | None) -> None:
    """Driver entry point of the driver-kill tests: `python executor_steps.py <run> <executor> [address]`."""
    from quadlib.execution import ExecutorSettings, RaySettings, make_executor

    settings = ExecutorSettings(executor=executor, ray=RaySettings(address=address, num_workers=1))
    make_executor(settings).run(SlowStep(), RunStore(root))


def done_shards(store: RunStore, step: str) -> int:
    return len(list((store.root / step / "_done").glob("shard-*.json")))


def run_killed_driver(store: RunStore, executor: str, address: str | None, at_least: int,
                      timeout: float = 120.0) -> int:
    """Start `SlowStep` in a driver subprocess, SIGKILL it once `at_least` shards are done; return that count."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, str(HERE / "executor_steps.py"), str(store.root), executor] + ([address] if address else [])
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while done_shards(store, "dsir-slow") < at_least:
            assert driver.poll() is None, f"the driver exited early with code {driver.returncode}"
            assert time.monotonic() < deadline, "the driver made no progress"
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    return done_shards(store, "dsir-slow")


def assert_exactly_once(store: RunStore, step: ShardStep) -> None:
    out = read_step_output(store, step)
    expected = pd.concat([pd.read_parquet(s, columns=["id"]) for s in store.shards("corpus")])["id"]
    assert out["id"].is_unique and sorted(out["id"]) == sorted(expected)
    assert store.is_done(step.name)


def vowel_share_scorer() -> Callable[[list[str]], np.ndarray]:
    """A scorer factory for the distributed-bandit tests: a cheap deterministic per-text score."""

    def score(texts: list[str]) -> np.ndarray:
        return np.array([sum(ch in "aeiou" for ch in t) / max(len(t), 1) - 0.3 for t in texts])  # [n]

    return score


class CrashOnceScorer:
    """A scorer factory (see `vowel_share_scorer`) whose actor dies on its first call (a marker file
    remembers it), for the test that a killed scoring actor loses no score."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __call__(self) -> Callable[[list[str]], np.ndarray]:
        score, marker = vowel_share_scorer(), self.marker

        def crash_once(texts: list[str]) -> np.ndarray:
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # a hard actor death in the middle of a bandit round
            return score(texts)

        return crash_once


if __name__ == "__main__":
    run_slow_step(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
