"""Checkpoints in open formats: model weights and optimizer state as safetensors, the rest as JSON.

A training checkpoint is a folder `step-<n>/` holding
  model.safetensors      the model's weights (tied weights stored once),
  optimizer.safetensors  every optimizer state tensor (`state.<param index>.<name>`) and the RNG
                         states (`rng.cpu`, `rng.cuda.<i>`), so a resumed run replays dropout too,
  state.json             step, losses so far, optimizer param groups, scheduler state, and whatever
                         the trainer adds (settings, data fingerprint).
Folders are written under a temporary name and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model as save_weights
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quadlib.runstore import atomic_dir, write_json_atomic

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
STEP_PREFIX = "step-"


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save model (config.json + model.safetensors) and tokenizer to one folder `build_model` reloads."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def load_model_checkpoint(model: PreTrainedModel, path: str | Path) -> PreTrainedModel:
    """Load weights into `model` in place from a checkpoint folder or a `.safetensors` file (strict)."""
    path = Path(path)
    weights = path / MODEL_FILE if path.is_dir() else path
    if not weights.exists():
        raise FileNotFoundError(f"no model weights at {weights}; expected a checkpoint folder or a .safetensors file")
    device = next(model.parameters()).device
    load_weights(model, str(weights), strict=True, device=str(device))
    return model


def save_training_state(folder: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]) -> Path:
    """Write one complete training checkpoint folder (atomically)."""
    optim = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    for index, param_state in optim["state"].items():
        for name, value in param_state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {name!r} of parameter {index} is not a tensor; "
                                "only tensor state can be checkpointed as safetensors")
            tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
    with atomic_dir(folder) as tmp:
        save_weights(model, str(tmp / MODEL_FILE))
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        write_json_atomic(tmp / STATE_FILE, {
            **state, "param_groups": optim["param_groups"], "scheduler": scheduler.state_dict(),
        })
    return folder


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The complete checkpoint folder with the highest step under `ckpt_dir`, or None."""
    folders = [f for f in Path(ckpt_dir).glob(f"{STEP_PREFIX}*") if (f / STATE_FILE).exists()]
    return max(folders, key=lambda f: int(f.name.removeprefix(STEP_PREFIX)), default=None)


def checkpoint_folder(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"{STEP_PREFIX}{step:08d}"


def read_training_state(folder: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (step, losses, settings ...)."""
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))


def restore_training_state(folder: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and RNG states from `folder`; return its JSON state."""
    state = read_training_state(folder)
    load_model_checkpoint(model, folder)
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    optimizer.load_state_dict({"state": optimizer_moments(tensors), "param_groups": state.pop("param_groups")})
    scheduler.load_state_dict(state.pop("scheduler"))
    torch.set_rng_state(tensors["rng.cpu"])
    n_cuda = sum(key.startswith("rng.cuda.") for key in tensors)
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(n_cuda)]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def optimizer_moments(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """The per-parameter optimizer state (`state.<param index>.<name>` tensors) of a checkpoint's
    optimizer file, keyed as `optimizer.state_dict()["state"]` is."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    return per_param


def read_optimizer_moments(folder: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """`optimizer_moments` of the checkpoint folder `folder` (e.g. the warm-up's last, for the MATES probes)."""
    return optimizer_moments(load_file(str(Path(folder) / OPTIMIZER_FILE)))


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the `keep` most recent checkpoint folders (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    folders = sorted(Path(ckpt_dir).glob(f"{STEP_PREFIX}*"), key=lambda f: int(f.name.removeprefix(STEP_PREFIX)))
    for folder in folders[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
