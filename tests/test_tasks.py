"""Zero-shot tasks: lm-eval's request encoding and metrics, our scorer vs brute force and vs lm-eval."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import tiny_model, tiny_tokenizer

from quadlib.evaluation.loglik import LoglikRequest, encode_pair, score_requests
from quadlib.evaluation.tasks import (
    TASKS, TaskScores, TaskSettings, evaluate_tasks, item_results, load_task_docs, task_items, task_metrics,
)

CHOICE_DOCS = [
    {"query": "Question: Which gas do plants take in?\n", "choices": ["carbon dioxide", "the cat"], "gold": 0},
    {"query": "Question: What boils at one hundred degrees?", "choices": ["water", "a mat", "sun"], "gold": 2},
]
PARTIAL_DOCS = [{"context_options": ["Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"],
                 "continuation": "got the harder cases.", "gold": 0}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return tiny_model(tokenizer, "test-gpt2"), tokenizer


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in docs).encode()))
    return path


def _brute_force(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    rows, target = logp[len(ctx) - 1: -1], torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_encode_pair_moves_trailing_whitespace_to_the_continuation(lm) -> None:
    _, tokenizer = lm
    ctx, cont = encode_pair(tokenizer, "Question: dresser\n", " bobby pin")
    assert ctx == tokenizer.encode("Question: dresser")
    assert ctx + cont == tokenizer.encode("Question: dresser\n bobby pin")
    empty_ctx, _ = encode_pair(tokenizer, "", " water")
    assert empty_ctx == [tokenizer.bos_token_id]


def test_score_requests_matches_brute_force_and_ignores_batching(lm) -> None:
    model, tokenizer = lm
    requests = [LoglikRequest(d["query"], " " + c) for d in CHOICE_DOCS for c in d["choices"]]
    batched = score_requests(model, tokenizer, requests, batch_size=8)
    single = score_requests(model, tokenizer, requests, batch_size=1)
    for req, a, b in zip(requests, batched, single):
        logprob, greedy = _brute_force(model, tokenizer, req.context, req.continuation)
        assert a.logprob == pytest.approx(logprob, abs=1e-4) and a.is_greedy == greedy
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_long_inputs_are_truncated_from_the_left(lm) -> None:
    model, tokenizer = lm
    context = "The cat sat on the mat. " * 40
    [full] = score_requests(model, tokenizer, [LoglikRequest(context, " water")], max_length=16)
    ctx, cont = encode_pair(tokenizer, context, " water")
    kept = (ctx + cont)[-17:]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([kept[:-1]])).logits[0], -1)
    expected = sum(float(logp[len(kept) - 1 - len(cont) + j, t]) for j, t in enumerate(cont))
    assert full.logprob == pytest.approx(expected, abs=1e-4)


def test_acc_norm_divides_by_choice_characters() -> None:
    docs = [{"query": "q", "choices": ["a", "much longer"], "gold": 1}]
    # total log-prob favours "a"; per character, "much longer" wins: -1/1 < -5/11
    items = item_results(docs, "choices", [[-1.0, -5.0]])
    assert items.loc[0, "acc"] == 0.0 and items.loc[0, "acc_norm"] == 1.0


def test_acc_norm_counts_characters_exactly_and_scores_the_gold_index() -> None:
    """lm-eval divides by len(choice) without the delimiter: one character more or less, or the gold
    index shifted by one, flips these items."""
    docs = [{"query": "q", "choices": ["a", "bc"], "gold": 1},  # -1/1 < -1.9/2; with len+1: -1/2 > -1.9/3
            {"query": "q", "choices": ["bc", "a"], "gold": 0},  # the same, gold first
            {"query": "q", "choices": ["abcd", "ab"], "gold": 1}]  # -4.2/4 < -2/2; with len-1: -4.2/3 > -2/1
    items = item_results(docs, "choices", [[-1.0, -1.9], [-1.9, -1.0], [-4.2, -2.0]])
    assert items["acc_norm"].tolist() == [1.0, 1.0, 1.0]
    assert items["acc"].tolist() == [0.0, 0.0, 1.0]


def test_gold_logprob_and_bits_per_byte_of_the_gold_continuation() -> None:
    docs = [{"query": "q", "choices": ["é", "ab"], "gold": 0},  # " é" is 3 UTF-8 bytes
            {"query": "q", "choices": ["x", "abcd"], "gold": 1}]  # " abcd": 5 bytes
    items = item_results(docs, "choices", [[-2.0, -1.0], [-0.5, -3.0]])
    assert items["gold_logprob"].tolist() == [-2.0, -3.0]
    assert items["gold_bytes"].tolist() == [3, 5]
    np.testing.assert_allclose(items["gold_bpb"], [2.0 / (math.log(2) * 3), 3.0 / (math.log(2) * 5)], rtol=1e-12)
    partial = item_results(PARTIAL_DOCS, "partial", [[-7.0, -6.0]])
    assert partial.loc[0, "gold_logprob"] == -7.0  # gold context option 0
    assert partial.loc[0, "gold_bytes"] == len(" got the harder cases.")
    long = task_items({"arc_easy": TaskScores(items, TASKS["arc_easy"].metrics)})
    assert set(long["metric"]) == {"acc", "acc_norm", "gold_logprob", "gold_bpb"}
    assert long.set_index(["item", "metric"]).loc[("1", "gold_logprob"), "value"] == -3.0
    flat = task_metrics({"arc_easy": TaskScores(items, TASKS["arc_easy"].metrics)})
    assert flat["arc_easy/gold_logprob"] == pytest.approx(-2.5)
    assert flat["tasks/gold_bpb_mean"] == pytest.approx(items["gold_bpb"].mean())


def test_evaluate_tasks_on_local_files_skips_missing_and_names_bad_records(lm, tmp_path: Path) -> None:
    model, tokenizer = lm
    _write(tmp_path / TASKS["arc_easy"].file, CHOICE_DOCS)
    _write(tmp_path / TASKS["winogrande"].file, PARTIAL_DOCS)
    scores = evaluate_tasks(model, tokenizer, tmp_path, TaskSettings(limit=1))
    assert set(scores) == {"arc_easy", "winogrande"}  # the other six files are absent: skipped
    assert len(scores["arc_easy"].items) == 1
    flat = task_metrics(scores)
    assert set(flat) >= {"arc_easy/acc", "arc_easy/acc_norm", "winogrande/acc", "tasks/acc_mean",
                         "arc_easy/gold_bpb", "winogrande/gold_logprob"}
    assert "winogrande/acc_norm" not in flat
    lls = [_brute_force(model, tokenizer, c, " " + PARTIAL_DOCS[0]["continuation"])[0]
           for c in PARTIAL_DOCS[0]["context_options"]]
    assert flat["winogrande/acc"] == float(np.argmax(lls) == 0)
    bad = _write(tmp_path / "bad.jsonl.gz", [CHOICE_DOCS[0], {"query": "q", "choices": ["a"], "gold": 3}])
    with pytest.raises(ValueError, match=r"bad.jsonl.gz:2"):
        load_task_docs(bad, "choices")
    with pytest.raises(KeyError, match="unknown task"):
        evaluate_tasks(model, tokenizer, tmp_path, TaskSettings(tasks=["hellaswag"]))


def test_every_shared_task_file_matches_its_schema(shared_data: Path) -> None:
    for name, spec in TASKS.items():
        docs = load_task_docs(shared_data / "eval" / spec.file, spec.schema, limit=50)
        assert len(docs) == 50, name


def test_our_scorer_agrees_with_lm_eval(lm, shared_data: Path) -> None:
    """lm-evaluation-harness 0.4.13 through local task YAMLs vs our scorer, item by item."""
    model, tokenizer = lm
    settings = TaskSettings(tasks=["arc_easy", "winogrande"], limit=10)
    ours = evaluate_tasks(model, tokenizer, shared_data / "eval", settings)
    harness = evaluate_tasks(model, tokenizer, shared_data / "eval", TaskSettings(**{**vars(settings), "backend": "lm_eval"}))
    for name in settings.tasks:
        a, b = ours[name].items, harness[name].items
        np.testing.assert_allclose(np.array(a["logprobs"].tolist()), np.array(b["logprobs"].tolist()), atol=1e-4)
        assert a["acc"].tolist() == b["acc"].tolist() and a["acc_norm"].tolist() == b["acc_norm"].tolist()
