"""Results over seeds: a tidy table of every metrics.json, mean ± std, and tests against Random.

Every method is trained with the same seeds, so besides Welch's unequal-variance t-test (the two
groups of seeds as independent samples) a paired t-test over matched seeds is offered: seed s fixes
the data order for every method, which removes that source of variance from the comparison.
The paper reports mean ± std over seeds with significance against Random (Tables 6 and 7).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from quadlib.evaluation.train_eval import EVAL_STEP, METRICS_FILE

COUNT_SUFFIXES = ("/n", "_n", "_tokens")  # bookkeeping, not results
LOWER_IS_BETTER_MARKERS = ("loss", "ppl")


def is_result_metric(name: str) -> bool:
    """False for counts such as `arc_easy/n` or `ref_tokens`."""
    return not name.endswith(COUNT_SUFFIXES)


def higher_is_better(name: str) -> bool:
    """Accuracies are better high; losses and perplexities low."""
    return not any(marker in name for marker in LOWER_IS_BETTER_MARKERS)


def collect_metrics(run_dir: str | Path) -> pd.DataFrame:
    """Every `<run>/eval/<method>/[scratch-]seed-<s>/metrics.json` as rows (method, seed, from_scratch,
    metric, value); compare warm-started and from-scratch runs apart (filter on `from_scratch`).

    Training figures come along as metrics `train/final_loss`, `train/seconds` and `eval/seconds`.
    """
    files = sorted(Path(run_dir).glob(f"{EVAL_STEP}/*/*seed-*/{METRICS_FILE}"))
    rows = []
    for path in files:
        record = json.loads(path.read_text(encoding="utf-8"))
        values = dict(record["metrics"])
        values |= {"train/final_loss": record["train"]["final_loss"], "train/seconds": record["train"]["seconds"],
                   "eval/seconds": record["eval_seconds"]}
        rows += [{"method": record["method"], "seed": int(record["seed"]), "from_scratch": bool(record["from_scratch"]),
                  "metric": metric, "value": float(value)} for metric, value in values.items()]
    return pd.DataFrame(rows, columns=["method", "seed", "from_scratch", "metric", "value"])


def collect_costs(run_dir: str | Path) -> pd.DataFrame:
    """Selection cost per method from `<run>/select-<method>/manifest.json`: wall time and the `cost` fields."""
    rows = []
    for path in sorted(Path(run_dir).glob("select-*/manifest.json")):
        manifest = json.loads(path.read_text(encoding="utf-8"))
        method = manifest.get("method", path.parent.name.removeprefix("select-"))
        cost = {f"cost_{k}": v for k, v in (manifest.get("cost") or {}).items()}
        rows.append({"method": method, "wall_time_s": manifest.get("wall_time_s"),
                     "tokens_selected": manifest.get("tokens_selected"), **cost})
    return pd.DataFrame(rows)


def summarize(tidy: pd.DataFrame) -> pd.DataFrame:
    """mean, std (ddof=1; NaN for a single seed) and seed count per (method, metric)."""
    grouped = tidy.groupby(["method", "metric"], sort=True)["value"]
    return grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n="count").reset_index()


def compare_to_baseline(tidy: pd.DataFrame, baseline: str = "random", metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Per (method, metric): mean difference to `baseline` (positive = better), Welch and paired-by-seed p-values.

    A test needs two seeds in each group (the paired one, two shared seeds); otherwise its p is NaN.
    """
    if baseline not in set(tidy["method"]):
        raise ValueError(f"baseline {baseline!r} has no results; methods: {sorted(set(tidy['method']))}")
    metrics = list(metrics) if metrics is not None else sorted(m for m in set(tidy["metric"]) if is_result_metric(m))
    wide = tidy.pivot_table(index=["method", "seed"], columns="metric", values="value", aggfunc="mean")
    base = wide.loc[baseline]
    rows = []
    for method in sorted(set(tidy["method"]) - {baseline}):
        other = wide.loc[method]
        for metric in metrics:
            if metric not in wide.columns:
                continue
            a, b = other[metric].dropna(), base[metric].dropna()
            sign = 1.0 if higher_is_better(metric) else -1.0
            shared = a.index.intersection(b.index)
            rows.append({
                "method": method, "metric": metric, "diff": sign * (a.mean() - b.mean()),
                "p_welch": _welch(a.to_numpy(), b.to_numpy()),
                "p_paired": _paired(a.loc[shared].to_numpy(), b.loc[shared].to_numpy()),
                "n_method": len(a), "n_baseline": len(b), "n_paired": len(shared),
            })
    return pd.DataFrame(rows)


def _welch(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    with warnings.catch_warnings():  # identical samples: scipy warns and returns NaN, which we keep
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def _paired(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_rel(a, b).pvalue)


def format_mean_std(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(tidy: pd.DataFrame, metrics: Sequence[str], baseline: str | None = "random",
                  costs: pd.DataFrame | None = None, cost_column: str = "wall_time_s", alpha: float = 0.05,
                  test: str = "p_welch", digits: int = 3, method_order: Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's comparison table (Table 6 style): one row per method, "mean ± std" per metric,
    `*` where the method differs from `baseline` at level `alpha` (Table 7's test), and a cost column."""
    summary = summarize(tidy).set_index(["method", "metric"])
    marks: dict[tuple[str, str], str] = {}
    if baseline is not None and baseline in set(tidy["method"]):
        for row in compare_to_baseline(tidy, baseline, metrics).itertuples():
            marks[(row.method, row.metric)] = "*" if getattr(row, test) < alpha else ""
    methods = list(method_order) if method_order is not None else sorted(set(tidy["method"]))
    table = pd.DataFrame(index=pd.Index(methods, name="method"))
    for metric in metrics:
        table[metric] = [format_mean_std(summary.loc[(m, metric), "mean"], summary.loc[(m, metric), "std"], digits)
                         + marks.get((m, metric), "") if (m, metric) in summary.index else "" for m in methods]
    if costs is not None and not costs.empty and cost_column in costs.columns:
        table[cost_column] = costs.set_index("method")[cost_column].reindex(methods).to_numpy()
    return table


def significance_table(tidy: pd.DataFrame, metrics: Sequence[str], baseline: str = "random",
                       test: str = "p_welch") -> pd.DataFrame:
    """p-values of each method against `baseline` (Table 7 style): rows methods, columns metrics."""
    comparison = compare_to_baseline(tidy, baseline, metrics)
    return comparison.pivot(index="method", columns="metric", values=test).reindex(columns=list(metrics))
