"""K-FAC and EK-FAC curvature per tracked layer, and its exact damped inverse.

Scale convention (so that absolute damping has a meaning): with A = mean over real tokens of
x x^T and G = mean over real tokens of delta delta^T, where delta are the output gradients of the
*summed* token loss, A (x) G approximates the Gauss-Newton/Fisher block of the mean-per-token
training loss: (1/N) sum_docs g_doc g_doc^T ~= (1/N) sum_tokens (d d^T) (x) (x x^T) = G (x) A.
EK-FAC keeps the Kronecker eigenbasis and refits the diagonal there:
Lambda = (1/N) sum_docs (Q_G^T M_doc Q_A)^2 (George et al. 2018; Grosse et al. 2023).

Precision and memory. float64 where it matters: the factor sums (they run over many batches, and the
small eigenvalues must survive the round-off of the large ones), the eigendecompositions and lambda.
The sums are kept as packed lower triangles (`SymmetricSum`: half the bytes, and eigh reads only the
lower triangle, so the decomposition is unchanged bit for bit); each layer's sums are released as soon
as it is decomposed. What the fitted estimator keeps is in the model's precision (float32; float64
toy models keep float64), as precise as the gradients it multiplies: the eigenbases Q_A, Q_G and, for
K-FAC, the eigenvalues as the two vectors (g, a) rather than g a^T (which is as large as the weight).
SmolLM2-135M (150 layers: 30 blocks of width 576, MLP 1536, joint QKV 960 outputs): float64 factor sums
1.2 GB packed (2.4 GB unpacked), float32 eigenbases 1.2 GB, K-FAC eigenvalues 1.1 MB (425 MB as g a^T).

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

    Lambda [out, in] is K-FAC's g a^T, kept as its two factors `kronecker_eigenvalues` = (g [out],
    a [in]) and never formed whole (it is as large as the layer's weight), or EK-FAC's refitted
    diagonal, stored whole in `eigenvalues`. Exactly one of the two is set.
    """

    q_activation: torch.Tensor  # [in, in]
    q_gradient: torch.Tensor  # [out, out]
    eigenvalues: torch.Tensor | None  # [out, in]: EK-FAC's diagonal; None for K-FAC
    damping: float  # the absolute lambda
    kronecker_eigenvalues: tuple[torch.Tensor, torch.Tensor] | None = None  # K-FAC: (g [out], a [in])

    def __post_init__(self) -> None:
        if (self.eigenvalues is None) == (self.kronecker_eigenvalues is None):
            raise ValueError("give either the full eigenvalues [out, in] (EK-FAC) or kronecker_eigenvalues (g, a)")

    def diagonal(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Lambda [out, in] (formed from (g, a) for K-FAC: a temporary the size of the layer's weight)."""
        if self.eigenvalues is not None:
            return self.eigenvalues.to(device or self.eigenvalues.device)
        g, a = self.kronecker_eigenvalues
        return torch.outer(g.to(device or g.device), a.to(device or a.device))  # [out, in]

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """(H + lambda I)^-1 vec(M) for M [..., out, in], returned as [..., out, in] in M's dtype."""
        q_a = self.q_activation.to(matrix.device)
        q_g = self.q_gradient.to(matrix.device)
        rotated = q_g.T @ matrix.to(q_a.dtype) @ q_a  # [..., out, in]
        rotated = rotated / (self.diagonal(matrix.device) + self.damping)
        return (q_g @ rotated @ q_a.T).to(matrix.dtype)

    def explicit(self) -> torch.Tensor:
        """H + lambda I as a dense [out*in, out*in] matrix in row-major vec(M) order (tests only)."""
        basis = torch.kron(self.q_gradient, self.q_activation)  # [out*in, out*in]
        return basis @ torch.diag(self.diagonal().flatten() + self.damping) @ basis.T


class SymmetricSum:
    """A running sum of symmetric n x n matrices that stores only the lower triangle: n(n+1)/2 + O(n) numbers.

    Rectangular full packing (as LAPACK's RFP format): with k = ceil(n/2) and the matrix split into
    blocks [[A11, .], [A21, A22]] (A11 k x k, A22 (n-k) x (n-k)), `top` [k+1, k] holds tril(A11) below
    its first row and tril(A22)^T on and above its diagonal (disjoint positions), `bottom` [n-k, k] holds A21.
    The float64 K-FAC factor sums thus take the bytes of a float32 matrix. `full()` restores the matrix
    with the upper triangle mirrored from the lower one: `torch.linalg.eigh` reads only the lower
    triangle, so its eigendecomposition is the one of the unpacked sum, bit for bit.
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float64) -> None:
        self.n, self.k = n, (n + 1) // 2
        self.top = torch.zeros(self.k + 1, self.k, dtype=dtype)  # [k+1, k]
        self.bottom = torch.zeros(n - self.k, self.k, dtype=dtype)  # [n-k, k]

    def add_(self, matrix: torch.Tensor) -> None:
        """Add the lower triangle of `matrix` [n, n] (rounded to the sum's dtype)."""
        k, m = self.k, self.n - self.k
        self.top[1:] += matrix[:k, :k].tril().to(self.top.dtype).cpu()
        self.top[:m, :m] += matrix[k:, k:].tril().T.to(self.top.dtype).cpu()  # upper triangle incl. diagonal
        self.bottom += matrix[k:, :k].to(self.bottom.dtype).cpu()

    def lower(self) -> torch.Tensor:
        """The sum's lower triangle [n, n] (zeros above the diagonal): all that `torch.linalg.eigh` reads."""
        k, m = self.k, self.n - self.k
        lower = torch.zeros(self.n, self.n, dtype=self.top.dtype)
        lower[:k, :k] = self.top[1:].tril()
        lower[k:, :k] = self.bottom
        lower[k:, k:] = self.top[:m, :m].triu().T
        return lower

    def full(self) -> torch.Tensor:
        """The symmetric sum [n, n]: the stored lower triangle, mirrored into the upper one."""
        lower = self.lower()
        return lower + lower.tril(-1).T


class KroneckerFactors:
    """A = E[x x^T] [in, in] and G = E[d d^T] [out, out] of one layer, token-weighted, float64.

    Given as the matrices themselves, or as packed token sums (`SymmetricSum`, from FactorAccumulator)
    that `activation` and `gradient` unpack and divide by `n_tokens` on each access.
    """

    def __init__(self, activation: torch.Tensor | SymmetricSum, gradient: torch.Tensor | SymmetricSum,
                 n_tokens: int) -> None:
        self._activation, self._gradient, self.n_tokens = activation, gradient, n_tokens

    def _matrix(self, factor: torch.Tensor | SymmetricSum) -> torch.Tensor:
        return factor.full() / self.n_tokens if isinstance(factor, SymmetricSum) else factor

    @property
    def activation(self) -> torch.Tensor:
        return self._matrix(self._activation)  # [in, in]

    @property
    def gradient(self) -> torch.Tensor:
        return self._matrix(self._gradient)  # [out, out]

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, Q_A, g, Q_G) with non-negative eigenvalues (round-off below zero clamped): A = Q_A diag(a) Q_A^T.

        On one thread: LAPACK's eigh is a long chain of small parallel regions, and while another process
        holds a core each region waits for the descheduled thread (n=256 on the loaded 2-core machine:
        4.5 s per eigh at 2 threads, 36 ms at 1; n=768: 11.8 s against 0.6 s).
        """
        def lower(factor: torch.Tensor | SymmetricSum) -> torch.Tensor:  # eigh reads the lower triangle only
            return factor.lower().div_(self.n_tokens) if isinstance(factor, SymmetricSum) else factor

        with torch_threads(1):
            a, q_a = torch.linalg.eigh(lower(self._activation))  # [in], [in, in]
            g, q_g = torch.linalg.eigh(lower(self._gradient))  # [out], [out, out]
        return a.clamp_min(0), q_a, g.clamp_min(0), q_g


class FactorAccumulator:
    """Sums x x^T and d d^T over real (unpadded) tokens for every layer; a LayerCapture consumer.

    The sums are float64 (they run over many batches, and K-FAC's small eigenvalues would drown in
    float32 round-off of the large ones) but packed (`SymmetricSum`): 4 bytes per entry of each factor.
    """

    def __init__(self, layers: list[TrackedLayer], dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.activation = {layer.name: SymmetricSum(layer.in_augmented, dtype) for layer in layers}
        self.gradient = {layer.name: SymmetricSum(layer.out_features, dtype) for layer in layers}
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
        self.activation[layer.name].add_(real.T @ real)  # [in, in]
        self.gradient[layer.name].add_(d.T @ d)  # [out, out]
        self.n_tokens[layer.name] += int(real.shape[0])

    def factors(self) -> dict[str, KroneckerFactors]:
        """Every layer's factors, holding the packed sums (moved out of the accumulator, not copied): a layer's
        full float64 A and G exist only while it is decomposed."""
        for name, n in self.n_tokens.items():
            if n == 0:
                raise ValueError(f"no tokens reached layer {name}; fit on at least one non-empty batch")
        return {name: KroneckerFactors(self.activation.pop(name), self.gradient.pop(name), n)
                for name, n in self.n_tokens.items()}


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
    """Damped inverses with the K-FAC eigenvalues g a^T (kept as g and a), stored in `dtype`.

    Consumes `factors`: each layer's float64 factors are dropped from the dict once decomposed, so
    the peak is the factors plus one layer's decomposition, not both sets whole. The eigendecomposition
    and lambda (from the mean of g a^T = mean(g) mean(a)) are computed in float64; only the results are
    cast to `dtype`.
    """
    out = {}
    for name in list(factors):
        a, q_a, g, q_g = factors.pop(name).eigen()  # float64
        lam = damping_value(torch.outer(g, a), damping, mode)
        out[name] = DampedKroneckerInverse(q_a.to(dtype), q_g.to(dtype), None, lam,
                                           kronecker_eigenvalues=(g.to(dtype), a.to(dtype)))
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
