"""Probe-based oracles for MATES and Group-MATES: how much does training on a document move the
reference loss?

An oracle influence is the drop in reference loss after short training on the document(s):
`L_ref(theta) - L_ref(theta after the step(s))` (MATES Sec. 3.1, the probe oracle, one step;
Group-MATES Sec. 3.1, rollouts of a few sequential steps, each step's oracle the marginal drop).
Positive = helpful. The released MATES code records `L_ref(after)` and keeps the lowest; the sign
here is flipped once, in `rollout_delta`, so that every score in this package reads "higher helps".

The step is the project's one training step (`quadlib.proxy.optimizer_step`: mean next-token loss
of `quadlib.proxy.causal_lm_loss`, gradient clipping, an optimizer step) with the project's one
document framing (`quadlib.proxy.encode_documents`). The optimizer is AdamW with the training
defaults (`quadlib.proxy.TrainSettings`: lr 1e-3, betas (0.9, 0.95), weight decay 0.1, clip 1.0),
the settings of MATES' probe script; it can continue a training checkpoint's moments
(`load_optimizer_moments`, as MATES resumes the checkpoint's optimizer), its state persists across
`train_on` calls, as the training run's optimizer does, and every probe restores weights and
optimizer state afterwards, so probes are independent of each other and of their order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from quadlib.device import default_device
from quadlib.proxy import (
    IGNORE_INDEX,
    TrainSettings,
    adamw,
    causal_lm_loss,
    document_batches,
    document_losses,
    optimizer_step,
)
from quadlib.selection.scoring import Cost

OPTIMIZERS = ("adamw", "sgd")


@runtime_checkable
class ProbeModel(Protocol):
    """A proxy model that can be probed with short training rollouts and trained on selected data."""

    cost: Cost

    def reference_loss(self) -> float:
        """Mean token loss on the reference set under the current weights."""
        ...

    def rollout_delta(self, steps: Sequence[Sequence[str]]) -> np.ndarray:
        """Drop in reference loss after each of the sequential steps `[n_steps]` (cumulative), then restore."""
        ...

    def one_step_delta(self, texts: Sequence[str]) -> float:
        """Drop in reference loss after one step on `texts`, then restore."""
        ...

    def train_on(self, texts: Sequence[str]) -> list[float]:
        """Train on `texts` (steps of `batch_size` documents, in order), keeping the result; the losses."""
        ...

    def preserved(self) -> Iterator[None]:
        """A context in which training is undone on exit (weights and optimizer state restored)."""
        ...


class HFProbeModel:
    """`ProbeModel` on a Hugging Face causal LM, its tokenizer and the reference texts.

    Also offers `doc_losses(texts)` (per-document mean token loss, `quadlib.proxy.document_losses`) for
    the PPL baseline. Documents are framed `[bos] text [eos]` and truncated at `max_length` tokens by
    `quadlib.proxy.encode_documents`, as in training and influence; the tokenizer needs an eos token.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, reference_texts: Sequence[str], *, lr: float = 1e-3,
                 optimizer: str = "adamw", grad_clip: float = 1.0, max_length: int = 256, batch_size: int = 16,
                 device: str | None = None) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if len(reference_texts) == 0:
            raise ValueError("HFProbeModel needs at least one reference text")
        self.device = default_device(device)
        self.model = model.to(self.device).eval()  # eval: no dropout, so probes are deterministic
        self.tokenizer = tokenizer
        self.reference_texts = list(reference_texts)
        self.lr, self.optimizer_name, self.grad_clip = lr, optimizer, grad_clip
        self.max_length, self.batch_size = max_length, batch_size
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.cost = Cost()
        self._optimizer: torch.optim.Optimizer | None = None
        self._base_loss: float | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The run's optimizer, built on first use; its state carries over between `train_on` calls."""
        if self._optimizer is None:
            if self.optimizer_name == "adamw":
                self._optimizer = adamw(self.model, TrainSettings(lr=self.lr))
            else:
                self._optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr)
        return self._optimizer

    def _batches(self, texts: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in document_batches(self.tokenizer, list(texts), self.max_length, self.batch_size):
            yield {k: v.to(self.device) for k, v in batch.items()}

    @staticmethod
    def _predicted(labels: torch.Tensor) -> torch.Tensor:
        """Predicted tokens per document `[B]` (labels after the first that are not padding)."""
        return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)

    @torch.no_grad()
    def doc_losses(self, texts: Sequence[str]) -> np.ndarray:
        """Mean token loss of each document `[len(texts)]` (log-perplexity)."""
        out = []
        for batch in self._batches(texts):
            out.append(document_losses(self.model, batch).float().cpu().numpy())  # [B]
            self.cost.add_forward(len(batch["labels"]), int(batch["attention_mask"].sum()), self.n_params)
        self.cost.docs_scored += len(texts)
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    @torch.no_grad()
    def reference_loss(self) -> float:
        """Mean loss per predicted token over all reference documents (nats)."""
        total, count = 0.0, 0
        for batch in self._batches(self.reference_texts):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(causal_lm_loss(logits, batch["labels"], "sum"))
            count += int(self._predicted(batch["labels"]).sum())
            self.cost.add_forward(len(batch["labels"]), int(batch["attention_mask"].sum()), self.n_params)
        return total / max(count, 1)

    def _step(self, texts: Sequence[str]) -> float:
        """One training step on `texts` (one padded batch); the step's loss."""
        (batch,) = list(document_batches(self.tokenizer, list(texts), self.max_length, len(texts)))
        loss = optimizer_step(self.model, self.optimizer, None, batch["input_ids"].to(self.device), self.grad_clip,
                              labels=batch["labels"].to(self.device))
        tokens = int(batch["attention_mask"].sum())
        self.cost.add_forward(len(texts), tokens, self.n_params)
        self.cost.add_backward(len(texts), tokens, self.n_params)
        return loss

    def load_optimizer_moments(self, folder: str | Path) -> None:
        """Continue from a training checkpoint's optimizer state (MATES probes from the checkpoint's
        AdamW moments); the learning rate stays the probe's. The checkpoint must come from
        `quadlib.proxy.train_lm` on this model (same parameter order)."""
        from quadlib.proxy.checkpoint import read_optimizer_moments

        if self.optimizer_name != "adamw":
            raise ValueError(f"{folder}: AdamW moments need optimizer='adamw', the probe uses {self.optimizer_name!r}")
        moments = read_optimizer_moments(folder)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # state_dict's index order
        mismatched = [i for i, state in moments.items()
                      if i >= len(params) or state["exp_avg"].shape != params[i].shape]
        if mismatched:
            raise ValueError(f"{folder}: its optimizer state does not fit this model (parameter index "
                             f"{mismatched[0]}); load the checkpoint of the model's own training run")
        self.optimizer.load_state_dict({"state": moments, "param_groups": self.optimizer.state_dict()["param_groups"]})

    @contextmanager
    def preserved(self) -> Iterator[None]:
        params = list(self.model.parameters())
        weights = [p.detach().clone() for p in params]
        state = copy.deepcopy(self.optimizer.state_dict())
        base = self._base_loss
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(params, weights, strict=True):
                    p.copy_(saved)
            self.optimizer.load_state_dict(state)
            self.optimizer.zero_grad(set_to_none=True)
            self._base_loss = base

    @contextmanager
    def learning_rate(self, lr: float | None) -> Iterator[None]:
        """A context in which the probe's training steps use learning rate `lr` (None: unchanged)."""
        if lr is None:
            yield
            return
        if lr <= 0:
            raise ValueError(f"the probe's learning rate must be positive, got {lr}")
        saved = self.lr
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        try:
            yield
        finally:
            self.lr = saved
            for group in self.optimizer.param_groups:  # fresh dicts if `preserved` reloaded the state inside
                group["lr"] = saved

    def rollout_delta(self, steps: Sequence[Sequence[str]]) -> np.ndarray:
        if self._base_loss is None:
            self._base_loss = self.reference_loss()
        base = self._base_loss
        deltas = []
        with self.preserved():
            for texts in steps:
                self._step(texts)
                deltas.append(base - self.reference_loss())  # positive: the step lowered the reference loss
        self.cost.docs_scored += sum(len(texts) for texts in steps)
        return np.asarray(deltas, dtype=np.float64)

    def one_step_delta(self, texts: Sequence[str]) -> float:
        return float(self.rollout_delta([texts])[0])

    def train_on(self, texts: Sequence[str]) -> list[float]:
        losses = [self._step(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        self._base_loss = None  # the checkpoint moved: the next probe re-measures the reference loss
        return losses
