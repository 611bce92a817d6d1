"""Mutation check: do the tests pin the behaviour the result tables rest on? (issue 14, item 6)

Each entry of `MUTANTS` changes one line of the library the way a plausible bug would (a sign, a
sort order, a sum for a mean, an off-by-one). For each, the script copies the tracked files of the
repository into a scratch folder, applies the mutant there (the working tree is never touched), runs
only the mutant's own tests, and reports the mutant

    killed    the tests failed (pytest exit status 1 or 2), as they must;
    survived  the tests passed: a behaviour no test pins;
    stale     its original text is no longer in the file (the code moved on: update the entry);
    error     no test ran (exit status 5), the tests timed out, or the unmutated copy is red.

The mutation score of a package is killed / (killed + survived) over its applicable mutants.
A new mutant is one `Mutant(...)` entry; the original text must occur exactly once in its file.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation_check.py            # every mutant
    .venv/bin/python benchmarks/mutation_check.py --only acc_norm lambada       # names containing these
    .venv/bin/python benchmarks/mutation_check.py --json reports/mutation.json  # also write the results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("quadlib/selection", "quadlib/evaluation")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file, relative to the repository root
    original: str  # exact text, present once
    mutated: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, "-k" expressions
    source: str  # where the mutant was listed


SELECTORS = "tests/test_selectors.py"
MATES = ("tests/test_mates.py",)
MUTANTS: tuple[Mutant, ...] = (
    # ---- issue 14: the selection behaviour behind the tables ----
    # Eq. 6's first term is the mean influence of the arm's pulls: a pull's reward is its batch's mean.
    Mutant("bandit reward is the batch sum, not the mean", "quadlib/selection/bandit.py",
           "float(scores[arms_sampled == arm].mean())", "float(scores[arms_sampled == arm].sum())",
           ("tests/test_bandit.py",), "issue 14"),
    Mutant("T_i counts documents, not pulls", "quadlib/selection/bandit.py",
           "self.pulls[near] += 1", "self.pulls[near] += n", ("tests/test_bandit.py",), "issue 14"),
    Mutant("PPL ranking order reversed", "quadlib/selection/methods/perplexity.py",
           "return ascending[::-1].copy()", "return ascending", ("tests/test_competitors.py",), "issue 14"),
    Mutant("PPL middle band reversed (extremes first)", "quadlib/selection/methods/perplexity.py",
           "return np.lexsort((rank, np.abs(rank - centre)))", "return np.lexsort((rank, -np.abs(rank - centre)))",
           ("tests/test_competitors.py",), "issue 16"),
    Mutant("MATES ranking order reversed", "quadlib/selection/methods/mates.py",
           "order = candidates[gumbel_order(predicted / s.temperature, rng)]",
           "order = candidates[gumbel_order(-predicted / s.temperature, rng)]", MATES, "issue 14"),
    Mutant("top-k clusters ranked lowest mean first", "quadlib/selection/methods/influence_ranking.py",
           "np.lexsort((np.arange(len(means)), -means))", "np.lexsort((np.arange(len(means)), means))",
           (SELECTORS,), "issue 14"),
    Mutant("MATES oracle sign flipped", "quadlib/selection/methods/mates.py",
           "oracle = np.array([probe.one_step_delta(", "oracle = -np.array([probe.one_step_delta(",
           MATES, "issue 14"),
    Mutant("Group-MATES relational term dropped", "quadlib/selection/methods/group_mates.py",
           "scores = individual * mean_relation if picked else individual.astype(np.float64)",
           "scores = individual.astype(np.float64)", MATES, "issue 14"),
    # ---- issue 16: the competitors' defining behaviour ----
    Mutant("top-k influence order reversed", "quadlib/selection/methods/influence_ranking.py",
           "order = rows[descending(scores[rows], ids[rows])]", "order = rows[descending(-scores[rows], ids[rows])]",
           ("tests/test_competitors.py", "-k", "topk"), "issue 16"),
    Mutant("SemDeDup epsilon ignored", "quadlib/selection/methods/semdedup.py",
           "kept = m_values <= 1.0 - epsilon + ROUNDOFF", "kept = m_values <= 0.95",
           ("tests/test_competitors.py", "-k", "semdedup"), "issue 16"),
    Mutant("QuRating Bradley-Terry direction flipped", "quadlib/selection/methods/qurating.py",
           "logits = (scores_b - scores_a)[valid]", "logits = (scores_a - scores_b)[valid]",
           ("tests/test_qurating.py", "-k", "bradley or learns"), "issue 16"),
    # ---- issue 14: the evaluation metrics ----
    Mutant("acc_norm off by one (counts the delimiter)", "quadlib/evaluation/tasks.py",
           'norm_lengths=lambda doc: [len(c) for c in doc["choices"]]',
           'norm_lengths=lambda doc: [len(c) + 1 for c in doc["choices"]]', ("tests/test_tasks.py",), "issue 14"),
    Mutant("acc_norm compared with the next option", "quadlib/evaluation/tasks.py",
           '"acc_norm": float(np.argmax(lls_arr / lengths) == gold)',
           '"acc_norm": float(np.argmax(lls_arr / lengths) == gold + 1)', ("tests/test_tasks.py",), "issue 14"),
    Mutant("LAMBADA greedy-matched on the first token only", "quadlib/evaluation/loglik.py",
           "greedy = bool((rows.argmax(dim=-1) == target).all())",
           "greedy = bool((rows.argmax(dim=-1) == target)[0])", ("tests/test_lm_metrics.py",), "issue 14"),
    Mutant("bits per byte in nats", "quadlib/evaluation/lm_metrics.py",
           '"bpb": losses.doc_nll[has_bytes] / (LN2 * n_bytes[has_bytes])',
           '"bpb": losses.doc_nll[has_bytes] / n_bytes[has_bytes]', ("tests/test_lm_metrics.py",), "stats"),
    Mutant("gold bits per byte off the gold option", "quadlib/evaluation/tasks.py",
           '"gold_bpb": float(-lls_arr[gold] / (LN2 * n_bytes))', '"gold_bpb": float(-lls_arr[0] / (LN2 * n_bytes))',
           ("tests/test_tasks.py",), "stats"),
    Mutant("Holm adjusts in descending order", "quadlib/evaluation/stats.py",
           "order = tested[np.argsort(p[tested], kind=\"stable\")]",
           "order = tested[np.argsort(-p[tested], kind=\"stable\")]", ("tests/test_stats.py",), "stats"),
    Mutant("Welch test on a zero-variance group", "quadlib/evaluation/stats.py",
           "if len(a) < 2 or len(b) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:",
           "if len(a) < 2 or len(b) < 2:", ("tests/test_stats.py",), "issue 14"),
    Mutant("paired statistic ignores item weights", "quadlib/evaluation/stats.py",
           "weights = np.asarray(weights, dtype=np.float64)  # [I]", "weights = np.ones(len(weights))  # [I]",
           ("tests/test_stats.py",), "stats"),
    Mutant("paired test ignores the seeds' spread", "quadlib/evaluation/stats.py",
           "v_seed = float(per_seed.var(ddof=1)) / n_seeds if n_seeds > 1 else 0.0", "v_seed = 0.0",
           ("tests/test_stats.py",), "stats"),
    Mutant("bits per byte treated as higher-is-better", "quadlib/evaluation/stats.py",
           'LOWER_IS_BETTER_MARKERS = ("loss", "ppl", "bpb", "heldout")',
           'LOWER_IS_BETTER_MARKERS = ("loss", "ppl", "heldout")', ("tests/test_stats.py",), "stats"),
    Mutant("held-out means treated as higher-is-better", "quadlib/evaluation/stats.py",
           'LOWER_IS_BETTER_MARKERS = ("loss", "ppl", "bpb", "heldout")',
           'LOWER_IS_BETTER_MARKERS = ("loss", "ppl", "bpb")', ("tests/test_stats.py",), "stats"),
)


def tracked_files(repo: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a clean checkout of the working tree holds."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p and (repo / p).is_file()]


def copy_repo(repo: Path, target: Path) -> None:
    for rel in tracked_files(repo):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, dest)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, float, str]:
    """pytest on `tests` inside the copy (its quadlib is imported: the cwd comes first on sys.path)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "QUAD_SHARED_DATA": os.environ.get("QUAD_SHARED_DATA", str((REPO / ".." / "shared" / "data").resolve()))}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start, "timed out"
    tail = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, time.perf_counter() - start, tail[-1] if tail else ""


def check(mutants: tuple[Mutant, ...], timeout: float, baseline: bool) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="quad-mutants-") as scratch:
        copy = Path(scratch)
        copy_repo(REPO, copy)
        green: dict[tuple[str, ...], bool] = {}
        for mutant in mutants:
            target = copy / mutant.path
            text = target.read_text(encoding="utf-8") if target.exists() else ""
            row = {**asdict(mutant), "status": "stale", "rc": None, "seconds": 0.0, "pytest": ""}
            if text.count(mutant.original) == 1:
                if baseline and mutant.tests not in green:
                    rc, _, _ = run_tests(copy, mutant.tests, timeout)
                    green[mutant.tests] = rc == 0
                if baseline and not green[mutant.tests]:
                    row |= {"status": "error", "pytest": "the unmutated tests are red"}
                else:
                    target.write_text(text.replace(mutant.original, mutant.mutated), encoding="utf-8")
                    try:
                        rc, seconds, tail = run_tests(copy, mutant.tests, timeout)
                    finally:
                        target.write_text(text, encoding="utf-8")
                    status = "killed" if rc in (1, 2) else "survived" if rc == 0 else "error"
                    row |= {"status": status, "rc": rc, "seconds": round(seconds, 1), "pytest": tail}
            results.append(row)
            print(f"{row['status']:>8}  {mutant.name}  [{mutant.path}]  {row['pytest']}", flush=True)
    return results


def scores(results: list[dict]) -> dict[str, dict[str, int | float | None]]:
    """Per package: killed, survived, not applicable (stale or error) and killed / (killed + survived)."""
    out = {}
    for package in PACKAGES:
        mine = [r for r in results if r["path"].startswith(package + "/")]
        killed = sum(r["status"] == "killed" for r in mine)
        survived = sum(r["status"] == "survived" for r in mine)
        out[package] = {"killed": killed, "survived": survived, "not_applied": len(mine) - killed - survived,
                        "score": killed / (killed + survived) if killed + survived else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="run the mutants whose name contains any of these")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    parser.add_argument("--no-baseline", action="store_true", help="skip checking the unmutated tests pass first")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    chosen = tuple(m for m in MUTANTS if args.only is None or any(s.lower() in m.name.lower() for s in args.only))
    results = check(chosen, args.timeout, baseline=not args.no_baseline)
    summary = scores(results)
    for package, s in summary.items():
        score = "n/a" if s["score"] is None else f"{s['score']:.0%}"
        print(f"{package}: {s['killed']} killed, {s['survived']} survived, {s['not_applied']} not applied "
              f"-> mutation score {score}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"mutants": results, "scores": summary}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
