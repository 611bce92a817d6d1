"""LM metrics: losses against a brute-force forward pass, windowing, LAMBADA split, held-out domains."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import tiny_model, tiny_tokenizer

from quadlib.evaluation.items import weighted_means
from quadlib.evaluation.loglik import encode_pair
from quadlib.evaluation.lm_metrics import (
    LMMetricSettings, heldout_domain_losses, heldout_items, lambada_items, lambada_metrics, lambada_requests,
    reference_items, reference_metrics, spread_over_sources, text_losses,
)

TEXTS = ["The cat sat on the mat.", "Energy from the sun drives ecosystems on land and in water.", "x"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return tiny_model(tokenizer, "test-llama"), tokenizer


def _brute_force_nll(model, tokenizer, text: str) -> tuple[float, int]:
    """Summed NLL of `[bos] text [eos]` from one unbatched forward pass."""
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False),
                         tokenizer.eos_token_id]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    return float(F.cross_entropy(logits, ids[0, 1:], reduction="sum")), ids.shape[1] - 1


def test_text_losses_match_brute_force_and_ignore_batching(lm) -> None:
    model, tokenizer = lm
    batched = text_losses(model, tokenizer, TEXTS, LMMetricSettings(batch_size=8))
    single = text_losses(model, tokenizer, TEXTS, LMMetricSettings(batch_size=1))
    for i, text in enumerate(TEXTS):
        nll, n = _brute_force_nll(model, tokenizer, text)
        assert batched.doc_tokens[i] == n
        assert batched.doc_nll[i] == pytest.approx(nll, rel=1e-5)
    np.testing.assert_allclose(batched.doc_nll, single.doc_nll, rtol=1e-5)
    assert batched.mean_loss == pytest.approx(batched.doc_nll.sum() / batched.doc_tokens.sum())
    assert batched.perplexity == pytest.approx(math.exp(batched.mean_loss))


def test_long_documents_are_windowed_so_every_token_is_predicted_once(lm) -> None:
    model, tokenizer = lm
    text = " ".join(TEXTS[:2]) * 3
    whole = text_losses(model, tokenizer, [text])
    windowed = text_losses(model, tokenizer, [text], LMMetricSettings(max_length=8))
    n_tokens = len(tokenizer.encode(text, add_special_tokens=False)) + 1  # eos predicted, bos not
    assert whole.n_tokens == windowed.n_tokens == n_tokens
    assert windowed.mean_loss != pytest.approx(whole.mean_loss, rel=1e-6)  # shorter contexts, other loss


def test_max_windows_scores_each_documents_first_windows_only(lm) -> None:
    model, tokenizer = lm
    text = " ".join(TEXTS[:2]) * 3
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    first, two = (text_losses(model, tokenizer, [text, TEXTS[2]], LMMetricSettings(max_length=8, max_windows=w))
                  for w in (1, 2))  # "x": one window
    short = text_losses(model, tokenizer, [TEXTS[2]], LMMetricSettings(max_length=8))
    assert first.doc_tokens[0] == 7 and two.doc_tokens[0] == 14  # windows of 8 overlap by one token
    assert first.doc_windows.tolist() == [1, 1] and two.doc_windows.tolist() == [2, 1]
    x_read = int(two.doc_tokens[1]) + 1  # "x" framed: one window, its tokens all read
    assert two.tokens_fed == 8 + 8 + x_read and first.tokens_fed == 8 + x_read  # each window reads 8 tokens
    with torch.no_grad():  # the first window alone, brute force: 7 predicted tokens
        window = torch.tensor([ids[:8]])
        expected = float(F.cross_entropy(model(input_ids=window).logits[0, :-1], window[0, 1:], reduction="sum"))
    assert first.doc_nll[0] == pytest.approx(expected, rel=1e-5)
    assert first.doc_nll[1] == pytest.approx(short.doc_nll[0], rel=1e-5)  # a short document is untouched
    with pytest.raises(ValueError, match="max_windows"):
        text_losses(model, tokenizer, [text], LMMetricSettings(max_windows=0))


def test_reference_metrics_keys_and_consistency(lm) -> None:
    model, tokenizer = lm
    out = reference_metrics(model, tokenizer, TEXTS)
    assert out["ref_ppl"] == pytest.approx(math.exp(out["ref_loss"]))
    losses = text_losses(model, tokenizer, TEXTS)
    assert out["ref_doc_loss"] == pytest.approx(float(np.mean(losses.doc_nll / losses.doc_tokens)))


def test_lambada_split_follows_lm_eval() -> None:
    requests = lambada_requests(["He opened the door and saw his  dog"])
    assert requests[0].context == "He opened the door and saw his " and requests[0].continuation == " dog"
    with pytest.raises(ValueError, match="passage 0"):
        lambada_requests(["single"])


def test_lambada_accuracy_and_perplexity_match_greedy_decoding(lm) -> None:
    model, tokenizer = lm
    passages = ["The cat sat on the mat", "Question: Which gas do plants take in? Answer: carbon"]
    out = lambada_metrics(model, tokenizer, passages)
    greedy, logprobs = [], []
    for text in passages:
        context, last = text.rsplit(" ", 1)
        ctx = tokenizer.encode(context)
        whole = tokenizer.encode(context + " " + last)
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        target = torch.tensor(whole[len(ctx):])
        rows = logp[len(ctx) - 1: len(whole) - 1]
        greedy.append(bool((rows.argmax(-1) == target).all()))
        logprobs.append(float(rows.gather(1, target[:, None]).sum()))
    assert out["lambada_acc"] == pytest.approx(np.mean(greedy))
    assert out["lambada_ppl"] == pytest.approx(math.exp(-np.mean(logprobs)), rel=1e-5)


def test_heldout_domain_losses_are_token_weighted_per_source(lm) -> None:
    model, tokenizer = lm
    frame = pd.DataFrame({"text": TEXTS + ["Water boils at one hundred degrees."],
                          "source": ["web", "science", "web", "science"]})
    out = heldout_domain_losses(model, tokenizer, frame)
    for source, group in frame.groupby("source"):
        assert out[f"heldout/{source}"] == pytest.approx(text_losses(model, tokenizer, group["text"].tolist()).mean_loss)
    assert out["heldout_mean"] == pytest.approx((out["heldout/web"] + out["heldout/science"]) / 2)
    with pytest.raises(ValueError, match="source"):
        heldout_domain_losses(model, tokenizer, frame[["text"]])


def test_heldout_cap_spreads_over_sources_in_stored_order() -> None:
    # Stored grouped by source, as ingest writes them: a plain head(4) would see only "a".
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(9)], "source": list("aaaaabbbc")})
    capped = spread_over_sources(frame, 4)
    assert capped["text"].tolist() == ["t0", "t1", "t5", "t8"]
    assert spread_over_sources(frame, 6)["text"].tolist() == ["t0", "t1", "t2", "t5", "t6", "t8"]
    assert spread_over_sources(frame, 20) is frame
    assert spread_over_sources(frame, None) is frame


def test_no_predicted_tokens_is_a_clear_error(lm) -> None:
    model, tokenizer = lm
    with pytest.raises(ValueError, match="no predicted tokens"):
        _ = text_losses(model, tokenizer, []).mean_loss


class NextTokenTable(torch.nn.Module):
    """A causal LM whose greedy next token after token t is `table[t]` (logit 5, all others 0)."""

    def __init__(self, vocab_size: int, table: dict[int, int]) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=64)
        logits = torch.zeros(vocab_size, vocab_size)  # [V, V]: row = current token
        for current, following in table.items():
            logits[current, following] = 5.0
        self.register_buffer("table", logits)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return SimpleNamespace(logits=self.table[input_ids])  # [B, T, V]


def test_lambada_exact_match_needs_every_target_token_greedy(lm) -> None:
    """A target word of several tokens whose first token is the greedy choice but whose second is
    not is a miss (lm-eval's `lambada_openai`); a first-token match would count it."""
    _, tokenizer = lm
    passages = ["The cat sat on the mat carbondioxide", "Energy from the sun drives xqzwv"]
    splits = [lambada_requests([p])[0] for p in passages]
    pairs = [encode_pair(tokenizer, r.context, r.continuation) for r in splits]
    (ctx_a, cont_a), (ctx_b, cont_b) = pairs
    assert len(cont_a) >= 2 and len(cont_b) >= 2, "the targets must span several tokens"
    wrong = next(t for t in range(len(tokenizer)) if t != cont_a[1])
    edges = [(ctx_a[-1], cont_a[0]), (cont_a[0], wrong),  # passage a: first token greedy, second not
             (ctx_b[-1], cont_b[0]), *zip(cont_b, cont_b[1:])]  # passage b: every token greedy
    table = dict(edges)
    assert len(table) == len(edges), "the passages' predicting tokens must not collide"
    model = NextTokenTable(len(tokenizer), table)
    metrics, items = lambada_items(model, tokenizer, passages, ids=["a", "b"])
    acc = items[items["metric"] == "acc"].set_index("item")["value"]
    assert acc.to_dict() == {"a": 0.0, "b": 1.0}
    assert metrics["lambada_acc"] == 0.5
    logprob = items[items["metric"] == "target_logprob"].set_index("item")["value"]
    assert metrics["lambada_logprob"] == pytest.approx(logprob.mean())
    assert metrics["lambada_ppl"] == pytest.approx(math.exp(-logprob.mean()))
    assert lambada_metrics(model, tokenizer, passages) == metrics


def test_bits_per_byte_and_items_aggregate_to_the_reported_losses(lm) -> None:
    model, tokenizer = lm
    texts = ["The cat sat on the mat.", "Énergie du soleil", "x"]
    metrics, items = reference_items(model, tokenizer, texts, ids=["r0", "r1", "r2"])
    losses = text_losses(model, tokenizer, texts)
    means = weighted_means(items)
    assert means[("reference", "loss")] == pytest.approx(metrics["ref_loss"], rel=1e-12)
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts])
    assert means[("reference", "bpb")] == pytest.approx(losses.doc_nll.sum() / (math.log(2) * n_bytes.sum()), rel=1e-12)
    assert metrics["ref_bpb"] == pytest.approx(means[("reference", "bpb")], rel=1e-12)
    per_doc = items[items["metric"] == "bpb"].set_index("item")["value"]
    assert per_doc["r1"] == pytest.approx(losses.doc_nll[1] / (math.log(2) * len("Énergie du soleil".encode())))
    frame = pd.DataFrame({"id": ["a", "b", "c", "d"], "text": TEXTS + ["Water boils at one hundred degrees."],
                          "source": ["web", "science", "web", "science"]})
    out, rows = heldout_items(model, tokenizer, frame)
    web = text_losses(model, tokenizer, [TEXTS[0], TEXTS[2]])
    web_bytes = len(TEXTS[0].encode()) + len(TEXTS[2].encode())
    assert out["heldout_bpb/web"] == pytest.approx(web.doc_nll.sum() / (math.log(2) * web_bytes), rel=1e-12)
    assert out["heldout_bpb_mean"] == pytest.approx((out["heldout_bpb/web"] + out["heldout_bpb/science"]) / 2)
    assert set(rows["task"]) == {"heldout/web", "heldout/science"}
    assert sorted(rows[rows["task"] == "heldout/web"]["item"].unique()) == ["a", "c"]


def test_batches_shrink_for_a_big_vocabulary_and_the_losses_do_not_change(lm, monkeypatch) -> None:
    from quadlib.evaluation import loglik

    model, tokenizer = lm
    smollm2 = SimpleNamespace(config=SimpleNamespace(vocab_size=49_152))
    assert loglik.logit_bounded_tokens(smollm2, 16_384) == 5_461  # 1 GiB of float32 logits
    assert loglik.logit_bounded_tokens(smollm2, 4_096) == 4_096  # a smaller cap stays
    whole = text_losses(model, tokenizer, TEXTS)
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(loglik, "LOGITS_BUDGET_BYTES", 4 * vocab * 8)  # 8 tokens a batch: one row each
    assert loglik.logit_bounded_tokens(model, 16_384) == 8
    one_by_one = text_losses(model, tokenizer, TEXTS)
    np.testing.assert_allclose(one_by_one.doc_nll, whole.doc_nll, rtol=1e-5)  # float32 logits, other padding
