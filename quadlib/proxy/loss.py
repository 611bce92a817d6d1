"""The language-modelling loss convention shared by training, influence and evaluation.

Loss = cross-entropy of each *predicted* token, in nats, averaged over predicted tokens: position t
predicts token t+1, and labels equal to `IGNORE_INDEX` (padding) are not predicted. So a document's
loss is the mean over its tokens after the first (its bos), eos included. Influence thresholds
(tau) and reference losses are in these units: nats per predicted token.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

Reduction = Literal["mean", "sum", "per_sequence"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Next-token cross-entropy from `logits` [B, T, V] and `labels` [B, T] (padding = IGNORE_INDEX).

    "mean": scalar, mean over all predicted tokens of the batch (what `model(labels=...)` computes);
    "sum": scalar, their sum; "per_sequence": [B], each sequence's mean over its predicted tokens
    (the per-document loss L(theta, z) whose gradient influence scores).
    """
    logits = logits[:, :-1].float()  # [B, T-1, V]
    targets = labels[:, 1:]  # [B, T-1]
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                 reduction="none")  # [B, T-1]
    predicted = (targets != IGNORE_INDEX).to(token_loss.dtype)  # [B, T-1]
    if reduction == "sum":
        return token_loss.sum()
    if reduction == "mean":
        return token_loss.sum() / predicted.sum().clamp_min(1.0)
    if reduction == "per_sequence":
        return token_loss.sum(dim=1) / predicted.sum(dim=1).clamp_min(1.0)  # [B]
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'per_sequence'")
