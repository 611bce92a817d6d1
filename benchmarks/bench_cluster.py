"""Benchmark: faiss k-means against scikit-learn MiniBatchKMeans on the same vectors, and embedding
throughput on a sample of the real pool.

Both clusterings are fitted on the same clustered random unit vectors with the same k, iterations
and init, and both inertias are measured by the same `quadlib.cluster.assign` (cosine distance),
so the ratios compare the algorithms, not their bookkeeping. Prints one JSON object.

    python benchmarks/bench_cluster.py                       # 1e5 x 384, k = 1,000
    python benchmarks/bench_cluster.py --sizes 100000 1000000 --k 1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from itertools import islice
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from quadlib.cluster import ClusterSettings, assign, fit_centroids  # noqa: E402
from quadlib.corpus import iter_records  # noqa: E402
from quadlib.embed import EmbedSettings, ShardEmbedder  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def clustered_vectors(n: int, dim: int, n_centres: int, seed: int, spread: float = 0.6) -> np.ndarray:
    """Unit vectors `[n, dim]` scattered around `n_centres` random directions (embedding-like)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)  # [c, d]
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_centres, n)]  # [n, d]
    x += (spread / np.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_clustering(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time both algorithms on one set of vectors; inertia = summed cosine distance to the nearest centroid."""
    vectors = clustered_vectors(n, args.dim, args.centres or args.k, args.seed)
    out: dict[str, Any] = {"n": n, "dim": args.dim, "k": args.k, "n_iter": args.n_iter, "init": args.init}
    for algorithm in ("faiss_kmeans", "minibatch_kmeans"):
        settings = ClusterSettings(k=args.k, algorithm=algorithm, sample_size=n, n_iter=args.n_iter, init=args.init,
                                   minibatch_size=args.minibatch_size, seed=args.seed, device="cpu")
        start = perf_counter()
        centroids = fit_centroids(vectors, settings)  # [k, d]
        fit_seconds = perf_counter() - start
        start = perf_counter()
        _, distances = assign(vectors, centroids, spherical=True)
        out[algorithm] = {"fit_seconds": round(fit_seconds, 2), "assign_seconds": round(perf_counter() - start, 2),
                          "inertia": float(distances.sum(dtype=np.float64))}
        print(f"  n={n} {algorithm}: {out[algorithm]}", file=sys.stderr, flush=True)
    faiss_run, sklearn_run = out["faiss_kmeans"], out["minibatch_kmeans"]
    out["time_ratio_sklearn_over_faiss"] = round(sklearn_run["fit_seconds"] / faiss_run["fit_seconds"], 2)
    out["inertia_ratio_sklearn_over_faiss"] = round(sklearn_run["inertia"] / faiss_run["inertia"], 4)
    return out


def bench_embedding(data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Documents and (truncated) tokens per second on the first documents of every pool source."""
    texts = [rec.data["text"] for path in sorted((data / "pool").glob("*.jsonl.gz"))
             for rec in islice(iter_records(path), args.embed_per_source) if rec.data is not None]
    embedder = ShardEmbedder(EmbedSettings(max_seq_length=args.max_seq_length))
    tokenizer = embedder.model.tokenizer
    tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_seq_length)["input_ids"])
    embedder(texts[:8])  # warm-up: first-call allocations are not throughput
    start = perf_counter()
    embedder(texts)
    seconds = perf_counter() - start
    return {"docs": len(texts), "max_seq_length": args.max_seq_length, "seconds": round(seconds, 2),
            "docs_per_second": round(len(texts) / seconds, 1), "tokens_per_second": round(tokens / seconds)}


def limit_threads(n: int) -> None:
    """One thread budget for every pool the benchmark touches, so neither side is favoured."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    threadpool_limits(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="pool sizes to cluster (1e5 to 1e6)")
    parser.add_argument("--dim", type=int, default=384, help="vector dimension (MiniLM: 384)")
    parser.add_argument("--k", type=int, default=1_000, help="clusters")
    parser.add_argument("--centres", type=int, default=None, help="true centres in the data (default: k)")
    parser.add_argument("--n-iter", type=int, default=10, help="iterations (MiniBatchKMeans: passes)")
    parser.add_argument("--init", choices=["k-means++", "random"], default="k-means++")
    parser.add_argument("--minibatch-size", type=int, default=4096, help="MiniBatchKMeans batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="shared data folder (embedding part)")
    parser.add_argument("--embed-per-source", type=int, default=20, help="pool documents per source to embed")
    parser.add_argument("--max-seq-length", type=int, default=256, help="embedder token cap")
    parser.add_argument("--skip-embedding", action="store_true", help="only benchmark clustering")
    parser.add_argument("--threads", type=int, default=None,
                        help="cap faiss, BLAS, OpenMP and torch threads (on a shared, loaded machine idle "
                             "threads spin-wait: 1 gives steadier figures); default: the libraries' own")
    args = parser.parse_args()
    if args.threads is not None:
        limit_threads(args.threads)

    result: dict[str, Any] = {"threads": args.threads or "library default", "clustering": [bench_clustering(n, args) for n in args.sizes]}
    if args.skip_embedding:
        result["embedding"] = "skipped (--skip-embedding)"
    elif not (args.data / "MANIFEST.json").exists():
        result["embedding"] = f"skipped: no shared data at {args.data.resolve()}"
    else:
        result["embedding"] = bench_embedding(args.data, args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
