"""Peer implementations run on OUR model and batches, for cross-checks and side-by-side benchmarks.

- Kronfluence 1.0.1 (pip, installed --no-deps): K-FAC / EK-FAC pairwise scores. Its task uses the
  summed token CE as the training loss (the same loss our curvature is fitted on) and the mean
  reference CE as the measurement; GPT-2's Conv1D modules must be swapped for nn.Linear first
  (`conv1d_to_linear`), since Kronfluence cannot track Conv1D.
- TRAK (traker 0.3.2): its CPU `BasicProjector` on per-document parameter gradients and TRAK's
  kernel phi_z^T (Phi^T Phi)^-1 phi_ref, with Phi the projected gradients of the fit documents.
  This is TRAK's estimator for one model checkpoint, without its ensemble.
Both are imported lazily so the engine never depends on them.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers.pytorch_utils import Conv1D

from quadlib.influence.loss import Batch, summed_token_loss
from quadlib.proxy.loss import document_losses


@dataclass
class PeerResult:
    scores: np.ndarray  # [n_docs], aggregated over the reference set, higher = lowers reference loss more
    fit_seconds: float
    score_seconds: float
    score_cpu_seconds: float  # process CPU time of scoring (all threads): steadier than wall time on a shared machine


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """A copy of `model` with every GPT-2 Conv1D replaced by the equivalent nn.Linear (weight transposed)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            n_in, n_out = module.weight.shape
            linear = nn.Linear(n_in, n_out, bias=module.bias is not None, dtype=module.weight.dtype)
            linear.weight.data.copy_(module.weight.data.T)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.data)
            parent_name, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), leaf, linear)
    return model


class _Rows(Dataset):
    """The rows of a list of equal-width batches, as Kronfluence's DataLoader expects."""

    def __init__(self, batches: list[Batch]) -> None:
        self.rows = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(_rows_in(batch))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def _rows_in(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


def kronfluence_scores(model: nn.Module, module_names: list[str], fit_batches: list[Batch], reference: list[Batch],
                       documents: list[Batch], strategy: str = "kfac", damping: float | None = None,
                       empirical_fisher: bool = True, dtype: torch.dtype = torch.float64) -> PeerResult:
    """Kronfluence's aggregated scores of `documents` against all of `reference` (batches of one width).

    `damping=None` is Kronfluence's heuristic 0.1 x mean eigenvalue per module.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class LanguageModelingTask(Task):
        def compute_train_loss(self, batch: Batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
            return summed_token_loss(model, batch, torch.Generator().manual_seed(0) if sample else None)[0]

        def compute_measurement(self, batch: Batch, model: nn.Module) -> torch.Tensor:
            return document_losses(model, batch).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return module_names

        def get_attention_mask(self, batch: Batch) -> torch.Tensor:
            return batch["attention_mask"]

    task = LanguageModelingTask()
    prepared = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as workdir:
        analyzer = Analyzer("peer", prepared, task, cpu=True, disable_tqdm=True, output_dir=workdir)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical_fisher,
                                      activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                                      eigendecomposition_dtype=torch.float64, lambda_dtype=dtype,
                                      per_sample_gradient_dtype=dtype)
        score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=dtype,
                                    precondition_dtype=dtype, score_dtype=dtype)
        width = _rows_in(fit_batches[0])
        start = time.perf_counter()
        analyzer.fit_all_factors("factors", _Rows(fit_batches), per_device_batch_size=width, factor_args=factor_args,
                                 overwrite_output_dir=True)
        fitted, cpu_start = time.perf_counter(), time.process_time()
        analyzer.compute_pairwise_scores("scores", "factors", _Rows(reference), _Rows(documents),
                                         per_device_query_batch_size=_rows_in(reference[0]),
                                         per_device_train_batch_size=_rows_in(documents[0]), score_args=score_args,
                                         overwrite_output_dir=True)
        done, cpu_done = time.perf_counter(), time.process_time()
        pairwise = analyzer.load_pairwise_scores("scores")["all_modules"]  # [n_reference, n_docs]
    # Kronfluence's pairwise score is grad_query^T P grad_train (positive = helpful), like ours.
    return PeerResult(pairwise.sum(0).double().numpy(), fitted - start, done - fitted, cpu_done - cpu_start)


def _flat_gradient(model: nn.Module, loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def trak_scores(model: nn.Module, fit_batches: list[Batch], reference: list[Batch], documents: list[Batch],
                proj_dim: int = 256, seed: int = 0) -> PeerResult:
    """TRAK's one-checkpoint estimator with traker's CPU BasicProjector (block_size 512)."""
    from trak.projectors import BasicProjector, ProjectionType

    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    projector = BasicProjector(grad_dim=dim, proj_dim=proj_dim, seed=seed, proj_type=ProjectionType.rademacher,
                               device=torch.device("cpu"), block_size=512, dtype=torch.float32)

    def features(batches: list[Batch]) -> torch.Tensor:
        rows = []
        for batch in batches:
            grads = torch.stack([_flat_gradient(model, document_losses(model, {k: v[i:i + 1] for k, v in batch.items()})
                                                .sum(), params) for i in range(_rows_in(batch))])  # [B, n_params]
            rows.append(projector.project(grads.float(), model_id=0).double())
        return torch.cat(rows)  # [n, proj_dim]

    start = time.perf_counter()
    phi = features(fit_batches)
    kernel_inverse = torch.linalg.pinv(phi.T @ phi)
    reference_feature = features(reference).mean(0)
    fitted, cpu_start = time.perf_counter(), time.process_time()
    scores = features(documents) @ kernel_inverse @ reference_feature
    return PeerResult(scores.numpy(), fitted - start, time.perf_counter() - fitted, time.process_time() - cpu_start)
