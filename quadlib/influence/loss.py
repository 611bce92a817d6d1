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

    The softmax is formed in float32, FISHER_SAMPLE_ROWS positions at a time, and sampled by inverting
    its cumulative sum at one uniform per position drawn with the CPU `generator` in position order, so
    the same seed draws the same labels on any device (torch.multinomial took 5 s per 4 x 128 batch
    at 49k vocabulary on one loaded thread, a third of the forward).
    """
    flat = logits.detach().flatten(0, -2)  # [N, V]
    uniforms = torch.rand(flat.shape[0], 1, generator=generator, dtype=torch.float64)  # [N, 1]
    drawn = torch.empty(flat.shape[0], dtype=torch.long)
    for start in range(0, flat.shape[0], FISHER_SAMPLE_ROWS):
        rows = slice(start, start + FISHER_SAMPLE_ROWS)
        cdf = torch.softmax(flat[rows].float(), dim=-1).cpu().cumsum(-1)  # [n, V], float32
        target = (uniforms[rows] * cdf[:, -1:].double()).float()  # [n, 1], scaled to the row's float32 total
        drawn[rows] = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)
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
