"""The main job as a few library calls over one run folder; the notebooks are thin wrappers.

    corpus (01) -> clusters (01) -> proxy warm-up (02) -> influence scorer (02)
    -> selections by every method (03) -> training and evaluation (05)

Each call reuses what the run folder already holds for the same parameters, so notebooks can be
re-run, resumed after an interruption, or run out of order once their inputs exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quadlib.cluster import load_assignments
from quadlib.corpus import SELECTION_PART, read_corpus, read_reference, split_reference
from quadlib.embed import load_embeddings
from quadlib.influence.estimators import PRESETS, make_estimator
from quadlib.influence.scorer import InfluenceScorer
from quadlib.proxy import TrainSettings, build_model, latest_checkpoint, load_tokenizer, warmup_proxy
from quadlib.runstore import RunStore, to_jsonable
from quadlib.selection import (CachingScorer, SelectionContext, export_selection, make_selector, read_selection,
                               selection_store)
from quadlib.selection.bandit import clustering_digest, scorer_identity
from quadlib.selection.probes import HFProbeModel
from quadlib.settings import setting

INFLUENCE_STEP = "influence"


@dataclass
class ProxySettings:
    model: str = setting("tiny-llama", "a named config of quadlib.proxy.MODEL_CONFIGS, a local path or a hub name")
    tokenizer_vocab: int | None = setting(4096, "train a byte-level BPE of this size on the warm-up sample; "
                                          "None uses the model's own tokenizer")
    warmup_docs: int = setting(1000, "pool documents (seeded sample) the proxy is warm-up trained on")
    train: TrainSettings = setting(TrainSettings(total_steps=150, batch_size=16, block_size=128, warmup_steps=15),
                                   "warm-up optimisation settings")
    seed: int = setting(0, "seed of the warm-up sample")


@dataclass
class ScoreSettings:
    estimator: str = setting("kfac_joint_qkv", "a key of quadlib.influence.estimators (dot, cosine, kfac_mlp, "
                             "kfac_attn_indep, kfac_joint_qkv, ekfac_joint_qkv)")
    preset: str = setting("default", "a key of quadlib.influence.estimators.PRESETS (damping, Fisher kind)")
    fit_docs: int = setting(256, "pool documents (seeded sample) the curvature is fitted on")
    reference_docs: int = setting(256, "reference documents forming the aggregated reference gradient")
    max_length: int = setting(128, "tokens per document when scoring")
    seed: int = setting(0, "seed of the fit and reference samples")


def seeded_sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """`n` rows (all when fewer), in their original order: a seeded, order-stable sample."""
    if n >= len(frame):
        return frame
    rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=n, replace=False))
    return frame.iloc[rows]


def prepare_proxy(store: RunStore, settings: ProxySettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Warm-up train the proxy on a pool sample (paper §4.1: influence on a partially trained model)."""
    sample = seeded_sample(read_corpus(store, columns=["id", "text"]), settings.warmup_docs, settings.seed)
    model, tokenizer = warmup_proxy(store, sample["text"].tolist(), settings.model, settings.tokenizer_vocab,
                                    settings.train)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_proxy(store: RunStore, step: str = "proxy") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The warmed-up proxy that `prepare_proxy` (notebook 02) left in the run folder."""
    folder = store.root / step / "model"
    if not store.is_done(step):
        raise FileNotFoundError(f"{folder}: no warmed-up proxy; run notebook 02_score (prepare_proxy) first")
    tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return build_model(str(folder), tokenizer=tokenizer).eval(), tokenizer


def load_scorer(store: RunStore, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                estimator: str) -> tuple[InfluenceScorer, CachingScorer]:
    """The scorer that notebook 02 fitted for `estimator` (its settings are read from the run); one
    not fitted yet is fitted with the settings of the last one that was."""
    def fitted(pattern: str) -> list[Path]:
        found = (p for p in (store.root / INFLUENCE_STEP).glob(pattern) if (p / "config.json").exists())
        return sorted(found, key=lambda p: p.stat().st_mtime)

    # Another estimator's settings (samples, damping, length) serve when this one was not fitted yet.
    candidates = fitted(f"{estimator}-*") or fitted("*-*")
    if not candidates:
        raise FileNotFoundError(f"{store.root / INFLUENCE_STEP}: no fitted scorer; run 02_score first")
    params = json.loads((candidates[-1] / "config.json").read_text(encoding="utf-8"))["params"]["score"]
    return prepare_scorer(store, model, tokenizer, ScoreSettings(**(params | {"estimator": estimator})))


def _identity(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(payload), sort_keys=True).encode()).hexdigest()[:12]


def prepare_scorer(store: RunStore, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   settings: ScoreSettings) -> tuple[InfluenceScorer, CachingScorer]:
    """The influence scorer (curvature fitted, reference direction preconditioned) and its cached
    `DocScorer` view keyed by id.

    Fitted estimators are saved as safetensors and reloaded on a rerun; scores live in one parquet
    cache per (proxy, estimator, settings) identity, so replays never recompute a score.
    """
    proxy_config = store.read_config("proxy") or {}
    # The resolved estimator settings (damping, Fisher kind, scoring mode) are part of the identity:
    # a changed preset or library default must not mix two kinds of score in one cache.
    resolved = asdict(PRESETS[settings.preset])
    # The reference gradient is built from the reference's selection part: its split is part of the identity.
    split = split_reference(store)
    reference_split = {"settings": split["settings"], "reference_ids_sha256": split["reference_ids_sha256"]}
    identity = _identity({"proxy": proxy_config.get("params"), "score": asdict(settings), "estimator": resolved,
                          "reference_split": reference_split})
    step = f"{INFLUENCE_STEP}/{settings.estimator}-{identity}"
    folder = store.step_dir(step)
    estimator = make_estimator(settings.estimator, PRESETS[settings.preset])
    scorer = InfluenceScorer(model, tokenizer, estimator, max_length=settings.max_length)
    state = folder / "estimator.safetensors"
    if store.begin(step, {"score": settings, "estimator": resolved, "proxy": proxy_config.get("params"),
                          "reference_split": reference_split}, seed=settings.seed):
        estimator.load(model, state)
    else:
        pool = read_corpus(store, columns=["id", "text"])
        reference = read_reference(store, SELECTION_PART, columns=["text"])
        scorer.fit_texts(seeded_sample(pool, settings.fit_docs, settings.seed)["text"].tolist())
        scorer.set_reference_texts(seeded_sample(reference, settings.reference_docs, settings.seed)["text"].tolist())
        estimator.save(state)
        store.mark_done(step, info={"fit_cost": asdict(scorer.cost)})
    corpus = read_corpus(store, columns=["id", "text", "n_tokens"])
    cached = CachingScorer(scorer.score_texts, dict(zip(corpus["id"], corpus["text"], strict=True)),
                           dict(zip(corpus["id"], corpus["n_tokens"], strict=True)), folder / "scores.parquet",
                           n_params=scorer.n_params, passes=scorer.passes_per_document(), counter=scorer.cost)
    return scorer, cached


def selection_context(store: RunStore, scorer: CachingScorer | None = None, model: PreTrainedModel | None = None,
                      tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0) -> SelectionContext:
    """Everything the selectors may need, read from the run folder; of the reference, only its selection part."""
    ids, vectors = load_embeddings(store)
    reference = read_reference(store, SELECTION_PART, columns=["text"])["text"].tolist()
    probe = HFProbeModel(model, tokenizer, reference[:64]) if model is not None and tokenizer is not None else None
    warmup = latest_checkpoint(store.root / "proxy" / "checkpoints")
    if probe is not None and warmup is not None:
        probe.load_optimizer_moments(warmup)  # MATES probes continue the warm-up's AdamW state
    return SelectionContext(
        pool=read_corpus(store), reference_texts=reference, assignments=load_assignments(store),
        embeddings=vectors, embedding_ids=ids, scorer=scorer,
        doc_losses=probe.doc_losses if probe is not None else None,
        proxy_params=probe.n_params if probe is not None else None, probe=probe, seed=seed, run_dir=store.root)


@dataclass
class SelectionPlan:
    """Which methods to run at what budget; every method gets the same budget and seed."""

    methods: list[str] = field(default_factory=lambda: ["random", "quad"])
    budget_tokens: int = 20_000
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)


def selection_key(ctx: SelectionContext) -> dict[str, Any]:
    """What besides the method's settings, budget and seed made a selection: the clustering, the
    scorer's identity (proxy, estimator, estimator settings and reference sample: one score cache
    per identity) and the reference texts the selectors read. A saved selection is reused only
    when all of them match (issue 14.4)."""
    reference = hashlib.sha256("\0".join(map(str, ctx.reference_texts)).encode()).hexdigest()
    return {"clusters": clustering_digest(ctx.assignments) if ctx.assignments is not None else None,
            "scorer": scorer_identity(ctx.scorer), "reference": reference}


def run_selections(store: RunStore, ctx: SelectionContext, plan: SelectionPlan) -> pd.DataFrame:
    """Run every method of `plan` (skipping those already exported with the same settings) and
    return one row per method: tokens, documents, cost and wall time from its manifest."""
    rows = []
    for method in plan.methods:
        settings = plan.method_settings.get(method, {})
        # Own marker: the export step's config records the method's resolved parameters instead.
        step = f"selections/{method}"
        selector = make_selector(method, settings)  # resolved settings: a changed default is a changed key
        params = {"method": method, "settings": selector.params(), "budget_tokens": plan.budget_tokens,
                  "seed": ctx.seed, **selection_key(ctx)}
        if not store.begin(step, params, seed=ctx.seed):
            selection = selector.select(ctx, plan.budget_tokens)
            export_selection(selection, ctx, store)
            store.mark_done(step)
        _, manifest = read_selection(store, method)
        rows.append({"method": method, **{k: manifest.get(k) for k in ("n_docs", "tokens_selected", "wall_time_s")},
                     **{f"cost_{k}": v for k, v in manifest.get("cost", {}).items()}})
    return pd.DataFrame(rows)


def select_for_seeds(store: RunStore, scorer: CachingScorer | None, model: PreTrainedModel | None,
                     tokenizer: PreTrainedTokenizerBase | None, methods: list[str], seeds: list[int]) -> pd.DataFrame:
    """Re-make every method's selection with each seed (issue 14.2), so seeds vary the selection too.

    The plan is the one `run_selections` recorded for the run's own selection (`selections/<method>`:
    the method's resolved settings and budget); only the seed changes, and with it every seeded part
    of a method: the bandit's sampling, Random's draw, DSIR's resampling, MATES' and top-k's samples.
    A seed whose selection the run already holds is skipped; others go to
    `<run>/selection-seeds/seed-<s>/` (`quadlib.selection.selection_store`), resumable like any run.
    The clustering, scorer and reference must be those of the recorded selection (else an error).
    Returns one row per (seed, method) re-made or found.
    """
    rows = []
    for seed in seeds:
        ctx = None
        # a method sized by another's cost (top-k influence's equal_cost_with) runs after that one
        ordered = sorted(methods, key=lambda m: (store.read_config(f"selections/{m}") or {}).get("params", {})
                         .get("settings", {}).get("equal_cost_with") is not None)
        for method in ordered:
            target = selection_store(store, method, seed)
            if target.root == store.root:
                continue
            recorded = store.read_config(f"selections/{method}")
            if recorded is None:
                raise FileNotFoundError(f"{store.root / 'selections' / method}: no recorded selection plan for "
                                        f"{method!r}; run 03_bandit (run_selections) first")
            params = recorded["params"]
            if ctx is None:
                ctx = selection_context(store, scorer, model, tokenizer, seed=seed)
                ctx.run_dir = target.root
            key = selection_key(ctx)
            changed = [k for k in key if k in params and params[k] != key[k]]
            if changed:
                raise ValueError(f"seed {seed} of {method!r} would differ from the run's selection in {changed}: "
                                 "pass the scorer (estimator), clustering and reference it was made with")
            plan = SelectionPlan(methods=[method], budget_tokens=params["budget_tokens"],
                                 method_settings={method: params["settings"]})
            rows.append(run_selections(target, ctx, plan).assign(seed=seed))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def sample_per_cluster(assignments: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to `n` documents from every cluster (seeded), for per-cluster influence figures."""
    rng = np.random.default_rng(seed)
    parts = [group.iloc[np.sort(rng.choice(len(group), size=min(n, len(group)), replace=False))]
             for _, group in assignments.sort_values(["cluster", "id"]).groupby("cluster")]
    return pd.concat(parts, ignore_index=True)
