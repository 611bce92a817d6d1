"""Results over seeds: a tidy table of every metrics.json, mean ± std, and tests against Random.

Two levels of comparison with a baseline (Random):

- per seed (`compare_to_baseline`): Welch's t-test (the seeds as two independent samples) and a
  paired t-test over matched seeds. With 2-3 seeds these have little power, and a group whose seeds
  all agree has zero variance: no test is made there (p is NaN; scipy would report p ~ 1e-30).
- per item (`paired_differences`, the verdict's test): every model is scored on the same items
  (`quadlib.evaluation.items`), so method and baseline are compared by their PAIRED differences
  d_{s,i} = m_{s,i} - b_{s,i} over items i and shared seeds s. The statistic is the metric's own
  aggregate of the differences (a weighted mean per task, averaged over the tasks of a composite
  such as `heldout_mean`, then over seeds), so it equals the difference of the reported metrics.
  Its standard error adds an item part (a bootstrap over items, resampled within each task) and
  a seed part (the spread of the per-seed statistics), its interval and p-value use Student's t
  with Satterthwaite's degrees of freedom (`bootstrap_statistic`), and the p-values of all
  comparisons in a table are adjusted together by Holm's step-down method (family-wise error
  <= alpha). A difference with no bootstrap spread (e.g. two
  identical models) gets no test.

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

from quadlib.evaluation.items import ITEM_COLUMNS, ITEMS_FILE, UNTRAINED
from quadlib.evaluation.train_eval import EVAL_STEP, METRICS_FILE

COUNT_SUFFIXES = ("/n", "_n", "_tokens")  # bookkeeping, not results
LOWER_IS_BETTER_MARKERS = ("loss", "ppl", "bpb", "heldout")  # every held-out metric is a loss


def is_result_metric(name: str) -> bool:
    """False for counts such as `arc_easy/n` or `ref_tokens`."""
    return not name.endswith(COUNT_SUFFIXES)


def higher_is_better(name: str) -> bool:
    """Accuracies and log-probabilities are better high; losses, perplexities and bits per byte low."""
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
    """Selection cost per method from `<run>/select-<method>/manifest.json`: the standalone `cost_*` fields
    (what the method's scoring costs on its own), the `computed_*` fields (what ran, cache misses only)
    and the wall time of that run."""
    rows = []
    for path in sorted(Path(run_dir).glob("select-*/manifest.json")):
        manifest = json.loads(path.read_text(encoding="utf-8"))
        method = manifest.get("method", path.parent.name.removeprefix("select-"))
        cost = {f"cost_{k}": v for k, v in (manifest.get("cost") or {}).items()}  # standalone (quadlib.cost)
        cost |= {f"computed_{k}": v for k, v in (manifest.get("computed_cost") or {}).items()}  # ran in wall_time_s
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
    """Welch's p; NaN with fewer than two values or zero variance in either group (no test there)."""
    if len(a) < 2 or len(b) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():  # identical samples: scipy warns and returns NaN, which we keep
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def _paired(a: np.ndarray, b: np.ndarray) -> float:
    """Paired t-test p; NaN with fewer than two pairs or differences of zero variance."""
    if len(a) < 2 or np.ptp(a - b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_rel(a, b).pvalue)


def format_mean_std(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(tidy: pd.DataFrame, metrics: Sequence[str], baseline: str | None = "random",
                  costs: pd.DataFrame | None = None, cost_column: str = "wall_time_s", alpha: float = 0.05,
                  test: str = "p_welch", digits: int = 3, method_order: Sequence[str] | None = None,
                  paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's comparison table (Table 6 style): one row per method, "mean ± std" per metric,
    `*` where the method differs from `baseline`, and a cost column.

    The star comes from `paired` (a `paired_differences` table: its Holm-adjusted item-level test)
    when given, else from the per-seed `test` of `compare_to_baseline`, Holm-adjusted over the
    table's comparisons; a comparison without a test (NaN p) never gets one."""
    summary = summarize(tidy).set_index(["method", "metric"])
    marks: dict[tuple[str, str], str] = {}
    if paired is not None:
        for row in paired.itertuples():
            marks[(row.method, row.metric)] = "*" if row.p_holm < alpha else ""
    elif baseline is not None and baseline in set(tidy["method"]):
        comparison = compare_to_baseline(tidy, baseline, metrics)
        adjusted = holm(comparison[test].to_numpy()) if len(comparison) else np.array([])
        for row, p in zip(comparison.itertuples(), adjusted):
            marks[(row.method, row.metric)] = "*" if p < alpha else ""
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


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order; NaN (no test) stays NaN
    and does not count among the m comparisons.

    With p_(1) <= ... <= p_(m) sorted: p~_(j) = max_{k <= j} min(1, (m - k + 1) p_(k)); rejecting
    p~ < alpha keeps the family-wise error rate <= alpha.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]  # ascending p
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])  # (m - k + 1) p_(k), k = 1..m
    out[order] = np.maximum.accumulate(scaled)
    return out


# ---- per-item paired comparison ------------------------------------------------------------------

ITEM_KEY = ["method", "seed", "from_scratch"]


def collect_items(run_dir: str | Path) -> pd.DataFrame:
    """Every `<run>/eval/<method>/[scratch-]seed-<s>/items.parquet` with the method, seed and
    from_scratch of its metrics.json: columns method, seed, from_scratch, task, item, metric, value, weight."""
    frames = []
    for path in sorted(Path(run_dir).glob(f"{EVAL_STEP}/*/*seed-*/{ITEMS_FILE}")):
        record_file = path.parent / METRICS_FILE
        if not record_file.exists():
            continue  # an interrupted run: its metrics were never written
        record = json.loads(record_file.read_text(encoding="utf-8"))
        frame = pd.read_parquet(path)
        frames.append(frame.assign(method=record["method"], seed=int(record["seed"]),
                                   from_scratch=bool(record["from_scratch"])))
    columns = ITEM_KEY + list(ITEM_COLUMNS)
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


NON_TASK_PREFIXES = ("reference", "lambada", "heldout/")


def metric_items(items: pd.DataFrame, name: str) -> pd.DataFrame:
    """The item rows behind a reported metric, with a `group` column: the metric is the mean over
    groups of each group's weighted mean (one group unless it is a mean over domains or tasks).

    ref_loss / ref_bpb -> task "reference"; lambada_acc / lambada_logprob -> task "lambada";
    heldout/<s> and heldout_bpb/<s> -> task "heldout/<s>" (loss, bpb); heldout_mean, heldout_bpb_mean
    -> every held-out domain; tasks/<m>_mean -> metric <m> of every task; <task>/<m> -> that task.
    """
    task, metric = items["task"], items["metric"]
    heldout = task.str.startswith("heldout/")
    is_task = ~task.str.startswith(NON_TASK_PREFIXES)
    rules = {"ref_loss": (task == "reference") & (metric == "loss"),
             "ref_bpb": (task == "reference") & (metric == "bpb"),
             "lambada_acc": (task == "lambada") & (metric == "acc"),
             "lambada_logprob": (task == "lambada") & (metric == "target_logprob"),
             "heldout_mean": heldout & (metric == "loss"), "heldout_bpb_mean": heldout & (metric == "bpb")}
    if name in rules:
        mask = rules[name]
    elif name.startswith("heldout/"):
        mask = (task == name) & (metric == "loss")
    elif name.startswith("heldout_bpb/"):
        mask = (task == "heldout/" + name.removeprefix("heldout_bpb/")) & (metric == "bpb")
    elif name.startswith("tasks/") and name.endswith("_mean"):
        mask = is_task & (metric == name.removeprefix("tasks/").removesuffix("_mean"))
    elif "/" in name:
        group, _, item_metric = name.rpartition("/")
        mask = (task == group) & (metric == item_metric)
    else:
        raise KeyError(f"metric {name!r} has no per-item definition (see metric_items)")
    return items[mask].assign(group=lambda f: f["task"])


def _counts(group_sizes: Sequence[int], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[B, I] resampling counts: each group's items drawn with replacement, group sizes kept."""
    return np.concatenate([rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) for n in group_sizes], axis=1)


def _group_stat(counts: np.ndarray, values: np.ndarray, weights: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Mean over groups of weighted means: counts [B, I], values [S, I], weights [I] -> [B, S]."""
    numer = np.add.reduceat((counts * weights)[:, None, :] * values[None, :, :], starts, axis=2)  # [B, S, G]
    denom = np.add.reduceat(counts * weights, starts, axis=1)[:, None, :]  # [B, 1, G]
    return (numer / denom).mean(axis=2)


def bootstrap_statistic(values: np.ndarray, weights: np.ndarray, groups: np.ndarray, *, n_boot: int = 2000,
                        level: float = 0.95, rng: np.random.Generator | None = None) -> dict[str, float]:
    """Estimate, interval and two-sided p (H0: statistic = 0) of
    T = mean_s T_s, T_s = mean_g (sum_{i in g} w_i v_{s,i} / sum_{i in g} w_i), for values [S, I]
    (seeds x items, crossed: every seed scores the same items).

    Var(T) has an item part and a seed part. The item part V_item is the variance of T over
    `n_boot` bootstrap resamples of the items (within each group, the same resample for every
    seed); the seed part is V_seed = var_s(T_s) / S (ddof 1; 0 for one seed). se = sqrt(V_item +
    V_seed) (slightly conservative: the seed x item noise is counted in both parts), with
    Satterthwaite's degrees of freedom df = se^4 / (V_seed^2 / (S - 1) + V_item^2 / (I - 1)), so a
    few seeds that disagree widen the interval as a t-test over seeds would. Interval
    T -/+ t_df se; p = 2 P(t_df > |T| / se). NaN p (no test) when se is 0: nothing varies.
    `benchmarks/paired_test_calibration.py` measures the false-positive rate and coverage.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))  # [S, I]
    weights = np.asarray(weights, dtype=np.float64)  # [I]
    groups = np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    values, weights, groups = values[:, order], weights[order], groups[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])  # first index of each group
    sizes = np.diff(np.r_[starts, len(groups)])
    n_seeds, n_items = values.shape
    per_seed = _group_stat(np.ones((1, n_items)), values, weights, starts)[0]  # [S]: T_s
    estimate = float(per_seed.mean())
    replicates = _group_stat(_counts(sizes, n_boot, rng), values, weights, starts).mean(axis=1)  # [B]
    v_item = float(replicates.var(ddof=1)) if n_boot > 1 else 0.0
    v_seed = float(per_seed.var(ddof=1)) / n_seeds if n_seeds > 1 else 0.0
    se = float(np.sqrt(v_item + v_seed))
    if se <= 1e-12 * max(1.0, abs(estimate)):
        return {"estimate": estimate, "ci_low": estimate, "ci_high": estimate, "se": 0.0, "df": float("nan"),
                "p": float("nan")}
    denominator = (v_seed ** 2 / (n_seeds - 1) if n_seeds > 1 else 0.0) + v_item ** 2 / max(n_items - 1, 1)
    df = float(se ** 4 / denominator)
    half = float(sps.t.ppf((1 + level) / 2, df)) * se
    return {"estimate": estimate, "ci_low": estimate - half, "ci_high": estimate + half, "se": se, "df": df,
            "p": float(2 * sps.t.sf(abs(estimate) / se, df))}


def _matrix(rows: pd.DataFrame, seeds: Sequence[int]) -> tuple[np.ndarray, pd.DataFrame]:
    """values [S, I] over (group, item) keys present for every seed, and the keys with weight and group."""
    wide = rows.pivot_table(index=["group", "item"], columns="seed", values="value", aggfunc="first")
    wide = wide.reindex(columns=list(seeds)).dropna()
    keys = rows.drop_duplicates(["group", "item"]).set_index(["group", "item"]).loc[wide.index, ["weight"]]
    return wide.to_numpy().T, keys.reset_index()


def paired_differences(items: pd.DataFrame, baseline: str = "random", metrics: Sequence[str] | None = None,
                       *, n_boot: int = 2000, level: float = 0.95, alpha: float = 0.05,
                       seed: int = 0) -> pd.DataFrame:
    """Each method against `baseline` by paired differences over items and shared seeds (module doc).

    Returns one row per (method, metric): `diff` = metric(method) - metric(baseline) in the metric's
    units with its 95% interval [ci_low, ci_high] (`bootstrap_statistic`), `gain` = diff oriented so that positive is
    better, p, Holm-adjusted p over every row (`p_holm`), `significant` (p_holm < alpha), and the
    numbers of paired items and seeds. Items are matched by (task, item) and seeds by number.
    """
    if items.empty:
        raise ValueError("no per-item results: run the evaluation (it writes items.parquet beside metrics.json)")
    if baseline not in set(items["method"]):
        raise ValueError(f"baseline {baseline!r} has no per-item results; methods: {sorted(set(items['method']))}")
    names = list(metrics) if metrics is not None else default_item_metrics(items)
    rng = np.random.default_rng(seed)
    rows = []
    for name in names:
        part = metric_items(items, name)
        if part.empty:
            continue
        base = part[part["method"] == baseline]
        for method in sorted(set(part["method"]) - {baseline}):
            mine = part[part["method"] == method]
            seeds = sorted(set(mine["seed"]) & set(base["seed"]))
            if not seeds:
                continue
            merged = mine.merge(base[["seed", "group", "item", "value"]], on=["seed", "group", "item"],
                                suffixes=("", "_base"))
            merged = merged.assign(value=merged["value"] - merged["value_base"])  # d_{s,i}
            diffs, keys = _matrix(merged, seeds)
            if diffs.shape[1] == 0:
                continue
            result = bootstrap_statistic(diffs, keys["weight"].to_numpy(), keys["group"].to_numpy(),
                                         n_boot=n_boot, level=level, rng=rng)
            sign = 1.0 if higher_is_better(name) else -1.0
            rows.append({"method": method, "metric": name, "diff": result["estimate"], "ci_low": result["ci_low"],
                         "ci_high": result["ci_high"], "gain": sign * result["estimate"], "p": result["p"],
                         "n_items": diffs.shape[1], "n_seeds": len(seeds)})
    table = pd.DataFrame(rows, columns=["method", "metric", "diff", "ci_low", "ci_high", "gain", "p", "n_items",
                                        "n_seeds"])
    table["p_holm"] = holm(table["p"].to_numpy())
    table["significant"] = table["p_holm"] < alpha
    return table


def metric_intervals(items: pd.DataFrame, metrics: Sequence[str], *, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> pd.DataFrame:
    """Each method's own value of each metric (mean over its seeds) with the interval of
    `bootstrap_statistic`: columns method, metric, value, ci_low, ci_high, n_items, n_seeds."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in metrics:
        part = metric_items(items, name)
        for method in sorted(set(part["method"])):
            mine = part[part["method"] == method]
            values, keys = _matrix(mine, sorted(set(mine["seed"])))
            if values.shape[1] == 0:
                continue
            result = bootstrap_statistic(values, keys["weight"].to_numpy(), keys["group"].to_numpy(),
                                         n_boot=n_boot, level=level, rng=rng)
            rows.append({"method": method, "metric": name, "value": result["estimate"], "ci_low": result["ci_low"],
                         "ci_high": result["ci_high"], "n_items": values.shape[1], "n_seeds": values.shape[0]})
    return pd.DataFrame(rows, columns=["method", "metric", "value", "ci_low", "ci_high", "n_items", "n_seeds"])


def default_item_metrics(items: pd.DataFrame) -> list[str]:
    """The headline metrics the items support: reference loss, LAMBADA, held-out means, the means
    over tasks, and each task's gold bits per byte (per-task accuracy, at chance for a small proxy,
    would add many tests and little signal to the Holm family)."""
    tasks = sorted(t for t in set(items["task"]) if not t.startswith(NON_TASK_PREFIXES))
    present = set(zip(items["task"], items["metric"]))
    names = [n for n, (t, m) in {"ref_loss": ("reference", "loss"), "lambada_acc": ("lambada", "acc"),
                                  "lambada_logprob": ("lambada", "target_logprob")}.items() if (t, m) in present]
    if any(t.startswith("heldout/") for t in set(items["task"])):
        names += ["heldout_mean", "heldout_bpb_mean"]
    if tasks:
        names += ["tasks/acc_mean", "tasks/gold_bpb_mean"]
    return names + [f"{t}/gold_bpb" for t in tasks if (t, "gold_bpb") in present]


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for the rows not dominated when both `x` and `y` are better low: no other row is <= in
    both and < in one."""
    xs, ys = points[x].to_numpy(dtype=np.float64), points[y].to_numpy(dtype=np.float64)
    dominated = [bool(np.any((xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i])))) for i in range(len(xs))]
    return pd.Series(~np.array(dominated, dtype=bool), index=points.index, name="pareto")


def verdict_sentences(levels: pd.DataFrame, paired: pd.DataFrame, x: str = "heldout_bpb_mean",
                      y: str = "ref_loss", baseline: str = "random", order: Sequence[str] | None = None) -> list[str]:
    """Two or three sentences generated from the numbers: which methods are on the Pareto front of
    (x, y) (both lower-is-better, `metric_intervals` values), which differ from `baseline` on some
    metric of `paired` after Holm's correction (and in which direction), and which are
    indistinguishable from it on every metric tested."""
    wide = levels.pivot_table(index="method", columns="metric", values="value", aggfunc="first")
    methods = list(order) if order is not None else sorted(wide.index)
    sentences = []
    if {x, y} <= set(wide.columns):
        points = wide.loc[[m for m in methods if m in wide.index], [x, y]].dropna()
        front = [m for m, on in pareto_front(points, x, y).items() if on]
        sentences.append(f"On {y} against {x} (lower is better on both), the Pareto front is "
                         f"{_names(front)}: no other method is at least as good on both.")
    tested = paired[paired["method"].isin(methods)]
    better, worse, neutral = [], [], []
    for method in [m for m in methods if m in set(tested["method"])]:
        rows = tested[(tested["method"] == method) & tested["significant"]]
        wins = [f"{r.metric} ({_signed(r.diff)}, 95% CI [{r.ci_low:.3g}, {r.ci_high:.3g}])"
                for r in rows.itertuples() if r.gain > 0]
        losses = [r.metric for r in rows.itertuples() if r.gain < 0]
        if wins:
            better.append(f"{method} on {_first(wins, SHOWN)}")
        if losses:
            worse.append(f"{method} on {_first(losses, SHOWN)}")
        if not wins and not losses:
            neutral.append(method)
    n_tests = int(tested["p"].notna().sum())
    if better or worse:
        parts = ([f"better than {baseline}: " + "; ".join(better)] if better else []) + \
                (["worse: " + "; ".join(worse)] if worse else [])
        sentences.append(f"After Holm's correction over {n_tests} paired tests, " + "; ".join(parts) + ".")
    if neutral:
        sentences.append(f"{_names(neutral)} {'is' if len(neutral) == 1 else 'are'} indistinguishable from "
                         f"{baseline} on every metric tested ({n_tests} paired tests, Holm-adjusted p >= 0.05).")
    return sentences


SHOWN = 3  # metrics named per method in a verdict sentence; the rest are counted


def _first(parts: Sequence[str], n: int) -> str:
    return ", ".join(parts[:n]) + (f" and {len(parts) - n} more" if len(parts) > n else "")


def _names(names: Sequence[str]) -> str:
    names = list(names)
    if not names:
        return "empty"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _signed(value: float) -> str:
    return f"{value:+.3g}"


# ---- the comparison over seeds, as the README prints it ------------------------------------------

SEED_TABLE_METRICS = ("ref_loss", "heldout_bpb_mean")


def metric_unit(name: str) -> str:
    """The unit a metric is reported in: bits per byte, nats (losses, log-probabilities), else none."""
    return "bits/byte" if "bpb" in name else "nats" if ("loss" in name or "logprob" in name or "heldout" in name) else ""


def _paired_to_every_seed(items: pd.DataFrame, method: str, seeds: Sequence[int]) -> pd.DataFrame:
    """`items` with `method`'s rows copied to the seeds it lacks, from its lowest seed: for a model
    that does not depend on the seed (the untrained one), so it pairs with every seed of the others."""
    own = items[items["method"] == method]
    if own.empty:
        return items
    source = own[own["seed"] == own["seed"].min()]
    missing = [s for s in seeds if s not in set(own["seed"])]
    return pd.concat([items] + [source.assign(seed=s) for s in missing], ignore_index=True)


def seed_table(items: pd.DataFrame, tidy: pd.DataFrame, costs: pd.DataFrame | None = None,
               metrics: Sequence[str] = SEED_TABLE_METRICS, baseline: str = "random",
               reference: str | None = UNTRAINED, order: Sequence[str] | None = None,
               alpha: float = 0.05) -> pd.DataFrame:
    """Every method over its seeds, as text: per metric its mean ± sd over seeds (`tidy`, the column
    named with the metric's unit), its paired
    difference from the `reference` model (the untrained one) and from `baseline` (Random) with the
    95% interval of `paired_differences` and `*` where the Holm-adjusted p < alpha (Holm over the
    table's comparisons with that model: methods x metrics), then the selection's standalone cost
    (`costs`: documents scored, FLOPs) and its wall seconds.

    The reference model does not depend on the seed: where it was evaluated at fewer seeds than the
    methods, its items pair with every seed (`_paired_to_every_seed`)."""
    methods = list(order) if order is not None else sorted(set(tidy["method"]))
    seeds = sorted(set(items["seed"]))
    summary = summarize(tidy[tidy["metric"].isin(metrics)]).set_index(["method", "metric"])
    against = {}
    for other in [m for m in (reference, baseline) if m is not None and m in set(items["method"])]:
        # the reference pairs with every seed; Random's family of tests leaves the reference out
        compared = (_paired_to_every_seed(items, other, seeds) if other == reference
                    else items[items["method"] != reference])
        against[other] = paired_differences(compared, other, list(metrics), alpha=alpha).set_index(["method", "metric"])
    cost = costs.set_index("method") if costs is not None and not costs.empty else pd.DataFrame()
    rows = []
    for method in methods:
        row = {"method": method}
        for metric in metrics:
            digits = 4 if "bpb" in metric else 3
            label = f"{metric} ({metric_unit(metric)})" if metric_unit(metric) else metric
            if (method, metric) in summary.index:
                entry = summary.loc[(method, metric)]
                row[label] = format_mean_std(entry["mean"], entry["std"], digits)
            else:
                row[label] = "—"
            for other, table in against.items():
                if (method, metric) in table.index:
                    r = table.loc[(method, metric)]
                    row[f"{metric} vs {other}"] = (f"{r['diff']:+.{digits}f} [{r['ci_low']:+.{digits}f}, "
                                                   f"{r['ci_high']:+.{digits}f}]" + ("*" if r["significant"] else ""))
                else:
                    row[f"{metric} vs {other}"] = "—"
        for column, label in (("cost_docs_scored", "docs scored"), ("cost_flops", "selection FLOPs"),
                              ("wall_time_s", "selection (s)")):
            value = cost.loc[method, column] if method in cost.index and column in cost.columns else None
            row[label] = ("—" if value is None or pd.isna(value) else
                          f"{value:.1e}" if column == "cost_flops" and value else f"{value:,.0f}")
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def markdown_table(table: pd.DataFrame) -> str:
    """A table of text as GitHub markdown, its index as the first column."""
    header = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(index)] + [str(v) for v in values]) + " |"
              for index, values in zip(table.index, table.to_numpy())]
    return "\n".join(lines)
