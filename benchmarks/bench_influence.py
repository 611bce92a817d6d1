"""Influence scoring speed, side by side in one run: a plain forward+backward, every estimator in
reverse mode, Kronfluence 1.0.1 (factor fit timed separately) and TRAK (traker's CPU projector),
on the same Llama-style model, documents and one aggregated reference query.

Reports documents/s, tokens/s, peak resident memory of each phase (VmHWM, reset per phase) and the
ratio of each scorer's throughput to the plain forward+backward (issue 3 target >= 0.7, issue 8
target >= 1.0). Timings are the best of `--repeats` runs (the machine is shared).

    .venv/bin/python benchmarks/bench_influence.py --hidden 256 --layers 4 --docs 64 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from quadlib.influence.estimators import ESTIMATORS, make_estimator
from quadlib.influence.loss import Batch, document_losses
from quadlib.influence.peers import kronfluence_scores, trak_scores
from quadlib.influence.toy import random_batch, tiny_llama


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(best seconds, peak MiB, last result) of `fn` over `repeats` runs after one untimed warm-up."""
    fn()
    best, peak, result = float("inf"), 0.0, None
    for _ in range(repeats):
        _reset_peak()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, _peak_mib())
    return best, peak, result


def forward_backward(model: torch.nn.Module, batches: list[Batch]) -> None:
    """What a training step costs without the optimizer: loss, full backward with weight gradients."""
    for batch in batches:
        model.zero_grad(set_to_none=True)
        document_losses(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def forward_only(model: torch.nn.Module, batches: list[Batch]) -> None:
    with torch.no_grad():
        for batch in batches:
            document_losses(model, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fit-docs", type=int, default=32)
    parser.add_argument("--reference-docs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--estimators", nargs="*", default=sorted(ESTIMATORS))
    parser.add_argument("--no-peers", action="store_true", help="skip Kronfluence and TRAK")
    parser.add_argument("--trak-proj-dim", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    model = tiny_llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab, heads=max(2, args.hidden // 64),
                       kv_heads=max(2, args.hidden // 64), intermediate=int(2.75 * args.hidden), dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    b = args.batch_size
    documents = [random_batch(b, args.tokens, args.vocab, seed=100 + i) for i in range(args.docs // b)]
    fit = [random_batch(b, args.tokens, args.vocab, seed=200 + i) for i in range(args.fit_docs // b)]
    reference = [random_batch(b, args.tokens, args.vocab, seed=300 + i) for i in range(args.reference_docs // b)]
    n_docs, n_tokens = args.docs // b * b, args.docs // b * b * args.tokens
    print(f"model: Llama-style, {args.layers} layers x {args.hidden}, vocab {args.vocab}, {n_params / 1e6:.2f}M params, "
          f"float32, {torch.get_num_threads()} threads; {n_docs} docs x {args.tokens} tokens, batch {b}")

    rows: list[dict[str, object]] = []

    def record(method: str, seconds: float, peak: float, fit_seconds: float | None = None) -> None:
        rows.append({"method": method, "seconds": seconds, "docs_per_s": n_docs / seconds,
                     "tokens_per_s": n_tokens / seconds, "peak_mib": peak, "fit_seconds": fit_seconds})

    seconds, peak, _ = timed(lambda: forward_backward(model, documents), args.repeats)
    record("forward+backward (training step)", seconds, peak)
    baseline = seconds
    seconds, peak, _ = timed(lambda: forward_only(model, documents), args.repeats)
    record("forward only (no grad)", seconds, peak)

    scores: dict[str, np.ndarray] = {}
    for name in args.estimators:
        estimator = make_estimator(name, "kronfluence_match")
        start = time.perf_counter()
        estimator.fit(model, fit)
        estimator.set_reference(model, reference)
        fit_seconds = time.perf_counter() - start
        seconds, peak, result = timed(lambda est=estimator: torch.cat([est.score(model, d) for d in documents]),
                                      args.repeats)
        scores[name] = result.numpy()
        record(f"quad {name}", seconds, peak, fit_seconds)

    if not args.no_peers:
        indep = make_estimator("kfac_attn_indep")
        indep.fit(model, fit[:1])
        modules = sorted({part.module_name for layer in indep.layers for part in layer.parts})
        _reset_peak()
        peer = kronfluence_scores(model, modules, fit, reference, documents, damping=None, dtype=torch.float32)
        record("kronfluence 1.0.1 kfac (pairwise, 1 query set)", peer.score_seconds, _peak_mib(), peer.fit_seconds)
        scores["kronfluence_kfac"] = peer.scores
        _reset_peak()
        trak = trak_scores(model, fit, reference, documents, proj_dim=args.trak_proj_dim)
        record(f"TRAK (traker BasicProjector, proj_dim {args.trak_proj_dim})", trak.score_seconds, _peak_mib(),
               trak.fit_seconds)
        scores["trak"] = trak.scores

    print(f"\n{'method':<52} {'docs/s':>8} {'tokens/s':>9} {'x fwd+bwd':>9} {'peak MiB':>9} {'fit s':>7}")
    for row in rows:
        row["ratio_to_forward_backward"] = baseline / row["seconds"]
        fit_text = f"{row['fit_seconds']:7.2f}" if row["fit_seconds"] is not None else f"{'-':>7}"
        print(f"{row['method']:<52} {row['docs_per_s']:8.1f} {row['tokens_per_s']:9.0f} "
              f"{row['ratio_to_forward_backward']:9.2f} {row['peak_mib']:9.0f} {fit_text}")
    if "kronfluence_kfac" in scores and "kfac_attn_indep" in scores:
        a, k = scores["kfac_attn_indep"], scores["kronfluence_kfac"]
        print(f"\npeer cross-check (float32): quad kfac_attn_indep vs Kronfluence kfac: "
              f"Pearson {np.corrcoef(a, k)[0, 1]:.6f}, Spearman {spearmanr(a, k)[0]:.6f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "n_params": n_params,
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
