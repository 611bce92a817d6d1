"""Language-modelling metrics: reference loss and perplexity, LAMBADA accuracy, held-out loss per domain.

Loss convention (`quadlib.proxy.loss`, shared with training and influence): mean cross-entropy per
predicted token, in nats, each document framed `[bos] text [eos]`. A document longer than the
model's context is cut into windows of `max_length` tokens overlapping by one, so every token after
the first is predicted exactly once.

The reference loss is the quantity Quad's influence scores estimate the change of (the loss on the
reference set after training on the selection); held-out domains are documents never offered for
selection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from quadlib.evaluation.loglik import LoglikRequest, length_batches, score_requests
from quadlib.proxy import causal_lm_loss, context_length, document_delimiters, encode_documents, pad_batch
from quadlib.settings import setting


@dataclass
class LMMetricSettings:
    batch_size: int = setting(16, "sequences per forward pass")
    batch_tokens: int = setting(16_384, "padded tokens per forward pass (bounds the [B, T, vocab] logits)")
    max_length: int | None = setting(None, "window length in tokens; None uses the model's context length")
    progress: bool = setting(False, "show tqdm progress bars")


@dataclass(frozen=True)
class TextLosses:
    """Summed negative log-likelihood and predicted-token count of each document (nats)."""

    doc_nll: np.ndarray  # [n_docs] float64
    doc_tokens: np.ndarray  # [n_docs] int64

    @property
    def n_tokens(self) -> int:
        return int(self.doc_tokens.sum())

    @property
    def mean_loss(self) -> float:
        """Token-weighted mean: total NLL over total predicted tokens."""
        if self.n_tokens == 0:
            raise ValueError("no predicted tokens: every document has fewer than 2 tokens")
        return float(self.doc_nll.sum() / self.n_tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss)

    @property
    def doc_mean_losses(self) -> np.ndarray:
        """Per-document mean loss; NaN for documents with no predicted token."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.doc_tokens > 0, self.doc_nll / np.maximum(self.doc_tokens, 1), np.nan)


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Rows of at most `max_length` tokens overlapping by one, so each token after the first is
    predicted exactly once (inside a row, position t predicts t+1)."""
    return [ids[start: start + max_length] for start in range(0, max(len(ids) - 1, 0), max_length - 1)]


def text_losses(model: torch.nn.Module, tokenizer, texts: Sequence[str],
                settings: LMMetricSettings | None = None) -> TextLosses:
    """Per-document summed NLL and predicted-token counts; documents are framed `[bos] text [eos]`
    as in training (`quadlib.proxy.batching`), batched by length, padding excluded."""
    settings = settings or LMMetricSettings()
    max_length = settings.max_length or context_length(model)
    if max_length < 2:
        raise ValueError(f"max_length {max_length} must be at least 2 (one input and one predicted token)")
    rows: list[list[int]] = []
    owner: list[int] = []
    encoded = encode_documents(tokenizer, texts, max_length=None) if len(texts) else []
    for doc, ids in enumerate(encoded):
        for row in _windows(ids, max_length):
            rows.append(row)
            owner.append(doc)
    doc_nll = np.zeros(len(texts), dtype=np.float64)
    doc_tokens = np.zeros(len(texts), dtype=np.int64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else document_delimiters(tokenizer)[1]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = list(length_batches([len(r) for r in rows], settings.batch_size, settings.batch_tokens))
    with torch.inference_mode():
        for batch in tqdm(batches, desc="text loss", disable=not settings.progress):
            inputs = {k: v.to(device) for k, v in pad_batch([rows[i] for i in batch], pad_id).items()}
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            predicted = [len(rows[i]) - 1 for i in batch]
            row_nll = causal_lm_loss(logits, inputs["labels"], "per_sequence")  # [B] mean per predicted token
            for b, i in enumerate(batch):
                doc_nll[owner[i]] += float(row_nll[b]) * predicted[b]
                doc_tokens[owner[i]] += predicted[b]
    model.train(was_training)
    return TextLosses(doc_nll, doc_tokens)


def reference_metrics(model: torch.nn.Module, tokenizer, texts: Sequence[str],
                      settings: LMMetricSettings | None = None) -> dict[str, float]:
    """Reference-set loss and perplexity (token-weighted) and the mean of per-document losses."""
    losses = text_losses(model, tokenizer, texts, settings)
    return {"ref_loss": losses.mean_loss, "ref_ppl": losses.perplexity, "ref_tokens": losses.n_tokens,
            "ref_doc_loss": float(np.nanmean(losses.doc_mean_losses))}


def lambada_requests(texts: Sequence[str]) -> list[LoglikRequest]:
    """lm-eval `lambada_openai`: context = all but the last space-separated word, target = " " + that word."""
    requests = []
    for n, text in enumerate(texts):
        words = text.split(" ")
        if len(words) < 2 or not words[-1]:
            raise ValueError(f"LAMBADA passage {n} has no final word after a space: {text[-60:]!r}")
        requests.append(LoglikRequest(" ".join(words[:-1]), " " + words[-1]))
    return requests


def lambada_metrics(model: torch.nn.Module, tokenizer, texts: Sequence[str],
                    settings: LMMetricSettings | None = None) -> dict[str, float]:
    """Last-word accuracy (every target token greedy) and the target perplexity exp(-mean log p)."""
    settings = settings or LMMetricSettings()
    results = score_requests(model, tokenizer, lambada_requests(texts), batch_size=settings.batch_size,
                             batch_tokens=settings.batch_tokens, max_length=settings.max_length,
                             progress=settings.progress)
    return {"lambada_acc": float(np.mean([r.is_greedy for r in results])),
            "lambada_ppl": math.exp(-float(np.mean([r.logprob for r in results]))),
            "lambada_n": len(results)}


def spread_over_sources(frame: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """At most `limit` rows, taken round-robin over `source` so every domain is represented.

    Held-out shards are stored in ingest order, usually grouped by source, so a plain head would
    keep only the first domains. Within a source the stored order is kept (deterministic).
    """
    if limit is None or len(frame) <= limit:
        return frame
    rank = frame.groupby("source", sort=False).cumcount()  # position of each row within its source
    order = np.lexsort((np.arange(len(frame)), rank.to_numpy()))
    return frame.iloc[np.sort(order[:limit])]


def heldout_domain_losses(model: torch.nn.Module, tokenizer, frame: pd.DataFrame,
                          settings: LMMetricSettings | None = None) -> dict[str, float]:
    """Token-weighted loss per `source` of held-out documents, plus their unweighted mean over domains.

    Returns {"heldout/<source>": loss, ..., "heldout_mean": mean over domains}.
    """
    missing = {"text", "source"} - set(frame.columns)
    if missing:
        raise ValueError(f"held-out frame lacks column(s) {sorted(missing)}; read it with read_corpus(store, 'heldout')")
    if frame.empty:
        raise ValueError("held-out frame is empty; ingest with CorpusSettings(heldout_fraction > 0)")
    losses = text_losses(model, tokenizer, frame["text"].tolist(), settings)
    per_doc = pd.DataFrame({"source": frame["source"].to_numpy(), "nll": losses.doc_nll, "tokens": losses.doc_tokens})
    sums = per_doc.groupby("source", sort=True)[["nll", "tokens"]].sum()
    sums = sums[sums["tokens"] > 0]
    out = {f"heldout/{source}": float(row.nll / row.tokens) for source, row in sums.iterrows()}
    out["heldout_mean"] = float(np.mean(list(out.values())))
    return out
