"""Command line: `quad make-data | ingest | scale | select | evaluate | demo | report` (`python -m quadlib.cli ...`).

Building the parser imports no torch, numpy or pandas (`quad --help` answers at once): each command
imports what it needs when it runs, and `quad scale`, `quad select` and `quad evaluate` build their
options (generated from the settings dataclasses, `quadlib.settings.add_options`) when they are called.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quadlib.reports import NOTEBOOKS, REPO_ROOT, build_report, parse_overrides, run_notebooks

DEFAULT_POOL = "data/synthetic/pool.jsonl.gz"
DEFAULT_REFERENCE = "data/synthetic/reference.jsonl.gz"
SCALE_HELP = "run per-shard steps on the local or the Ray executor (docs/scale.md)"
SELECT_HELP = "make every method's selection and export from an ingested run, on the local or the Ray executor"
SELECT_DETAILS = ("Whatever the run lacks is made first: embeddings and clusters (as `quad scale --steps embed "
                  "assign`), the warmed-up proxy, the influence scorer. Writes what notebook 03 writes: "
                  "<run>/select-<method>/ and its export.")
EVALUATE_HELP = ("train a model on every selection of a run, for each seed, and evaluate it "
                 "(notebook 05's training and measurements)")


def demo_parameters(run: str, pool: str, reference: str, seed: int, *, eval_dir: str | None = None,
                    lambada: bool = False, ablations: bool = True, budget_fraction: float | None = None,
                    seeds: Sequence[int] | None = None, task_limit: int | None = None,
                    train_tokens: int | None = None) -> dict[str, dict[str, Any]]:
    """Papermill parameters of `quad demo`, per notebook: the run folder, the data, the seed and the
    options given on the command line (None: not given). Every other setting is the notebook's own
    default: the parameters cells hold the demo's settings (quadlib.reports.notebook_profile)."""
    common = {"RUN_DIR": run, "SEED": seed}
    options = {"BUDGET_FRACTION": budget_fraction, "SEEDS": None if seeds is None else list(seeds),
               "TASK_LIMIT": task_limit, "TRAIN_TOKENS": train_tokens, "EVAL_DIR": eval_dir,
               "LAMBADA": True if lambada else None, "ABLATIONS": None if ablations else []}
    given = {name: value for name, value in options.items() if value is not None}

    def only(*names: str) -> dict[str, Any]:
        return {name: given[name] for name in names if name in given}

    return {
        "01_cluster": common | {"POOL": pool, "REFERENCE": reference},
        "02_score": common,
        "03_bandit": common | only("BUDGET_FRACTION"),
        "04_ablate": common | {"RESULT_DIR": f"{run}-ablate/single"} | only("BUDGET_FRACTION", "TRAIN_TOKENS"),
        "05_evaluate": common | {"ABLATE_DIR": f"{run}-ablate"}
        | only("SEEDS", "TRAIN_TOKENS", "TASK_LIMIT", "EVAL_DIR", "LAMBADA", "ABLATIONS"),
    }


def _available(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if (REPO_ROOT / "notebooks" / f"{n}.ipynb").exists()]


def cmd_demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    reports = Path(args.reports)
    names = _available(NOTEBOOKS) if not args.only else args.only
    parameters = demo_parameters(args.run, args.pool, args.reference, args.seed, eval_dir=args.eval_dir,
                                 lambada=args.lambada, ablations=not args.no_ablations,
                                 budget_fraction=args.budget_fraction, seeds=args.seeds,
                                 task_limit=args.task_limit, train_tokens=args.train_tokens)
    for name, values in parse_overrides(args.set, NOTEBOOKS).items():
        parameters[name] = parameters.get(name, {}) | values
    run_notebooks(names, parameters, reports)
    report = build_report(reports)
    print(f"[quad] done in {time.perf_counter() - start:.0f} s; report: {report.resolve()}")


def cmd_report(args: argparse.Namespace) -> None:
    report = build_report(Path(args.reports))
    print(f"[quad] report: {report.resolve()}")


def cmd_profile(args: argparse.Namespace) -> None:
    from quadlib.profile import format_profile, profile

    print(format_profile(profile(args.run, args.reports)))


def cmd_table(args: argparse.Namespace) -> None:
    from quadlib.evaluation.items import UNTRAINED
    from quadlib.evaluation.stats import (SEED_TABLE_METRICS, collect_costs, collect_items, collect_metrics,
                                         markdown_table, seed_table)
    from quadlib.plots.palette import method_order

    costs = collect_costs(args.run)
    if costs.empty:
        raise FileNotFoundError(f"{args.run}: no selection manifests (select-*/manifest.json); run 03_bandit first")
    methods = list(args.methods) if args.methods else list(costs["method"])
    unknown = sorted(set(methods) - set(costs["method"]))
    if unknown:
        raise ValueError(f"{args.run}: no selection of {unknown}; methods with one: {sorted(costs['method'])}")
    shown = method_order([*methods, UNTRAINED])  # the starting model, where the run evaluated it
    items, tidy = collect_items(args.run), collect_metrics(args.run)
    items = items[items["method"].isin(shown) & (items["from_scratch"] == args.from_scratch)]
    tidy = tidy[tidy["method"].isin(shown) & (tidy["from_scratch"] == args.from_scratch)]
    if items.empty:
        raise FileNotFoundError(f"{args.run}: no evaluated models (eval/<method>/seed-<s>/items.parquet); "
                                "run 05_evaluate or `quad evaluate` first")
    shown = [m for m in shown if m in set(tidy["method"])]
    seeds = sorted(set(items["seed"]))
    print(f"{args.run}: {len(shown)} methods, seeds {seeds}")
    print(markdown_table(seed_table(items, tidy, costs, metrics=args.metrics or SEED_TABLE_METRICS,
                                            order=shown)))


def cmd_make_data(args: argparse.Namespace) -> None:
    from quadlib.synthetic import write_default_data

    pool, reference = write_default_data(Path(args.out))
    print(f"wrote {pool} and {reference}")


def cmd_ingest(args: argparse.Namespace) -> None:
    from quadlib.corpus import CorpusSettings, ingest, split_reference
    from quadlib.runstore import RunStore

    store = RunStore(args.run)
    pool_settings = CorpusSettings(text_field=args.text_field, shard_size=args.shard_size,
                                   heldout_fraction=args.heldout_fraction, group_field=args.group_field,
                                   overlap_step="reference", drop_overlap=args.drop_overlap)
    # the reference first, so the pool's documents are checked against it (by id and by text)
    ref = ingest(store, args.reference, step="reference",
                 settings=CorpusSettings(text_field=args.text_field, id_field=None, source_field=None))
    pool = ingest(store, args.pool, settings=pool_settings)
    split = split_reference(store)
    print(f"pool: {pool['kept']} kept, {pool['heldout']} held out (by origin group), {pool['skipped_total']} skipped "
          f"in {len(pool['shards'])} shards; reference: {ref['kept']} ({len(split['selection'])} for selection, "
          f"{len(split['evaluation'])} for evaluation only)")


def cmd_scale(args: argparse.Namespace) -> None:
    """`quad scale ...`: its options come from the scale-out module, imported (with torch) only now."""
    from quadlib.execution.scaleout import add_arguments, run_scaleout, settings_from_args
    from quadlib.runstore import RunStore

    parser = argparse.ArgumentParser(prog="quad scale", description=SCALE_HELP)
    add_arguments(parser)
    args = parser.parse_args(args.deferred_args)
    for name, run in run_scaleout(RunStore(args.run), settings_from_args(args)).items():
        print(f"{name}: {len(run.processed)} shards processed ({run.rows} documents), {run.skipped} already done")


def add_selection_options(parser: argparse.ArgumentParser, skip: Sequence[str] = (),
                          used: str = "used when --methods names it") -> None:
    """The options of making selections (what `quad select` takes; `quad evaluate` too, for methods the
    run has not selected yet), generated from the settings dataclasses; `skip`: SelectSettings fields
    the command declares itself."""
    from quadlib.cluster import ClusterSettings
    from quadlib.embed import EmbedSettings
    from quadlib.pipeline import ProxySettings, ScoreSettings, SelectSettings
    from quadlib.selection import SELECTORS
    from quadlib.settings import add_options

    add_options(parser, SelectSettings, title="selection", skip=tuple(skip))
    add_options(parser, EmbedSettings, prefix="embed-", title="embeddings (made when the run has none)")
    add_options(parser, ClusterSettings, prefix="cluster-", title="clusters (made when the run has none)")
    add_options(parser, ProxySettings, prefix="proxy-", title="proxy warm-up (when the run has no proxy)")
    add_options(parser, ScoreSettings, prefix="score-", skip=("estimator",),
                title="influence scorer (fitted when the run has none; else the run's is used)")
    for name, cls in SELECTORS.items():
        add_options(parser, cls.settings_type, prefix=f"{name.replace('_', '-')}-", defaults=cls().settings,
                    title=f"method {name} ({used})")


def selection_inputs(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, Any]:
    """`select_run`'s keyword arguments from the options `add_selection_options` declared."""
    from quadlib.cluster import ClusterSettings
    from quadlib.embed import EmbedSettings
    from quadlib.pipeline import ProxySettings, ScoreSettings
    from quadlib.settings import settings_from_options

    return {"method_settings": method_overrides(args, methods),
            "proxy": settings_from_options(ProxySettings, args, prefix="proxy-"),
            "score": settings_from_options(ScoreSettings, args, prefix="score-"),
            "embed": settings_from_options(EmbedSettings, args, prefix="embed-"),
            "cluster": settings_from_options(ClusterSettings, args, prefix="cluster-")}


def select_parser() -> argparse.ArgumentParser:
    """`quad select`'s options, generated from the settings dataclasses (imports the library: built
    only when the command runs)."""
    from quadlib.execution import ExecutorSettings
    from quadlib.settings import add_options

    parser = argparse.ArgumentParser(prog="quad select", description=SELECT_HELP + ". " + SELECT_DETAILS)
    parser.add_argument("--run", required=True, help="run folder made by `quad ingest` (and `quad scale`) or the "
                                                     "notebooks; its finished steps are reused")
    add_options(parser, ExecutorSettings, title="executor")
    add_selection_options(parser)
    return parser


def method_overrides(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method, the settings given on the command line that differ from the method's defaults."""
    from dataclasses import fields

    from quadlib.selection import SELECTORS
    from quadlib.settings import settings_from_options

    overrides = {}
    for name in methods:
        default = SELECTORS[name]().settings
        chosen = settings_from_options(type(default), args, prefix=f"{name.replace('_', '-')}-", defaults=default)
        overrides[name] = {f.name: getattr(chosen, f.name) for f in fields(chosen)
                           if getattr(chosen, f.name) != getattr(default, f.name)}
    return overrides


def cmd_select(args: argparse.Namespace) -> None:
    from quadlib.execution import ExecutorSettings
    from quadlib.pipeline import SelectSettings, check_methods, select_run
    from quadlib.runstore import RunStore
    from quadlib.settings import settings_from_options

    args = select_parser().parse_args(args.deferred_args)
    select = settings_from_options(SelectSettings, args)
    check_methods(select.methods)
    summary = select_run(RunStore(args.run), select, executor=settings_from_options(ExecutorSettings, args),
                         **selection_inputs(args, select.methods))
    print(summary.to_string(index=False))
    print(f"[quad] selections in {Path(args.run).resolve()}/select-<method>/ (selected.parquet, manifest.json)")


def evaluate_parser() -> argparse.ArgumentParser:
    """`quad evaluate`'s options, generated from the settings dataclasses."""
    from quadlib.evaluation.train_eval import EvalSettings
    from quadlib.execution import ExecutorSettings
    from quadlib.pipeline import EVALUATE_TRAIN, EvaluateSettings
    from quadlib.proxy import TrainSettings
    from quadlib.settings import add_options

    parser = argparse.ArgumentParser(prog="quad evaluate", description=EVALUATE_HELP)
    parser.add_argument("--run", required=True, help="run folder: ingested (`quad ingest`) or holding selections "
                                                     "(`quad select`); a method named in --methods that the run "
                                                     "has not selected is selected first")
    add_options(parser, EvaluateSettings, title="evaluation")
    add_options(parser, ExecutorSettings, title="executor (embeds, clusters and scores the selections it makes)")
    add_options(parser, TrainSettings, prefix="train-", defaults=EVALUATE_TRAIN,
                title="training, the same for every method and seed")
    add_options(parser, EvalSettings, prefix="eval-", title="measurements")
    add_selection_options(parser, skip=("methods", "estimator", "seed"),
                          used="used only if --methods names it and the run holds no selection of it yet; "
                               "re-run `quad select` with new settings to replace one")
    return parser


def cmd_evaluate(args: argparse.Namespace) -> None:
    from quadlib.evaluation.train_eval import EvalSettings
    from quadlib.execution import ExecutorSettings
    from quadlib.pipeline import EVALUATE_TRAIN, EvaluateSettings, check_methods, evaluate_run
    from quadlib.proxy import TrainSettings
    from quadlib.runstore import RunStore
    from quadlib.settings import settings_from_options

    args = evaluate_parser().parse_args(args.deferred_args)
    options = settings_from_options(EvaluateSettings, args)
    check_methods(options.methods or [])
    records = evaluate_run(RunStore(args.run), options,
                           settings_from_options(TrainSettings, args, prefix="train-", defaults=EVALUATE_TRAIN),
                           settings_from_options(EvalSettings, args, prefix="eval-"),
                           executor=settings_from_options(ExecutorSettings, args),
                           budget_fraction=args.budget_fraction, **selection_inputs(args, options.methods or []))
    print(f"[quad] {len(records)} trained models evaluated; metrics under {Path(args.run).resolve()}/eval/")


def _deferred(sub: Any, name: str, help_text: str, func: Any) -> None:
    """A subcommand whose options are parsed by `func` itself (so building them imports the library
    only when it runs): prefix "+" makes "--run" and "--help" plain words to this parser."""
    parser = sub.add_parser(name, help=help_text + f"; `quad {name} --help` lists its options", add_help=False,
                            prefix_chars="+")
    parser.add_argument("deferred_args", nargs="*")
    parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the notebook pipeline with papermill and write reports/")
    demo.add_argument("--run", default="runs/demo", help="run folder (reused: finished steps are skipped)")
    demo.add_argument("--pool", default=DEFAULT_POOL, help="pool: file, folder, glob or hf:<dataset>")
    demo.add_argument("--reference", default=DEFAULT_REFERENCE, help="reference set, same forms as --pool")
    demo.add_argument("--reports", default="reports", help="where executed notebooks and HTML go")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-dir", default=None, help="zero-shot task files, e.g. ../shared/data/eval")
    demo.add_argument("--lambada", action="store_true", help="the reference is LAMBADA: report last-word accuracy")
    # unset options keep the notebooks' defaults, which are the demo's (their parameters cells)
    demo.add_argument("--budget-fraction", type=float, default=None,
                      help="selection budget as a fraction of the pool's tokens, every method and 04_ablate's "
                           "experiment (default: each notebook's BUDGET_FRACTION)")
    demo.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="training seeds of 05_evaluate (default: its SEEDS)")
    demo.add_argument("--train-tokens", type=int, default=None,
                      help="tokens each method's model trains on in 05_evaluate and 04_ablate's experiment, the "
                           "same for every method (default: each notebook's TRAIN_TOKENS)")
    demo.add_argument("--task-limit", type=int, default=None,
                      help="items per zero-shot task (default: 05_evaluate's TASK_LIMIT)")
    demo.add_argument("--no-ablations", action="store_true", help="skip the ablation grids of 05_evaluate")
    demo.add_argument("--only", nargs="*", choices=NOTEBOOKS, help="run only these notebooks")
    demo.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="set a parameter of every notebook that declares it (VALUE as JSON, else text), e.g. "
                           "--set PROXY_MODEL=smollm2-135m --set TOKENIZER_VOCAB=null; repeatable")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser("report", help="render reports/ again from its executed notebooks (report.html, "
                                           "one page per notebook, index.html)")
    report.add_argument("--reports", default="reports", help="folder of executed notebooks written by `quad demo`")
    report.set_defaults(func=cmd_report)

    prof = sub.add_parser("profile", help="where a finished run's time went: each notebook cell's share of the "
                                          "wall time, each selection's and each model's seconds (quadlib.profile)")
    prof.add_argument("--run", default="runs/demo", help="the run folder")
    prof.add_argument("--reports", default="reports", help="the executed notebooks of that run")
    prof.set_defaults(func=cmd_profile)

    tab = sub.add_parser("table", help="a finished run's comparison over seeds as a markdown table: per metric "
                                       "the mean ± sd over seeds, the paired differences from the untrained "
                                       "model and from Random with 95%% intervals (* Holm), the selection cost")
    tab.add_argument("--run", default="runs/demo", help="the run folder")
    tab.add_argument("--methods", nargs="+", default=None, help="methods (default: every selection of the run)")
    tab.add_argument("--metrics", nargs="+", default=None,
                     help="metrics of quadlib.evaluation.stats.metric_items (default: ref_loss heldout_bpb_mean; "
                          "others e.g. lambada_logprob tasks/gold_bpb_mean)")
    tab.add_argument("--from-scratch", action="store_true", help="the models trained from a fresh initialisation")
    tab.set_defaults(func=cmd_table)

    ing = sub.add_parser("ingest", help="validate and shard a pool and a reference set into a run folder")
    ing.add_argument("--run", required=True)
    ing.add_argument("--pool", default=DEFAULT_POOL)
    ing.add_argument("--reference", default=DEFAULT_REFERENCE)
    ing.add_argument("--text-field", default="text")
    ing.add_argument("--shard-size", type=int, default=2_000)
    ing.add_argument("--heldout-fraction", type=float, default=0.1)
    ing.add_argument("--group-field", default=None,
                     help="record field naming a document's origin group for the held-out split (e.g. meta.book); "
                          "default: inferred from meta, else the id")
    ing.add_argument("--drop-overlap", action="store_true",
                     help="drop pool documents that are also in the reference set (by id or text); "
                          "without it they are only reported")
    ing.set_defaults(func=cmd_ingest)

    _deferred(sub, "scale", SCALE_HELP, cmd_scale)
    _deferred(sub, "select", SELECT_HELP, cmd_select)
    _deferred(sub, "evaluate", EVALUATE_HELP, cmd_evaluate)

    data = sub.add_parser("make-data", help="regenerate the default synthetic data")
    data.add_argument("--out", default="data/synthetic")
    data.set_defaults(func=cmd_make_data)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run one command. An error prints one line, `quad: error: <message>` (the message names the file,
    the record and the fix), and exits 1; `--traceback` or QUAD_TRACEBACK=1 shows the traceback instead."""
    parser = build_parser()
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, print the full traceback (also QUAD_TRACEBACK=1); accepted anywhere")
    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = "--traceback" in argv  # also after the command's own options: `quad ingest ... --traceback`
    args = parser.parse_args([a for a in argv if a != "--traceback"])
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("quad: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - the one place every command's error is reported
        if traceback or os.environ.get("QUAD_TRACEBACK", "") not in ("", "0"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"quad: error: {message} (--traceback for details)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
