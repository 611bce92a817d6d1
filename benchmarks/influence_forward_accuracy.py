"""Forward-only influence scores against the reverse-mode score, on real pool documents.

A BPE tokenizer and the "tiny-llama" proxy (float32) are trained briefly on a pool sample
(quadlib.proxy.train_lm), so scores come from a partially trained model as in Quad's warm-up.
The estimator is fitted on pool documents, the reference is LAMBADA, and a stratified sample of
pool documents (every source) is scored in every mode of the same estimator. Each forward-only
mode is compared with the reverse-mode score: Pearson, Spearman, max relative error
(max_z |s - r| / max_z |r|, so near-zero scores do not blow it up) and the overlap of the top 5%.
A mode qualifies as a default when Spearman >= 0.999 and top-5% overlap >= 0.95 (the bar).

    .venv/bin/python benchmarks/influence_forward_accuracy.py --docs 128

A pretrained model (issue 17) is scored as it is, with its own tokenizer and no warm-up:

    .venv/bin/python benchmarks/influence_forward_accuracy.py --model smollm2-135m --docs 32 \
        --max-length 128 --fit-per-source 4 --reference-docs 16

The row "central_difference auto" is the default: the step chosen per model on the first reference
batch (InfluenceSettings.fd_step None). Peak resident memory is printed after the fit and at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from quadlib.influence.estimators import InfluenceSettings, make_estimator
from quadlib.influence.scorer import InfluenceScorer
from quadlib.proxy.configs import PACKAGED_MODELS, build_model, convert_packaged, is_pretrained
from quadlib.proxy.tokenizer import load_tokenizer, train_bpe_tokenizer
from quadlib.proxy.train import TrainSettings, train_lm

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SPEARMAN_BAR, TOP_OVERLAP_BAR = 0.999, 0.95


def read_texts(path: Path, limit: int) -> list[str]:
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            if len(texts) >= limit:
                break
    return texts


def pool_sample(data: Path, per_source: int, seed: int) -> list[str]:
    """`per_source` documents from each pool file, drawn from its first 4 x per_source (seeded)."""
    rng = random.Random(seed)
    texts = []
    for path in sorted((data / "pool").glob("*.jsonl.gz")):
        candidates = read_texts(path, 4 * per_source)
        texts.extend(rng.sample(candidates, min(per_source, len(candidates))))
    return texts


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def agreement(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    k = max(1, int(round(0.05 * len(reference))))
    top = set(np.argsort(-reference)[:k])
    return {"pearson": float(pearsonr(scores, reference)[0]), "spearman": float(spearmanr(scores, reference)[0]),
            "max_rel_error": float(np.abs(scores - reference).max() / np.abs(reference).max()),
            "top5_overlap": len(top & set(np.argsort(-scores)[:k])) / k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--docs", type=int, default=128, help="scored documents, spread over the sources")
    parser.add_argument("--train-docs", type=int, default=400)
    parser.add_argument("--warmup-steps", type=int, default=80)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--estimator", default="kfac_joint_qkv")
    parser.add_argument("--model", default="tiny-llama",
                        help="a named config (warmed up here) or a pretrained model: smollm2-135m, a folder, a hub name")
    parser.add_argument("--fit-per-source", type=int, default=8, help="pool documents per source to fit K-FAC on")
    parser.add_argument("--reference-docs", type=int, default=32, help="LAMBADA passages forming the reference")
    parser.add_argument("--skip-jvp", action="store_true", help="leave out the jvp row (slow on large models)")
    parser.add_argument("--fd-steps", type=float, nargs="*", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the tokenizer and warm-up checkpoints here, so a rerun resumes (default: temporary)")
    args = parser.parse_args()
    if not (args.data / "pool").is_dir():
        print(f"skipped: no pool data at {args.data.resolve()}")
        return

    sources = len(list((args.data / "pool").glob("*.jsonl.gz")))
    train = pool_sample(args.data, args.train_docs // sources, args.seed)
    scored = pool_sample(args.data, -(-args.docs // sources), args.seed + 1)[:args.docs]
    fit = pool_sample(args.data, args.fit_per_source, args.seed + 2)
    reference = read_texts(args.data / "reference" / "lambada_test.jsonl.gz", args.reference_docs)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        start = time.perf_counter()
        if is_pretrained(args.model):  # its own tokenizer, no warm-up
            folder = args.model
            if args.model in PACKAGED_MODELS:
                folder = str(convert_packaged(args.model, workdir / args.model))
            tokenizer = load_tokenizer(folder)
            model = build_model(folder, tokenizer=tokenizer, device="cpu")
            trained = "pretrained, no warm-up"
        else:
            tokenizer = train_bpe_tokenizer(train, 4096, workdir / "tokenizer")
            model = build_model(args.model, tokenizer=tokenizer, device="cpu", seed=args.seed)
            result = train_lm(model, tokenizer, train, TrainSettings(total_steps=args.warmup_steps, batch_size=8,
                                                                     block_size=128, device="cpu"),
                              workdir / "ckpt", resume=True, progress=False)
            trained = (f"warm-up {args.warmup_steps} steps ({result.resumed_from} resumed), last loss "
                       f"{result.losses[-1] if result.losses else float('nan'):.3f}")
    print(f"{args.model} float32, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {trained}, "
          f"ready in {time.perf_counter() - start:.0f} s; {len(scored)} pool docs from {sources} sources, "
          f"max {args.max_length} tokens; estimator {args.estimator}; {torch.get_num_threads()} thread(s)")

    scorer = InfluenceScorer(model, tokenizer, make_estimator(args.estimator, InfluenceSettings(mode="reverse")),
                             max_length=args.max_length, batch_size=8, device="cpu")
    start = time.perf_counter()
    scorer.fit_texts(fit)
    print(f"fit on {len(fit)} docs in {time.perf_counter() - start:.0f} s; peak RSS {peak_rss_gb():.2f} GB")
    start = time.perf_counter()
    scorer.set_reference_texts(reference)
    print(f"reference ({len(reference)} LAMBADA passages) in {time.perf_counter() - start:.0f} s")
    variants = ([("reverse", None)] + ([] if args.skip_jvp else [("jvp", None)]) + [("central_difference", None)]
                + [("central_difference", c) for c in args.fd_steps])
    scorer.estimator.settings = replace(scorer.estimator.settings, mode="central_difference", fd_step=None)
    start = time.perf_counter()
    scorer.estimator.parameter_direction(model)  # chooses the step on the first reference batch
    print(f"step chosen in {time.perf_counter() - start:.0f} s (1 reverse + {2 * len(scorer.estimator.fd_errors)} "
          "forwards of one batch, not in the auto row's time)")
    scores, seconds = {}, {}
    for mode, step in variants:
        label = mode if mode != "central_difference" else f"{mode} c={step:g}" if step else f"{mode} auto"
        scorer.estimator.settings = replace(scorer.estimator.settings, mode=mode, fd_step=step)
        start = time.perf_counter()
        scores[label] = scorer.score_texts(scored)
        seconds[label] = time.perf_counter() - start
    print(f"chosen step c={scorer.estimator.chosen_fd_step:g}; calibration errors "
          + ", ".join(f"{c:g}: {e:.1e}" for c, e in scorer.estimator.fd_errors.items())
          + f"; peak RSS {peak_rss_gb():.2f} GB")
    truth = scores["reverse"]
    print(f"\n| mode | docs/s | x reverse speed | Pearson | Spearman | max rel. error | top-5% overlap | meets bar |")
    print("|---|---|---|---|---|---|---|---|")
    for label, values in scores.items():
        stats = agreement(values, truth)
        ok = stats["spearman"] >= SPEARMAN_BAR and stats["top5_overlap"] >= TOP_OVERLAP_BAR
        print(f"| {label} | {len(scored) / seconds[label]:.1f} | {seconds['reverse'] / seconds[label]:.2f} | "
              f"{stats['pearson']:.6f} | {stats['spearman']:.6f} | {stats['max_rel_error']:.2e} | "
              f"{stats['top5_overlap']:.2f} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main()
