"""Zero-shot multiple-choice tasks scored by log-likelihood (the paper's downstream evaluation).

Tasks are read from local MosaicML-gauntlet files (`../shared/data/eval/<task>.jsonl.gz`) in one of
two schemas, each a registry entry of `SCHEMAS`:

- "choices": `{query, choices, gold}`; each choice is scored as the continuation `" " + choice`
  of `query`;
- "partial": WinoGrande's `{context_options, continuation, gold}`; `" " + continuation` is scored
  after each context option (partial scoring).

Metrics follow lm-evaluation-harness 0.4.13 (`ConfigurableTask.process_results`) exactly:
acc = [argmax_i log p(choice_i) == gold], acc_norm = [argmax_i log p(choice_i) / len(choice_i) == gold]
with len the choice string's length in characters (without the leading space). A new task is an
entry of `TASKS`; a new scorer is an entry of `BACKENDS` (ours, fast and default, or lm-eval's).

Accuracy is at chance for a small proxy, so every task also reports two continuous metrics of the
gold answer that move with the model long before its argmax does (issue 14, item 3):
gold_logprob = log p(gold continuation | context) in nats, and
gold_bpb = -gold_logprob / (ln 2 * bytes(gold continuation)), bits per UTF-8 byte of the scored text
(the leading delimiter included, since its tokens are scored). Per-item results are kept
(`task_items`) so that methods can be compared by paired differences over items.
"""

from __future__ import annotations

import gzip
import math
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from quadlib.evaluation.items import concat_items, item_frame
from quadlib.evaluation.loglik import LoglikRequest, score_requests
from quadlib.settings import setting

log = logging.getLogger(__name__)

TARGET_DELIMITER = " "  # lm-eval's default between context and continuation


@dataclass(frozen=True)
class Schema:
    """How one record format becomes log-likelihood requests, and how lm-eval reads the same fields."""

    fields: tuple[str, ...]
    requests: Callable[[dict[str, Any]], list[LoglikRequest]]
    norm_lengths: Callable[[dict[str, Any]], list[int]]  # lm-eval's `len(doc_to_choice(doc)[i])`
    n_options: Callable[[dict[str, Any]], int]
    gold_text: Callable[[dict[str, Any]], str]  # the continuation scored for the gold option
    lm_eval_fields: dict[str, str]  # doc_to_text / doc_to_target / doc_to_choice of a task YAML


SCHEMAS: dict[str, Schema] = {
    "choices": Schema(
        fields=("query", "choices", "gold"),
        requests=lambda doc: [LoglikRequest(doc["query"], TARGET_DELIMITER + c) for c in doc["choices"]],
        norm_lengths=lambda doc: [len(c) for c in doc["choices"]],
        n_options=lambda doc: len(doc["choices"]),
        gold_text=lambda doc: TARGET_DELIMITER + doc["choices"][int(doc["gold"])],
        lm_eval_fields={"doc_to_text": "query", "doc_to_target": "gold", "doc_to_choice": "choices"},
    ),
    "partial": Schema(
        fields=("context_options", "continuation", "gold"),
        requests=lambda doc: [LoglikRequest(ctx, TARGET_DELIMITER + doc["continuation"])
                              for ctx in doc["context_options"]],
        norm_lengths=lambda doc: [len(c) for c in doc["context_options"]],
        n_options=lambda doc: len(doc["context_options"]),
        gold_text=lambda doc: TARGET_DELIMITER + doc["continuation"],
        # An int doc_to_text (the gold index) is lm-eval's signal for "multiple inputs".
        lm_eval_fields={"doc_to_text": "gold", "doc_to_target": "continuation", "doc_to_choice": "context_options"},
    ),
}


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task: its file under the eval folder, its schema and the metrics it reports."""

    file: str
    schema: str
    metrics: tuple[str, ...] = ("acc", "acc_norm")


SIGNAL_METRICS = ("gold_logprob", "gold_bpb")  # reported for every task beside its accuracies
LN2 = math.log(2.0)

TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc_easy.jsonl.gz", "choices"),
    "arc_challenge": TaskSpec("arc_challenge.jsonl.gz", "choices"),
    "piqa": TaskSpec("piqa.jsonl.gz", "choices"),
    "siqa": TaskSpec("siqa.jsonl.gz", "choices"),
    "openbookqa": TaskSpec("openbookqa.jsonl.gz", "choices"),
    # lm-eval's winogrande reports acc only: its acc_norm would divide by the context options' lengths.
    "winogrande": TaskSpec("winogrande.jsonl.gz", "partial", metrics=("acc",)),
    "boolq": TaskSpec("boolq.jsonl.gz", "choices", metrics=("acc",)),
    "logiqa": TaskSpec("logiqa.jsonl.gz", "choices"),
}


@dataclass
class TaskSettings:
    tasks: list[str] | None = setting(None, "task names from TASKS; None: every task whose file is present")
    limit: int | None = setting(None, "score only the first N items of each task (None: all)")
    backend: str = setting("quad", "scorer: 'quad' (ours, fast) or 'lm_eval' (lm-evaluation-harness)")
    batch_size: int = setting(32, "requests per forward pass")
    batch_tokens: int = setting(16_384, "padded tokens per forward pass (bounds the logits in memory)")
    max_length: int | None = setting(None, "context length; None uses the model's")
    progress: bool = setting(False, "show progress bars")


@dataclass(frozen=True)
class TaskScores:
    """Per-item results of one task (columns doc_id, gold, acc, acc_norm, gold_logprob, gold_bytes,
    gold_bpb, logprobs) and the accuracies it reports (`SIGNAL_METRICS` are reported for every task)."""

    items: pd.DataFrame
    metrics: tuple[str, ...]

    def summary(self) -> dict[str, float]:
        return {m: float(self.items[m].mean()) for m in self.metrics + SIGNAL_METRICS} | {"n": len(self.items)}


def load_task_docs(path: Path, schema: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` records of a task file, each checked against its schema (file:line on error)."""
    spec = SCHEMAS[schema]
    docs: list[dict[str, Any]] = []
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            doc = json.loads(line)
            missing = [k for k in spec.fields if k not in doc]
            if missing or not 0 <= int(doc["gold"]) < spec.n_options(doc):
                raise ValueError(f"{path}:{lineno}: a {schema!r} record needs fields {list(spec.fields)} with gold "
                                 f"indexing an option; missing {missing}, gold={doc.get('gold')!r}")
            docs.append(doc)
    return docs


def item_results(docs: Sequence[dict[str, Any]], schema: str, logprobs: Sequence[Sequence[float]]) -> pd.DataFrame:
    """Per item from each option's log-likelihood: acc and acc_norm (lm-eval's definitions), the gold
    option's log-probability (nats) and its bits per byte, -log p / (ln 2 * bytes of the gold continuation)."""
    spec = SCHEMAS[schema]
    rows = []
    for doc_id, (doc, lls) in enumerate(zip(docs, logprobs, strict=True)):
        lls_arr = np.asarray(lls, dtype=np.float64)  # [n_options]
        lengths = np.asarray(spec.norm_lengths(doc), dtype=np.float64)  # [n_options] characters
        gold = int(doc["gold"])
        n_bytes = len(spec.gold_text(doc).encode("utf-8"))
        rows.append({"doc_id": doc_id, "gold": gold, "acc": float(np.argmax(lls_arr) == gold),
                     "acc_norm": float(np.argmax(lls_arr / lengths) == gold), "gold_logprob": float(lls_arr[gold]),
                     "gold_bytes": n_bytes, "gold_bpb": float(-lls_arr[gold] / (LN2 * n_bytes)),
                     "logprobs": lls_arr.tolist()})
    return pd.DataFrame(rows)


def resolve_tasks(eval_dir: Path, names: Sequence[str] | None) -> dict[str, Path]:
    """Task name -> file for the requested tasks (all registered by default) whose file exists."""
    unknown = sorted(set(names or []) - set(TASKS))
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; registered tasks: {sorted(TASKS)}")
    found: dict[str, Path] = {}
    for name in names or list(TASKS):
        path = Path(eval_dir) / TASKS[name].file
        if path.exists():
            found[name] = path
        else:
            log.warning("task %s skipped: %s not found", name, path)
    return found


def score_quad(model: torch.nn.Module, tokenizer, files: dict[str, Path],
               settings: TaskSettings) -> dict[str, TaskScores]:
    """Our scorer: every option of every item through `score_requests`, one batched pass per task."""
    out: dict[str, TaskScores] = {}
    for name, path in files.items():
        spec = TASKS[name]
        schema = SCHEMAS[spec.schema]
        docs = load_task_docs(path, spec.schema, settings.limit)
        requests = [req for doc in docs for req in schema.requests(doc)]
        results = iter(score_requests(model, tokenizer, requests, batch_size=settings.batch_size,
                                      batch_tokens=settings.batch_tokens, max_length=settings.max_length,
                                      progress=settings.progress))
        logprobs = [[next(results).logprob for _ in range(schema.n_options(doc))] for doc in docs]
        out[name] = TaskScores(item_results(docs, spec.schema, logprobs), spec.metrics)
    return out


def lm_eval_task_config(name: str, path: Path) -> dict[str, Any]:
    """An lm-eval task definition reading the local file with the `json` dataset builder."""
    spec = TASKS[name]
    return {
        "task": f"quad_{name}", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
        "test_split": "test", "output_type": "multiple_choice", "target_delimiter": TARGET_DELIMITER,
        **SCHEMAS[spec.schema].lm_eval_fields,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }


def score_lm_eval(model: torch.nn.Module, tokenizer, files: dict[str, Path],
                  settings: TaskSettings) -> dict[str, TaskScores]:
    """lm-evaluation-harness on the same files, through local task YAMLs and `HFLM(pretrained=model)`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
              max_length=settings.max_length, logits_cache=False)
    out: dict[str, TaskScores] = {}
    with tempfile.TemporaryDirectory(prefix="quad-lm-eval-") as include:
        for name, path in files.items():
            # JSON is valid YAML, so the definition needs no YAML writer.
            (Path(include) / f"quad_{name}.yaml").write_text(json.dumps(lm_eval_task_config(name, path)))
        results = simple_evaluate(model=lm, tasks=[f"quad_{n}" for n in files], limit=settings.limit,
                                  task_manager=TaskManager(include_path=include, include_defaults=False), log_samples=True,
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    for name, path in files.items():
        spec = TASKS[name]
        samples = sorted(results["samples"][f"quad_{name}"], key=lambda s: s["doc_id"])
        docs = load_task_docs(path, spec.schema, settings.limit)
        logprobs = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
        items = item_results(docs, spec.schema, logprobs)
        harness = pd.DataFrame({"acc": [s["acc"] for s in samples], "acc_norm": [s["acc_norm"] for s in samples]})
        if not (items[["acc", "acc_norm"]].to_numpy() == harness.to_numpy()).all():
            raise RuntimeError(f"lm-eval's {name} acc/acc_norm disagree with its own log-likelihoods")
        out[name] = TaskScores(items, spec.metrics)
    return out


Backend = Callable[[torch.nn.Module, Any, dict[str, Path], TaskSettings], dict[str, TaskScores]]
BACKENDS: dict[str, Backend] = {"quad": score_quad, "lm_eval": score_lm_eval}


def evaluate_tasks(model: torch.nn.Module, tokenizer, eval_dir: str | Path,
                   settings: TaskSettings | None = None) -> dict[str, TaskScores]:
    """Score every requested task whose file exists under `eval_dir` (missing files are skipped)."""
    settings = settings or TaskSettings()
    if settings.backend not in BACKENDS:
        raise KeyError(f"unknown task backend {settings.backend!r}; choose one of {sorted(BACKENDS)}")
    files = resolve_tasks(Path(eval_dir), settings.tasks)
    return BACKENDS[settings.backend](model, tokenizer, files, settings) if files else {}


def task_metrics(scores: dict[str, TaskScores]) -> dict[str, float]:
    """Flat `{"<task>/<metric>": value}` plus the means over tasks `"tasks/acc_mean"` (Table 6's Avg)
    and `"tasks/gold_bpb_mean"`."""
    flat = {f"{name}/{metric}": value for name, s in scores.items() for metric, value in s.summary().items()}
    if scores:
        flat["tasks/acc_mean"] = float(np.mean([s.summary()["acc"] for s in scores.values()]))
        flat["tasks/gold_bpb_mean"] = float(np.mean([s.summary()["gold_bpb"] for s in scores.values()]))
    return flat


def task_items(scores: dict[str, TaskScores]) -> pd.DataFrame:
    """Per-item results of every task in the long format of `quadlib.evaluation.items` (task, item,
    metric, value, weight): the reported accuracies and `SIGNAL_METRICS`, each of weight 1."""
    return concat_items([item_frame(name, s.items["doc_id"].tolist(),
                                    {m: s.items[m].tolist() for m in s.metrics + SIGNAL_METRICS})
                         for name, s in scores.items()])
