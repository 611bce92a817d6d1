"""The main job as a few library calls over one run folder; the notebooks are thin wrappers.

    corpus (01) -> clusters (01) -> proxy warm-up (02) -> influence scorer (02)
    -> selections by every method (03) -> training and evaluation (05)

Each call reuses what the run folder already holds for the same parameters, so notebooks can be
re-run, resumed after an interruption, or run out of order once their inputs exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
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


# -- the pipeline from a run folder, for `quad select` and `quad evaluate` ---------------------------------
@dataclass
class SelectSettings:
    """What `quad select` makes: every method at one budget and seed (notebook 03's plan)."""

    methods: list[str] = setting(["random", "quad"], "selection methods, keys of quadlib.selection.SELECTORS")
    budget_fraction: float = setting(0.1, "token budget as a fraction of the pool's tokens, the same for every method")
    estimator: str = setting("kfac_joint_qkv", "the influence scorer the selectors use; when the run has no fitted "
                             "scorer yet, it is fitted with the --score-* settings")
    seed: int = setting(0, "seed of every method's selection")


@dataclass
class EvaluateSettings:
    """What `quad evaluate` trains and measures (notebook 05's first half)."""

    seeds: list[int] = setting([0, 1, 2], "training seeds; each seed re-makes every selection with that seed first")
    methods: list[str] | None = setting(None, "methods to evaluate (None: every selection the run holds)")
    estimator: str = setting("kfac_joint_qkv", "the influence scorer the selections were made with")
    from_scratch: bool = setting(False, "train from a fresh initialisation instead of the warm-up checkpoint")
    workers: int = setting(1, "(method, seed) pairs trained and evaluated at once, in worker processes")
    worker_threads: int = setting(1, "torch threads of each worker process")
    keep_models: bool = setting(True, "save the trained weights (metrics and per-item results are always kept)")
    untrained: bool = setting(False, "also evaluate the starting model itself, as the method 'untrained'")


# notebook 05's training settings: every method's model trains on the same number of tokens
EVALUATE_TRAIN = TrainSettings(token_budget=20_000, batch_size=8, block_size=128, warmup_steps=2)


def fitted_scorer(store: RunStore, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  settings: ScoreSettings) -> tuple[InfluenceScorer, CachingScorer]:
    """The scorer of `settings.estimator` the run already fitted (`load_scorer`: notebook 02's settings),
    else one fitted now with `settings`."""
    if any((p / "config.json").exists() for p in (store.root / INFLUENCE_STEP).glob("*-*")):
        return load_scorer(store, model, tokenizer, settings.estimator)
    return prepare_scorer(store, model, tokenizer, settings)


def ensure_clusters(store: RunStore, executor: Any, embed: Any, cluster: Any) -> None:
    """Embed and cluster the pool on `executor` (`quadlib.execution`) unless the run holds a clustering
    (made by 01_cluster or `quad scale --steps embed assign`); both write `<run>/cluster/`."""
    from quadlib.execution.scaleout import ScaleOutSettings, run_scaleout

    store.require_done("corpus", "quad select (run `quad ingest` first)")
    steps = [s for s, done in (("embed", store.is_done("embed")), ("assign", store.is_done("cluster"))) if not done]
    if steps:
        run_scaleout(store, ScaleOutSettings(steps=steps, executor=executor, embed=embed, cluster=cluster))


def ray_scorer(store: RunStore, influence: InfluenceScorer, cached: CachingScorer, ray: Any) -> CachingScorer:
    """`cached` with its scoring on Ray actors (`quadlib.execution.doc_scorer`): each actor loads the
    proxy and the fitted estimator once; a round's documents go out in the batches `influence` forms,
    so scores, cache file and selections are those of the local path."""
    from quadlib.execution.doc_scorer import influence_partition, influence_scorer_factory, ray_doc_scorer
    from quadlib.execution.steps import InfluenceStep

    folder = Path(cached.cache.path).parent
    score = json.loads((folder / "config.json").read_text(encoding="utf-8"))["params"]["score"]
    step = InfluenceStep(store.root / "proxy" / "model", folder / "estimator.safetensors",
                         estimator=score["estimator"], preset=score["preset"], max_length=influence.max_length,
                         batch_size=influence.batch_size)
    return ray_doc_scorer(influence_scorer_factory(step), cached.texts, cached.n_tokens, cached.cache, ray,
                          n_params=cached.n_params, passes=cached.passes, run_root=store.root,
                          partition=influence_partition(influence))


@dataclass
class RunParts:
    """What the selectors need from a run folder (`run_context`): the context, the proxy, and `close`,
    which stops the Ray scoring actors (a no-op on the local executor)."""

    ctx: SelectionContext
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    close: Any = None

    def stop(self) -> None:
        if self.close is not None:
            self.close()


def run_context(store: RunStore, estimator: str, seed: int, executor: Any, proxy: ProxySettings | None = None,
                score: ScoreSettings | None = None) -> RunParts:
    """Notebook 03's context from the run folder, fitting a missing proxy or scorer; with the Ray
    executor (`executor.executor == "ray"`) the scorer's work runs on actors."""
    if not store.is_done("proxy"):
        prepare_proxy(store, proxy or ProxySettings())
    model, tokenizer = load_proxy(store)  # the saved proxy, in eval mode, as every later call loads it
    influence, scorer = fitted_scorer(store, model, tokenizer, replace(score or ScoreSettings(), estimator=estimator))
    close = None
    if executor.executor == "ray":
        scorer = ray_scorer(store, influence, scorer, executor.ray)
        close = scorer.score_texts.close
    return RunParts(selection_context(store, scorer, model, tokenizer, seed=seed), model, tokenizer, close)


def check_methods(methods: list[str]) -> None:
    """Refuse an unknown method before any work starts."""
    from quadlib.selection import SELECTORS

    unknown = [m for m in methods if m not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown selection method(s) {unknown}; known: {sorted(SELECTORS)}")


def select_run(store: RunStore, select: SelectSettings, method_settings: dict[str, dict[str, Any]] | None = None,
               *, executor: Any = None, proxy: ProxySettings | None = None, score: ScoreSettings | None = None,
               embed: Any = None, cluster: Any = None) -> pd.DataFrame:
    """`quad select`: from an ingested run (or one the notebooks made), fit what is missing (embeddings and
    clusters on `executor`, the proxy, the scorer) and make every method's selection with `run_selections`,
    writing what notebook 03 writes (`select-<method>/`, its export). `executor` is a
    `quadlib.execution.ExecutorSettings` (default local)."""
    from quadlib.cluster import ClusterSettings
    from quadlib.embed import EmbedSettings
    from quadlib.execution import ExecutorSettings

    check_methods(select.methods)
    executor = executor or ExecutorSettings()
    ensure_clusters(store, executor, embed or EmbedSettings(), cluster or ClusterSettings())
    parts = run_context(store, select.estimator, select.seed, executor, proxy, score)
    try:
        budget = int(select.budget_fraction * parts.ctx.pool["n_tokens"].sum())
        plan = SelectionPlan(methods=list(select.methods), budget_tokens=budget,
                             method_settings={m: (method_settings or {}).get(m, {}) for m in select.methods})
        return run_selections(store, parts.ctx, plan)
    finally:
        parts.stop()


def selected_methods(store: RunStore) -> list[str]:
    """The methods whose selection the run holds (`run_selections`' markers), in the registry's order."""
    from quadlib.selection import SELECTORS

    return [m for m in SELECTORS if store.is_done(f"selections/{m}")]


def evaluate_run(store: RunStore, options: EvaluateSettings, train: TrainSettings, evaluation: Any, *,
                 executor: Any = None, budget_fraction: float | None = None, **select: Any) -> list[dict[str, Any]]:
    """`quad evaluate`, notebook 05's first half: make the selection of every method in `options.methods`
    the run does not hold yet (`select_run` at `budget_fraction`, with `select`'s settings: so one
    command goes from an ingested pool to evaluated selections), re-make every selection with each seed
    (`select_for_seeds`, scored on `executor`), then train and evaluate them all
    (`quadlib.evaluation.train_eval.evaluate_selections`). Returns its records.

    Every method must have been selected at one token budget; a run mixing budgets is refused.
    """
    from quadlib.evaluation.train_eval import evaluate_selections
    from quadlib.execution import ExecutorSettings

    methods, seeds, estimator = options.methods or selected_methods(store), list(options.seeds), options.estimator
    if not methods:
        raise FileNotFoundError(f"{store.root}: no selection to evaluate; name --methods or run "
                                f"`quad select --run {store.root}` first")
    executor = executor or ExecutorSettings()
    missing = [m for m in methods if not store.is_done(f"selections/{m}")]
    budgets = {m: store.read_config(f"selections/{m}")["params"]["budget_tokens"] for m in methods if m not in missing}
    fraction = SelectSettings().budget_fraction if budget_fraction is None else budget_fraction
    if missing:
        store.require_done("corpus", "quad evaluate (run `quad ingest` first)")
        pool_tokens = int(read_corpus(store, columns=["n_tokens"])["n_tokens"].sum())
        budgets.update(dict.fromkeys(missing, int(fraction * pool_tokens)))  # select_run's budget
    if len(set(budgets.values())) > 1:
        raise ValueError(f"{store.root}: the methods would be compared at different token budgets {budgets}; "
                         "evaluate each budget's methods separately, or pass the --budget-fraction they were "
                         "selected at")
    if missing:
        select_run(store, SelectSettings(methods=missing, budget_fraction=fraction, estimator=estimator,
                                         seed=seeds[0]), executor=executor, **select)
    parts = run_context(store, estimator, seeds[0], executor)
    try:
        select_for_seeds(store, parts.ctx.scorer, parts.model, parts.tokenizer, methods, seeds)
    finally:
        parts.stop()
    return evaluate_selections(store, methods, store.root / "proxy" / "model", parts.tokenizer, train, seeds,
                               evaluation, from_scratch=options.from_scratch, workers=options.workers,
                               worker_threads=options.worker_threads, keep_models=options.keep_models,
                               untrained=options.untrained)
