"""Language-modelling metrics: reference loss and perplexity, LAMBADA accuracy, held-out loss per domain.

Loss convention (`quadlib.proxy.loss`, shared with training and influence): mean cross-entropy per
predicted token, in nats, each document framed `[bos] text [eos]`. A document longer than the
model's context is cut into windows of `max_length` tokens overlapping by one, so every token after
the first is predicted exactly once.

The reference loss is the quantity Quad's influence scores estimate the change of (the loss on the
reference set after training on the selection); held-out domains are documents never offered for
selection. Held-out domains also report bits per byte, total NLL / (ln 2 * total UTF-8 bytes of the
texts), which compares across tokenizers. Each family has an `*_items` function giving its per-item
results (`quadlib.evaluation.items`), from which the aggregates are computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

LN2 = math.log(2.0)

from quadlib.evaluation.items import concat_items, item_frame, weighted_means
from quadlib.evaluation.loglik import LoglikRequest, length_batches, logit_bounded_tokens, score_requests
from quadlib.proxy import causal_lm_loss, context_length, document_delimiters, encode_documents, pad_batch
from quadlib.settings import setting


@dataclass
class LMMetricSettings:
    batch_size: int = setting(16, "sequences per forward pass")
    batch_tokens: int = setting(16_384, "padded tokens per forward pass (bounds the [B, T, vocab] logits)")
    max_length: int | None = setting(None, "window length in tokens; None uses the model's context length")
    max_windows: int | None = setting(None, "score only each document's first N windows (None: every token)")
    progress: bool = setting(False, "show tqdm progress bars")


@dataclass(frozen=True)
class TextLosses:
    """Summed negative log-likelihood and predicted-token count of each document (nats)."""

    doc_nll: np.ndarray  # [n_docs] float64
    doc_tokens: np.ndarray  # [n_docs] int64
    doc_windows: np.ndarray  # [n_docs] int64: windows (sequences) fed per document

    @property
    def tokens_fed(self) -> int:
        """Tokens the model read: each window feeds its predicted tokens plus its first one."""
        return int(self.doc_tokens.sum() + self.doc_windows.sum())

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
    if settings.max_windows is not None and settings.max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 or None, got {settings.max_windows}")
    for doc, ids in enumerate(encoded):
        for row in _windows(ids, max_length)[:settings.max_windows]:
            rows.append(row)
            owner.append(doc)
    doc_nll = np.zeros(len(texts), dtype=np.float64)
    doc_tokens = np.zeros(len(texts), dtype=np.int64)
    doc_windows = np.bincount(np.asarray(owner, dtype=np.int64), minlength=len(texts)).astype(np.int64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else document_delimiters(tokenizer)[1]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = list(length_batches([len(r) for r in rows], settings.batch_size,
                                  logit_bounded_tokens(model, settings.batch_tokens)))
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
    return TextLosses(doc_nll, doc_tokens, doc_windows)


def document_items(task: str, ids: Sequence[str], texts: Sequence[str], losses: TextLosses) -> pd.DataFrame:
    """Per-document `loss` (nats per predicted token, weight = predicted tokens) and `bpb` (bits per
    UTF-8 byte of the text, weight = bytes); documents with no predicted token or no byte are left out."""
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.float64)  # [n_docs]
    has_tokens, has_bytes = losses.doc_tokens > 0, (losses.doc_tokens > 0) & (n_bytes > 0)
    return concat_items([
        item_frame(task, [ids[i] for i in np.flatnonzero(has_tokens)],
                   {"loss": losses.doc_nll[has_tokens] / losses.doc_tokens[has_tokens]},
                   {"loss": losses.doc_tokens[has_tokens]}),
        item_frame(task, [ids[i] for i in np.flatnonzero(has_bytes)],
                   {"bpb": losses.doc_nll[has_bytes] / (LN2 * n_bytes[has_bytes])}, {"bpb": n_bytes[has_bytes]}),
    ])


def reference_items(model: torch.nn.Module, tokenizer, texts: Sequence[str], ids: Sequence[str] | None = None,
                    settings: LMMetricSettings | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """`reference_metrics` (plus ref_bpb, bits per byte) and the per-document items (task "reference")."""
    losses = text_losses(model, tokenizer, texts, settings)
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
    items = document_items("reference", ids, texts, losses)
    metrics = {"ref_loss": losses.mean_loss, "ref_ppl": losses.perplexity, "ref_tokens": losses.n_tokens,
               "ref_doc_loss": float(np.nanmean(losses.doc_mean_losses)),
               "ref_bpb": float(weighted_means(items).get(("reference", "bpb"), np.nan))}
    return metrics, items


def reference_metrics(model: torch.nn.Module, tokenizer, texts: Sequence[str],
                      settings: LMMetricSettings | None = None) -> dict[str, float]:
    """Reference-set loss and perplexity (token-weighted) and the mean of per-document losses."""
    return reference_items(model, tokenizer, texts, settings=settings)[0]


def lambada_requests(texts: Sequence[str]) -> list[LoglikRequest]:
    """lm-eval `lambada_openai`: context = all but the last space-separated word, target = " " + that word."""
    requests = []
    for n, text in enumerate(texts):
        words = text.split(" ")
        if len(words) < 2 or not words[-1]:
            raise ValueError(f"LAMBADA passage {n} has no final word after a space: {text[-60:]!r}")
        requests.append(LoglikRequest(" ".join(words[:-1]), " " + words[-1]))
    return requests


def lambada_items(model: torch.nn.Module, tokenizer, texts: Sequence[str], ids: Sequence[str] | None = None,
                  settings: LMMetricSettings | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """`lambada_metrics` and its per-passage items (task "lambada"): `acc` (exact match: EVERY token of
    the target word is the model's greedy choice, as lm-eval's `lambada_openai`) and `target_logprob`
    (log p(target word | context), nats), both of weight 1."""
    settings = settings or LMMetricSettings()
    results = score_requests(model, tokenizer, lambada_requests(texts), batch_size=settings.batch_size,
                             batch_tokens=settings.batch_tokens, max_length=settings.max_length,
                             progress=settings.progress)
    acc = np.array([float(r.is_greedy) for r in results])  # [n]
    logprob = np.array([r.logprob for r in results])  # [n] nats
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
    metrics = {"lambada_acc": float(acc.mean()), "lambada_logprob": float(logprob.mean()),
               "lambada_ppl": math.exp(-float(logprob.mean())), "lambada_n": len(results)}
    return metrics, item_frame("lambada", ids, {"acc": acc, "target_logprob": logprob})


def lambada_metrics(model: torch.nn.Module, tokenizer, texts: Sequence[str],
                    settings: LMMetricSettings | None = None) -> dict[str, float]:
    """Last-word accuracy (every target token greedy), the mean target log-probability (nats) and
    the target perplexity exp(-mean log p)."""
    return lambada_items(model, tokenizer, texts, settings=settings)[0]


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
    """Token-weighted loss and bits per byte per `source` of held-out documents, plus their
    unweighted means over domains.

    Returns {"heldout/<source>": loss, ..., "heldout_mean": mean over domains,
    "heldout_bpb/<source>": bits per byte, ..., "heldout_bpb_mean": mean over domains}.
    """
    return heldout_items(model, tokenizer, frame, settings)[0]


def heldout_items(model: torch.nn.Module, tokenizer, frame: pd.DataFrame,
                  settings: LMMetricSettings | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """`heldout_domain_losses` and its per-document items (task "heldout/<source>", metrics loss and
    bpb; item = the `id` column when present, else the row position)."""
    missing = {"text", "source"} - set(frame.columns)
    if missing:
        raise ValueError(f"held-out frame lacks column(s) {sorted(missing)}; read it with read_corpus(store, 'heldout')")
    if frame.empty:
        raise ValueError("held-out frame is empty; ingest with CorpusSettings(heldout_fraction > 0)")
    texts = frame["text"].tolist()
    losses = text_losses(model, tokenizer, texts, settings)
    ids = frame["id"].astype(str).tolist() if "id" in frame.columns else [str(i) for i in range(len(frame))]
    sources = frame["source"].to_numpy()
    items = concat_items([document_items(f"heldout/{source}", [ids[i] for i in idx], [texts[i] for i in idx],
                                         TextLosses(losses.doc_nll[idx], losses.doc_tokens[idx],
                                                    losses.doc_windows[idx]))
                          for source in sorted(set(sources)) for idx in [np.flatnonzero(sources == source)]])
    means = weighted_means(items)
    out = {f"heldout/{task.removeprefix('heldout/')}": float(v) for (task, metric), v in means.items() if metric == "loss"}
    out["heldout_mean"] = float(np.mean(list(out.values())))
    bpb = {f"heldout_bpb/{task.removeprefix('heldout/')}": float(v) for (task, metric), v in means.items()
           if metric == "bpb"}
    return out | bpb | {"heldout_bpb_mean": float(np.mean(list(bpb.values())))}, items
