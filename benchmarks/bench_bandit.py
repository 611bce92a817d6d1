"""Benchmark: the Quad bandit's own overhead at the paper's scale (10,000 arms, 10M documents).

Synthetic scores stand in for influence (a table lookup, no model), so what is timed is the
bandit itself: ranking the arms, sampling, the keep rule, the budget and the round records. Arm
means are N(0, 1), a document's score its arm's mean plus N(0, noise^2); n_tokens is log-normal
(median ~400, clipped to [16, 4096]). Prints one JSON object: setup seconds (building the state
over the pool), seconds per round (mean, median, p95), rounds to budget, documents scored,
tokens selected, clusters covered, and the process's peak resident memory.

    python benchmarks/bench_bandit.py                                  # 10,000 arms, 10M docs, defaults
    python benchmarks/bench_bandit.py --docs 1000000 --k 50 --batch-size 10
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from dataclasses import asdict
from time import perf_counter
from typing import Any

import numpy as np
import pandas as pd

from quadlib.selection.bandit import BanditSettings, run_bandit
from quadlib.selection.scoring import Cost


class ArrayScorer:
    """A DocScorer over a score array (ids are row numbers as strings); it notes the time of every
    call: the bandit scores once per round, so the gaps between calls are the rounds' durations."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores
        self.cost = Cost()
        self.calls: list[float] = []

    def score(self, ids: list[str]) -> np.ndarray:
        self.calls.append(perf_counter())
        self.cost.docs_scored += len(ids)
        return self.scores[np.fromiter(map(int, ids), dtype=np.int64, count=len(ids))]


def synthetic_pool(n_docs: int, n_arms: int, noise: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Pool (id, n_tokens), assignments (id, cluster) and per-document scores `[n_docs]`."""
    rng = np.random.default_rng(seed)
    arm = rng.integers(0, n_arms, n_docs)  # [n_docs]
    scores = rng.normal(0.0, 1.0, n_arms)[arm] + rng.normal(0.0, noise, n_docs)  # [n_docs]
    n_tokens = np.clip(rng.lognormal(np.log(400), 0.8, n_docs), 16, 4096).astype(np.int64)  # [n_docs]
    ids = pd.Series(np.arange(n_docs)).astype(str)
    return pd.DataFrame({"id": ids, "n_tokens": n_tokens}), pd.DataFrame({"id": ids, "cluster": arm}), scores


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def bench(args: argparse.Namespace) -> dict[str, Any]:
    start = perf_counter()
    pool, assignments, scores = synthetic_pool(args.docs, args.arms, args.noise, args.seed)
    generate_s = perf_counter() - start
    budget = int(args.budget_fraction * pool["n_tokens"].sum())
    settings = BanditSettings(alpha=args.alpha, k=args.k, batch_size=args.batch_size, budget_tokens=budget,
                              seed=args.seed, log_every_arm=False, max_rounds=args.max_rounds)
    memory_after_pool = peak_rss_gib()
    scorer = ArrayScorer(scores)
    start = perf_counter()
    result = run_bandit(pool, assignments, scorer, settings, progress=args.progress)
    end = perf_counter()
    rounds, reason = len(scorer.calls), result.stop_reason
    setup_s = scorer.calls[0] - start if rounds else end - start  # state over the pool, before round 0
    seconds = np.diff(np.asarray(scorer.calls + [end]))  # round r: from its scoring call to the next one
    per_round = np.asarray(seconds)
    covered = int(assignments.set_index("id").loc[result.ids, "cluster"].nunique()) if result.ids else 0
    return {
        "arms": args.arms, "documents": args.docs, "settings": {k: v for k, v in asdict(settings).items()
                                                                 if k in ("alpha", "tau", "gamma", "k", "batch_size",
                                                                          "units", "cold_start", "budget_tokens")},
        "generate_s": round(generate_s, 2), "setup_s": round(setup_s, 2), "rounds": rounds, "stop_reason": reason,
        "round_ms_mean": round(1e3 * per_round.mean(), 3), "round_ms_median": round(1e3 * np.median(per_round), 3),
        "round_ms_p95": round(1e3 * np.quantile(per_round, 0.95), 3), "run_s_total": round(end - start, 2),
        "docs_scored": scorer.cost.docs_scored, "docs_selected": len(result.ids),
        "tokens_selected": result.tokens_selected, "clusters_covered": covered,
        "peak_rss_gib_after_pool": round(memory_after_pool, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", type=int, default=10_000)
    parser.add_argument("--docs", type=int, default=10_000_000)
    parser.add_argument("--budget-fraction", type=float, default=0.001, help="of the pool's tokens")
    parser.add_argument("--alpha", type=float, default=BanditSettings.alpha)
    parser.add_argument("--k", type=int, default=BanditSettings.k)
    parser.add_argument("--batch-size", type=int, default=BanditSettings.batch_size)
    parser.add_argument("--noise", type=float, default=2.0, help="std of a document's score around its arm's mean")
    parser.add_argument("--max-rounds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="a progress bar over rounds (stderr)")
    print(json.dumps(bench(parser.parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
