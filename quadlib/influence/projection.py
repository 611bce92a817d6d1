"""Seeded Johnson-Lindenstrauss sketches of per-document layer gradients, for many-query analyses.

The reverse-mode scorer answers ONE aggregated query per backward pass. Per-reference-example
influence or gradient similarity between clusters needs many inner products, so each document's
layer gradient M = sum_t d_t x_t^T [out, in] is sketched factorwise as P_out M P_in^T [k_out, k_in]
= sum_t (P_out d_t)(P_in x_t)^T, never forming M. With i.i.d. entries of variance 1/k,
E[P^T P] = I, so inner products of sketches are unbiased estimates of gradient inner products.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quadlib.influence.capture import augment_bias, backward_pass
from quadlib.influence.layers import TrackedLayer
from quadlib.influence.loss import Batch
from quadlib.proxy.loss import document_losses
from quadlib.settings import setting

PROJECTION_KINDS = ("gaussian", "rademacher")
Preconditioner = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class ProjectionSettings:
    dim_per_layer: int = setting(256, "sketch size per layer, k_out x k_in with k_out = ceil(sqrt(dim)); "
                                      "the error shrinks as 1/sqrt(dim), also past the layer's own size")
    kind: str = setting("rademacher", f"one of {PROJECTION_KINDS}: entries N(0, 1/k) or +-1/sqrt(k)")
    seed: int = setting(0, "seed; each layer's matrices also depend on the layer's name")

    def __post_init__(self) -> None:
        if self.kind not in PROJECTION_KINDS:
            raise ValueError(f"projection kind {self.kind!r} is not one of {PROJECTION_KINDS}")
        if self.dim_per_layer < 1:
            raise ValueError("dim_per_layer must be >= 1")


def _random_matrix(rows: int, cols: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] with i.i.d. entries of mean 0 and variance 1/rows (so E[P^T P] = I)."""
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator, dtype=torch.float64) / math.sqrt(rows)
    signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int64) * 2 - 1
    return signs.to(torch.float64) / math.sqrt(rows)


class GradientProjector:
    """Per-layer factorwise sketches; `project_documents` gives [B, D] from one backward pass."""

    def __init__(self, layers: list[TrackedLayer], settings: ProjectionSettings | None = None) -> None:
        self.settings = settings or ProjectionSettings()
        self.layers = layers
        self.matrices: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in layers:
            k_out = math.ceil(math.sqrt(self.settings.dim_per_layer))
            k_in = math.ceil(self.settings.dim_per_layer / k_out)
            generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + zlib.crc32(layer.name.encode()))
            self.matrices[layer.name] = (_random_matrix(k_out, layer.out_features, self.settings.kind, generator),
                                         _random_matrix(k_in, layer.in_augmented, self.settings.kind, generator))
        self.dim = sum(p_out.shape[0] * p_in.shape[0] for p_out, p_in in self.matrices.values())

    def project(self, layer_name: str, matrix: torch.Tensor) -> torch.Tensor:
        """Sketch of a layer gradient [..., out, in(+1)] -> [..., k_out * k_in]."""
        p_out, p_in = (p.to(device=matrix.device, dtype=matrix.dtype) for p in self.matrices[layer_name])
        return (p_out @ matrix @ p_in.T).flatten(-2)

    def project_direction(self, direction: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sketch of a per-layer direction such as an estimator's preconditioned reference V: [D]."""
        return torch.cat([self.project(layer.name, direction[layer.name]) for layer in self.layers])

    def project_documents(self, model: nn.Module, batch: Batch, precondition: Preconditioner | None = None
                          ) -> torch.Tensor:
        """Sketches of each document's mean-token-loss gradient [B, D] (float64), optionally preconditioned.

        Preconditioning (e.g. `estimator.precondition`, for per-reference-example influence) needs
        the full per-document layer gradient [B, out, in]; without it the sketch is taken factorwise.
        """
        mask = batch["attention_mask"]
        sketches: dict[str, torch.Tensor] = {}

        def consumer(layer: TrackedLayer, x: torch.Tensor, delta: torch.Tensor) -> None:
            x = augment_bias(x) if layer.has_bias else x
            x = x * mask.to(x)[..., None]  # [B, T, in(+1)]
            if precondition is None:
                p_out, p_in = (p.to(x) for p in self.matrices[layer.name])
                sketch = torch.einsum("bto,bti->boi", delta @ p_out.T, x @ p_in.T).flatten(1)  # [B, k_out*k_in]
            else:
                gradients = torch.einsum("bto,bti->boi", delta, x)  # [B, out, in(+1)]
                sketch = self.project(layer.name, precondition(layer.name, gradients))
            sketches[layer.name] = sketch.double().cpu()

        backward_pass(model, self.layers, consumer, lambda: document_losses(model, batch).sum())
        return torch.cat([sketches[layer.name] for layer in self.layers], dim=1)
