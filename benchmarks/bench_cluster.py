"""Benchmark: faiss k-means against scikit-learn MiniBatchKMeans at equal quality, on the same vectors.

Every run is fitted on the same clustered random unit vectors with the same k, and every inertia is
measured by the same `quadlib.cluster.assign` (summed cosine distance to the nearest centroid), so the
ratios compare the algorithms, not their bookkeeping. Rows, in one run:
  - scikit-learn MiniBatchKMeans at --n-iter passes (greedy k-means++ seeding on 3 x batch points): the reference;
  - faiss as `quadlib.cluster` runs it (its own k-means++ seeding, then Lloyd) at --n-iter, at 4x as many
    iterations and with 3 restarts: what more work buys;
  - faiss seeded like MiniBatchKMeans (scikit-learn's greedy `kmeans_plusplus` on a subsample of
    3 x batch points, then faiss's Lloyd iterations): what a better seeding buys.
"time to equal inertia" is the CPU time of the cheapest faiss row whose inertia is at most MiniBatchKMeans's.
Times are process CPU seconds (all threads; steadier than wall time on a shared machine) and wall seconds.
Prints a markdown table per size and one JSON object. Embedding throughput: benchmarks/bench_embed.py.

    nice -n 19 python benchmarks/bench_cluster.py --threads 1                 # 2e4 x 384, k = 200
    python benchmarks/bench_cluster.py --sizes 100000 --k 1000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from time import perf_counter, process_time
from typing import Any

import faiss
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from quadlib.cluster import ClusterSettings, assign, fit_centroids  # noqa: E402


def clustered_vectors(n: int, dim: int, n_centres: int, seed: int, spread: float = 0.6) -> np.ndarray:
    """Unit vectors `[n, dim]` scattered around `n_centres` random directions (embedding-like)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)  # [c, d]
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_centres, n)]  # [n, d]
    x += (spread / np.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed_fit(fit: Callable[[], np.ndarray], vectors: np.ndarray) -> dict[str, Any]:
    """CPU and wall seconds of one centroid fit, and the inertia its (unit) centroids leave on `vectors`."""
    wall, cpu = perf_counter(), process_time()
    centroids = np.asarray(fit(), dtype=np.float32)  # [k, d]
    out = {"fit_cpu_seconds": process_time() - cpu, "fit_seconds": perf_counter() - wall}
    _, distances = assign(vectors, centroids / np.linalg.norm(centroids, axis=1, keepdims=True), spherical=True)
    out["inertia"] = float(distances.sum(dtype=np.float64))
    return out


def faiss_from_greedy_seeds(vectors: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """scikit-learn's greedy k-means++ on a seeded subsample of max(3 x batch, 3k) points (MiniBatchKMeans's
    seeding), then faiss's spherical Lloyd iterations from those seeds."""
    from sklearn.cluster import kmeans_plusplus

    n, d = vectors.shape
    m = min(n, max(3 * args.minibatch_size, 3 * args.k))
    rows = np.sort(np.random.default_rng(args.seed).choice(n, m, replace=False))
    seeds, _ = kmeans_plusplus(vectors[rows], args.k, random_state=args.seed)  # [k, d]
    kmeans = faiss.Kmeans(d, args.k, niter=args.n_iter, seed=args.seed, spherical=True, verbose=False,
                          max_points_per_centroid=max(256, math.ceil(n / args.k)), min_points_per_centroid=1)
    kmeans.train(vectors, init_centroids=np.ascontiguousarray(seeds, dtype=np.float32))
    return kmeans.centroids  # [k, d]


def bench_clustering(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every row on one set of vectors; ratios against MiniBatchKMeans at --n-iter."""
    vectors = clustered_vectors(n, args.dim, args.centres or args.k, args.seed)

    def settings(algorithm: str, n_iter: int, n_init: int = 1) -> ClusterSettings:
        return ClusterSettings(k=args.k, algorithm=algorithm, sample_size=n, n_iter=n_iter, n_init=n_init,
                               init="k-means++", minibatch_size=args.minibatch_size, seed=args.seed, device="cpu")

    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, fit: Callable[[], np.ndarray]) -> None:
        rows[name] = timed_fit(fit, vectors)
        print(f"  n={n} {name}: {rows[name]}", file=sys.stderr, flush=True)

    reference = f"scikit-learn MiniBatchKMeans, {args.n_iter} passes"
    row(reference, lambda: fit_centroids(vectors, settings("minibatch_kmeans", args.n_iter)))
    for n_iter, n_init in ((args.n_iter, 1), (4 * args.n_iter, 1), (args.n_iter, 3)):
        row(f"faiss (quadlib: faiss's k-means++), {n_iter} iterations" + (f", {n_init} restarts" if n_init > 1 else ""),
            lambda n_iter=n_iter, n_init=n_init: fit_centroids(vectors, settings("faiss_kmeans", n_iter, n_init)))
    row(f"faiss from greedy k-means++ seeds (as MiniBatchKMeans seeds), {args.n_iter} iterations",
        lambda: faiss_from_greedy_seeds(vectors, args))
    base = rows[reference]
    print(f"\n{n} clustered unit vectors x {args.dim}, k = {args.k} ({args.centres or args.k} true centres), "
          f"{args.threads or 'library default'} thread(s); against MiniBatchKMeans: inertia ratio <= 1 is at "
          "least as good, CPU speed-up > 1 is faster\n")
    print("| method | fit CPU s | fit wall s | inertia | inertia / MiniBatchKMeans | CPU speed-up vs MiniBatchKMeans |")
    print("|---|---|---|---|---|---|")
    for name, result in rows.items():
        result["inertia_ratio"] = result["inertia"] / base["inertia"]
        result["cpu_speedup"] = base["fit_cpu_seconds"] / result["fit_cpu_seconds"]
        print(f"| {name} | {result['fit_cpu_seconds']:.2f} | {result['fit_seconds']:.2f} | {result['inertia']:.1f} | "
              f"{result['inertia_ratio']:.4f} | {result['cpu_speedup']:.2f} |")
    equal = sorted((r["fit_cpu_seconds"], name) for name, r in rows.items()
                   if name != reference and r["inertia"] <= base["inertia"])
    first = equal[0][1] if equal else None
    print("\ntime to MiniBatchKMeans's inertia: " + (
        f"{first}: {rows[first]['fit_cpu_seconds']:.2f} s CPU against {base['fit_cpu_seconds']:.2f} s" if first
        else "no faiss row reached it"), flush=True)
    return {"n": n, "dim": args.dim, "k": args.k, "rows": rows, "cheapest_at_equal_inertia": first}


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
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000], help="pool sizes to cluster")
    parser.add_argument("--dim", type=int, default=384, help="vector dimension (MiniLM: 384)")
    parser.add_argument("--k", type=int, default=200, help="clusters")
    parser.add_argument("--centres", type=int, default=None, help="true centres in the data (default: k)")
    parser.add_argument("--n-iter", type=int, default=10, help="iterations (MiniBatchKMeans: passes)")
    parser.add_argument("--minibatch-size", type=int, default=4096, help="MiniBatchKMeans batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="cap faiss, BLAS, OpenMP and torch threads (on a shared, loaded machine idle "
                             "threads spin-wait: 1 gives steadier figures); default: the libraries' own")
    args = parser.parse_args()
    if args.threads is not None:
        limit_threads(args.threads)

    result = {"threads": args.threads or "library default", "clustering": [bench_clustering(n, args) for n in args.sizes]}
    print(json.dumps(result, indent=2))

if __name__ == "__main__":
    main()
