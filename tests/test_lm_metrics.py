"""LM metrics: losses against a brute-force forward pass, windowing, LAMBADA split, held-out domains."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import tiny_model, tiny_tokenizer

from quadlib.evaluation.lm_metrics import (
    LMMetricSettings, heldout_domain_losses, lambada_metrics, lambada_requests, reference_metrics,
    spread_over_sources, text_losses,
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
