"""Throughput of each per-shard step: local executor, Ray with 1 worker, Ray with 2 workers.

    .venv/bin/python benchmarks/bench_scale.py [--docs 192] [--shard-size 24] [--out runs/bench-scale]

Two throughputs per run, in documents per second: `window` over the processing window (first
shard start to last shard end; worker start-up and model loading excluded, `wall_s` includes
them) and `busy` = documents / (summed shard seconds / workers), which leaves out a worker idling
while the other still starts. Parallel efficiency = busy(2 workers) / (2 x busy(1 worker)).
One worker = one core: the local executor runs with torch.set_num_threads(1), as Ray's 1-CPU
workers do. Model steps (embed, perplexity, influence) run on `--docs` documents; the cheap steps
(dsir, assign) on `--cheap-docs`, assign over seeded random unit vectors (its cost does not
depend on the vectors' values). The proxy steps use the `tiny-llama` layout with a BPE trained on
the sample: the timing of their forward/backward work, not their quality, is measured.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from quadlib.cluster import ClusterSettings, fit_centroids
from quadlib.corpus import CorpusSettings, ingest, read_corpus
from quadlib.embed import EmbedSettings, embedding_path
from quadlib.execution import Executor, LocalExecutor, RayExecutor, RaySettings, ShardStep, connect_ray
from quadlib.execution.step import input_ids
from quadlib.execution.steps import AssignStep, DsirFeatureStep, EmbedStep, InfluenceStep, PerplexityStep
from quadlib.runstore import RunStore, write_json_atomic

DEFAULT_POOL = Path(__file__).resolve().parents[1] / "data" / "synthetic" / "pool.jsonl.gz"
MAX_LENGTH = 128


def build_proxy(store: RunStore, folder: Path) -> tuple[Path, Path, int]:
    """A tiny-llama proxy with a BPE on the sample and a fitted K-FAC estimator; (model dir, state, n_params)."""
    from quadlib.influence.estimators import make_estimator
    from quadlib.influence.scorer import InfluenceScorer
    from quadlib.proxy.checkpoint import save_model
    from quadlib.proxy.configs import build_model
    from quadlib.proxy.tokenizer import train_bpe_tokenizer

    texts = read_corpus(store, columns=["text"])["text"].tolist()
    tokenizer = train_bpe_tokenizer(texts, 1024, folder / "tokenizer")
    model = build_model("tiny-llama", tokenizer=tokenizer, device="cpu").eval()
    save_model(model, tokenizer, folder / "model")
    estimator = make_estimator("kfac_joint_qkv")
    scorer = InfluenceScorer(model, tokenizer, estimator, max_length=MAX_LENGTH, batch_size=8, device="cpu")
    scorer.fit_texts(texts[:32])
    scorer.set_reference_texts(texts[32:48])
    estimator.save(folder / "estimator.safetensors")
    return folder / "model", folder / "estimator.safetensors", scorer.n_params


def fresh_run(base: RunStore, root: Path, copy: tuple[str, ...]) -> RunStore:
    """A run folder with the base run's `copy` steps (the inputs of the measured step)."""
    if root.exists():
        shutil.rmtree(root)
    for step in copy:
        shutil.copytree(base.root / step, root / step)
    return RunStore(root)


def measure(step: ShardStep, base: RunStore, root: Path, executor: Executor, copy: tuple[str, ...]) -> dict:
    store = fresh_run(base, root, copy)
    start = time.perf_counter()
    run = executor.run(step, store)
    return {"window": run.throughput(), "busy": run.busy_throughput(), "wall_s": time.perf_counter() - start,
            "docs": run.rows, "workers": run.workers}


def random_embeddings(store: RunStore, dim: int = 384, seed: int = 0) -> np.ndarray:
    """Seeded unit vectors as the run's embeddings (for the assign timing); returns them `[n, d]`."""
    rng = np.random.default_rng(seed)
    parts = []
    for shard in store.shards("corpus"):
        n = len(input_ids(shard))
        vectors = rng.normal(size=(n, dim)).astype(np.float32)  # [n, d]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        np.save(embedding_path(store, shard), vectors)
        parts.append(vectors)
    return np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default=str(DEFAULT_POOL))
    parser.add_argument("--docs", type=int, default=192, help="documents for the model steps")
    parser.add_argument("--shard-size", type=int, default=24)
    parser.add_argument("--cheap-docs", type=int, default=4000, help="documents for dsir and assign")
    parser.add_argument("--cheap-shard-size", type=int, default=250)
    parser.add_argument("--k", type=int, default=1000, help="centroids of the assign step")
    parser.add_argument("--steps", nargs="+", default=["dsir", "embed", "assign", "perplexity", "influence"])
    parser.add_argument("--out", default="runs/bench-scale")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # one worker = one core, for the local executor too
    out = Path(args.out).resolve()
    base = RunStore(out / "base")
    ingest(base, args.pool, settings=CorpusSettings(shard_size=args.shard_size, limit=args.docs))
    cheap = RunStore(out / "base-cheap")
    ingest(cheap, args.pool, settings=CorpusSettings(shard_size=args.cheap_shard_size, limit=args.cheap_docs))
    embed_settings = EmbedSettings(max_seq_length=256)
    steps: dict[str, tuple[ShardStep, RunStore, tuple[str, ...]]] = {
        "dsir": (DsirFeatureStep(), cheap, ("corpus",)),
        "embed": (EmbedStep(embed_settings), base, ("corpus",)),
    }
    if "assign" in args.steps:
        vectors = random_embeddings(cheap)
        centroids = fit_centroids(vectors[:20_000], ClusterSettings(k=min(args.k, len(vectors) // 4), n_iter=5))
        steps["assign"] = (AssignStep(centroids), cheap, ("corpus", "embed"))
    n_params = None
    if {"perplexity", "influence"} & set(args.steps):
        model_dir, state, n_params = build_proxy(base, out / "proxy")
        steps["perplexity"] = (PerplexityStep(model_dir, max_length=MAX_LENGTH, device="cpu"), base, ("corpus",))
        steps["influence"] = (InfluenceStep(model_dir, state, max_length=MAX_LENGTH, device="cpu"), base, ("corpus",))

    connect_ray(RaySettings(num_cpus=2), out)
    results: dict[str, dict] = {}
    for name in [s for s in args.steps if s in steps]:
        step, source, copy = steps[name]
        row = {"local": measure(step, source, out / f"{name}-local", LocalExecutor(), copy)}
        for workers in (1, 2):
            row[f"ray{workers}"] = measure(step, source, out / f"{name}-ray{workers}",
                                           RayExecutor(RaySettings(num_workers=workers)), copy)
        row["efficiency"] = row["ray2"]["busy"] / (2 * row["ray1"]["busy"])
        row["window_speedup"] = row["ray2"]["window"] / row["ray1"]["window"]
        row["seconds_per_doc_one_core"] = 1.0 / row["local"]["busy"]
        tokens = read_corpus(source, columns=["n_tokens"])["n_tokens"]
        row["mean_tokens_per_doc"] = float(tokens.mean())
        results[name] = row
        print(f"{name:>10} ({row['local']['docs']} docs): one core {row['local']['busy']:7.1f} doc/s | busy: ray x1 "
              f"{row['ray1']['busy']:7.1f}, x2 {row['ray2']['busy']:7.1f} doc/s, efficiency {row['efficiency']:.2f} | "
              f"window speed-up x2/x1 {row['window_speedup']:.2f} | wall incl. start-up x1 {row['ray1']['wall_s']:.0f} s, "
              f"x2 {row['ray2']['wall_s']:.0f} s", flush=True)
    summary = {"embed_max_seq_length": embed_settings.max_seq_length, "proxy_max_length": MAX_LENGTH,
               "proxy_params": n_params, "pool": args.pool, "args": vars(args), "steps": results,
               "note": "2 CPU cores shared with other jobs: absolute numbers are noisy; compare ratios"}
    write_json_atomic(out / "results.json", summary)
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
