"""What a fitted influence estimator holds, against an AdamW step's state, on the same model.

For each model, measured in one process:
  AdamW state   the bytes of every parameter's gradient plus AdamW's two moments (exp_avg,
                exp_avg_sq) after one real `torch.optim.AdamW` step on one small batch (fp32);
  estimator     `InfluenceEstimator.held_bytes()` after fit, set_reference and one scored batch in
                the default scoring mode: float32 eigenbases Q_A, Q_G of every tracked layer, K-FAC's
                eigenvalues as the vectors (g, a), V once in float32 and any scoring copy;
  fit peak      the peak of live tensor bytes during `fit` (torch.profiler memory events): the float64
                factor sums of all tracked layers (packed lower triangles: `kfac.SymmetricSum`) plus one
                layer's decomposition and the pass's activations.
The estimator is fitted on a few short random documents: what it holds depends on the layer shapes,
not on how many documents it saw. `--shapes-only` models (e.g. the paper's 1.3B) are not fitted: their
figures come from the layer shapes by the formula that tests/test_influence_engine.py pins exactly
against `held_bytes()` of fitted float32 estimators, and their AdamW state is 12 bytes per parameter.
"before" is the layout this replaced, from the same shapes: K-FAC's g a^T whole [out, in], V in float64
and a float32 copy of V for scoring.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py \
        --models tiny-llama llama-4x1024 smollm2-135m --shapes-only paper-1.3b --out runs/bench-memory.json

A model's row is written to --out as soon as it is measured and reused on the next run (delete it to redo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_influence import live_peak_mib, pretrained  # noqa: E402

from quadlib.influence.estimators import DEFAULT_ESTIMATOR, ESTIMATORS, InfluenceSettings, make_estimator  # noqa: E402
from quadlib.influence.layers import discover_layers  # noqa: E402
from quadlib.influence.toy import random_batch, tiny_llama  # noqa: E402
from quadlib.proxy.configs import MODEL_CONFIGS, PACKAGED_MODELS, build_model, model_config  # noqa: E402
from quadlib.proxy.loss import document_losses  # noqa: E402

MIB = 2**20


def load(name: str, workdir: Path) -> torch.nn.Module:
    """A float32 model: a registry config, "llama-4x1024" (bench_influence's 4 x 1024), or a pretrained one."""
    if name == "llama-4x1024":  # the largest random-init configuration of bench_influence.py
        return tiny_llama(hidden=1024, layers=4, vocab=4096, heads=16, kv_heads=16, intermediate=2816,
                          dtype=torch.float32)
    if name in MODEL_CONFIGS:
        return build_model(name, device="cpu")
    if name in PACKAGED_MODELS or Path(name).exists():
        return pretrained(name, workdir)
    raise SystemExit(f"bench_memory: unknown model {name!r}; use a name of {sorted(MODEL_CONFIGS)}, "
                     f"{sorted(PACKAGED_MODELS)}, llama-4x1024 or a model folder")


def shape_figures(model: torch.nn.Module, estimator: str) -> dict[str, float]:
    """Bytes by formula from the tracked layers' shapes (float32 storage, float64 factor sums)."""
    layers = discover_layers(model, ESTIMATORS[estimator].groups)
    shapes = [(layer.out_features, layer.in_augmented) for layer in layers]
    weights = sum(o * i for o, i in shapes)
    bases = 4 * sum(o * o + i * i for o, i in shapes)
    full_diagonal = ESTIMATORS[estimator].curvature == "ekfac"
    eigenvalues = 4 * weights if full_diagonal else 4 * sum(o + i for o, i in shapes)
    return {"tracked_weights": weights, "eigenbases": bases, "eigenvalues": eigenvalues, "direction": 4 * weights,
            "scoring copies": 0, "factor_sums_float64": 8 * sum((n + 1) * ((n + 1) // 2) for o, i in shapes for n in (o, i)),
            "factor_sums_float64_unpacked": 2 * bases,
            "before": bases + 4 * weights + 8 * weights + 4 * weights}


def adamw_state_bytes(model: torch.nn.Module, vocab: int) -> int:
    """Gradients + AdamW's exp_avg and exp_avg_sq after one real step (the model is restored after)."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    document_losses(model, random_batch(1, 16, vocab, seed=1)).sum().backward()
    optimizer.step()
    total = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    total += sum(t.nbytes for state in optimizer.state.values() for key, t in state.items() if key != "step")
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(saved[name])
    return total


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    model = load(name, args.workdir).eval()
    vocab = model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    row = {"model": name, "params": n_params, **shape_figures(model, args.estimator)}
    row["adamw_state"] = adamw_state_bytes(model, vocab)
    fit = [random_batch(2, args.tokens, vocab, seed=200 + i) for i in range(2)]
    reference = [random_batch(2, args.tokens, vocab, seed=300)]
    estimator = make_estimator(args.estimator, InfluenceSettings(batch_size=2))
    start = time.perf_counter()
    row["fit_peak_live"] = live_peak_mib(lambda: estimator.fit(model, fit)) * MIB
    row["fit_seconds"] = time.perf_counter() - start
    estimator.set_reference(model, reference)
    estimator.score(model, random_batch(2, args.tokens, vocab, seed=100))
    held = estimator.held_bytes()
    for key, formula in (("eigenbases", row["eigenbases"]), ("eigenvalues", row["eigenvalues"]),
                         ("direction", row["direction"]), ("scoring copies", 0)):
        if held[key] != formula:
            raise SystemExit(f"bench_memory: {name} {key}: held {held[key]} bytes, the shapes say {formula}")
    row.update(measured=True, scoring_mode=estimator.scoring_mode)
    return row


def print_table(rows: list[dict[str, float]], estimator: str) -> None:
    print(f"\n{estimator}; MiB; ratios are estimator / AdamW state (grads + 2 moments, fp32)\n")
    print("| model | params | tracked weights | AdamW state | eigenbases | eigenvalues | V | fitted (bases + eigenvalues) "
          "| after set_reference (+ V) | x AdamW fitted | x AdamW after set_reference | before: after set_reference "
          "| x AdamW before | float64 factor sums (fit) | fit peak live | x AdamW fit peak |")
    print("|---|" + "---|" * 15)
    for row in rows:
        adam = row["adamw_state"]
        fitted = row["eigenbases"] + row["eigenvalues"]
        held = fitted + row["direction"] + row["scoring copies"]
        peak = row.get("fit_peak_live")
        source = "" if row["measured"] else " (from shapes)"
        print(f"| {row['model']}{source} | {row['params'] / 1e6:.1f}M | {row['tracked_weights'] / 1e6:.1f}M | "
              f"{adam / MIB:.0f} | {row['eigenbases'] / MIB:.0f} | {row['eigenvalues'] / MIB:.1f} | "
              f"{row['direction'] / MIB:.0f} | {fitted / MIB:.0f} | {held / MIB:.0f} | {fitted / adam:.2f} | "
              f"{held / adam:.2f} | {row['before'] / MIB:.0f} | {row['before'] / adam:.2f} | "
              f"{row['factor_sums_float64'] / MIB:.0f} | " + ("-" if peak is None else f"{peak / MIB:.0f}") + " | "
              + ("-" if peak is None else f"{peak / adam:.2f}") + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "llama-4x1024", "smollm2-135m"])
    parser.add_argument("--shapes-only", nargs="*", default=["paper-1.3b"],
                        help="models too large to fit here: figures from their layer shapes (built on the meta device)")
    parser.add_argument("--estimator", default=DEFAULT_ESTIMATOR, choices=sorted(ESTIMATORS))
    parser.add_argument("--tokens", type=int, default=32, help="tokens per random document (fit, reference, scoring)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-influence"),
                        help="where a packaged model is converted (once)")
    parser.add_argument("--out", type=Path, default=None, help="JSON rows; rows already there are reused")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    rows = []
    for name in [*args.models, *args.shapes_only]:
        key = f"{name}/{args.estimator}"
        if key not in done:
            if name in args.shapes_only:
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(model_config(name))
                n_params = sum(p.numel() for p in model.parameters())
                done[key] = {"model": name, "params": n_params, **shape_figures(model, args.estimator),
                             "adamw_state": 12 * n_params, "measured": False}
            else:
                done[key] = measure(name, args)
            print(f"  {key}: {json.dumps(done[key])}", file=sys.stderr, flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(done, indent=2))
        rows.append(done[key])
    print_table(rows, args.estimator)


if __name__ == "__main__":
    main()
