"""Embedding throughput side by side in one run: quadlib's ShardEmbedder, SentenceTransformer.encode and
a bare AutoModel forward, on the same real pool texts with the same model, length cap and batch size.

  bare forward   the transformer alone (`model[0].auto_model`), texts tokenized BEFORE the timer,
                 batches bucketed by token length (longest first), under torch.inference_mode: the
                 ceiling for any embedder of this model (no tokenization, pooling or normalisation);
  encode         `SentenceTransformer.encode(texts, batch_size, normalize_embeddings=True)`, one call;
  ShardEmbedder  `quadlib.embed.ShardEmbedder` as `embed_corpus` calls it (windows of
                 batch_size x ENCODE_WINDOW_BATCHES texts), tokenization, pooling and normalisation included;
  bare, unsorted the bare forward on batches in the texts' own order (what length bucketing saves).
The machine is shared, so the methods run in rounds (each once per round, in turn) and every ratio is
the median over rounds of (bare forward time / method time) within the round, in wall time and in
process CPU time (steadier under other users' load); docs/s and tokens/s come from the best wall time.
Tokens are the truncated token counts without padding.

    nice -n 19 .venv/bin/python benchmarks/bench_embed.py --per-source 40 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from quadlib.corpus import iter_records  # noqa: E402
from quadlib.embed import ENCODE_WINDOW_BATCHES, EmbedSettings, ShardEmbedder  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def pool_texts(data: Path, per_source: int) -> list[str]:
    """The first `per_source` documents of every pool source (real text, all sources)."""
    paths = sorted((data / "pool").glob("*.jsonl.gz"))
    if not paths:
        raise SystemExit(f"bench_embed: no pool files (*.jsonl.gz) in {data / 'pool'}; pass --data")
    return [rec.data["text"] for path in paths for rec in islice(iter_records(path), per_source) if rec.data is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--per-source", type=int, default=40, help="pool documents per source")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=EmbedSettings.batch_size)
    parser.add_argument("--max-seq-length", type=int, default=EmbedSettings.max_seq_length)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = pool_texts(args.data, args.per_source)
    embedder = ShardEmbedder(EmbedSettings(batch_size=args.batch_size, max_seq_length=args.max_seq_length))
    model = embedder.model
    auto_model, tokenizer = model[0].auto_model, model.tokenizer
    encoded = tokenizer([text.strip() for text in texts], truncation=True, max_length=model.max_seq_length, verbose=False)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])  # [n]
    n_tokens = int(lengths.sum())

    def batches(order: np.ndarray) -> list[dict[str, torch.Tensor]]:
        out = []
        for start in range(0, len(order), args.batch_size):
            rows = order[start:start + args.batch_size]
            out.append(tokenizer.pad({key: [values[i] for i in rows] for key, values in encoded.items()},
                                     return_tensors="pt"))
        return out

    sorted_batches = batches(np.argsort(-lengths, kind="stable"))
    unsorted_batches = batches(np.arange(len(texts)))

    def bare(prepared: list[dict[str, torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for batch in prepared:
                    auto_model(**batch)
        return run

    def shard_embedder() -> np.ndarray:
        window = args.batch_size * ENCODE_WINDOW_BATCHES
        return np.concatenate([embedder(texts[start:start + window]) for start in range(0, len(texts), window)])

    def encode() -> np.ndarray:
        return model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)

    methods: dict[str, Callable[[], object]] = {
        "bare AutoModel forward (pre-tokenized, length-bucketed)": bare(sorted_batches),
        "quadlib ShardEmbedder": shard_embedder,
        "SentenceTransformer.encode": encode,
        "bare AutoModel forward (pre-tokenized, unsorted batches)": bare(unsorted_batches),
    }
    ours, theirs = shard_embedder(), encode()  # warm-up, and the vectors compared below
    bare(sorted_batches[-1:])()
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            method()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    base = next(iter(methods))
    diff = float(np.abs(ours - theirs).max())
    print(f"\n{model[0].auto_model.config._name_or_path.split('/')[-2] or 'model'}: {len(texts)} pool documents "
          f"({args.per_source} per source), {n_tokens} tokens after truncation at {model.max_seq_length} "
          f"(mean {lengths.mean():.0f}), batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
          f"{args.rounds} rounds; ShardEmbedder vs encode vectors: max |diff| {diff:.1e}\n")
    print("| method | docs/s | tokens/s | x bare forward (wall) | x bare forward (CPU) |")
    print("|---|---|---|---|---|")
    results = {}
    for name in methods:
        wall_ratio = statistics.median(b / m for b, m in zip(wall[base], wall[name], strict=True))
        cpu_ratio = statistics.median(b / m for b, m in zip(cpu[base], cpu[name], strict=True))
        best = min(wall[name])
        results[name] = {"wall": wall[name], "cpu": cpu[name], "x_bare_wall": wall_ratio, "x_bare_cpu": cpu_ratio}
        print(f"| {name} | {len(texts) / best:.1f} | {n_tokens / best:.0f} | {wall_ratio:.2f} | {cpu_ratio:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"docs": len(texts), "tokens": n_tokens, "max_abs_diff_vs_encode": diff,
                                        "args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2))


if __name__ == "__main__":
    main()
