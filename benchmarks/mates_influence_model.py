"""How well does MATES' data-influence model predict its oracles? Held-out Spearman against one-step
probe oracles, next to a per-domain-mean predictor and the old ridge on frozen MiniLM embeddings.

The run is the real-data demo's first steps: the pool and the reference (its selection split) are
ingested, the proxy is warmed up (`quadlib.pipeline.ProxySettings` defaults), and `--oracles` pool
documents (a seeded uniform sample) are probed with `HFProbeModel.one_step_delta` from the warm-up
checkpoint's weights and AdamW moments, against the reference selection split's first 64 documents,
as `MATESSelector` does in its first interval. The oracles are cached in `<run>/mates-oracles.parquet`
(resumable). Then k-fold cross-validation: per fold, a fresh `DataInfluenceModel` (MiniLM fine-tuned,
the MATES defaults) is trained on the other folds' z-scored oracles and predicts the fold.

    python benchmarks/mates_influence_model.py --run runs/mates-bench \
        --pool '../shared/data/pool/*.jsonl.gz' --reference ../shared/data/reference/lambada_test.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/mates-bench")
    parser.add_argument("--pool", default="../shared/data/pool/*.jsonl.gz")
    parser.add_argument("--reference", default="../shared/data/reference/lambada_test.jsonl.gz")
    parser.add_argument("--oracles", type=int, default=400)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON result file (default <run>/mates-influence-model.json)")
    parser.add_argument("--reference-docs", type=int, default=64, help="reference documents per probe (MATES "
                        "selector: 64)")
    parser.add_argument("--doc-max-length", type=int, default=256, help="proxy tokens per probed document")
    parser.add_argument("--dim-max-length", type=int, default=128, help="encoder tokens per document")
    parser.add_argument("--from-checkpoint", default=None,
                        help="probe from this warm-up checkpoint folder (weights and AdamW moments) instead of "
                             "finishing the warm-up")
    parser.add_argument("--cached-only", action="store_true",
                        help="probe nothing: cross-validate on the oracles already cached in the run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from quadlib.corpus import CorpusSettings, ingest, read_corpus, read_reference, split_reference
    from quadlib.pipeline import ProxySettings, prepare_proxy
    from quadlib.proxy import latest_checkpoint
    from quadlib.runstore import RunStore
    from quadlib.selection.probes import HFProbeModel

    store = RunStore(args.run)
    cache = store.root / "mates-oracles.parquet"
    if args.cached_only:
        done = pd.read_parquet(cache)
        pool = read_corpus(store, columns=["id", "text", "source"]).set_index("id").loc[done["id"]].reset_index()
        result = cross_validate(pool.assign(oracle=done["oracle"].to_numpy()), args.folds, args.seed,
                                args.dim_max_length)
        result |= {"oracles": len(done), "oracle_mean": float(done["oracle"].mean()),
                   "oracle_std": float(done["oracle"].std(ddof=0))}
        Path(args.out or store.root / "mates-influence-model.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "folds"}, indent=1))
        return
    ingest(store, args.reference, step="reference", settings=CorpusSettings(id_field=None, source_field=None))
    ingest(store, args.pool, settings=CorpusSettings(heldout_fraction=0.1, overlap_step="reference"))
    split_reference(store)
    if args.from_checkpoint:
        from quadlib.proxy import build_model, load_model_checkpoint, load_tokenizer

        tokenizer = load_tokenizer(store.root / "proxy" / "tokenizer")
        model = load_model_checkpoint(build_model(ProxySettings().model, tokenizer=tokenizer), args.from_checkpoint)
        checkpoint = Path(args.from_checkpoint)
    else:
        model, tokenizer = prepare_proxy(store, ProxySettings())
        checkpoint = latest_checkpoint(store.root / "proxy" / "checkpoints")
    reference = read_reference(store, "selection", columns=["text"])["text"].tolist()[:args.reference_docs]
    probe = HFProbeModel(model.eval(), tokenizer, reference, max_length=args.doc_max_length)
    probe.load_optimizer_moments(checkpoint)

    pool = read_corpus(store, columns=["id", "text", "source"]).sort_values("id").reset_index(drop=True)
    sample = pool.iloc[np.random.default_rng([args.seed, 1]).permutation(len(pool))[:args.oracles]]
    done = pd.read_parquet(cache) if cache.exists() else pd.DataFrame({"id": [], "oracle": []})
    known = dict(zip(done["id"], done["oracle"], strict=True))
    start = time.perf_counter()
    for n, (doc_id, text) in enumerate(zip(sample["id"], sample["text"], strict=True)):
        if doc_id not in known:
            known[doc_id] = probe.one_step_delta([text])
            if len(known) % 25 == 0:
                pd.DataFrame({"id": list(known), "oracle": list(known.values())}).to_parquet(cache)
                print(f"{len(known)} oracles, {time.perf_counter() - start:.0f} s", flush=True)
    pd.DataFrame({"id": list(known), "oracle": list(known.values())}).to_parquet(cache)
    oracle_s = time.perf_counter() - start
    result = cross_validate(sample.assign(oracle=sample["id"].map(known)), args.folds, args.seed,
                            args.dim_max_length)
    result |= {"oracles": len(sample), "oracle_seconds_this_run": round(oracle_s, 1),
               "oracle_mean": float(np.mean(list(known.values()))), "oracle_std": float(np.std(list(known.values()))),
               "probe_cost": probe.cost.__dict__, "reference_docs": len(reference), "checkpoint": str(checkpoint),
               "doc_max_length": args.doc_max_length, "dim_max_length": args.dim_max_length}
    out = Path(args.out or store.root / "mates-influence-model.json")
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "folds"}, indent=1))


def cross_validate(frame: pd.DataFrame, folds: int, seed: int, max_length: int = 128) -> dict:
    from sklearn.linear_model import Ridge

    from quadlib.embed import EmbedSettings, ShardEmbedder
    from quadlib.selection.methods.mates import (
        DataInfluenceModel,
        InfluenceModelSettings,
        domain_mean_prediction,
        spearman,
        standardise,
    )

    texts = frame["text"].tolist()
    oracle = frame["oracle"].to_numpy(dtype=np.float64)
    domains = frame["source"].to_numpy()
    vectors = ShardEmbedder(EmbedSettings(device="cpu", max_seq_length=max_length))(texts)  # frozen MiniLM, for the old ridge
    fold_of = np.random.default_rng([seed, 2]).permutation(len(frame)) % folds
    pred = {name: np.zeros(len(frame)) for name in ("model", "domain_mean", "ridge_frozen")}
    per_fold = []
    for f in range(folds):
        train, test = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        z, _, _ = standardise(oracle[train])
        model = DataInfluenceModel(InfluenceModelSettings(device="cpu", max_seq_length=max_length),
                                   seed=seed * 1000 + f)
        t0 = time.perf_counter()
        model.fit([texts[i] for i in train], z)
        pred["model"][test], _ = model.predict([texts[i] for i in test])
        pred["domain_mean"][test] = domain_mean_prediction(domains[train], oracle[train], domains[test])
        pred["ridge_frozen"][test] = Ridge(alpha=1.0).fit(vectors[train], oracle[train]).predict(vectors[test])
        row = {"fold": f, "n_test": len(test), "fit_seconds": round(time.perf_counter() - t0, 1)}
        row |= {name: spearman(p[test], oracle[test]) for name, p in pred.items()}
        per_fold.append(row)
        print(row, flush=True)
    summary = {f"{name}_spearman_pooled": spearman(p, oracle) for name, p in pred.items()}
    summary |= {f"{name}_spearman_fold_mean": float(np.mean([r[name] for r in per_fold])) for name in pred}
    summary |= {f"{name}_spearman_fold_std": float(np.std([r[name] for r in per_fold])) for name in pred}
    return {"folds": per_fold, **summary}


if __name__ == "__main__":
    main()
