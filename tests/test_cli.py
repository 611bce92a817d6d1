"""The `quad` command line: help answers without importing the heavy libraries, `quad scale` forwards its options."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from quadlib.cli import main
from quadlib.settings import add_options, setting, settings_from_options
from quadlib.reports import REPO_ROOT

HEAVY = ("torch", "transformers", "pandas", "numpy")


@dataclass
class Inner:
    steps: int | None = setting(None, "how many steps")
    betas: tuple[float, float] = setting((0.9, 0.95), "two betas")


@dataclass
class Outer:
    name: str = setting("a", "the name")
    rate: float = setting(0.5, "the rate")
    fast: bool = setting(True, "go fast")
    methods: list[str] = setting(["x"], "the methods")
    inner: Inner = field(default_factory=Inner, metadata={"help": "inner settings"})


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["report", "--help"], ["ingest", "--help"],
                                  ["make-data", "--help"]])
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    """`quad --help` took 2-4 s when building the `scale` subparser imported torch."""
    probe = (f"import sys\nfrom quadlib.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
             f"print('MODULES=' + __import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: quad" in done.stdout
    loaded = json.loads(done.stdout.rsplit("MODULES=", 1)[1])
    assert loaded == [], f"`quad {' '.join(argv)}` imported {loaded}"


def test_scale_parses_its_own_options(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    with pytest.raises(SystemExit) as shown:
        main(["scale", "--help"])
    assert shown.value.code == 0
    out = capsys.readouterr().out  # the scale-out settings' options, under `quad scale`
    assert "--estimator-state" in out and "--cluster-k" in out and "--ray-num-workers" in out
    with pytest.raises(SystemExit) as refused:
        main(["scale", "--run", str(tmp_path / "run"), "--steps", "no-such-step"])
    assert refused.value.code == 1
    assert "unknown scale-out step(s) ['no-such-step']" in capsys.readouterr().err


def test_help_lists_the_pipeline_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("ingest", "scale", "select", "evaluate", "demo", "report", "profile", "table"))


def test_options_are_generated_from_settings_with_help_types_and_defaults() -> None:
    """Every field of a settings dataclass becomes an option with its help text and default, and the
    parsed options build the dataclass back (nested settings, optional, bool, list and tuple fields)."""
    parser = argparse.ArgumentParser()
    add_options(parser, Outer, prefix="o-")
    assert "the rate (default: 0.5)" in parser.format_help() and "--o-inner-betas" in parser.format_help()
    assert settings_from_options(Outer, parser.parse_args([]), prefix="o-") == Outer()
    args = parser.parse_args(["--o-rate", "2", "--no-o-fast", "--o-methods", "y", "z", "--o-inner-steps", "7",
                              "--o-inner-betas", "0.8", "0.9"])
    assert settings_from_options(Outer, args, prefix="o-") == Outer(
        rate=2.0, fast=False, methods=["y", "z"], inner=Inner(steps=7, betas=(0.8, 0.9)))
    assert settings_from_options(Outer, parser.parse_args(["--o-inner-steps", "none"]), prefix="o-").inner.steps is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--o-rate", "fast"])  # a wrong type is argparse's one-line error


def test_select_passes_only_the_method_settings_given(capsys: pytest.CaptureFixture[str]) -> None:
    """`quad select` options per method come from its settings class; only changed values reach the plan,
    so a run selected with the defaults keeps the key notebook 03 gives it."""
    from quadlib.cli import method_overrides, select_parser

    parser = select_parser()
    args = parser.parse_args(["--run", "r", "--methods", "quad", "quad_released", "topk_influence",
                              "--quad-gamma", "0.05", "--topk-influence-sample-size", "128"])
    assert method_overrides(args, args.methods) == {"quad": {"gamma": 0.05}, "quad_released": {},
                                                    "topk_influence": {"sample_size": 128}}
    with pytest.raises(SystemExit) as shown:
        main(["select", "--help"])
    assert shown.value.code == 0 and "--quad-alpha" in capsys.readouterr().out


def test_select_refuses_an_unknown_method_and_an_uningested_run(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["select", "--run", str(tmp_path / "run"), "--methods", "quad", "nosuch"])
    assert refused.value.code == 1 and "unknown selection method(s) ['nosuch']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["select", "--run", str(tmp_path / "run"), "--methods", "random"])
    assert refused.value.code == 1 and "quad ingest" in capsys.readouterr().err


def test_select_then_evaluate_from_an_ingested_run(tmp_path) -> None:
    """`quad select` fits what an ingested run lacks (embeddings and clusters through the scale-out,
    proxy, scorer) and writes notebook 03's files; a rerun reuses them; `quad evaluate` re-makes each
    selection per seed and trains and evaluates every (method, seed)."""
    from executor_steps import TINY_SELECT, ingest_tiny_run

    from quadlib.cluster import load_assignments
    from quadlib.pipeline import EvaluateSettings, evaluate_run
    from quadlib.proxy import TrainSettings
    from quadlib.runstore import RunStore
    from quadlib.selection import read_selection

    store = RunStore(tmp_path / "run")
    ingest_tiny_run(store)
    main(["select", "--run", str(store.root), *TINY_SELECT])
    assert len(load_assignments(store)) == 64 and store.is_done("cluster-assign")  # the scale-out's one path
    quad, manifest = read_selection(store, "quad")
    assert len(quad) > 2 and manifest["params"]["gamma"] == 0.5 and manifest["extra"]["n_rounds"] > 1
    written = (store.root / "select-quad" / "manifest.json").stat().st_mtime_ns
    main(["select", "--run", str(store.root), *TINY_SELECT])  # finished: nothing is selected again
    assert (store.root / "select-quad" / "manifest.json").stat().st_mtime_ns == written

    main(["evaluate", "--run", str(store.root), "--seeds", "0", "1", "--train-total-steps", "2",
          "--train-batch-size", "2", "--train-block-size", "32", "--eval-max-reference-docs", "8",
          "--eval-max-heldout-docs", "8"])
    for method in ("random", "quad"):
        for seed in (0, 1):
            metrics = json.loads((store.root / "eval" / method / f"seed-{seed}" / "metrics.json").read_text())
            assert metrics["selection_seed"] == seed, (method, seed)

    # one command from the ingested run: a method not selected yet is selected first, at one budget with the rest
    budget = read_selection(store, "random")[1]["budget_tokens"]
    with pytest.raises(ValueError, match="different token budgets"):  # refused before anything is selected
        evaluate_run(store, EvaluateSettings(methods=["random", "dsir"], seeds=[0]), TrainSettings(), None,
                     budget_fraction=0.5)
    assert not store.is_done("selections/dsir")
    main(["evaluate", "--run", str(store.root), "--methods", "random", "dsir", "--seeds", "0", "--budget-fraction",
          "0.25", "--train-total-steps", "2", "--train-batch-size", "2", "--train-block-size", "32",
          "--eval-max-reference-docs", "8", "--eval-max-heldout-docs", "8"])
    assert read_selection(store, "dsir")[1]["budget_tokens"] == budget
    assert (store.root / "eval" / "dsir" / "seed-0" / "metrics.json").exists()


def test_set_overrides_reach_only_the_notebooks_that_declare_them() -> None:
    from quadlib.reports import NOTEBOOKS, parse_overrides

    out = parse_overrides(["PROXY_MODEL=smollm2-135m", "TOKENIZER_VOCAB=null", "SEEDS=[0, 1]", "01_cluster:K=16",
                           "LR=1e-4", "METHODS=[\"random\", \"quad\"]"], NOTEBOOKS)
    assert out["02_score"] == {"PROXY_MODEL": "smollm2-135m", "TOKENIZER_VOCAB": None}  # text, JSON null
    assert out["05_evaluate"] == {"SEEDS": [0, 1], "LR": 1e-4, "METHODS": ["random", "quad"]}
    assert out["04_ablate"] == {"LR": 1e-4}  # its one experiment trains as 05 does
    assert out["01_cluster"] == {"K": 16} and "K" not in out["03_bandit"]  # the notebook prefix scopes it
    assert out["03_bandit"] == {"METHODS": ["random", "quad"]}
    assert parse_overrides(["K=4"], NOTEBOOKS)["03_bandit"] == {"K": 4} == parse_overrides(["K=4"], NOTEBOOKS)["01_cluster"]
    for bad, message in (("PROXY_MODLE=x", "no notebook .* has the parameter 'PROXY_MODLE'"),
                         ("PROXY_MODEL", "NAME=VALUE"), ("09_x:K=1", "NAME=VALUE"),
                         ("02_score:K=3", "no notebook of 02_score has the parameter 'K'")):
        with pytest.raises(ValueError, match=message):
            parse_overrides([bad], NOTEBOOKS)
