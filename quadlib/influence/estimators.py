"""Influence estimators behind one interface: fit(curvature) -> set_reference -> score.

Sign convention (Quad's influence formula): score(z) = grad L(theta, D_ref)^T (H + lambda I)^-1 grad L(theta, z),
i.e. minus the paper's I(z) read as "change in reference loss". A HIGHER score means training on z
is expected to REDUCE the reference loss more; the bandit keeps high scores and its threshold tau
is in these units (losses are mean cross-entropy per token in nats, see loss.py).

The reference set enters as one aggregated gradient, preconditioned once per layer into V_l; a
document's score is then sum_l sum_t delta_{b,t}^T V_l x_{b,t}, contracted inside ONE activation-
gradient backward pass of the summed per-document losses (no per-document gradient is formed).
The same score is the directional derivative of the document's loss along V, which the forward-
only modes compute without a backward pass (directional.py); `InfluenceSettings.mode` picks one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quadlib.influence.capture import augment_bias, backward_pass
from quadlib.influence.directional import (
    ParameterDirection,
    central_difference_scores,
    central_difference_step,
    jvp_scores,
    parameter_direction,
)
from quadlib.influence.kfac import (
    DAMPING_MODES,
    FISHER_MODES,
    DampedKroneckerInverse,
    ekfac_inverses,
    fit_kfac,
    kfac_inverses,
)
from quadlib.influence.layers import TrackedLayer, discover_layers
from quadlib.influence.loss import IGNORE, Batch, summed_token_loss
from quadlib.proxy.loss import document_losses
from quadlib.runstore import atomic_path
from quadlib.settings import setting


SCORING_MODES = ("reverse", "jvp", "central_difference")
# Relative central-difference steps tried when InfluenceSettings.fd_step is None: truncation error
# grows as c^2 and float32 round-off as 1/c, and where they cross depends on the model. On SmolLM2-135M
# (kfac_joint_qkv, 4 LAMBADA passages) the error fell from 0.82 at c = 1e-2 to 0.026 at 1e-4, the
# smallest step tried then, so the grid reaches 1e-5.
FD_STEP_CANDIDATES = (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
# The fastest mode that met the bar (Spearman >= 0.999 and top-5% overlap >= 0.95 against reverse on
# real pool documents, float32 warm-up proxy; docs/influence_performance.md).
DEFAULT_MODE = "central_difference"


@dataclass
class InfluenceSettings:
    """How curvature is fitted and damped, and which layers are tracked."""

    damping: float = setting(0.1, "lambda: an absolute value, or a multiple of each block's mean eigenvalue")
    damping_mode: str = setting("relative", f"one of {DAMPING_MODES}; relative = damping x mean eigenvalue per layer")
    fisher: str = setting("sampled", f"one of {FISHER_MODES}: labels drawn from the model (true Fisher ~ GGN) "
                                     "or the data's labels (empirical Fisher)")
    layer_filter: str = setting("", "regular expression over tracked layer names; empty = every MLP/attention layer")
    batch_size: int = setting(8, "documents per forward/backward pass")
    seed: int = setting(0, "seed of the sampled Fisher labels")
    mode: str = setting(DEFAULT_MODE, "how a document's score is computed: reverse (contraction inside one "
                                      "activation-gradient backward, exact), jvp (forward-mode AD along V, exact), "
                                      "central_difference (two no-grad forwards at theta +- eps V, the fastest; "
                                      "float32 or wider models only); the cosine estimator needs ||grad z|| and "
                                      "always runs reverse")
    fd_step: float | None = setting(
        None, "central_difference: relative step c, eps = c ||theta_tracked|| / ||V||; None chooses c per model "
              "at set_reference: the candidate of FD_STEP_CANDIDATES closest to reverse mode on the first "
              "reference batch (a fixed 1e-2 gave 1e-2 relative error on a random-init 4x256 model, 1e-3 gave 5e-4; "
              "on SmolLM2-135M 1e-2 gave Spearman 0.79 against reverse, the chosen 1e-4 0.99991)")

    def __post_init__(self) -> None:
        if self.damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode {self.damping_mode!r} is not one of {DAMPING_MODES}")
        if self.fisher not in FISHER_MODES:
            raise ValueError(f"fisher {self.fisher!r} is not one of {FISHER_MODES}")
        if self.damping < 0 or self.batch_size < 1:
            raise ValueError("damping must be >= 0 and batch_size >= 1")
        if self.mode not in SCORING_MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {SCORING_MODES}")
        if self.fd_step is not None and not 0 < self.fd_step < 1:
            raise ValueError(f"fd_step must be None (chosen per model) or in (0, 1), got {self.fd_step}")


PRESETS: dict[str, InfluenceSettings] = {
    "default": InfluenceSettings(),
    # Kronfluence's heuristic damping (0.1 x mean eigenvalue) with the data's labels: the peer cross-check.
    "kronfluence_match": InfluenceSettings(damping=0.1, damping_mode="relative", fisher="empirical"),
    "light_damping": InfluenceSettings(damping=0.01, damping_mode="relative"),
    "cpu_small_batch": InfluenceSettings(batch_size=4),
}

Curvature = Callable[[nn.Module, list[TrackedLayer], list[Batch], InfluenceSettings],
                     dict[str, DampedKroneckerInverse] | None]


def _no_curvature(model: nn.Module, layers: list[TrackedLayer], batches: list[Batch],
                  settings: InfluenceSettings) -> None:
    return None


def curvature_dtype(model: nn.Module) -> torch.dtype:
    """Eigenbases are kept in the model's precision: float64 for a float64 model, else float32."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def _kfac(model: nn.Module, layers: list[TrackedLayer], batches: list[Batch],
          settings: InfluenceSettings) -> dict[str, DampedKroneckerInverse]:
    factors = fit_kfac(model, layers, batches, fisher=settings.fisher, seed=settings.seed)
    return kfac_inverses(factors, settings.damping, settings.damping_mode, curvature_dtype(model))


def _ekfac(model: nn.Module, layers: list[TrackedLayer], batches: list[Batch],
           settings: InfluenceSettings) -> dict[str, DampedKroneckerInverse]:
    factors = fit_kfac(model, layers, batches, fisher=settings.fisher, seed=settings.seed)
    return ekfac_inverses(model, layers, batches, factors, settings.damping, settings.damping_mode,
                          fisher=settings.fisher, seed=settings.seed, dtype=curvature_dtype(model))


CURVATURES: dict[str, Curvature] = {"none": _no_curvature, "kfac": _kfac, "ekfac": _ekfac}


@dataclass(frozen=True)
class EstimatorSpec:
    """An estimator is a choice of layers, curvature and normalisation."""

    groups: tuple[str, ...]
    curvature: str
    cosine: bool = False
    description: str = ""


ALL_LAYERS = ("mlp", "attn_qkv_joint", "attn_out")
ESTIMATORS: dict[str, EstimatorSpec] = {
    "dot": EstimatorSpec(ALL_LAYERS, "none", description="no-Hessian: gradient dot product"),
    "cosine": EstimatorSpec(ALL_LAYERS, "none", cosine=True, description="no-Hessian: gradient cosine"),
    "kfac_mlp": EstimatorSpec(("mlp",), "kfac", description="K-FAC on MLP layers only"),
    "kfac_attn_indep": EstimatorSpec(("mlp", "attn_qkv_independent", "attn_out"), "kfac",
                                     description="K-FAC on MLP and attention, Q, K, V independent"),
    "kfac_joint_qkv": EstimatorSpec(ALL_LAYERS, "kfac", description="Quad: K-FAC with Q, K, V as one joint layer"),
    "ekfac_joint_qkv": EstimatorSpec(ALL_LAYERS, "ekfac", description="EK-FAC with Q, K, V as one joint layer"),
}
DEFAULT_ESTIMATOR = "kfac_joint_qkv"


def _predicted_tokens(batch: Batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class InfluenceEstimator:
    """fit(model, batches) -> set_reference(model, batches) -> score(model, batch) -> Tensor[B]."""

    def __init__(self, spec: EstimatorSpec, settings: InfluenceSettings | None = None, name: str = "") -> None:
        if spec.curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {spec.curvature!r}; known: {sorted(CURVATURES)}")
        self.spec = spec
        self.name = name
        self.settings = settings or InfluenceSettings()
        self.layers: list[TrackedLayer] = []
        self.inverses: dict[str, DampedKroneckerInverse] | None = None
        self.fitted = False
        self.direction: dict[str, torch.Tensor] = {}  # V_l [out, in(+1)], in the model's precision (curvature_dtype)
        self.reference_norm = 0.0  # ||grad L(D_ref)|| over tracked layers (cosine)
        self._cast: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self._tangents: dict[tuple[torch.dtype, torch.device], ParameterDirection] = {}
        self._calibration_batch: Batch | None = None  # the first reference batch, to choose fd_step on
        self.chosen_fd_step: float | None = None  # c chosen for this model when settings.fd_step is None
        self.fd_errors: dict[float, float] = {}  # candidate c -> max |CD - reverse| / max |reverse| (calibration)

    def _bind(self, model: nn.Module) -> None:
        layers = discover_layers(model, self.spec.groups, self.settings.layer_filter)
        if self.layers and [layer.name for layer in layers] != [layer.name for layer in self.layers]:
            raise ValueError(f"estimator {self.name!r} was fitted on another model layout")
        self.layers = layers

    # -- curvature -------------------------------------------------------------------------
    def fit(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        """Fit the curvature on pool batches (a no-op for the no-Hessian estimators)."""
        self._bind(model)
        self.inverses = CURVATURES[self.spec.curvature](model, self.layers, list(batches), self.settings)
        self.fitted = True

    def precondition(self, layer_name: str, matrix: torch.Tensor) -> torch.Tensor:
        """(H_l + lambda I)^-1 applied to a layer gradient [..., out, in(+1)] (identity without curvature)."""
        if not self.fitted:
            raise RuntimeError(f"call fit() on estimator {self.name!r} before preconditioning or scoring")
        return matrix if self.inverses is None else self.inverses[layer_name].apply(matrix)

    # -- reference -------------------------------------------------------------------------
    def set_reference(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        """Aggregate grad L(theta, D_ref) (mean CE per reference token) and precondition it once per layer.

        The sum over reference tokens is accumulated in float64 (it may run over many batches); V is
        kept in the model's precision (`curvature_dtype`: float32 for a float32 model), the precision
        every scorer contracts it in, so no second copy of V is made for scoring.
        """
        self._bind(model)
        sums = {layer.name: torch.zeros(layer.out_features, layer.in_augmented, dtype=torch.float64)
                for layer in self.layers}
        n_tokens = 0
        self._calibration_batch = None
        for batch in batches:
            if self._calibration_batch is None:
                self._calibration_batch = batch
            mask = batch["attention_mask"].bool()

            def consumer(layer: TrackedLayer, x: torch.Tensor, delta: torch.Tensor) -> None:
                real = x[mask].double()  # [N, in]
                real = augment_bias(real) if layer.has_bias else real
                sums[layer.name] += (delta[mask].double().T @ real).cpu()  # [out, in(+1)]

            backward_pass(model, self.layers, consumer, lambda b=batch: summed_token_loss(model, b)[0])
            n_tokens += _predicted_tokens(batch)
        if n_tokens == 0:
            raise ValueError("the reference batches contain no predicted token")
        gradients = {name: total / n_tokens for name, total in sums.items()}
        self.reference_norm = math.sqrt(sum(float(g.square().sum()) for g in gradients.values()))
        dtype = curvature_dtype(model)
        self.direction = {name: self.precondition(name, gradients.pop(name)).to(dtype) for name in list(gradients)}
        self._cast.clear()
        self._tangents.clear()
        self.chosen_fd_step, self.fd_errors = None, {}
        if self.fd_step is None and self.scoring_mode == "central_difference":
            self.calibrate_fd_step(model, self._calibration_batch)

    def calibrate_fd_step(self, model: nn.Module, batch: Batch) -> float:
        """Choose the relative step c for this model: the candidate whose central differences on `batch`
        are closest to the exact reverse-mode scores (max error relative to the largest |score|).

        eps = c ||theta_tracked|| / ||V|| scales with the weights and the direction; c itself trades
        truncation (c^2) against round-off (1/c), which depends on the model, so it is measured here:
        one reverse pass and two forwards per candidate on one batch.
        """
        exact = _reverse_scores(self, model, batch)  # [B] float64
        scale = float(exact.abs().max())
        if scale == 0.0:
            raise ValueError("every reference document scores 0; cannot choose a central-difference step")
        tangents = self.tangents(model)
        self.fd_errors = {}
        for c in FD_STEP_CANDIDATES:
            eps = central_difference_step(model, tangents, c)
            approx = central_difference_scores(model, batch, tangents, eps)
            self.fd_errors[c] = float((approx - exact).abs().max()) / scale
        self.chosen_fd_step = min(self.fd_errors, key=self.fd_errors.get)
        return self.chosen_fd_step

    @property
    def fd_step(self) -> float | None:
        """The relative central-difference step c in use: the settings' own, else the one chosen (or None)."""
        return self.settings.fd_step if self.settings.fd_step is not None else self.chosen_fd_step

    def _direction_as(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = self.direction[name].to(dtype=like.dtype, device=like.device)
        return self._cast[key]

    def _check_reference(self, model: nn.Module) -> None:
        if not self.direction:
            raise RuntimeError(f"call set_reference() on estimator {self.name!r} before scoring")
        self._bind(model)

    def tangents(self, model: nn.Module) -> ParameterDirection:
        """V on the model's weights (its dtype/device), cached; shared with reverse mode's cast."""
        self._check_reference(model)
        like = next(model.parameters())
        key = (like.dtype, like.device)
        if key not in self._tangents:
            cast = {layer.name: self._direction_as(layer.name, like) for layer in self.layers}
            self._tangents[key] = parameter_direction(model, self.layers, cast)
        return self._tangents[key]

    def parameter_direction(self, model: nn.Module) -> tuple[ParameterDirection, float]:
        """V on the model's weights and the central-difference step eps = c ||theta_tracked|| / ||V||.

        c is InfluenceSettings.fd_step, or the one chosen for this model on the first reference batch.
        """
        tangents = self.tangents(model)
        if self.fd_step is None:
            if self._calibration_batch is None:
                raise RuntimeError(f"estimator {self.name!r} has no central-difference step: set_reference "
                                   "chooses it (or set InfluenceSettings.fd_step)")
            self.calibrate_fd_step(model, self._calibration_batch)
        return tangents, central_difference_step(model, tangents, self.fd_step)

    # -- scoring ---------------------------------------------------------------------------
    @property
    def scoring_mode(self) -> str:
        """The mode `score` runs: the settings' mode, or reverse for cosine (it needs ||grad z||)."""
        return "reverse" if self.spec.cosine else self.settings.mode

    def score_layers(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Per tracked layer, each document's contribution [B] (float64); they sum to the reverse score.

        Always reverse mode: a forward-only pass gives only the total along V, not its split by layer.
        """
        self._check_reference(model)
        mask = batch["attention_mask"].to(torch.float64)  # [B, T]
        dots: dict[str, torch.Tensor] = {}
        squared_norms: dict[str, torch.Tensor] = {}

        def consumer(layer: TrackedLayer, x: torch.Tensor, delta: torch.Tensor) -> None:
            v = self._direction_as(layer.name, x)  # [out, in(+1)]
            per_token = ((delta @ v[:, :layer.in_features]) * x).sum(-1)  # [B, T]
            if layer.has_bias:
                per_token = per_token + delta @ v[:, -1]
            m = mask.to(x.device)
            dots[layer.name] = (per_token.double() * m).sum(1).cpu()
            if self.spec.cosine:
                squared_norms[layer.name] = per_document_squared_norm(x, delta, m.to(x.dtype), layer.has_bias).cpu()

        backward_pass(model, self.layers, consumer, lambda: document_losses(model, batch).sum())
        if not self.spec.cosine:
            return dots
        norms = torch.stack(list(squared_norms.values())).sum(0).sqrt() * self.reference_norm  # [B]
        return {name: dot / norms.clamp_min(torch.finfo(torch.float64).tiny) for name, dot in dots.items()}

    def score(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Each document's influence score [B] (float64, higher = lowers reference loss more), by `scoring_mode`."""
        return SCORERS[self.scoring_mode](self, model, batch)

    # -- memory ----------------------------------------------------------------------------
    def held_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this estimator holds, by role, each storage counted once.

        eigenbases: Q_A and Q_G of every tracked layer; eigenvalues: K-FAC's (g, a) or EK-FAC's diagonal;
        direction: V; scoring copies: V cast to another dtype/device and tangents that are not views of V.
        """
        seen: set[int] = set()

        def size(tensors: Iterable[torch.Tensor]) -> int:
            total = 0
            for tensor in tensors:
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            return total

        inverses = list((self.inverses or {}).values())
        return {
            "eigenbases": size(t for inv in inverses for t in (inv.q_activation, inv.q_gradient)),
            "eigenvalues": size(t for inv in inverses
                                for t in ((inv.eigenvalues,) if inv.kronecker_eigenvalues is None
                                          else inv.kronecker_eigenvalues)),
            "direction": size(self.direction.values()),
            "scoring copies": size([*self._cast.values(), *(t for tangents in self._tangents.values()
                                                            for t in tangents.values())]),
        }

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Curvature and reference direction as safetensors (open format, no pickle)."""
        tensors = {f"direction/{name}": v.contiguous() for name, v in self.direction.items()}
        for name, inv in (self.inverses or {}).items():
            tensors[f"q_activation/{name}"] = inv.q_activation.contiguous()
            tensors[f"q_gradient/{name}"] = inv.q_gradient.contiguous()
            if inv.kronecker_eigenvalues is None:
                tensors[f"eigenvalues/{name}"] = inv.eigenvalues.contiguous()
            else:
                tensors[f"gradient_eigenvalues/{name}"], tensors[f"activation_eigenvalues/{name}"] = (
                    e.contiguous() for e in inv.kronecker_eigenvalues)
            tensors[f"damping/{name}"] = torch.tensor(inv.damping, dtype=torch.float64)
        tensors["reference_norm"] = torch.tensor(self.reference_norm, dtype=torch.float64)
        if self.chosen_fd_step is not None:
            tensors["chosen_fd_step"] = torch.tensor(self.chosen_fd_step, dtype=torch.float64)
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"estimator": self.name})

    def load(self, model: nn.Module, path: str | Path) -> None:
        """Restore what `save` wrote, for the same model layout."""
        self._bind(model)
        tensors = load_file(str(path))
        names = [layer.name for layer in self.layers]
        if self.spec.curvature != "none":
            self.inverses = {name: _load_inverse(tensors, name) for name in names}
        self.fitted = True
        self.direction = {name: tensors[f"direction/{name}"] for name in names if f"direction/{name}" in tensors}
        self.reference_norm = float(tensors["reference_norm"])
        self.chosen_fd_step = float(tensors["chosen_fd_step"]) if "chosen_fd_step" in tensors else None
        self._calibration_batch = None
        self._cast.clear()
        self._tangents.clear()


def _load_inverse(tensors: dict[str, torch.Tensor], name: str) -> DampedKroneckerInverse:
    """One layer's inverse as `save` wrote it: EK-FAC's full eigenvalues, or K-FAC's (g, a) (an older file's
    full K-FAC eigenvalues load as they are)."""
    kronecker = None
    if f"gradient_eigenvalues/{name}" in tensors:
        kronecker = (tensors[f"gradient_eigenvalues/{name}"], tensors[f"activation_eigenvalues/{name}"])
    return DampedKroneckerInverse(tensors[f"q_activation/{name}"], tensors[f"q_gradient/{name}"],
                                  tensors.get(f"eigenvalues/{name}"), float(tensors[f"damping/{name}"]),
                                  kronecker_eigenvalues=kronecker)


def per_document_squared_norm(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """||sum_t d_t x_t^T||_F^2 per document [B], via token Gram matrices when T^2 (in+out) < T in out."""
    _, tokens, n_in = x.shape
    n_out = delta.shape[-1]
    x = x * mask[..., None]
    if tokens * (n_in + n_out) < n_in * n_out:
        gram_x = x @ x.transpose(1, 2)  # [B, T, T]
        if has_bias:
            gram_x = gram_x + mask[:, :, None] * mask[:, None, :]
        gram_d = delta @ delta.transpose(1, 2)  # [B, T, T]
        return (gram_x * gram_d).sum((1, 2)).double()
    x = augment_bias(x) * mask[..., None] if has_bias else x
    return torch.einsum("bto,bti->boi", delta, x).square().sum((1, 2)).double()  # via [B, out, in]


def _reverse_scores(estimator: InfluenceEstimator, model: nn.Module, batch: Batch) -> torch.Tensor:
    return torch.stack(list(estimator.score_layers(model, batch).values())).sum(0)


def _jvp_scores(estimator: InfluenceEstimator, model: nn.Module, batch: Batch) -> torch.Tensor:
    return jvp_scores(model, batch, estimator.tangents(model))


def _central_difference_scores(estimator: InfluenceEstimator, model: nn.Module, batch: Batch) -> torch.Tensor:
    tangents, eps = estimator.parameter_direction(model)
    return central_difference_scores(model, batch, tangents, eps)


SCORERS: dict[str, Callable[[InfluenceEstimator, nn.Module, Batch], torch.Tensor]] = {
    "reverse": _reverse_scores, "jvp": _jvp_scores, "central_difference": _central_difference_scores}


def make_estimator(name: str = DEFAULT_ESTIMATOR, settings: InfluenceSettings | str | None = None) -> InfluenceEstimator:
    """An estimator from the registry; `settings` may be an InfluenceSettings or a PRESETS name."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {sorted(ESTIMATORS)}")
    if isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f"unknown settings preset {settings!r}; known: {sorted(PRESETS)}")
        settings = PRESETS[settings]
    return InfluenceEstimator(ESTIMATORS[name], settings, name)
