"""One ablation experiment (notebook 04): a clustering variant, a selection, training, evaluation.

The base run (corpus, embeddings, warmed-up proxy, fitted scorers from notebooks 01-02) is shared;
clusters of another k or algorithm are written as their own step of the base run, the influence
score cache is shared (scores are keyed by document id, so every experiment reuses what another
scored), and the selection and its result go to the experiment's own folder. Training and
evaluation results land under `<base>/eval/ablate-<name>/` so 05_evaluate finds them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from quadlib.cluster import ClusterSettings, cluster_corpus, load_assignments
from quadlib.evaluation.train_eval import EvalSettings, train_and_evaluate
from quadlib.pipeline import load_proxy, load_scorer, selection_context
from quadlib.proxy import TrainSettings
from quadlib.runstore import RunStore, write_json_atomic
from quadlib.selection import BanditSettings, export_selection, make_selector
from quadlib.selection.metrics import quality_diversity
from quadlib.settings import setting

BASE_CLUSTER_STEP = "cluster"
ABLATION_PREFIX = "ablate-"  # <base>/eval/ablate-<name>/: an experiment's model, beside 05's (quad profile groups them)


@dataclass
class ExperimentSettings:
    method: str = setting("quad", "selector: 'quad', 'quad_released' or a baseline such as 'topk_clusters' (Fig. 4a)")
    estimator: str = setting("kfac_joint_qkv", "influence variant (Figs. 4b/4c)")
    n_clusters: int | None = setting(None, "k of a re-clustering (Fig. 5d); None: the base run's k")
    cluster_algorithm: str = setting("faiss_kmeans", "clustering algorithm (Fig. 5c); the base run's clusters "
                                     "are reused when it and k match them")
    # The bandit's knobs default to BanditSettings' (their one home); alpha and tau are in `units`.
    alpha: float = setting(BanditSettings.alpha, "UCB exploration weight, in `units`")
    tau: float = setting(BanditSettings.tau, "influence threshold, in `units`")
    gamma: float = setting(BanditSettings.gamma, "fraction of a batch kept at most")
    k: int = setting(BanditSettings.k, "clusters pulled per round")
    batch_size: int = setting(BanditSettings.batch_size, "documents per pulled cluster and round")
    units: str = setting(BanditSettings.units, "'score_scale': alpha and tau in standard deviations of the scores "
                         "the bandit has seen (per document, whatever the batch size); 'absolute': score units")
    budget_fraction: float = setting(0.1, "selection budget as a fraction of the pool's tokens (Table 5)")
    train_tokens: int = setting(20_000, "tokens every trained model sees, whatever its selection's size")
    lr: float = setting(TrainSettings.lr, "peak learning rate of the training (for a pretrained model such as "
                        "SmolLM2, about 1e-4); 05_evaluate's LR")
    max_reference_docs: int | None = setting(None, "evaluate only the first N documents of the reference's "
                                             "evaluation part (None: all); 05_evaluate's MAX_REFERENCE_DOCS")
    max_heldout_docs: int | None = setting(200, "held-out documents evaluated at most; 05_evaluate's MAX_HELDOUT_DOCS")
    seed: int = setting(0, "selection and training seed")


def ablation_clusters(base: RunStore, settings: ExperimentSettings) -> pd.DataFrame:
    """The base run's clusters when k and algorithm match them, else a re-clustering stored as its
    own step of the base run (k defaults to the base run's, so Fig. 5c compares algorithms at one k)."""
    base_params = (base.read_config(BASE_CLUSTER_STEP) or {}).get("params", {}).get("cluster", {})
    if not base_params:
        raise FileNotFoundError(f"{base.root / BASE_CLUSTER_STEP}: no clusters; run 01_cluster first")
    k = settings.n_clusters or int(base_params["k"])
    if k == base_params["k"] and settings.cluster_algorithm == base_params["algorithm"]:
        return load_assignments(base, BASE_CLUSTER_STEP)
    step = f"cluster-{settings.cluster_algorithm}-k{k}"
    cluster_corpus(base, ClusterSettings(k=k, algorithm=settings.cluster_algorithm, seed=settings.seed), out_step=step)
    return load_assignments(base, step)


def run_experiment(base_dir: str | Path, result_dir: str | Path, settings: ExperimentSettings,
                   name: str) -> dict[str, Any]:
    """Run one experiment and write `<result_dir>/result.json` (flat: parameters and measurements)."""
    base, own = RunStore(base_dir), RunStore(result_dir)
    model, tokenizer = load_proxy(base)
    _, scorer = load_scorer(base, model, tokenizer, settings.estimator)
    ctx = selection_context(base, scorer, model, tokenizer, seed=settings.seed)
    ctx.assignments = ablation_clusters(base, settings)
    ctx.run_dir = own.root
    budget = int(settings.budget_fraction * ctx.pool["n_tokens"].sum())
    selector_settings: dict[str, Any] = {}
    if settings.method in ("quad", "quad_released"):  # the bandit reads alpha and tau in `units` itself
        selector_settings = {"alpha": settings.alpha, "tau": settings.tau, "gamma": settings.gamma,
                             "k": settings.k, "batch_size": settings.batch_size, "units": settings.units}
    start = time.perf_counter()
    selection = make_selector(settings.method, selector_settings).select(ctx, budget)
    select_seconds = time.perf_counter() - start
    export_selection(selection, ctx, own)
    scores = pd.Series(scorer.cached(ctx.pool["id"].tolist()))
    measured = quality_diversity(selection.ids, scores, ctx.assignments)
    texts = ctx.pool.set_index("id").loc[sorted(selection.ids), "text"].tolist()
    records = train_and_evaluate(
        base, f"{ABLATION_PREFIX}{name}", texts, base.root / "proxy" / "model", tokenizer,
        TrainSettings(token_budget=settings.train_tokens, batch_size=8, block_size=128, warmup_steps=2, lr=settings.lr),
        [settings.seed], EvalSettings(max_reference_docs=settings.max_reference_docs,
                                      max_heldout_docs=settings.max_heldout_docs))
    result = {**asdict(settings), **measured, "budget_tokens": budget, "tokens_selected": selection.tokens_selected,
              "select_seconds": select_seconds, "docs_scored": selection.cost.docs_scored,
              "flops": selection.cost.flops, **records[0]["metrics"]}
    write_json_atomic(own.root / "result.json", result)
    return result
