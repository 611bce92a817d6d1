"""Train the proxy on each method's selection and evaluate it, per seed (issue 5, section 1).

Every method is trained with the same `TrainSettings` (so the same token budget, schedule and
hyper-parameters) and the same seeds, starting from the same model: the warm-up checkpoint, or a
fresh initialisation of the same architecture (`from_scratch`). Per method and seed::

    <run>/eval/<method>/seed-<s>/config.json     parameters (RunStore)
    <run>/eval/<method>/seed-<s>/checkpoints/    resumable training checkpoints (removed when done)
    <run>/eval/<method>/seed-<s>/model/          the trained model (config.json + model.safetensors)
    <run>/eval/<method>/seed-<s>/metrics.json    every metric, the training summary and timings
    <run>/eval/<method>/seed-<s>/items.parquet   per-item results (quadlib.evaluation.items) for paired tests

(`scratch-seed-<s>/` for runs from a fresh initialisation.)

A finished (method, seed) pair is skipped; an interrupted one resumes from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from quadlib.corpus import EVALUATION_PART, read_corpus, read_reference
from quadlib.device import default_device
from quadlib.evaluation.items import ITEMS_FILE, UNTRAINED, concat_items
from quadlib.evaluation.lm_metrics import (LMMetricSettings, heldout_items, lambada_items, reference_items,
                                            spread_over_sources)
from quadlib.evaluation.tasks import TaskSettings, evaluate_tasks, task_items, task_metrics
from quadlib.proxy import MODEL_CONFIGS, TrainSettings, build_model, save_model, train_lm
from quadlib.runstore import RunStore, write_json_atomic
from quadlib.selection.export import read_selection, selection_store
from quadlib.settings import setting

EVAL_STEP = "eval"
METRICS_FILE = "metrics.json"


@dataclass
class EvalSettings:
    """What to measure after training; the same for every method and seed."""

    reference_step: str | None = setting("reference", "run step holding the reference set (only its evaluation "
                                                      "part is read, see quadlib.corpus.split_reference); None skips it")
    heldout_step: str | None = setting("heldout", "run step of held-out pool documents; None (or absent) skips it")
    lambada: bool = setting(False, "also report LAMBADA last-word accuracy on the reference texts "
                                   "(set when the reference set is LAMBADA)")
    max_reference_docs: int | None = setting(None, "evaluate only the first N documents of the reference's "
                                                   "evaluation part (None: all)")
    max_heldout_docs: int | None = setting(None, "evaluate at most N held-out documents, spread evenly over "
                                                           "sources (None: all)")
    eval_dir: str | None = setting(None, "folder of the multiple-choice task files (../shared/data/eval); None skips tasks")
    tasks: list[str] | None = setting(None, "task names; None: every registered task whose file exists")
    task_limit: int | None = setting(None, "items per task (None: all)")
    task_backend: str = setting("quad", "task scorer: 'quad' (ours) or 'lm_eval'")
    batch_size: int = setting(16, "sequences per forward pass")
    batch_tokens: int = setting(16_384, "padded tokens per forward pass")
    progress: bool = setting(False, "show progress bars")

    def lm_settings(self) -> LMMetricSettings:
        return LMMetricSettings(batch_size=self.batch_size, batch_tokens=self.batch_tokens, progress=self.progress)

    def task_settings(self) -> TaskSettings:
        return TaskSettings(tasks=self.tasks, limit=self.task_limit, backend=self.task_backend,
                            batch_size=self.batch_size, batch_tokens=self.batch_tokens, progress=self.progress)


def eval_step(method: str, seed: int, from_scratch: bool = False) -> str:
    """The run-store step of one (method, seed) pair; from-scratch runs live beside warm-started ones."""
    return f"{EVAL_STEP}/{method}/{'scratch-' if from_scratch else ''}seed-{seed}"


def read_selection_texts(store: RunStore, method: str) -> list[str]:
    """The texts of method's exported selection, sorted by id (training packs them in this order)."""
    table, _ = read_selection(store, method)
    if table.empty:
        raise ValueError(f"{store.root / f'select-{method}'}: the selection of {method!r} is empty")
    return table.sort_values("id", kind="stable")["text"].tolist()


def initial_model(base_model: str | Path, tokenizer: PreTrainedTokenizerBase, from_scratch: bool,
                  seed: int, device: str | None) -> PreTrainedModel:
    """The model training starts from: the warm-up weights, or a seeded fresh init of the same architecture.

    A registry name (e.g. "tiny-llama") is always a fresh initialisation.
    """
    name = str(base_model)
    if not from_scratch or name in MODEL_CONFIGS:
        return build_model(name, device=device, tokenizer=tokenizer, seed=seed)
    config = AutoConfig.from_pretrained(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(default_device(device))


def texts_sha256(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def evaluate_model(store: RunStore, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   settings: EvalSettings) -> dict[str, float]:
    """Every metric of one trained model, flat: ref_loss, ref_ppl, heldout/<source>, <task>/acc ..."""
    return evaluate_model_items(store, model, tokenizer, settings)[0]


def evaluate_model_items(store: RunStore, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         settings: EvalSettings) -> tuple[dict[str, float], pd.DataFrame]:
    """`evaluate_model`'s metrics and the per-item results they aggregate (`quadlib.evaluation.items`)."""
    lm = settings.lm_settings()
    metrics: dict[str, float] = {}
    items: list[pd.DataFrame] = []
    if settings.reference_step is not None:
        reference = read_reference(store, EVALUATION_PART, settings.reference_step).iloc[: settings.max_reference_docs]
        texts = reference["text"].tolist()
        ids = reference["id"].astype(str).tolist() if "id" in reference.columns else None
        values, rows = reference_items(model, tokenizer, texts, ids, lm)
        metrics |= values
        items.append(rows)
        if settings.lambada:
            values, rows = lambada_items(model, tokenizer, texts, ids, lm)
            metrics |= values
            items.append(rows)
    if settings.heldout_step is not None and store.shards(settings.heldout_step):
        frame = read_corpus(store, settings.heldout_step)
        values, rows = heldout_items(model, tokenizer, spread_over_sources(frame, settings.max_heldout_docs), lm)
        metrics |= values
        items.append(rows)
    if settings.eval_dir is not None:
        scores = evaluate_tasks(model, tokenizer, settings.eval_dir, settings.task_settings())
        metrics |= task_metrics(scores)
        items.append(task_items(scores))
    return metrics, concat_items(items)


def variance_sources(selection_varies: bool, from_scratch: bool) -> list[str]:
    """What differs between the seeds of one method: the spread over seeds covers these and nothing else."""
    return (["selection"] if selection_varies else []) + ["training order"] + (["initialisation"] if from_scratch else [])


def train_and_evaluate(store: RunStore, method: str, selection_texts: Sequence[str], base_model: str | Path,
                       tokenizer: PreTrainedTokenizerBase, train_settings: TrainSettings, seeds: Sequence[int],
                       eval_settings: EvalSettings, *, from_scratch: bool = False, progress: bool = False,
                       selection_seed: int | None = None, selection_varies: bool = False,
                       keep_model: bool = True) -> list[dict[str, Any]]:
    """Train on `selection_texts` once per seed, evaluate, write metrics.json; return them in seed order.

    `base_model` is the warm-up model folder (`<run>/proxy/model`) or a registry name. The token
    budget must be fixed (`token_budget` or `total_steps`), so every method trains on as many tokens
    whatever the size of its selection. Seeds set both the data order and, from scratch, the init.
    metrics.json records the seed the selection was made with (`selection_seed`) and the
    `variance_sources` the spread over seeds covers (`selection_varies`: each seed has its own selection).
    """
    if train_settings.token_budget is None and train_settings.total_steps is None:
        raise ValueError("set TrainSettings.token_budget (or total_steps): methods must train on the same "
                         "number of tokens, whatever their selection's size")
    if not selection_texts:
        raise ValueError(f"method {method!r}: the selection has no texts")
    records = []
    for seed in seeds:
        settings = replace(train_settings, seed=seed)
        step = eval_step(method, seed, from_scratch)
        params = {"method": method, "selection_sha256": texts_sha256(selection_texts), "base_model": str(base_model),
                  "from_scratch": from_scratch, "train": settings.trajectory(), "eval": eval_settings}
        folder = store.step_dir(step)
        with store.lock(step):  # a second process on this pair waits, then finds it done
            _train_pair(store, step, params, method, seed, selection_texts, base_model, tokenizer, settings,
                        eval_settings, from_scratch=from_scratch, progress=progress, keep_model=keep_model)
        record = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
        provenance = {"selection_seed": selection_seed,
                      "variance_sources": variance_sources(selection_varies, from_scratch)}
        if any(record.get(k) != v for k, v in provenance.items()):  # a finished run from before these keys
            record |= provenance
            write_json_atomic(folder / METRICS_FILE, record)
        records.append(record)
    return records


def _train_pair(store: RunStore, step: str, params: dict[str, Any], method: str, seed: int,
                selection_texts: Sequence[str], base_model: str | Path, tokenizer: PreTrainedTokenizerBase,
                settings: TrainSettings, eval_settings: EvalSettings, *, from_scratch: bool, progress: bool,
                keep_model: bool = True) -> None:
    """Train one (method, seed) pair from `base_model` on `selection_texts`, evaluate it, mark it done
    (resuming from its latest checkpoint; nothing to do when it is done with these params)."""
    folder = store.step_dir(step)
    if not store.begin(step, params, seed=seed):
        model = initial_model(base_model, tokenizer, from_scratch, seed, settings.device)
        start = time.perf_counter()
        result = train_lm(model, tokenizer, selection_texts, settings, folder / "checkpoints", resume=True,
                          progress=progress)
        train_seconds = time.perf_counter() - start
        if keep_model:
            save_model(model, tokenizer, folder / "model")
        start = time.perf_counter()
        metrics, items = evaluate_model_items(store, model.eval(), tokenizer, eval_settings)
        items.to_parquet(folder / ITEMS_FILE, index=False)
        write_json_atomic(folder / METRICS_FILE, {
            "method": method, "seed": seed, "from_scratch": from_scratch, "metrics": metrics,
            "train": {"steps": result.steps, "tokens_seen": result.tokens_seen,
                      "final_loss": result.losses[-1] if result.losses else math.nan,
                      "resumed_from": result.resumed_from, "seconds": train_seconds},
            "eval_seconds": time.perf_counter() - start,
        })
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # model/ holds the final weights
        store.mark_done(step, info={"metrics": METRICS_FILE})


@dataclass(frozen=True)
class PairJob:
    """One (method, seed) pair of `evaluate_selections`: what a worker process needs to run it."""

    method: str
    seed: int
    source_root: str          # the run folder holding the selection it trains on
    selection_seed: int | None
    selection_varies: bool


def _run_pair(store: RunStore, job: PairJob, base_model: str | Path, tokenizer: PreTrainedTokenizerBase,
              train_settings: TrainSettings, eval_settings: EvalSettings, *, from_scratch: bool, progress: bool,
              keep_model: bool) -> list[dict[str, Any]]:
    texts = read_selection_texts(RunStore(job.source_root), job.method)
    return train_and_evaluate(store, job.method, texts, base_model, tokenizer, train_settings, [job.seed],
                              eval_settings, from_scratch=from_scratch, progress=progress,
                              selection_seed=job.selection_seed, selection_varies=job.selection_varies,
                              keep_model=keep_model)


def _worker_init(threads: int) -> None:
    """A training worker: `threads` torch threads (1 by default: two 1-thread processes train faster
    than one 2-thread process on a 2-core machine, STACK.md), nothing on the terminal but its result."""
    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker_pair(root: str, job: PairJob, base_model: str, tokenizer: PreTrainedTokenizerBase,
                 train_settings: TrainSettings, eval_settings: EvalSettings, from_scratch: bool,
                 keep_model: bool) -> list[dict[str, Any]]:
    return _run_pair(RunStore(root), job, base_model, tokenizer, train_settings, eval_settings,
                     from_scratch=from_scratch, progress=False, keep_model=keep_model)


def pair_jobs(store: RunStore, methods: Sequence[str], seeds: Sequence[int], *, vary_selection: bool) -> list[PairJob]:
    """Every (method, seed) pair in method-then-seed order, with the selection each trains on; a missing
    per-seed selection is an error that says how to make it."""
    jobs = []
    for method in methods:
        if not vary_selection:
            _, manifest = read_selection(store, method)
            jobs += [PairJob(method, seed, str(store.root), manifest.get("seed"), False) for seed in seeds]
            continue
        for seed in seeds:
            source = selection_store(store, method, seed)
            if not source.is_done(f"select-{method}"):
                raise FileNotFoundError(
                    f"{source.root / f'select-{method}'}: no selection of {method!r} made with seed {seed}; run "
                    "quadlib.pipeline.select_for_seeds(store, scorer, model, tokenizer, methods, seeds) first "
                    "(notebook 05 does), or pass vary_selection=False to train every seed on one selection")
            jobs.append(PairJob(method, seed, str(source.root), seed, True))
    return jobs


def evaluate_selections(store: RunStore, methods: Sequence[str], base_model: str | Path,
                        tokenizer: PreTrainedTokenizerBase, train_settings: TrainSettings, seeds: Sequence[int],
                        eval_settings: EvalSettings, *, from_scratch: bool = False, progress: bool = False,
                        vary_selection: bool = True, workers: int = 1, worker_threads: int = 1,
                        keep_models: bool = True, untrained: bool = False) -> list[dict[str, Any]]:
    """`train_and_evaluate` for every method, with one set of settings and seeds.

    With `vary_selection` (the default) seed s trains on the method's selection made with seed s
    (`quadlib.selection.selection_store`; `quadlib.pipeline.select_for_seeds` makes them), so the spread
    over seeds covers the selection's own randomness as well as training. Without it every seed trains
    on the run's one selection and the spread covers training only.

    `workers` > 1 runs the (method, seed) pairs in that many worker processes of `worker_threads`
    torch threads each (spawned; each pair is locked in the run folder, resumes from its checkpoint
    and is skipped when done, so a killed run loses at most the pairs in flight). `untrained` also
    evaluates `base_model` itself as the method "untrained" (`evaluate_untrained`), the reference
    point for what training on any selection did. `keep_models=False` saves no trained weights
    (metrics and per-item results are kept). `progress` prints one line per finished pair.
    Records come back in method-then-seed order.
    """
    jobs = pair_jobs(store, methods, seeds, vary_selection=vary_selection)
    records: list[dict[str, Any]] = []
    if untrained:
        records += evaluate_untrained(store, base_model, tokenizer, seeds, eval_settings, from_scratch=from_scratch)
    start = time.perf_counter()

    def announce(job: PairJob, done: int) -> None:  # one line per finished pair: light on a notebook's output
        if progress:
            print(f"[quad] {job.method} seed {job.seed} trained and evaluated ({done}/{len(jobs)}, "
                  f"{time.perf_counter() - start:.0f} s)", flush=True)

    if workers <= 1 or len(jobs) <= 1:
        for done, job in enumerate(jobs, 1):
            records += _run_pair(store, job, base_model, tokenizer, train_settings, eval_settings,
                                 from_scratch=from_scratch, progress=False, keep_model=keep_models)
            announce(job, done)
        return records
    results: dict[int, list[dict[str, Any]]] = {}
    context = multiprocessing.get_context("spawn")  # no forked torch state; CUDA-safe
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                             initargs=(worker_threads,)) as pool:
        futures = {pool.submit(_worker_pair, str(store.root), job, str(base_model), tokenizer, train_settings,
                               eval_settings, from_scratch, keep_models): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()  # a worker's error stops the run; finished pairs stay on disk
            announce(jobs[i], len(results))
    for i in range(len(jobs)):
        records += results[i]
    return records


def evaluate_untrained(store: RunStore, base_model: str | Path, tokenizer: PreTrainedTokenizerBase,
                       seeds: Sequence[int], eval_settings: EvalSettings, *,
                       from_scratch: bool = False) -> list[dict[str, Any]]:
    """The model every method starts from, evaluated without training, as the method "untrained".

    Its evaluation does not depend on a seed (no sampling, the same texts), so it runs once and is
    written for every seed of `seeds` (`eval/untrained/seed-<s>/`), which lets the paired test
    compare each method with it over the same seeds and items. From scratch it is the seeded
    initialisation of each seed instead, evaluated per seed.
    """
    records = []
    first: tuple[dict[str, float], pd.DataFrame, float] | None = None
    for seed in seeds:
        step = eval_step(UNTRAINED, seed, from_scratch)
        params = {"method": UNTRAINED, "base_model": str(base_model), "from_scratch": from_scratch,
                  "eval": eval_settings}
        folder = store.step_dir(step)
        with store.lock(step):
            if not store.begin(step, params, seed=seed):
                if first is None or from_scratch:
                    model = initial_model(base_model, tokenizer, from_scratch, seed, None).eval()
                    start = time.perf_counter()
                    metrics, items = evaluate_model_items(store, model, tokenizer, eval_settings)
                    first = (metrics, items, time.perf_counter() - start)
                    del model
                metrics, items, seconds = first
                items.to_parquet(folder / ITEMS_FILE, index=False)
                write_json_atomic(folder / METRICS_FILE, {
                    "method": UNTRAINED, "seed": seed, "from_scratch": from_scratch, "metrics": metrics,
                    "train": {"steps": 0, "tokens_seen": 0, "final_loss": math.nan, "resumed_from": None,
                              "seconds": 0.0},
                    "eval_seconds": seconds, "selection_seed": None, "variance_sources": [],
                })
                store.mark_done(step, info={"metrics": METRICS_FILE})
        records.append(json.loads((folder / METRICS_FILE).read_text(encoding="utf-8")))
    return records
