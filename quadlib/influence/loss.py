"""Influence's own loss: the summed token CE with Fisher-sampled labels (the rest lives in quadlib.proxy.loss).

The convention behind every score is next-token cross-entropy in nats, mean per token:

- A document's loss L(theta, z) is the mean CE over its own predicted tokens, so long and short
  documents are on one scale and the bandit's threshold tau is in "nats per token".
- The reference loss L(theta, D_ref) is the mean CE over all predicted reference tokens.
- Curvature is fitted on the summed token CE (each token a Fisher sample), see kfac.py.

Batches are dicts of input_ids [B, T], attention_mask [B, T] and labels [B, T] (-100 = ignore);
labels are shifted here, as Hugging Face causal LMs do.
"""

from __future__ import annotations

import torch
from torch import nn

from quadlib.proxy.loss import IGNORE_INDEX, Batch, next_token_logits, token_losses

IGNORE = IGNORE_INDEX  # one padding convention with training (quadlib.proxy.loss)
# Positions whose softmax is held at once when sampling Fisher labels: 256 x 49,152 float32 is 50 MB,
# where one float64 softmax of a whole 8 x 128 batch over that vocabulary was 400 MB (1.6 GB at 8 x 512).
FISHER_SAMPLE_ROWS = 256


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per position drawn from softmax(logits) [..., V] -> [...] (long, on the logits' device).

    The softmax is formed in float32, FISHER_SAMPLE_ROWS positions at a time, and drawn with the CPU
    `generator` in position order, so the same seed draws the same labels on any device.
    """
    flat = logits.detach().flatten(0, -2)  # [N, V]
    drawn = torch.empty(flat.shape[0], dtype=torch.long)
    for start in range(0, flat.shape[0], FISHER_SAMPLE_ROWS):
        probs = torch.softmax(flat[start:start + FISHER_SAMPLE_ROWS].float(), dim=-1).cpu()  # [n, V]
        drawn[start:start + FISHER_SAMPLE_ROWS] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return drawn.view(logits.shape[:-1]).to(logits.device)


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
        targets = torch.where(targets == IGNORE, targets, sample_labels(logits, sample_generator))
    ce, mask = token_losses(logits, targets)
    return ce.sum(), int(mask.sum())
