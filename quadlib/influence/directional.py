"""Forward-only influence scores: the directional derivative of each document's loss along V.

With V = (H + lambda I)^-1 grad L(theta, D_ref) (the preconditioned reference direction, one
[out, in(+1)] block per tracked layer), the reverse-mode score grad L(theta, z)^T V is the
directional derivative d/de L(theta + e V, z) at e = 0 (Quad's influence formula read along V).
It therefore needs no backward pass:
- "jvp": forward-mode AD (`torch.func.jvp`) with tangent V on the tracked weights, exact;
- "central_difference": (L(theta + eps V, z) - L(theta - eps V, z)) / (2 eps) from two no-grad
  forwards, with eps = c ||theta_tracked|| / ||V|| (c = `fd_step`), i.e. a relative step c on
  the tracked weights. Error O(eps^2) truncation plus O(u L / eps) round-off (u: unit round-off).
jvp substitutes dual tensors through `functional_call`; the central difference swaps each tracked
module's weights for perturbed copies only while that module runs and puts the originals back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.profiler import record_function
from transformers.pytorch_utils import Conv1D

from quadlib.influence.layers import TrackedLayer
from quadlib.influence.loss import Batch
from quadlib.proxy.loss import document_losses

ParameterDirection = dict[str, torch.Tensor]  # parameter name -> tangent shaped like the parameter


def parameter_direction(model: nn.Module, layers: list[TrackedLayer], direction: dict[str, torch.Tensor]
                        ) -> ParameterDirection:
    """Per-layer V [out, in(+1)] mapped back onto module weights and biases, in V's dtype and device.

    Joint layers are split back into their parts' rows (Llama q/k/v); Conv1D weights are [in, out].
    A module that is one whole part gets VIEWS of V (no copy); only a module split into several
    layers by rows (GPT-2's c_attn as independent Q, K, V) gets a tensor of its own.
    Parameters of untracked modules get no entry (their tangent is zero).
    """
    modules = dict(model.named_modules())
    out: ParameterDirection = {}
    for layer in layers:
        v = direction[layer.name]  # [out, in(+1)]
        start = 0
        for part in layer.parts:
            module = modules[part.module_name]
            conv = isinstance(module, Conv1D)  # weight [in, out]
            n_rows = len(part.rows) if part.rows is not None else module.weight.shape[1 if conv else 0]
            block = v[start:start + n_rows]  # [rows, in(+1)]
            start += n_rows
            weight, bias = block[:, :layer.in_features], block[:, -1] if layer.has_bias else None
            weight = weight.T if conv else weight  # the module's own layout
            names = (f"{part.module_name}.weight", f"{part.module_name}.bias")
            if part.rows is None:
                out[names[0]] = weight
                if bias is not None:
                    out[names[1]] = bias
                continue
            rows = part.rows.to(v.device)
            full = out.setdefault(names[0], torch.zeros_like(module.weight, dtype=v.dtype, device=v.device))
            if conv:
                full[:, rows] = weight
            else:
                full[rows] = weight
            if bias is not None:
                out.setdefault(names[1], torch.zeros_like(module.bias, dtype=v.dtype, device=v.device))[rows] = bias
    return out


@contextmanager
def perturbed_weights(model: nn.Module, tangents: ParameterDirection, scale: float) -> Iterator[None]:
    """Each tracked module computes with theta + scale * V only while it runs, so one layer's perturbed
    copy exists at a time; its original tensors are put back after, so the model is restored exactly."""
    by_module: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tangent in tangents.items():
        module_name, leaf = name.rsplit(".", 1)
        by_module.setdefault(module_name, []).append((leaf, tangent))
    originals: dict[tuple[str, str], torch.Tensor] = {}

    def restore(module_name: str, module: nn.Module) -> None:
        for leaf, _ in by_module[module_name]:
            if (module_name, leaf) in originals:
                getattr(module, leaf).data = originals.pop((module_name, leaf))

    def hooks(module_name: str) -> tuple[object, object]:
        def before(module: nn.Module, args: tuple[object, ...]) -> None:
            for leaf, tangent in by_module[module_name]:
                parameter = getattr(module, leaf)
                originals[(module_name, leaf)] = parameter.data
                parameter.data = parameter.data + scale * tangent
        return before, lambda module, args, output: restore(module_name, module)

    modules = dict(model.named_modules())
    handles = []
    for module_name in by_module:
        before, after = hooks(module_name)
        handles += [modules[module_name].register_forward_pre_hook(before),
                    modules[module_name].register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module_name in by_module:
            restore(module_name, modules[module_name])  # after an exception mid-forward


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch to the model's eager attention (SDPA has no forward-mode AD rule on CPU); restore after."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if config is not None and previous is not None:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if config is not None and previous is not None:
            config._attn_implementation = previous


def jvp_scores(model: nn.Module, batch: Batch, tangents: ParameterDirection) -> torch.Tensor:
    """d/de L(theta + e V, z) at e = 0 per document [B], by forward-mode AD."""
    names = list(tangents)
    own = dict(model.named_parameters())
    primals = tuple(own[name].detach() for name in names)

    def losses(*weights: torch.Tensor) -> torch.Tensor:
        return document_losses(_WithParameters(model, dict(zip(names, weights, strict=True))), batch)

    was_training = model.training
    model.eval()
    try:
        with eager_attention(model), torch.no_grad(), record_function("influence.forward"):
            _, derivative = jvp(losses, primals, tuple(tangents[name] for name in names))
    finally:
        model.train(was_training)
    return derivative.double()


def central_difference_step(model: nn.Module, tangents: ParameterDirection, relative_step: float) -> float:
    """eps = c ||theta_tracked|| / ||V||: moves the tracked weights by a relative step c."""
    own = dict(model.named_parameters())
    theta = math.sqrt(sum(float(own[name].detach().double().square().sum()) for name in tangents))
    v = math.sqrt(sum(float(t.double().square().sum()) for t in tangents.values()))
    if v == 0.0:
        raise ValueError("the reference direction is zero; central differences need a non-zero V")
    return relative_step * theta / v


def central_difference_scores(model: nn.Module, batch: Batch, tangents: ParameterDirection,
                              eps: float) -> torch.Tensor:
    """(L(theta + eps V, z) - L(theta - eps V, z)) / (2 eps) per document [B], two no-grad forwards."""
    own = dict(model.named_parameters())
    low = sorted({str(own[name].dtype) for name in tangents if own[name].dtype in (torch.float16, torch.bfloat16)})
    if low:
        raise ValueError(f"central differences of a {low[0]} model lose the score to round-off (unit round-off / "
                         "step); use mode='jvp' or 'reverse', or score a float32 copy of the model")
    was_training = model.training
    model.eval()
    losses = []
    try:
        with torch.no_grad(), record_function("influence.forward"):
            for sign in (1.0, -1.0):
                with perturbed_weights(model, tangents, sign * eps):
                    losses.append(document_losses(model, batch).double())
    finally:
        model.train(was_training)
    return (losses[0] - losses[1]) / (2 * eps)


class _WithParameters(nn.Module):
    """`model` called with some parameters substituted (torch.func.functional_call); weights untouched."""

    def __init__(self, model: nn.Module, parameters: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.__dict__["wrapped"] = model  # not registered: no parameters of its own
        self.parameters_in_use = parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        return functional_call(self.wrapped, self.parameters_in_use, args=(),
                               kwargs={"input_ids": input_ids, "attention_mask": attention_mask}, strict=False)
