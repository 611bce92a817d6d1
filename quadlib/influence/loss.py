"""The loss convention behind every score: next-token cross-entropy in nats, mean per token.

- A document's loss L(theta, z) is the mean CE over its own predicted tokens, so long and short
  documents are on one scale and the bandit's threshold tau is in "nats per token".
- The reference loss L(theta, D_ref) is the mean CE over all predicted reference tokens.
- Curvature is fitted on the summed token CE (each token a Fisher sample), see kfac.py.

Batches are dicts of input_ids [B, T], attention_mask [B, T] and labels [B, T] (-100 = ignore);
labels are shifted here, as Hugging Face causal LMs do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quadlib.proxy.loss import IGNORE_INDEX

Batch = dict[str, torch.Tensor]
IGNORE = IGNORE_INDEX  # one padding convention with training (quadlib.proxy.loss)


def check_batch(batch: Batch) -> None:
    missing = {"input_ids", "attention_mask", "labels"} - set(batch)
    if missing:
        raise ValueError(f"batch lacks {sorted(missing)}; expected input_ids, attention_mask, labels [B, T]")
    shapes = {key: tuple(batch[key].shape) for key in ("input_ids", "attention_mask", "labels")}
    if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 2:
        raise ValueError(f"batch tensors must all be [B, T]; got {shapes}")


def next_token_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits for positions 0..T-2, which predict tokens 1..T-1: [B, T-1, V]."""
    check_batch(batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[:, :-1]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE per predicted token [B, T-1] (0 where ignored) and the mask of predicted tokens [B, T-1]."""
    mask = targets != IGNORE
    flat = logits.flatten(0, 1)  # [B*(T-1), V]
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # half-precision CE loses the small differences scores are made of
    ce = F.cross_entropy(flat, targets.clamp_min(0).flatten(), reduction="none")
    return ce.view(targets.shape) * mask, mask


def document_losses(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Each document's mean CE over its own predicted tokens [B] (0 for a document with none)."""
    ce, mask = token_losses(next_token_logits(model, batch), batch["labels"][:, 1:])
    return ce.sum(1) / mask.sum(1).clamp_min(1)


def summed_token_loss(model: nn.Module, batch: Batch, sample_generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, int]:
    """Sum of token CEs over the batch and the number of predicted tokens.

    With `sample_generator`, targets are drawn from the model's own predictive distribution at every
    predicted position (the "true" Fisher, whose expectation is the Gauss-Newton matrix for CE);
    without, the data's labels are used (empirical Fisher).
    """
    logits = next_token_logits(model, batch)  # [B, T-1, V]
    targets = batch["labels"][:, 1:]
    if sample_generator is not None:
        probs = torch.softmax(logits.detach().double(), dim=-1).flatten(0, 1)
        drawn = torch.multinomial(probs.cpu(), 1, generator=sample_generator).view(targets.shape)
        targets = torch.where(targets == IGNORE, targets, drawn.to(targets.device))
    ce, mask = token_losses(logits, targets)
    return ce.sum(), int(mask.sum())
