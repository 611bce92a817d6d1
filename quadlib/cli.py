"""Command line: `quad make-data`, `quad demo`, `quad report` (`python -m quadlib.cli ...`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from quadlib.reports import NOTEBOOKS, REPO_ROOT, run_notebooks, write_index
from quadlib.synthetic import write_default_data

DEFAULT_POOL = "data/synthetic/pool.jsonl.gz"
DEFAULT_REFERENCE = "data/synthetic/reference.jsonl.gz"


def demo_parameters(run: str, pool: str, reference: str, seed: int) -> dict[str, dict[str, Any]]:
    """Papermill parameters of the main job, per notebook (the notebooks' own defaults are tiny)."""
    common = {"RUN_DIR": run, "POOL": pool, "REFERENCE": reference, "SEED": seed}
    return {
        "01_cluster": common | {"LIMIT": None, "K": 32},
        "02_score": common,
        "03_bandit": common,
        "04_ablate": common,
        "05_evaluate": common,
    }


def _available(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if (REPO_ROOT / "notebooks" / f"{n}.ipynb").exists()]


def cmd_demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    reports = Path(args.reports)
    names = _available(NOTEBOOKS) if not args.only else args.only
    runs = run_notebooks(names, demo_parameters(args.run, args.pool, args.reference, args.seed), reports)
    index = write_index(reports, runs)
    print(f"[quad] done in {time.perf_counter() - start:.0f} s; report: {index.resolve()}")


def cmd_make_data(args: argparse.Namespace) -> None:
    pool, reference = write_default_data(Path(args.out))
    print(f"wrote {pool} and {reference}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the notebook pipeline with papermill and write reports/")
    demo.add_argument("--run", default="runs/demo", help="run folder (reused: finished steps are skipped)")
    demo.add_argument("--pool", default=DEFAULT_POOL, help="pool: file, folder, glob or hf:<dataset>")
    demo.add_argument("--reference", default=DEFAULT_REFERENCE, help="reference set, same forms as --pool")
    demo.add_argument("--reports", default="reports", help="where executed notebooks and HTML go")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--only", nargs="*", choices=NOTEBOOKS, help="run only these notebooks")
    demo.set_defaults(func=cmd_demo)

    data = sub.add_parser("make-data", help="regenerate the default synthetic data")
    data.add_argument("--out", default="data/synthetic")
    data.set_defaults(func=cmd_make_data)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
