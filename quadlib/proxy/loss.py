"""The language-modelling loss convention shared by training, influence, evaluation and the probes.

Loss = cross-entropy of each *predicted* token, in nats, averaged over predicted tokens: position t
predicts token t+1, and labels equal to `IGNORE_INDEX` (padding) are not predicted. So a document's
loss is the mean over its tokens after the first (its bos), eos included. Influence thresholds
(tau) and reference losses are in these units: nats per predicted token.

This is the one home of the loss: a document is framed by `quadlib.proxy.batching.encode_documents`
and its loss is `document_losses` (Quad's L(theta, z)); influence keeps only its Fisher-sampling
variant (`quadlib.influence.loss.summed_token_loss`), built on `token_losses`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

Reduction = Literal["mean", "sum", "per_sequence"]
Batch = dict[str, torch.Tensor]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE per predicted token [B, T'] (0 where ignored) and the mask of predicted tokens [B, T'].

    `logits` [B, T', V] are already aligned with `targets` [B, T'] (position t predicts targets[t]).
    Half-precision logits are upcast to float32 (a bf16 CE loses the small differences scores are
    made of); float32 and float64 are kept. Written with a clamp and a mask rather than
    `ignore_index` so that forward-mode AD (influence's jvp mode) runs through it.
    """
    mask = targets != IGNORE_INDEX
    flat = logits.flatten(0, 1)  # [B*T', V]
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    ce = F.cross_entropy(flat, targets.clamp_min(0).flatten(), reduction="none")  # [B*T']
    return ce.view(targets.shape) * mask, mask


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Next-token cross-entropy from `logits` [B, T, V] and `labels` [B, T] (padding = IGNORE_INDEX).

    "mean": scalar, mean over all predicted tokens of the batch (what `model(labels=...)` computes);
    "sum": scalar, their sum; "per_sequence": [B], each sequence's mean over its predicted tokens
    (the per-document loss L(theta, z) whose gradient influence scores).
    """
    ce, mask = token_losses(logits[:, :-1], labels[:, 1:])  # [B, T-1] each
    if reduction == "sum":
        return ce.sum()
    if reduction == "mean":
        return ce.sum() / mask.sum().clamp_min(1)
    if reduction == "per_sequence":
        return ce.sum(dim=1) / mask.sum(dim=1).clamp_min(1)  # [B]
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'per_sequence'")


def check_batch(batch: Batch) -> None:
    missing = {"input_ids", "attention_mask", "labels"} - set(batch)
    if missing:
        raise ValueError(f"batch lacks {sorted(missing)}; expected input_ids, attention_mask, labels [B, T] "
                         "(quadlib.proxy.pad_batch makes them)")
    shapes = {key: tuple(batch[key].shape) for key in ("input_ids", "attention_mask", "labels")}
    if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 2:
        raise ValueError(f"batch tensors must all be [B, T]; got {shapes}")


def next_token_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits for positions 0..T-2, which predict tokens 1..T-1: [B, T-1, V]."""
    check_batch(batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[:, :-1]


def document_losses(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Each document's mean CE over its own predicted tokens [B] (0 for a document with none): L(theta, z)."""
    ce, mask = token_losses(next_token_logits(model, batch), batch["labels"][:, 1:])  # [B, T-1] each
    return ce.sum(1) / mask.sum(1).clamp_min(1)
