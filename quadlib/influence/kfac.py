"""K-FAC and EK-FAC curvature per tracked layer, and its exact damped inverse.

Scale convention (so that absolute damping has a meaning): with A = mean over real tokens of
x x^T and G = mean over real tokens of delta delta^T, where delta are the output gradients of the
*summed* token loss, A (x) G approximates the Gauss-Newton/Fisher block of the mean-per-token
training loss: (1/N) sum_docs g_doc g_doc^T ~= (1/N) sum_tokens (d d^T) (x) (x x^T) = G (x) A.
EK-FAC keeps the Kronecker eigenbasis and refits the diagonal there:
Lambda = (1/N) sum_docs (Q_G^T M_doc Q_A)^2 (George et al. 2018; Grosse et al. 2023).

Memory on a real model (SmolLM2-135M, 30 blocks of width 576, MLP 1536, joint QKV 960 outputs): the
float64 factor sums of all 150 tracked layers take 2.4 GB while fitting; each layer's factors are
released as soon as it is eigendecomposed, and the eigenbases and eigenvalues are kept in the model's
own precision (float32: 1.6 GB for all 30 blocks; float64 toy models keep float64), so the inverse is
as precise as the gradients it multiplies.

The damped inverse (H + lambda I)^-1 is applied exactly through the eigendecompositions
(the inverse in Quad's influence formula, with a Kronecker H): V = Q_G [(Q_G^T M Q_A) / (Lambda + lambda)] Q_A^T. The authors'
released code multiplies by (Lambda + lambda) here; dividing is the inverse.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from quadlib.device import torch_threads
from quadlib.influence.capture import augment_bias, backward_pass
from quadlib.influence.layers import TrackedLayer
from quadlib.influence.loss import Batch, summed_token_loss

DAMPING_MODES = ("relative", "absolute")
FISHER_MODES = ("sampled", "empirical")


def damping_value(eigenvalues: torch.Tensor, damping: float, mode: str) -> float:
    """lambda itself ("absolute") or `damping` times the mean eigenvalue of the block ("relative")."""
    if mode == "absolute":
        return float(damping)
    if mode == "relative":
        return float(damping * eigenvalues.mean())
    raise ValueError(f"unknown damping mode {mode!r}; choose one of {DAMPING_MODES}")


@dataclass
class DampedKroneckerInverse:
    """(H + lambda I)^-1 for H = Q_G diag(Lambda) Q_A^T-structured curvature of one layer.

    `eigenvalues` [out, in] is g a^T for K-FAC or the refitted diagonal for EK-FAC.
    """

    q_activation: torch.Tensor  # [in, in]
    q_gradient: torch.Tensor  # [out, out]
    eigenvalues: torch.Tensor  # [out, in]
    damping: float  # the absolute lambda

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """(H + lambda I)^-1 vec(M) for M [..., out, in], returned as [..., out, in] in M's dtype."""
        q_a = self.q_activation.to(matrix.device)
        q_g = self.q_gradient.to(matrix.device)
        rotated = q_g.T @ matrix.to(q_a.dtype) @ q_a  # [..., out, in]
        rotated = rotated / (self.eigenvalues.to(matrix.device) + self.damping)
        return (q_g @ rotated @ q_a.T).to(matrix.dtype)

    def explicit(self) -> torch.Tensor:
        """H + lambda I as a dense [out*in, out*in] matrix in row-major vec(M) order (tests only)."""
        basis = torch.kron(self.q_gradient, self.q_activation)  # [out*in, out*in]
        return basis @ torch.diag(self.eigenvalues.flatten() + self.damping) @ basis.T


@dataclass
class KroneckerFactors:
    """A = E[x x^T] [in, in] and G = E[d d^T] [out, out] of one layer, token-weighted, float64."""

    activation: torch.Tensor
    gradient: torch.Tensor
    n_tokens: int

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, Q_A, g, Q_G) with non-negative eigenvalues (round-off below zero clamped): A = Q_A diag(a) Q_A^T.

        On one thread: LAPACK's eigh is a long chain of small parallel regions, and while another process
        holds a core each region waits for the descheduled thread (n=256 on the loaded 2-core machine:
        4.5 s per eigh at 2 threads, 36 ms at 1; n=768: 11.8 s against 0.6 s).
        """
        with torch_threads(1):
            a, q_a = torch.linalg.eigh(self.activation)  # [in], [in, in]
            g, q_g = torch.linalg.eigh(self.gradient)  # [out], [out, out]
        return a.clamp_min(0), q_a, g.clamp_min(0), q_g


class FactorAccumulator:
    """Sums x x^T and d d^T over real (unpadded) tokens for every layer; a LayerCapture consumer."""

    def __init__(self, layers: list[TrackedLayer], dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.activation = {layer.name: torch.zeros(layer.in_augmented, layer.in_augmented, dtype=dtype)
                           for layer in layers}
        self.gradient = {layer.name: torch.zeros(layer.out_features, layer.out_features, dtype=dtype)
                         for layer in layers}
        self.n_tokens = {layer.name: 0 for layer in layers}
        self.mask: torch.Tensor | None = None  # [B, T] bool, set per batch

    def __call__(self, layer: TrackedLayer, x: torch.Tensor, delta: torch.Tensor) -> None:
        # One batch's Gram matrices in the model's precision (at least float32; a half model's in float32),
        # summed across batches in float64: the float64 GEMMs were most of a fit's time on SmolLM2-135M
        # (about 330 GFLOP per 8 x 128 batch over its 150 layers), and a batch's sum over ~10^3 tokens
        # loses nothing in float32 that the curvature estimate's own sampling noise does not dwarf.
        compute = torch.promote_types(x.dtype, torch.float32)
        real = x[self.mask].to(compute)  # [N, in]
        if layer.has_bias:
            real = augment_bias(real)
        d = delta[self.mask].to(compute)  # [N, out]
        self.activation[layer.name] += (real.T @ real).to(self.dtype).cpu()
        self.gradient[layer.name] += (d.T @ d).to(self.dtype).cpu()
        self.n_tokens[layer.name] += int(real.shape[0])

    def factors(self) -> dict[str, KroneckerFactors]:
        out = {}
        for name, n in self.n_tokens.items():
            if n == 0:
                raise ValueError(f"no tokens reached layer {name}; fit on at least one non-empty batch")
            out[name] = KroneckerFactors(self.activation[name] / n, self.gradient[name] / n, n)
        return out


class EigenCorrectionAccumulator:
    """Sums (Q_G^T M_doc Q_A)^2 over documents, M_doc = sum_t d_t x_t^T, for the EK-FAC diagonal."""

    def __init__(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype = torch.float64) -> None:
        self.bases = bases  # name -> (Q_A [in, in], Q_G [out, out])
        self.dtype = dtype
        self.squares = {name: torch.zeros(q_g.shape[0], q_a.shape[0], dtype=dtype) for name, (q_a, q_g) in bases.items()}
        self.mask: torch.Tensor | None = None

    def __call__(self, layer: TrackedLayer, x: torch.Tensor, delta: torch.Tensor) -> None:
        q_a, q_g = (q.to(x.device, self.dtype) for q in self.bases[layer.name])  # one layer's float64 copy
        x = x.to(self.dtype)  # [B, T, in]
        if layer.has_bias:
            x = augment_bias(x)
        x = x * self.mask[..., None]
        rotated = torch.einsum("bto,bti->boi", delta.to(self.dtype) @ q_g, x @ q_a)  # [B, out, in]
        self.squares[layer.name] += rotated.square().sum(0).cpu()


def _fit_passes(model: nn.Module, layers: list[TrackedLayer], batches: Iterable[Batch],
                consumer: FactorAccumulator | EigenCorrectionAccumulator, fisher: str, seed: int, desc: str) -> None:
    """Backward passes of the summed token loss (labels sampled or empirical) over `batches`."""
    if fisher not in FISHER_MODES:
        raise ValueError(f"unknown fisher mode {fisher!r}; choose one of {FISHER_MODES}")
    generator = torch.Generator().manual_seed(seed) if fisher == "sampled" else None
    for batch in tqdm(batches, desc=desc, leave=False):
        consumer.mask = batch["attention_mask"].bool()
        backward_pass(model, layers, consumer, lambda b=batch: summed_token_loss(model, b, generator)[0])


def fit_kfac(model: nn.Module, layers: list[TrackedLayer], batches: Iterable[Batch], *, fisher: str = "sampled",
             seed: int = 0) -> dict[str, KroneckerFactors]:
    """K-FAC factors of every layer from one pass over `batches` (materialised, so iterate once)."""
    accumulator = FactorAccumulator(layers)
    _fit_passes(model, layers, batches, accumulator, fisher, seed, "K-FAC factors")
    return accumulator.factors()


def kfac_inverses(factors: dict[str, KroneckerFactors], damping: float, mode: str,
                  dtype: torch.dtype = torch.float64) -> dict[str, DampedKroneckerInverse]:
    """Damped inverses with the K-FAC eigenvalues g a^T, stored in `dtype`.

    Consumes `factors`: each layer's float64 factors are dropped from the dict once decomposed, so
    the peak is the factors plus one layer's decomposition, not both sets whole.
    """
    out = {}
    for name in list(factors):
        a, q_a, g, q_g = factors.pop(name).eigen()  # float64
        eigenvalues = torch.outer(g, a)  # [out, in]
        lam = damping_value(eigenvalues, damping, mode)
        out[name] = DampedKroneckerInverse(q_a.to(dtype), q_g.to(dtype), eigenvalues.to(dtype), lam)
    return out


def ekfac_inverses(model: nn.Module, layers: list[TrackedLayer], batches: Iterable[Batch],
                   factors: dict[str, KroneckerFactors], damping: float, mode: str, *, fisher: str = "sampled",
                   seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, DampedKroneckerInverse]:
    """Damped inverses with the EK-FAC diagonal refitted on per-document gradients in the K-FAC eigenbasis.

    The eigenbases are kept (and the diagonal refitted) in `dtype`; `factors` are consumed.
    """
    n_tokens = {name: factor.n_tokens for name, factor in factors.items()}
    bases = {}
    for name in list(factors):
        _, q_a, _, q_g = factors.pop(name).eigen()
        bases[name] = (q_a.to(dtype), q_g.to(dtype))
    accumulator = EigenCorrectionAccumulator(bases)
    _fit_passes(model, layers, batches, accumulator, fisher, seed + 1, "EK-FAC eigenvalues")
    out = {}
    for name, (q_a, q_g) in bases.items():
        eigenvalues = accumulator.squares.pop(name) / n_tokens[name]  # [out, in] float64
        out[name] = DampedKroneckerInverse(q_a, q_g, eigenvalues.to(dtype), damping_value(eigenvalues, damping, mode))
    return out
