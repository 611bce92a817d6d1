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
from collections.abc import Iterator
from contextlib import contextmanager
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


@dataclass
class KronfluenceTiming:
    """One Kronfluence scoring call, timed at two levels (wall s, process CPU s)."""

    scores: np.ndarray  # [n_docs], aggregated over the reference set
    seconds: float  # reference gradients + preconditioning + the pass over the scored documents
    cpu_seconds: float
    documents_seconds: float  # the pass over the scored documents alone (Kronfluence's dot-product loader)
    documents_cpu_seconds: float


@contextmanager
def _timed(module: object, name: str, log: list[tuple[float, float]]) -> Iterator[None]:
    """Time every call of `module.name` (wall, CPU) into `log`, restoring the attribute afterwards."""
    original = getattr(module, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            log.append((time.perf_counter() - start, time.process_time() - cpu_start))

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


class KronfluencePeer:
    """Kronfluence's factors fitted once; `score` may then run repeatedly (for paired timing).

    Each `score` call is timed inside Kronfluence, excluding its disk I/O (factor loading, score saving):
    the whole score computation (the reference documents' gradients, their preconditioning, and the pass
    over the scored documents) and, within it, the pass over the scored documents alone. With
    `aggregate_query=True` the reference gradients are summed into ONE query before preconditioning
    (Kronfluence's `aggregate_query_gradients`), the same work as our `set_reference`; with False each
    reference document is preconditioned and the scored documents are re-read once per reference batch.
    """

    def __init__(self, model: nn.Module, module_names: list[str], fit_batches: list[Batch], strategy: str = "kfac",
                 damping: float | None = None, empirical_fisher: bool = True, dtype: torch.dtype = torch.float64,
                 aggregate_query: bool = False) -> None:
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
        self._workdir = tempfile.TemporaryDirectory()
        self.analyzer = Analyzer("peer", prepared, task, cpu=True, disable_tqdm=True, output_dir=self._workdir.name)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical_fisher,
                                      activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                                      eigendecomposition_dtype=torch.float64, lambda_dtype=dtype,
                                      per_sample_gradient_dtype=dtype)
        self.score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=dtype,
                                         precondition_dtype=dtype, score_dtype=dtype,
                                         aggregate_query_gradients=aggregate_query)
        start = time.perf_counter()
        self.analyzer.fit_all_factors("factors", _Rows(fit_batches), per_device_batch_size=_rows_in(fit_batches[0]),
                                      factor_args=factor_args, overwrite_output_dir=True)
        self.fit_seconds = time.perf_counter() - start

    def score(self, reference: list[Batch], documents: list[Batch]) -> KronfluenceTiming:
        """Scores of `documents` summed over all of `reference` (batches of one width each)."""
        from kronfluence.computer import score_computer
        from kronfluence.score import pairwise

        whole: list[tuple[float, float]] = []
        passes: list[tuple[float, float]] = []
        with _timed(score_computer, "compute_pairwise_scores_with_loaders", whole), \
                _timed(score_computer, "compute_pairwise_query_aggregated_scores_with_loaders", whole), \
                _timed(pairwise, "compute_dot_products_with_loader", passes):
            self.analyzer.compute_pairwise_scores("scores", "factors", _Rows(reference), _Rows(documents),
                                                  per_device_query_batch_size=_rows_in(reference[0]),
                                                  per_device_train_batch_size=_rows_in(documents[0]),
                                                  score_args=self.score_args, overwrite_output_dir=True)
        if len(whole) != 1 or not passes:
            raise RuntimeError(f"Kronfluence's scoring internals changed: {len(whole)} score computations and "
                               f"{len(passes)} document passes timed; update KronfluencePeer.score for its version")
        pairwise_scores = self.analyzer.load_pairwise_scores("scores")["all_modules"]  # [n_queries, n_docs]
        # Kronfluence's pairwise score is grad_query^T P grad_train (positive = helpful), like ours.
        return KronfluenceTiming(pairwise_scores.sum(0).double().numpy(), whole[0][0], whole[0][1],
                                 sum(p[0] for p in passes), sum(p[1] for p in passes))

    def close(self) -> None:
        self._workdir.cleanup()


def kronfluence_scores(model: nn.Module, module_names: list[str], fit_batches: list[Batch], reference: list[Batch],
                       documents: list[Batch], strategy: str = "kfac", damping: float | None = None,
                       empirical_fisher: bool = True, dtype: torch.dtype = torch.float64,
                       aggregate_query: bool = False) -> PeerResult:
    """Kronfluence's aggregated scores of `documents` against all of `reference` (batches of one width).

    `damping=None` is Kronfluence's heuristic 0.1 x mean eigenvalue per module.
    """
    peer = KronfluencePeer(model, module_names, fit_batches, strategy, damping, empirical_fisher, dtype,
                           aggregate_query)
    try:
        timing = peer.score(reference, documents)
    finally:
        peer.close()
    return PeerResult(timing.scores, peer.fit_seconds, timing.seconds, timing.cpu_seconds)


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
