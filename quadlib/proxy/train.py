"""Causal-LM training on packed blocks: warm-up pretraining of the proxy and training on a selection.

AdamW with linear warm-up and cosine decay. The data order is a pure function of (seed, step), and
checkpoints hold weights, optimizer, scheduler and RNG states, so a run resumed from its latest
checkpoint ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quadlib.device import default_device
from quadlib.proxy.batching import encode_documents, pack_blocks
from quadlib.proxy.checkpoint import (
    checkpoint_folder,
    latest_checkpoint,
    prune_checkpoints,
    read_training_state,
    restore_training_state,
    save_training_state,
)
from quadlib.proxy.configs import context_length
from quadlib.proxy.loss import IGNORE_INDEX, causal_lm_loss
from quadlib.runstore import to_jsonable
from quadlib.settings import setting

# Settings that do not change the trajectory: a checkpoint may be resumed with other values.
# (micro_batch_size splits a step's sum over the same tokens: only float rounding differs.)
RESUMABLE_CHANGES = frozenset({"device", "checkpoint_every", "keep_checkpoints", "micro_batch_size"})


@dataclass
class TrainSettings:
    """How to train; identical settings and seed give identical weights (issue 5: same across methods)."""

    lr: float = setting(1e-3, "peak learning rate, reached at the end of warm-up")
    min_lr_ratio: float = setting(0.1, "the cosine decays the learning rate to lr * min_lr_ratio at the last step")
    warmup_steps: int = setting(20, "steps of linear warm-up from lr / warmup_steps to lr")
    total_steps: int | None = setting(None, "optimizer steps; wins over token_budget and epochs")
    token_budget: int | None = setting(
        None, "tokens to train on: ceil(token_budget / (batch_size * block_size)) steps; wins over epochs")
    epochs: float = setting(1.0, "passes over the packed blocks, used when total_steps and token_budget are None")
    batch_size: int = setting(16, "packed blocks per optimizer step")
    micro_batch_size: int | None = setting(
        None, "blocks per forward/backward; a step accumulates batch_size / micro_batch_size of them (None: all)")
    block_size: int = setting(256, "tokens per packed block, at most the model's context length")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay on matrices and embeddings (not biases, norms)")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW (beta1, beta2)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0 disables clipping")
    seed: int = setting(0, "seed of the data order (and of dropout, where a model has any)")
    checkpoint_every: int = setting(100, "save a resumable checkpoint every this many steps (and at the last)")
    keep_checkpoints: int = setting(2, "how many of the most recent checkpoints stay on disk; 0 keeps all")
    device: str | None = setting(None, "'cpu', 'cuda', 'cuda:1' ...; None picks cuda when present")

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every, "lr": self.lr,
                    "micro_batch_size": 1 if self.micro_batch_size is None else self.micro_batch_size}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"TrainSettings.{name} must be positive, got {value}")
        if self.block_size < 2:
            raise ValueError(f"TrainSettings.block_size must be at least 2, got {self.block_size}")
        if self.total_steps is not None and self.total_steps < 0:
            raise ValueError(f"TrainSettings.total_steps must be >= 0, got {self.total_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainSettings.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def steps_for(self, n_blocks: int) -> int:
        """Optimizer steps for `n_blocks` packed blocks: total_steps, else token_budget, else epochs."""
        if self.total_steps is not None:
            return self.total_steps
        if self.token_budget is not None:
            return math.ceil(self.token_budget / (self.batch_size * self.block_size))
        return math.ceil(self.epochs * (n_blocks // self.batch_size))

    def trajectory(self) -> dict[str, Any]:
        """The settings that determine the weights (compared before resuming a checkpoint)."""
        return {k: v for k, v in to_jsonable(asdict(self)).items() if k not in RESUMABLE_CHANGES}


@dataclass
class TrainResult:
    """What a training run did; `losses[i]` is the mean loss (nats per predicted token) of step i+1."""

    losses: list[float]
    steps: int
    tokens_seen: int
    resumed_from: int = 0
    checkpoint: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier of 0-based `step`: linear warm-up to 1, then cosine decay to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@lru_cache(maxsize=2)
def _epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def batch_indices(step: int, n_blocks: int, batch_size: int, seed: int) -> np.ndarray:
    """Block indices of 0-based `step`: each epoch is a fresh seeded permutation, cut into full batches."""
    steps_per_epoch = n_blocks // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    return _epoch_order(n_blocks, seed, epoch)[position * batch_size:(position + 1) * batch_size]


def adamw(model: PreTrainedModel, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norm gains are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas)


def _fingerprint(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.numpy().tobytes()).hexdigest()


def train_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
             settings: TrainSettings, ckpt_dir: str | Path, resume: bool = True, progress: bool = True,
             on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model` in place on `texts` packed into blocks; checkpoint to `ckpt_dir`; resume from it.

    `texts` must come in a stable order (e.g. sorted by document id): the packing follows it.
    With `resume`, the latest checkpoint in `ckpt_dir` is continued (its settings and data must
    match, else a clear error); without, existing checkpoints there are deleted first. `on_step(step,
    loss)` runs after each optimizer step; an exception from it stops training, and the latest
    checkpoint remains to resume from. The model keeps its train/eval mode on return.
    """
    device = default_device(settings.device)
    if settings.block_size > context_length(model):
        raise ValueError(f"block_size {settings.block_size} exceeds the model's context {context_length(model)}")
    blocks = pack_blocks(encode_documents(tokenizer, texts, max_length=None), settings.block_size)  # [N, T]
    if len(blocks) < settings.batch_size:
        raise ValueError(f"the texts fill only {len(blocks)} blocks of {settings.block_size} tokens, fewer than "
                         f"batch_size {settings.batch_size}; give more text or lower block_size/batch_size")
    total_steps = settings.steps_for(len(blocks))
    run_state = {"settings": settings.trajectory(), "data_fingerprint": _fingerprint(blocks),
                 "total_steps": total_steps}
    ckpt_dir = Path(ckpt_dir)
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    was_training = model.training
    model.to(device).train()
    optimizer = adamw(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, settings.warmup_steps, total_steps, settings.min_lr_ratio))
    losses: list[float] = []
    start = 0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            latest = latest_checkpoint(ckpt_dir) if resume else None
            if latest is not None:
                _check_resumable(read_training_state(latest), run_state, latest)
                stored = restore_training_state(latest, model, optimizer, scheduler)
                losses, start = stored["losses"], stored["step"]
            bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=not progress,
                       desc="train", unit="step")
            for step in bar:
                batch = blocks[batch_indices(step, len(blocks), settings.batch_size, settings.seed)]  # [B, T]
                losses.append(optimizer_step(model, optimizer, scheduler, batch.to(device), settings.grad_clip,
                                             settings.micro_batch_size))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if (step + 1) % settings.checkpoint_every == 0 or step + 1 == total_steps:
                    save_training_state(checkpoint_folder(ckpt_dir, step + 1), model, optimizer, scheduler,
                                        {**run_state, "step": step + 1, "losses": losses})
                    prune_checkpoints(ckpt_dir, settings.keep_checkpoints)
                if on_step is not None:
                    on_step(step + 1, losses[-1])
    finally:
        model.train(was_training)
    return TrainResult(losses=losses, steps=total_steps,
                       tokens_seen=total_steps * settings.batch_size * settings.block_size, resumed_from=start,
                       checkpoint=latest_checkpoint(ckpt_dir), settings=to_jsonable(settings))


def optimizer_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler | None, batch: torch.Tensor, grad_clip: float,
                   micro_batch_size: int | None = None, labels: torch.Tensor | None = None) -> float:
    """The one training step, on a batch [B, T]; returns its mean loss (nats per predicted token).

    `batch` is packed blocks (every position after the first is predicted) or, with `labels` [B, T]
    holding IGNORE_INDEX on padding, right-padded documents (the MATES probes, `quadlib.selection.probes`).
    The batch runs in micro-batches of `micro_batch_size` rows whose summed token losses, divided
    by the whole batch's predicted tokens, accumulate into one gradient: the same step as one pass.
    On CUDA the forward runs under bf16 autocast (weights, gradients and optimizer state stay float32).
    """
    labels = batch if labels is None else labels
    optimizer.zero_grad(set_to_none=True)
    n_predicted = int((labels[:, 1:] != IGNORE_INDEX).sum().clamp_min(1))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.device.type == "cuda")
    total = 0.0
    size = micro_batch_size or len(batch)
    for micro, micro_labels in zip(batch.split(size), labels.split(size), strict=True):  # [b, T] each
        with autocast:
            logits = model(input_ids=micro).logits  # [b, T, V]
        loss = causal_lm_loss(logits, micro_labels, "sum") / n_predicted
        loss.backward()
        total += loss.item()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return total


def _check_resumable(stored: dict[str, Any], wanted: dict[str, Any], folder: Path) -> None:
    """Refuse to continue a checkpoint made with other settings or other data."""
    for key in ("settings", "data_fingerprint", "total_steps"):
        if stored.get(key) != wanted[key]:
            raise ValueError(f"checkpoint {folder} was made with a different {key} ({stored.get(key)!r} vs "
                             f"{wanted[key]!r}); use another ckpt_dir or resume=False to start over")
