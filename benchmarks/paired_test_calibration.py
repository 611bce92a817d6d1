"""Calibration of the paired test against Random (`quadlib.evaluation.stats.bootstrap_statistic`).

Simulates A/A comparisons (no true difference) and A/B ones (a known shift) on the design the
evaluation uses: S seeds x I items, the per-item paired difference d_{s,i} = shift + u_s + e_{s,i}
with a per-seed offset u_s ~ N(0, seed_sd) (the selection and training-order variance a seed
carries) and item noise e ~ N(0, item_sd). Reports how often p < 0.05 (the false-positive rate
under shift = 0, the power otherwise) and how often the 95% interval covers the true shift.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paired_test_calibration.py --sims 400
"""

from __future__ import annotations

import argparse

import numpy as np

from quadlib.evaluation.stats import bootstrap_statistic


def simulate(n_seeds: int, n_items: int, shift: float, seed_sd: float, item_sd: float, sims: int,
             n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    rejected = covered = 0
    for _ in range(sims):
        diffs = shift + rng.normal(0, seed_sd, (n_seeds, 1)) + rng.normal(0, item_sd, (n_seeds, n_items))  # [S, I]
        out = bootstrap_statistic(diffs, np.ones(n_items), np.zeros(n_items), n_boot=n_boot, rng=rng)
        rejected += out["p"] < 0.05
        covered += out["ci_low"] <= shift <= out["ci_high"]
    return rejected / sims, covered / sims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=400)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--items", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    item_sd = 1.0
    se = item_sd / np.sqrt(args.items)  # standard error of one seed's mean difference
    print("| seeds | seed sd / item SE | shift / item SE | p < 0.05 | 95% CI covers the shift |")
    print("|---|---|---|---|---|")
    for n_seeds in (1, 3, 5):
        for seed_ratio in (0.0, 1.0, 3.0):
            for shift_ratio in (0.0, 3.0):
                if n_seeds == 1 and seed_ratio > 0:
                    continue  # one seed cannot see seed variance: not simulated
                rate, cover = simulate(n_seeds, args.items, shift_ratio * se, seed_ratio * se, item_sd, args.sims,
                                       args.n_boot, rng)
                print(f"| {n_seeds} | {seed_ratio:g} | {shift_ratio:g} | {rate:.3f} | {cover:.3f} |", flush=True)


if __name__ == "__main__":
    main()
