"""Log-likelihood of continuations given contexts: the primitive under every zero-shot metric.

The tokenisation follows lm-evaluation-harness 0.4.13's `HFLM` exactly, so that our scores and
lm-eval's agree request by request:

- trailing whitespace of the context moves to the front of the continuation;
- the pair is tokenised whole and the continuation is the tokens after the context's tokens;
- an empty context is replaced by the prefix token (BOS, else EOS);
- an input longer than `max_length + 1` tokens is truncated from the left.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quadlib.proxy import context_length, pad_batch


@dataclass(frozen=True)
class LoglikRequest:
    """Score `continuation` as the text following `context`."""

    context: str
    continuation: str


@dataclass(frozen=True)
class LoglikResult:
    logprob: float  # summed log-probability of the continuation's tokens, nats
    is_greedy: bool  # every continuation token is the model's argmax (LAMBADA accuracy)
    n_tokens: int  # continuation tokens scored


def prefix_token_id(tokenizer) -> int:
    """BOS, else EOS: what lm-eval conditions on when the context is empty."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; an empty context cannot be scored")
    return int(token)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split the way lm-eval's causal `HFLM` splits them."""
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    return whole[:n_context], whole[n_context:]


LOGITS_BUDGET_BYTES = 2**30  # one forward pass's float32 [B, T, vocab] logits: at most 1 GiB


def logit_bounded_tokens(model: torch.nn.Module, batch_tokens: int) -> int:
    """`batch_tokens`, lowered so that one batch's float32 logits `[B, T, vocab]` stay within
    `LOGITS_BUDGET_BYTES` (SmolLM2's 49,152-token vocabulary: 5,461 tokens a batch; the log-softmax
    and the loss hold about two more such tensors). A single longer row still runs, alone."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:  # a model without a known vocabulary keeps the cap it was given
        return int(batch_tokens)
    return max(1, min(int(batch_tokens), LOGITS_BUDGET_BYTES // (4 * int(vocab))))


def length_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped longest first, at most `batch_size` rows and `batch_tokens` padded tokens each.

    Sorting by length keeps padding small; the token cap bounds the [B, T, vocab] logits in memory.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * longest > batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def padded_logits(model: torch.nn.Module, rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """float32 logits [B, T, V] of right-padded rows (padding is masked and sits after real tokens)."""
    device = next(model.parameters()).device
    batch = pad_batch(rows, pad_id)
    return model(input_ids=batch["input_ids"].to(device),
                 attention_mask=batch["attention_mask"].to(device)).logits.float()  # [B, T, V]


def score_requests(model: torch.nn.Module, tokenizer, requests: Sequence[LoglikRequest], *,
                   batch_size: int = 32, batch_tokens: int = 16_384, max_length: int | None = None,
                   progress: bool = False) -> list[LoglikResult]:
    """Summed log-probability and greediness of each request's continuation, in request order."""
    max_length = max_length or context_length(model)
    pairs = [encode_pair(tokenizer, r.context, r.continuation) for r in requests]
    for req, (_, cont) in zip(requests, pairs):
        if not cont or len(cont) > max_length:
            raise ValueError(f"continuation {req.continuation[:40]!r} after context {req.context[-40:]!r} has "
                             f"{len(cont)} tokens; it must have 1 to max_length={max_length}")
    inputs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[LoglikResult | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    batches = list(length_batches([len(x) for x in inputs], batch_size, logit_bounded_tokens(model, batch_tokens)))
    with torch.inference_mode():
        for batch in tqdm(batches, desc="log-likelihood", disable=not progress):
            logprobs = F.log_softmax(padded_logits(model, [inputs[i] for i in batch], pad_id), dim=-1)  # [B, T, V]
            for b, i in enumerate(batch):
                cont = pairs[i][1]
                end = len(inputs[i])
                rows = logprobs[b, end - len(cont): end]  # [C, V]: the positions that predict the continuation
                target = torch.as_tensor(cont, device=rows.device)  # [C]
                picked = rows.gather(1, target[:, None]).squeeze(1)  # [C]
                greedy = bool((rows.argmax(dim=-1) == target).all())
                results[i] = LoglikResult(float(picked.sum()), greedy, len(cont))
    model.train(was_training)
    return results  # type: ignore[return-value]
