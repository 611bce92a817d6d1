"""Probe-based oracles for MATES and Group-MATES: how much does training on a document move the
reference loss?

An oracle influence is the drop in reference loss after short training on the document(s):
`L_ref(theta) - L_ref(theta after the step(s))` (MATES Sec. 3, one-step probe; Group-MATES,
rollouts of a few sequential steps). Positive = helpful. The model's weights are restored after
every probe, so probes are independent of each other and of their order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from quadlib.device import default_device
from quadlib.proxy import causal_lm_loss, encode_documents, pad_batch, pad_id_of
from quadlib.selection.scoring import Cost

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


@runtime_checkable
class ProbeModel(Protocol):
    """A proxy model that can be probed with short training rollouts."""

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


class HFProbeModel:
    """`ProbeModel` on a Hugging Face causal LM, its tokenizer and the reference texts.

    Also offers `doc_losses(texts)` (per-document mean token loss) for the PPL baseline.
    The tokenizer needs a pad token (set `tokenizer.pad_token` before passing it) and an eos token:
    documents are framed `[bos] text [eos]` as in training and influence (`quadlib.proxy.encode_documents`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, reference_texts: Sequence[str], *, lr: float = 1e-3,
                 optimizer: str = "sgd", max_length: int = 256, batch_size: int = 16,
                 device: str | None = None) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if tokenizer.pad_token is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
        if len(reference_texts) == 0:
            raise ValueError("HFProbeModel needs at least one reference text")
        self.device = default_device(device)
        self.model = model.to(self.device).eval()  # eval: no dropout, so probes are deterministic
        self.tokenizer = tokenizer
        self.reference_texts = list(reference_texts)
        self.lr, self.optimizer, self.max_length, self.batch_size = lr, optimizer, max_length, batch_size
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.cost = Cost()
        self._base_loss: float | None = None

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The one framing `[bos] text [eos]` of training and influence (`quadlib.proxy.encode_documents`)."""
        batch = pad_batch(encode_documents(self.tokenizer, texts, self.max_length), pad_id_of(self.tokenizer))
        return {key: value.to(self.device) for key, value in batch.items()}

    def _token_loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-document summed next-token loss `[B]` and predicted-token counts `[B]`."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        counts = batch["attention_mask"][:, 1:].sum(dim=1).to(torch.float32)  # [B] predicted tokens
        return causal_lm_loss(logits, batch["labels"], "per_sequence") * counts, counts

    def _batches(self, texts: Sequence[str]) -> list[list[str]]:
        return [list(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]

    @torch.no_grad()
    def doc_losses(self, texts: Sequence[str]) -> np.ndarray:
        """Mean token loss of each document `[len(texts)]` (log-perplexity)."""
        out = []
        for chunk in self._batches(texts):
            batch = self._encode(chunk)
            sums, counts = self._token_loss_sums(batch)
            self.cost.add_forward(len(chunk), int(batch["attention_mask"].sum()), self.n_params)
            out.append((sums / counts.clamp(min=1)).cpu().numpy())
        self.cost.docs_scored += len(texts)
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    @torch.no_grad()
    def reference_loss(self) -> float:
        total, count = 0.0, 0.0
        for chunk in self._batches(self.reference_texts):
            batch = self._encode(chunk)
            sums, counts = self._token_loss_sums(batch)
            self.cost.add_forward(len(chunk), int(batch["attention_mask"].sum()), self.n_params)
            total += float(sums.sum())
            count += float(counts.sum())
        return total / max(count, 1.0)

    def _train_step(self, optimizer: torch.optim.Optimizer, texts: Sequence[str]) -> None:
        batch = self._encode(texts)
        sums, counts = self._token_loss_sums(batch)
        loss = sums.sum() / counts.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens = int(batch["attention_mask"].sum())
        self.cost.add_forward(len(texts), tokens, self.n_params)
        self.cost.add_backward(len(texts), tokens, self.n_params)

    def rollout_delta(self, steps: Sequence[Sequence[str]]) -> np.ndarray:
        if self._base_loss is None:
            self._base_loss = self.reference_loss()
        params = list(self.model.parameters())
        snapshot = [p.detach().clone() for p in params]
        optimizer = OPTIMIZERS[self.optimizer](params, lr=self.lr)
        deltas = []
        try:
            for texts in steps:
                self._train_step(optimizer, texts)
                deltas.append(self._base_loss - self.reference_loss())
        finally:
            with torch.no_grad():
                for p, saved in zip(params, snapshot, strict=True):
                    p.copy_(saved)
            optimizer.zero_grad(set_to_none=True)
        self.cost.docs_scored += sum(len(texts) for texts in steps)
        return np.asarray(deltas, dtype=np.float64)

    def one_step_delta(self, texts: Sequence[str]) -> float:
        return float(self.rollout_delta([texts])[0])
