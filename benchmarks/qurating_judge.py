"""QuRating's judge on real pool documents: agreement with itself under swapped order, and the rater's fit.

    python benchmarks/qurating_judge.py --pairs 32 --out runs/qurating-judge

Draws `2 * pairs` documents from ../shared/data/pool (seeded), has the judge compare each pair on
the four QuRating criteria in both orders (judgements cached in `<out>/judgements.parquet`, so an
interrupted run resumes), then reports per criterion: the fraction of pairs whose winner is the
same in both orders, the mean gap |p_forward - (1 - p_backward)|, the mean probability of the
first-shown text (position bias), and the distilled MiniLM rater's agreement with the merged
judgements on held-out pairs (trained on the rest). Writes `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch

from quadlib.influence.cache import ScoreCache
from quadlib.selection.methods.base import load_pretrained_lm
from quadlib.selection.methods.qurating import (
    CRITERIA,
    EncoderRater,
    LMJudge,
    judge_pairs,
    merge_orders,
    order_agreement,
    train_rater,
)
from quadlib.selection.scoring import Cost


def pool_sample(folder: Path, n: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` documents drawn uniformly (seeded) from every pool file's records."""
    ids, texts = [], []
    for path in sorted((folder / "pool").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                ids.append(record["id"])
                texts.append(record["text"])
    rows = np.random.default_rng(seed).permutation(len(ids))[:n]  # a smaller run is a prefix of a larger one
    return [ids[r] for r in rows], [texts[r] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--judge", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--excerpt-tokens", type=int, default=128)
    parser.add_argument("--heldout", type=float, default=0.25, help="fraction of pairs held out from the rater")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/qurating-judge"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    ids, texts = pool_sample(args.data, 2 * args.pairs, args.seed)
    pairs = np.arange(2 * args.pairs).reshape(-1, 2)  # [P, 2]
    start = time.perf_counter()
    model, tokenizer = load_pretrained_lm(args.judge, args.out)  # a packaged model is converted once into <out>/models
    loaded = time.perf_counter() - start
    judge = LMJudge(model, tokenizer, args.judge, excerpt_tokens=args.excerpt_tokens)
    cache = ScoreCache(args.out / f"judgements-ex{args.excerpt_tokens}.parquet")
    criteria = list(CRITERIA)
    forward, backward = judge_pairs(judge, texts, ids, pairs, criteria, cache)  # [P, C] each
    judged = time.perf_counter() - start - loaded
    merged = merge_orders(forward, backward)
    n_test = max(1, int(round(args.heldout * len(pairs))))
    train, test = pairs[n_test:], pairs[:n_test]
    rater = EncoderRater("all-MiniLM-L6-v2", len(criteria), max_length=256, seed=args.seed)
    history = train_rater(rater, [texts[a] for a, _ in train], [texts[b] for _, b in train], merged[n_test:],
                          epochs=4, lr=1e-4, batch_pairs=8, seed=args.seed, cost=Cost())
    rated = rater.rate([texts[i] for i in test.reshape(-1)]).reshape(len(test), 2, len(criteria))
    heldout = np.mean((rated[:, 1] > rated[:, 0]) == (merged[:n_test] > 0.5), axis=0)
    summary = {
        "judge": args.judge, "pairs": len(pairs), "excerpt_tokens": args.excerpt_tokens,
        "load_s": loaded, "judge_s": judged, "prompts_judged_now": judge.cost.forward_passes,
        "prompt_tokens_judged_now": judge.cost.tokens,
        "order_agreement": dict(zip(criteria, order_agreement(forward, backward).round(3).tolist(), strict=True)),
        "mean_order_gap": dict(zip(criteria, np.abs(forward - (1 - backward)).mean(axis=0).round(3).tolist(),
                                   strict=True)),
        "mean_p_first_shown": dict(zip(criteria, (1 - np.concatenate([forward, backward])).mean(axis=0).round(3)
                                       .tolist(), strict=True)),
        "rater_loss": history, "rater_heldout_pairs": int(n_test),
        "rater_heldout_agreement": dict(zip(criteria, heldout.round(3).tolist(), strict=True)),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
