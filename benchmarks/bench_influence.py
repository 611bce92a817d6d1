"""Influence scoring speed and memory, side by side in one run, at several model sizes and lengths.

For each configuration (hidden width x tokens per document), on one Llama-style float32 model with
one set of documents and one aggregated reference query:
  - a plain forward+backward (a training step without the optimizer: weight gradients included);
  - every estimator in reverse mode (contraction inside an activation-gradient backward);
  - the forward-only modes of the default estimator (jvp; central_difference), whose cost does
    not depend on the estimator (only V differs);
  - at equal work, Kronfluence 1.0.1's K-FAC with one block per module (the match of kfac_attn_indep
    on Llama's separate q/k/v) against our reverse and central-difference scorers: the same fit,
    reference and scored documents, one aggregated reference query, in two tables: the reference-side
    work (reference gradients + preconditioning: our `set_reference`) inside both timers, and outside
    both (the pass over the scored documents only); factor fits timed separately;
  - optionally TRAK (traker's CPU projector).
The machine is shared, so every method is timed in PAIRS with a forward+backward run right before
it; "x fwd+bwd" is the median over repeats of the pairwise ratio of wall times and, steadier under
other users' load, of process CPU times (all threads); docs/s and tokens/s come from the best wall time.
Peak memory, two ways:
  live MiB  peak of live tensor bytes allocated during one call (torch.profiler memory events,
            an untimed run; tensors alive before the call, i.e. weights and estimator state, excluded);
  RSS MiB   peak resident set (VmHWM, reset right before the timed call): whole process.
A per-phase profile of one batch (torch.profiler record_function sections in quadlib.influence:
forward, backward, hooks, contraction, collate) shows where the time goes.

    .venv/bin/python benchmarks/bench_influence.py --configs 256:128:64:16 256:512:16:8 1024:128:16:8 1024:512:4:4

Every count is the count used: docs, --fit-docs and --reference-docs run in batches of min(batch, count),
and a count that is not a whole number of such batches is refused.

A real pretrained model instead of the random-init ones (its hidden width is its own; the config's
first field is ignored), e.g. SmolLM2-135M converted once into --workdir:

    .venv/bin/python benchmarks/bench_influence.py --model smollm2-135m --configs 576:128:8:4 \
        --estimators kfac_joint_qkv --no-kronfluence --repeats 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.profiler import ProfilerActivity, profile, record_function

from quadlib.influence.estimators import DEFAULT_ESTIMATOR, ESTIMATORS, InfluenceEstimator, make_estimator
from quadlib.influence.loss import Batch
from quadlib.proxy.loss import document_losses
from quadlib.influence.peers import KronfluencePeer, trak_scores
from quadlib.influence.scorer import collate
from quadlib.influence.toy import random_batch, tiny_llama
from quadlib.proxy.configs import PACKAGED_MODELS, build_model, convert_packaged

PHASES = ("influence.collate", "influence.forward", "influence.backward", "influence.hooks",
          "influence.contraction")
FORWARD_ONLY_MODES = ("jvp", "central_difference")


@dataclass
class Config:
    """hidden:tokens:docs:batch, e.g. 256:128:64:16."""

    hidden: int
    tokens: int
    docs: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> Config:
        try:
            hidden, tokens, docs, batch = (int(part) for part in text.split(":"))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"--configs entry {text!r} is not hidden:tokens:docs:batch") from err
        return cls(hidden, tokens, docs, batch)


@dataclass
class Row:
    method: str
    seconds: float  # best wall time
    cpu_seconds: float  # best process CPU time
    ratios: list[float]  # fwd+bwd / method, wall time, per pair
    cpu_ratios: list[float]  # the same in process CPU time
    live_mib: float | None
    rss_mib: float
    fit_seconds: float | None = None


def batches_of(count: int, width: int, seed: int, tokens: int, vocab: int, flag: str) -> list[Batch]:
    """`count` random documents in batches of min(width, count); a count the batches cannot hold exactly is refused."""
    width = min(width, count)
    if count < 1 or count % width:
        raise SystemExit(f"bench_influence: {flag} {count} is not a whole number of batches of {width}; "
                         f"pass a multiple of {width} (or change the config's batch)")
    return [random_batch(width, tokens, vocab, seed=seed + i) for i in range(count // width)]


def _reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _rss_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def live_peak_mib(fn: Callable[[], object]) -> float:
    """Peak of live tensor bytes allocated while `fn` runs (profiler memory events, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def forward_backward(model: torch.nn.Module, batches: list[Batch]) -> None:
    """What a training step costs without the optimizer: loss, full backward with weight gradients."""
    for batch in batches:
        model.zero_grad(set_to_none=True)
        with record_function("influence.forward"):
            total = document_losses(model, batch).sum()
        with record_function("influence.backward"):
            total.backward()
    model.zero_grad(set_to_none=True)


def forward_only(model: torch.nn.Module, batches: list[Batch]) -> None:
    with torch.no_grad():
        for batch in batches:
            document_losses(model, batch)


def scoring(estimator: InfluenceEstimator, mode: str, model: torch.nn.Module, batches: list[Batch]
            ) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        estimator.settings = replace(estimator.settings, mode=mode)
        return torch.cat([estimator.score(model, batch) for batch in batches]).numpy()
    return run


def paired(method: Callable[[], object], baseline: Callable[[], object], repeats: int) -> tuple[Row, object]:
    """Timed (fwd+bwd, method) pairs; the Row's method name, memory and fit time are filled by the caller."""
    result, wall, cpu, ratios, cpu_ratios, rss = None, [], [], [], [], 0.0
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        baseline()
        base_wall, base_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        _reset_rss_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = method()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        rss = max(rss, _rss_peak_mib())
        ratios.append(base_wall / wall[-1])
        cpu_ratios.append(base_cpu / cpu[-1])
    return Row("", min(wall), min(cpu), ratios, cpu_ratios, None, rss), result


def phase_profile(fn: Callable[[], object]) -> dict[str, float]:
    """Milliseconds inside each record_function phase during one call of `fn`, plus the total."""
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    total = (time.perf_counter() - start) * 1000
    spent = {event.key: event.cpu_time_total / 1000 for event in prof.key_averages() if event.key in PHASES}
    out = {phase.removeprefix("influence."): spent.get(phase, 0.0) for phase in PHASES}
    out["hooks"] -= out["contraction"]  # the contraction runs inside the backward hook
    out["backward"] -= out["hooks"] + out["contraction"]  # the hooks run inside the backward
    out["total"] = total
    return out


def pretrained(name: str, workdir: Path) -> torch.nn.Module:
    """A pretrained model in float32 (a packaged one converted once into `workdir`)."""
    folder = str(convert_packaged(name, workdir / name)) if name in PACKAGED_MODELS else name
    return build_model(folder, device="cpu").eval()


def run_config(config: Config, args: argparse.Namespace
               ) -> tuple[list[Row], dict[str, dict[str, float]], list[EqualWorkRow]]:
    if args.model:
        model = pretrained(args.model, args.workdir)
        args.vocab, args.layers = model.config.vocab_size, model.config.num_hidden_layers
        config = replace(config, hidden=model.config.hidden_size)
    else:
        model = tiny_llama(hidden=config.hidden, layers=args.layers, vocab=args.vocab, heads=max(2, config.hidden // 64),
                           kv_heads=max(2, config.hidden // 64), intermediate=int(2.75 * config.hidden),
                           dtype=torch.float32)
    documents = batches_of(config.docs, config.batch, 100, config.tokens, args.vocab, "the config's docs")
    fit = batches_of(args.fit_docs, config.batch, 200, config.tokens, args.vocab, "--fit-docs")
    reference = batches_of(args.reference_docs, config.batch, 300, config.tokens, args.vocab, "--reference-docs")
    b, n_batches = _rows(documents[0]), len(documents)
    n_params = sum(p.numel() for p in model.parameters())
    title = args.model or f"Llama-style {args.layers} x {config.hidden} (intermediate {int(2.75 * config.hidden)})"
    print(f"\n## {title}, {args.layers} layers, width {config.hidden}, vocab "
          f"{args.vocab}, {n_params / 1e6:.1f}M params, float32, {torch.get_num_threads()} threads; "
          f"{n_batches * b} docs x {config.tokens} tokens, batch {b}; fit {sum(map(_rows, fit))} docs, reference "
          f"{sum(map(_rows, reference))} docs (batch {_rows(reference[0])})", flush=True)
    baseline = lambda: forward_backward(model, documents)  # noqa: E731
    rows: list[Row] = []
    equal_rows: list[EqualWorkRow] = []
    profiles: dict[str, dict[str, float]] = {}
    scores: dict[str, np.ndarray] = {}

    def measure(method: str, fn: Callable[[], object], fit_seconds: float | None = None) -> object:
        live = live_peak_mib(fn)  # also the warm-up run
        row, result = paired(fn, baseline, args.repeats)
        rows.append(replace(row, method=method, live_mib=live, fit_seconds=fit_seconds))
        print(f"  {method}: {row.seconds:.2f} s, x fwd+bwd wall {statistics.median(row.ratios):.2f}, CPU "
              f"{statistics.median(row.cpu_ratios):.2f}, live {live:.0f} MiB", flush=True)
        return result

    if not args.equal_work_only:
        measure("forward+backward (training step)", baseline)
        measure("forward only (no grad)", lambda: forward_only(model, documents))
        profiles["forward+backward"] = phase_profile(lambda: forward_backward(model, documents[:1]))
    for name in [] if args.equal_work_only else args.estimators:
        estimator = make_estimator(name, "kronfluence_match")
        start = time.perf_counter()
        estimator.fit(model, fit)
        estimator.set_reference(model, reference)
        fit_seconds = time.perf_counter() - start
        scores[name] = measure(f"reverse {name}", scoring(estimator, "reverse", model, documents), fit_seconds)
        if name == DEFAULT_ESTIMATOR:
            token_lists = [row.tolist() for row in documents[0]["input_ids"]]

            def one_batch(mode: str, est: InfluenceEstimator = estimator) -> None:
                batch = collate(token_lists, 0, torch.device("cpu"))
                scoring(est, mode, model, [batch])()
            profiles[f"reverse {name}"] = phase_profile(lambda: one_batch("reverse"))
            for mode in FORWARD_ONLY_MODES:
                scores[f"{mode} {name}"] = measure(f"{mode} {name}", scoring(estimator, mode, model, documents))
                profiles[f"{mode} {name}"] = phase_profile(lambda m=mode: one_batch(m))
        del estimator

    if not args.no_kronfluence:
        peer_scores, equal_rows = equal_work(model, fit, reference, documents, baseline, args)
        scores.update(peer_scores)
    if args.trak:
        _reset_rss_peak()
        trak = trak_scores(model, fit, reference, documents, proj_dim=args.trak_proj_dim)
        rows.append(Row(f"TRAK (traker BasicProjector, proj_dim {args.trak_proj_dim})", trak.score_seconds,
                        trak.score_cpu_seconds, [rows[0].seconds / trak.score_seconds],
                        [rows[0].cpu_seconds / trak.score_cpu_seconds], None, _rss_peak_mib(), trak.fit_seconds))
    if "kronfluence_kfac" in scores and "equal-work kfac_attn_indep" in scores:
        a, k = scores["equal-work kfac_attn_indep"], scores["kronfluence_kfac"]
        print(f"  peer cross-check: quad kfac_attn_indep vs Kronfluence kfac: Pearson {np.corrcoef(a, k)[0, 1]:.6f}, "
              f"Spearman {spearmanr(a, k)[0]:.6f}")
    reverse = scores.get(DEFAULT_ESTIMATOR)
    for mode in FORWARD_ONLY_MODES:
        if reverse is not None and f"{mode} {DEFAULT_ESTIMATOR}" in scores:
            other = scores[f"{mode} {DEFAULT_ESTIMATOR}"]
            print(f"  {mode} vs reverse ({DEFAULT_ESTIMATOR}, random tokens, float32): Spearman "
                  f"{spearmanr(other, reverse)[0]:.6f}, max |diff| / max |reverse| "
                  f"{np.abs(other - reverse).max() / np.abs(reverse).max():.2e}")
    if rows:
        print_table(rows, n_batches * b, n_batches * b * config.tokens)
        print_profiles(profiles)
    return rows, profiles, equal_rows


def _rows(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


@dataclass
class EqualWorkRow:
    """One method's paired timings at equal work, with and without the reference-side work in its timer."""

    method: str
    with_reference: list[tuple[float, float]]  # (method CPU s, fwd+bwd CPU s) per pair
    without_reference: list[tuple[float, float]]
    fit_seconds: float


def equal_work(model: torch.nn.Module, fit: list[Batch], reference: list[Batch], documents: list[Batch],
               baseline: Callable[[], object], args: argparse.Namespace
               ) -> tuple[dict[str, np.ndarray], list[EqualWorkRow]]:
    """Our estimators and Kronfluence's K-FAC on the same fit, reference and scored documents, one aggregated query.

    Per repeat: a forward+backward over the scored documents, then the method, timed twice inside one call:
    the whole call (reference gradients + preconditioning + the pass over the scored documents; ours:
    `set_reference` then `score` on every batch) and the pass over the scored documents alone.
    Kronfluence runs with `aggregate_query_gradients=True` (one summed query, as `set_reference`) and also
    without (one preconditioned query per reference document, the scored documents re-read per reference batch).
    """
    rows: list[EqualWorkRow] = []
    scores: dict[str, np.ndarray] = {}

    def base_cpu() -> float:
        start = time.process_time()
        baseline()
        return time.process_time() - start

    for name, mode in (("kfac_attn_indep", "reverse"), (DEFAULT_ESTIMATOR, "central_difference")):
        estimator = make_estimator(name, "kronfluence_match")
        estimator.settings = replace(estimator.settings, mode=mode)
        start = time.perf_counter()
        estimator.fit(model, fit)
        fit_seconds = time.perf_counter() - start
        row = EqualWorkRow(f"quad {mode} {name}", [], [], fit_seconds)
        for repeat in range(args.repeats + 1):  # the first call (one batch) warms up, untimed
            scored = documents if repeat else documents[:1]
            base = base_cpu() if repeat else 0.0
            start = time.process_time()
            estimator.set_reference(model, reference)
            middle = time.process_time()
            result = torch.cat([estimator.score(model, batch) for batch in scored]).numpy()
            end = time.process_time()
            if repeat:
                row.with_reference.append((end - start, base))
                row.without_reference.append((end - middle, base))
        rows.append(row)
        scores[f"equal-work {name}" if mode == "reverse" else f"equal-work {mode} {name}"] = result
        print(f"  {row.method}: {row.with_reference[-1][0]:.2f} s CPU with reference, "
              f"{row.without_reference[-1][0]:.2f} s without", flush=True)
        del estimator

    indep = make_estimator("kfac_attn_indep")
    indep.fit(model, fit[:1])
    modules = sorted({part.module_name for layer in indep.layers for part in layer.parts})
    for aggregate in (True, False):
        peer = KronfluencePeer(model, modules, fit, damping=None, dtype=torch.float32, aggregate_query=aggregate)
        label = "aggregated query" if aggregate else "one query per reference doc"
        row = EqualWorkRow(f"Kronfluence 1.0.1 kfac, {label}", [], [], peer.fit_seconds)
        try:
            for repeat in range(args.repeats + 1):  # the first call (one batch) warms up, untimed
                base = base_cpu() if repeat else 0.0
                timing = peer.score(reference, documents if repeat else documents[:1])
                if repeat:
                    row.with_reference.append((timing.cpu_seconds, base))
                    row.without_reference.append((timing.documents_cpu_seconds, base))
        finally:
            peer.close()
        rows.append(row)
        if aggregate:
            scores["kronfluence_kfac"] = timing.scores
        print(f"  {row.method}: {row.with_reference[-1][0]:.2f} s CPU with reference, "
              f"{row.without_reference[-1][0]:.2f} s without", flush=True)
    n_docs, n_ref = sum(map(_rows, documents)), sum(map(_rows, reference))
    for key, title in (("with_reference", "reference-side work (reference gradients + preconditioning) INSIDE both "
                                          "timers"),
                       ("without_reference", "reference-side work OUTSIDE both timers (the pass over the scored "
                                             "documents only)")):
        print(f"\nequal work, {title}: {n_docs} scored docs in {len(documents)} batches, {n_ref} reference docs; "
              f"CPU-time ratio fwd+bwd / method on the same scored batches, median of {args.repeats} pairs "
              "(higher = faster)")
        print("| method | CPU s (best) | x fwd+bwd (CPU) | x Kronfluence aggregated (CPU) | fit s |")
        print("|---|---|---|---|---|")
        peer_row = next(r for r in rows if r.method.endswith("aggregated query"))
        peer_ratio = statistics.median(b / m for m, b in getattr(peer_row, key))
        for row in rows:
            ratio = statistics.median(b / m for m, b in getattr(row, key))
            print(f"| {row.method} | {min(m for m, _ in getattr(row, key)):.2f} | {ratio:.2f} | "
                  f"{ratio / peer_ratio:.2f} | {row.fit_seconds:.1f} |")
    return scores, rows


def print_table(rows: list[Row], n_docs: int, n_tokens: int) -> None:
    print("\n| method | docs/s | tokens/s | x fwd+bwd (wall) | x fwd+bwd (CPU) | live MiB | RSS MiB | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        live = f"{row.live_mib:.0f}" if row.live_mib is not None else "-"
        fit = f"{row.fit_seconds:.1f}" if row.fit_seconds is not None else "-"
        print(f"| {row.method} | {n_docs / row.seconds:.1f} | {n_tokens / row.seconds:.0f} | "
              f"{statistics.median(row.ratios):.2f} | {statistics.median(row.cpu_ratios):.2f} | {live} | "
              f"{row.rss_mib:.0f} | {fit} |")


def print_profiles(profiles: dict[str, dict[str, float]]) -> None:
    names = ("collate", "forward", "backward", "hooks", "contraction", "total")
    print("\nprofile of one batch (ms; torch.profiler record_function sections, profiler overhead included; "
          "backward excludes the backward hooks, hooks exclude the contraction; the forward includes the forward "
          "hooks; a forward-only mode is all forward)")
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for method, phases in profiles.items():
        print(f"| {method} | " + " | ".join(f"{phases[name]:.0f}" for name in names) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Config.parse,
                        default=[Config.parse(text) for text in ("256:128:64:16", "256:512:16:8", "1024:128:16:8",
                                                                 "1024:512:4:4")],
                        help="hidden:tokens:docs:batch per configuration (docs a multiple of batch); few docs keep the big "
                             "ones feasible")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--fit-docs", type=int, default=16)
    parser.add_argument("--reference-docs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed (fwd+bwd, method) pairs per method")
    parser.add_argument("--estimators", nargs="*", default=sorted(ESTIMATORS))
    parser.add_argument("--no-kronfluence", action="store_true")
    parser.add_argument("--equal-work-only", action="store_true",
                        help="only the equal-work comparison with Kronfluence (no per-estimator table, no profiles)")
    parser.add_argument("--trak", action="store_true", help="also time TRAK (slow: per-document gradients)")
    parser.add_argument("--trak-proj-dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; 1 avoids OpenMP barrier stalls when other users load the cores")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--model", default=None, help="a pretrained model (smollm2-135m, a folder, a hub name) "
                                                      "instead of random-init Llama models")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-influence"),
                        help="where a packaged model is converted (once)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for config in args.configs:
        rows, profiles, equal_rows = run_config(config, args)
        results[f"{config.hidden}x{config.tokens}"] = {"config": vars(config), "rows": [vars(r) for r in rows],
                                                       "profiles": profiles,
                                                       "equal_work": [vars(r) for r in equal_rows]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2))


if __name__ == "__main__":
    main()
